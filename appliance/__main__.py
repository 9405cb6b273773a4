"""``python -m appliance`` is ``portico``."""

from appliance.cli.main import main

raise SystemExit(main())
