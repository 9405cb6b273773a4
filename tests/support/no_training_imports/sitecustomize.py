"""Put this folder on PYTHONPATH to make torch, MONAI, NVFlare and onnx unimportable in a process and its children.

Each attempt is appended to the file named by ``PORTICO_BLOCKED_LOG`` (stderr when unset), so a test can prove that
the serve and demo paths run in a virtual environment without the ``train`` and ``fl`` extras (issue #10): nothing
tries to import them, not even under ``try``.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import traceback
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

#: top-level modules to refuse: ``PORTICO_BLOCKED_MODULES`` (comma-separated), else the train and fl extras
BLOCKED = frozenset(os.environ.get("PORTICO_BLOCKED_MODULES", "torch,monai,nvflare,onnx,onnxscript").split(","))


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.split(".")[0] not in BLOCKED:
            return None
        caller = next((f"{f.filename}:{f.lineno}" for f in reversed(traceback.extract_stack())
                       if "importlib" not in f.filename and f.filename != __file__), "?")
        with open(os.environ.get("PORTICO_BLOCKED_LOG", "/dev/stderr"), "a", encoding="utf-8") as log:
            log.write(f"{fullname} <- {caller}\n")
        raise ModuleNotFoundError(f"{fullname} is blocked (training package)", name=fullname)


sys.meta_path.insert(0, _Blocker())
