"""The dashboard's Rules page: the active rules file with line numbers, validated, and its warnings.

The same checks as ``portico rules check`` (:func:`dicom_router.rules.parse_rules`, then
:func:`appliance.routing_explain.modality_warnings` against the installed models); each problem keeps the
line it names so the page can mark it. Which rules would fire for a stored study is the routing
explanation (``GET /studies/{uid}/routing``): a dry run that creates no job.
"""

from __future__ import annotations

import re
from typing import Any

from appliance.models import ModelRegistry
from appliance.routing_explain import modality_warnings
from appliance.settings import Settings
from dicom_router.errors import RulesError
from dicom_router.rules import parse_rules

#: a rules file is a few kB; the page shows at most this much of one
MAX_RULES_BYTES = 256 * 1024


def rules_file(settings: Settings, registry: ModelRegistry) -> dict[str, Any]:
    """The active rules file: its lines, whether it is valid, its problems (with lines), rules and warnings."""
    path = settings.rules_path
    out: dict[str, Any] = {"path": str(path), "exists": False, "lines": [], "truncated": False, "valid": False,
                           "problems": [], "rules": [], "warnings": []}
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RULES_BYTES + 1)
    except OSError as exc:
        out["problems"] = [{"line": None, "message": f"cannot read the rules file ({exc.strerror or exc})"}]
        return out
    out["exists"] = True
    out["truncated"] = len(data) > MAX_RULES_BYTES
    text = data[:MAX_RULES_BYTES].decode("utf-8", errors="replace")
    out["lines"] = text.splitlines()
    if out["truncated"]:
        out["problems"] = [{"line": None, "message": f"the file is larger than {MAX_RULES_BYTES // 1024} KiB: "
                                                     "not a rules file"}]
        return out
    source = path.name
    try:
        rules = parse_rules(text, source)
    except RulesError as exc:
        out["problems"] = [_problem(source, p) for p in exc.problems] or [{"line": None, "message": str(exc)}]
        return out
    out["valid"] = True
    out["rules"] = [{"name": r.name, "model": r.model, "model_version": r.model_version, "describe": r.describe()}
                    for r in rules.rules]
    out["warnings"] = modality_warnings(rules, registry)
    return out


def _problem(source: str, text: str) -> dict[str, Any]:
    """``source:12: where: what`` as ``{line: 12, message: "where: what"}``."""
    found = re.match(rf"^{re.escape(source)}(?::(\d+))?: (.*)$", text, re.DOTALL)
    if found is None:
        return {"line": None, "message": text}
    return {"line": int(found.group(1)) if found.group(1) else None, "message": found.group(2)}
