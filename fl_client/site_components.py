"""Site components loaded by NVFlare inside the client's processes (named in ``local/``).

- :class:`SiteJobGate` (client parent): a job runs here only after a site administrator approved it;
  remote shell commands and remote shutdown/restart are refused.
- :class:`ApprovedContentLauncher` (client parent): starts a job process only for a deployed app whose
  content hash is the one the site approved.
- :class:`SiteStatusWriter` (client parent): connection state and running jobs, for the appliance.
- :class:`OutgoingLedger` (job process, last result filter): checks that a result holds only
  numeric weights and metrics, refuses anything else, and records what left the site.

They talk to the appliance only through files in the control folder (see :mod:`fl_client.layout`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import ContentBlockedException, Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, JobConstants
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.job_launcher.client_process_launcher import ClientProcessJobLauncher

from fl_client.approvals import Approvals
from fl_client.job_review import review_deployed
from fl_client.kit import enrolment
from fl_client.layout import SiteLayout, read_json, write_json
from fl_client.privacy_budget import PrivacyBudget

log = logging.getLogger(__name__)

#: commands that would deploy or start a job at this site
JOB_COMMANDS = frozenset({"check_resources", "submit_job", "deploy_app", "start_app", "start_job"})
#: never run at a site whatever the server's authorization says
REFUSED_COMMANDS = frozenset({"pwd", "ls", "cat", "head", "tail", "grep", "shutdown", "restart", "call",
                              "app_command"})
#: meta keys a result may carry (NVFlare's own and the trainer's); values must be numbers or these strings
ALLOWED_META_STRINGS = frozenset({"params_type", "processed_algorithm", "model_format", "data_kind", "kind"})
NUMERIC = (int, float, bool, np.integer, np.floating, np.bool_)


class SiteJobGate(FLComponent):  # type: ignore[misc]
    """Deny-by-default approval of jobs, read from the appliance's approvals file on every check."""

    def __init__(self, control_dir: str) -> None:
        super().__init__()
        self.layout = SiteLayout.from_control(Path(control_dir))
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.AUTHORIZE_COMMAND_CHECK:
            return
        command = str(fl_ctx.get_prop(FLContextKey.COMMAND_NAME, ""))
        items = fl_ctx.get_prop(FLContextKey.SECURITY_ITEMS, {}) or {}
        meta = items.get(FLContextKey.JOB_META) or {}
        reason = self.check(command, meta if isinstance(meta, dict) else {},
                            str(items.get(FLContextKey.USER_NAME, "")))
        if reason is not None:
            fl_ctx.set_prop(FLContextKey.AUTHORIZATION_RESULT, False, sticky=False)
            fl_ctx.set_prop(FLContextKey.AUTHORIZATION_REASON, reason, sticky=False)

    def check(self, command: str, meta: dict[str, Any], user: str) -> str | None:
        """None when ``command`` may run, else the reason shown to the server."""
        site = "site policy"
        if command in REFUSED_COMMANDS:
            log.warning("refused remote command %r", command)
            return f"{site}: remote command '{command}' is not allowed at this site"
        if command not in JOB_COMMANDS:
            return None
        job_id = str(meta.get("job_id", ""))
        if not job_id:
            return f"{site}: '{command}' without a job is not allowed"
        name = str(meta.get("name", ""))
        submitter = str(meta.get("submitter_name", user))
        info = enrolment(self.layout)
        spent = PrivacyBudget(self.layout).exhausted(info.project) if info else None
        if spent is not None:
            return f"{site}: {spent}; this site contributes no more to the project"
        with self._lock:
            approvals = Approvals(self.layout)
            decision = approvals.decision(job_id)
            if decision is not None and decision.decision == "approved":
                if decision.name == name and decision.submitter == submitter:
                    approvals.clear_pending(job_id)
                    return None
                reason = f"{site}: job '{job_id}' differs from the approved one (name or submitter)"
            elif decision is not None:
                reason = f"{site}: job '{name}' ({job_id}) was rejected by the site: {decision.reason}"
            else:
                reason = (f"{site}: job '{name}' ({job_id}) is waiting for approval by a site administrator "
                          f"(portico fl approve {job_id})")
            approvals.note_pending(job_id, name=name, submitter=submitter, command=command, reason=reason,
                                   meta=_meta_summary(meta))
        return reason


def _meta_summary(meta: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "submitter_name", "submitter_org", "submitter_role", "min_clients", "deploy_map",
            "resource_spec", "submit_time_iso", "scope")
    return {k: meta[k] for k in keep if k in meta}


class ApprovedContentLauncher(ClientProcessJobLauncher):  # type: ignore[misc]
    """NVFlare's process launcher, but only for a deployed app whose content the site approved.

    The approval gate sees a job's meta only (NVFlare authorizes ``check_resources`` and the deploy
    before the app's bytes are unpacked); here, after the deploy and before any process starts, the
    app as received is hashed and compared with the hash the approval bound. A job whose content
    differs does not start, and waits here as a new approval with what it would really run.
    """

    def __init__(self, control_dir: str) -> None:
        super().__init__()
        self.layout = SiteLayout.from_control(Path(control_dir))

    def launch_job(self, job_meta: dict[str, Any], fl_ctx: FLContext) -> Any:
        job_id = str(job_meta.get(JobConstants.JOB_ID, ""))
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        app_dir = Path(workspace.get_app_dir(job_id))
        reason = self.check(job_id, app_dir, job_meta)
        if reason is not None:
            log.error("%s", reason)
            raise RuntimeError(reason)
        return super().launch_job(job_meta, fl_ctx)

    def check(self, job_id: str, app_dir: Path, job_meta: dict[str, Any]) -> str | None:
        """None when the deployed app is the approved content, else the reason (and a pending record)."""
        approvals = Approvals(self.layout)
        decision = approvals.decision(job_id)
        deployed: dict[str, Any] = review_deployed(app_dir) if app_dir.is_dir() \
            else {"client_app_sha256": "", "trainer": {}}
        if decision is None or decision.decision != "approved":
            reason = f"site policy: job {job_id} was not approved here"
        elif not decision.client_app_sha256:
            reason = f"site policy: the approval of job {job_id} binds no content hash; approve its content"
        elif deployed["client_app_sha256"] != decision.client_app_sha256:
            reason = (f"site policy: job {job_id}'s content (sha256 {deployed['client_app_sha256'][:16]}…) differs "
                      f"from the approved content ({decision.client_app_sha256[:16]}…): a new approval is needed")
        else:
            return None
        approvals.note_pending(job_id, name=str(job_meta.get("name", "")),
                               submitter=str(job_meta.get("submitter_name", "")), command="start_job",
                               reason=reason, meta={**_meta_summary(job_meta), "deployed": deployed})
        return reason


class SiteStatusWriter(FLComponent):  # type: ignore[misc]
    """Writes ``status.json``: connected or not, last heartbeat, jobs running in this client."""

    def __init__(self, control_dir: str) -> None:
        super().__init__()
        self.layout = SiteLayout.from_control(Path(control_dir))
        self._lock = threading.Lock()
        self._last_write = 0.0

    def _update(self, **changes: Any) -> None:
        with self._lock:
            status = read_json(self.layout.status_file, {}) or {}
            running = dict(status.get("running_jobs", {}))
            history = list(status.get("history", []))
            launched, ended = changes.pop("launched", None), changes.pop("ended", None)
            if launched:
                running[launched] = time.time()
            if ended:
                job_id, state = ended
                running.pop(job_id, None)
                history = [*history, {"job_id": job_id, "state": state, "at": time.time()}][-50:]
            status.update(changes, running_jobs=running, history=history, updated=time.time())
            write_json(self.layout.status_file, status)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        job_id = str(fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID, "") or "")
        if event_type == EventType.SYSTEM_START:
            self._update(state="starting", running_jobs={}, pid_started=time.time())
        elif event_type in (EventType.AFTER_CLIENT_REGISTER, EventType.AFTER_CLIENT_HEARTBEAT):
            now = time.time()
            if event_type == EventType.AFTER_CLIENT_REGISTER or now - self._last_write > 5:
                self._last_write = now
                self._update(state="connected", last_heartbeat=now)
        elif event_type == EventType.CLIENT_DISCONNECTED:
            self._update(state="disconnected")
        elif event_type == EventType.CLIENT_RECONNECTED:
            self._update(state="connected", last_heartbeat=time.time())
        elif event_type == EventType.AFTER_JOB_LAUNCH and job_id:
            self._update(launched=job_id)
        elif event_type in (EventType.JOB_COMPLETED, EventType.JOB_ABORTED, EventType.JOB_CANCELLED) and job_id:
            self._update(ended=(job_id, event_type.strip("_").removeprefix("job_")))
        elif event_type == EventType.SYSTEM_END:
            self._update(state="stopped")


class OutgoingLedger(Filter):  # type: ignore[misc]
    """Last result filter: only numeric weights and metrics may leave; each result is recorded."""

    def __init__(self, control_dir: str) -> None:
        super().__init__()
        self.layout = SiteLayout.from_control(Path(control_dir))

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        job_id = str(fl_ctx.get_job_id() or "unknown")
        task = str(fl_ctx.get_prop(FLContextKey.TASK_NAME, "") or "")
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            # a reply without a DXO (an error return code) carries nothing of ours
            entry: dict[str, Any] = {"task": task, "kind": "none", "return_code": shareable.get_return_code()}
            self._append(job_id, entry)
            return shareable
        problems, summary = inspect_dxo(dxo.data_kind, dxo.data, dxo.meta or {})
        entry = {"task": task, "at": time.time(), **summary, "blocked": bool(problems)}
        if problems:
            entry["problems"] = problems[:10]
            self._append(job_id, entry)
            log.error("blocked an outgoing result of job %s: %s", job_id, problems[:3])
            raise ContentBlockedException("site policy: result holds more than weights and metrics")
        self._append(job_id, entry)
        return shareable

    def _append(self, job_id: str, entry: dict[str, Any]) -> None:
        path = self.layout.job_dir(job_id) / "ledger.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True, default=str) + "\n")


def inspect_dxo(kind: str, data: Any, meta: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Problems (anything but numeric arrays and numbers) and a summary of a result's content."""
    problems: list[str] = []
    variables: dict[str, list[Any]] = {}
    total = 0
    digest = hashlib.sha256()
    if kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF, DataKind.METRICS):
        problems.append(f"data kind {kind!r} is not weights or metrics")
    for key, value in (data or {}).items():
        array = _as_array(value)
        if array is None:
            problems.append(f"variable {key!r} is {type(value).__name__}, not a numeric array")
            continue
        if array.dtype.kind not in "fiub":
            problems.append(f"variable {key!r} has dtype {array.dtype}")
            continue
        variables[str(key)] = [list(array.shape), str(array.dtype)]
        total += int(array.nbytes)
        digest.update(str(key).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    flat_meta: dict[str, Any] = {}
    for key, value in meta.items():
        problems.extend(_check_meta(str(key), value, flat_meta))
    summary = {"kind": str(kind), "variables": len(variables), "shapes": variables, "bytes": total,
               "sha256": digest.hexdigest(), "meta": flat_meta}
    return problems, summary


def _as_array(value: Any) -> np.ndarray[Any, Any] | None:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, NUMERIC):
        return np.asarray(value)
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return np.asarray(value.detach().cpu().numpy())
    return None


def _check_meta(key: str, value: Any, out: dict[str, Any], depth: int = 0) -> list[str]:
    if value is None or isinstance(value, NUMERIC):
        out[key] = value if not isinstance(value, np.generic) else value.item()
        return []
    if isinstance(value, str):
        if key.rsplit(".", 1)[-1] in ALLOWED_META_STRINGS and len(value) <= 64:
            out[key] = value
            return []
        return [f"meta {key!r} is a free-text string"]
    if isinstance(value, dict) and depth < 2:
        found: list[str] = []
        for k, v in value.items():
            found.extend(_check_meta(f"{key}.{k}", v, out, depth + 1))
        return found
    return [f"meta {key!r} is {type(value).__name__}"]
