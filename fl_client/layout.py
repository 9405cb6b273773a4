"""Where the FL client keeps things, all under one folder in the appliance's data folder."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: environment variable naming the control folder, for code running inside NVFlare's processes
CONTROL_ENV = "PORTICO_FL_CONTROL"


@dataclass(frozen=True)
class SiteLayout:
    """Paths of one appliance's FL state. ``root`` is ``<data_dir>/<fl.workspace>``."""

    root: Path

    @property
    def site(self) -> Path:
        """NVFlare's workspace: the installed kit (``startup/``, ``local/``) and its run files."""
        return self.root / "site"

    @property
    def home(self) -> Path:
        """HOME of the NVFlare processes (``~/.nvflare`` lands here, not in the user's home)."""
        return self.root / "home"

    @property
    def tmp(self) -> Path:
        """TMPDIR of the NVFlare processes."""
        return self.root / "tmp"

    @property
    def control(self) -> Path:
        """Portico's side: approvals, status, cohorts, per-job outputs. Read by the site components."""
        return self.root / "portico"

    @property
    def request(self) -> Path:
        """Distributed provisioning: the site's own private key and certificate request."""
        return self.root / "request"

    @property
    def approvals(self) -> Path:
        return self.control / "approvals.json"

    @property
    def pending(self) -> Path:
        return self.control / "pending"

    @property
    def status_file(self) -> Path:
        return self.control / "status.json"

    @property
    def supervisor_file(self) -> Path:
        return self.control / "supervisor.json"

    @property
    def enrolment_file(self) -> Path:
        return self.control / "enrolment.json"

    @property
    def site_config(self) -> Path:
        """What the trainer may use: allowed models, cohort index files, device (written by Portico)."""
        return self.control / "site.json"

    @property
    def cohorts(self) -> Path:
        return self.control / "cohorts"

    @property
    def jobs(self) -> Path:
        return self.control / "jobs"

    def job_dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.jobs / job_id

    def ensure(self) -> None:
        for folder in (self.root, self.home, self.tmp, self.control, self.pending, self.cohorts, self.jobs):
            folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @classmethod
    def from_control(cls, control: Path) -> SiteLayout:
        return cls(control.parent)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename).

    Written by root into a folder another user owns (the FL user's box, :mod:`fl_client.box`), the
    file is that user's, so the NVFlare side can read what the appliance wrote (an approval).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if os.geteuid() == 0:
            folder = os.stat(path.parent)
            if folder.st_uid != 0:
                os.fchown(fd, folder.st_uid, folder.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when it is absent or half-written."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default
