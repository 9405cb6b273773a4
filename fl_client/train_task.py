"""Entry script NVFlare's in-process Client API runs (``task_script_path``); the code is in trainer.py."""

import sys

from fl_client.trainer import run

if __name__ == "__main__":
    run(sys.argv[1:])
