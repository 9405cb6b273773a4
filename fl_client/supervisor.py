"""Supervise the NVFlare client process: start, restart with backoff, stop with every job process.

NVFlare's client parent (``client_train``) must run on a process's main thread and may ``os._exit``,
so it runs as a subprocess in its own session. Its job processes are spawned with ``setsid``, so a
process-group kill misses them: the supervisor tracks every descendant it has seen (pid and start
time, so a reused pid is never hit) and ends them all on stop, on restart and after a crash, also
those left by an earlier appliance run. HOME and TMPDIR point into the FL folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fl_client.approvals import Approvals
from fl_client.box import FLUser, box_user, hand_over, open_the_way, stage_models
from fl_client.errors import NotEnrolledError
from fl_client.job_review import saved_review
from fl_client.kit import enrolment
from fl_client.layout import CONTROL_ENV, SiteLayout, read_json, write_json
from fl_client.policy import floor_of_privacy as floor_config_of
from fl_client.policy import write_policy
from fl_client.privacy_budget import PrivacyBudget, budget_view
from fl_client.settings import FLSettings, PrivacySettings

log = logging.getLogger(__name__)

CLIENT_MODULE = "nvflare.private.fed.app.client.client_train"
LOG_NAME = "portico_client.log"
LOG_ROTATE_BYTES = 20 * 1024 * 1024


class FLEventKind(StrEnum):
    STARTED = "started"
    EXITED = "exited"
    STOPPED = "stopped"
    JOB_WAITING = "job_waiting"
    JOB_STARTED = "job_started"
    ROUND = "round"
    JOB_FINISHED = "job_finished"
    EXPORTED = "exported"
    EXPORT_FAILED = "export_failed"
    #: the site's privacy floor refused to train a job (cohort too small, too few examples per round)
    JOB_REFUSED = "job_refused"
    #: the project's privacy budget is spent: this site sends no more updates for it
    PRIVACY_BUDGET_SPENT = "privacy_budget_spent"


@dataclass(frozen=True)
class FLEvent:
    """Something the appliance may audit. ``detail`` holds ids, numbers and states only."""

    kind: FLEventKind
    job_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


#: what an NVFlare process may inherit from the appliance's environment (nothing else: no PORTICO_* secret)
ENV_KEEP = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
                      "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "NVIDIA_VISIBLE_DEVICES", "SSL_CERT_FILE",
                      "SSL_CERT_DIR"})


def nvflare_env(layout: SiteLayout, threads: int = 1) -> dict[str, str]:
    """Environment of every NVFlare process, built from an allow-list (the appliance's secrets stay out):
    HOME/TMPDIR inside the FL folder, few threads."""
    layout.ensure()
    env = {k: v for k, v in os.environ.items()
           if (k in ENV_KEEP or k.startswith("LC_")) and not k.startswith("PORTICO_")}
    env.setdefault("PATH", "/usr/bin:/bin")
    env.update({
        "HOME": str(layout.home), "TMPDIR": str(layout.tmp), CONTROL_ENV: str(layout.control),
        "MALLOC_ARENA_MAX": "2", "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
        "NUMEXPR_NUM_THREADS": str(threads),
        "XDG_CACHE_HOME": str(layout.home / ".cache"), "TORCHINDUCTOR_CACHE_DIR": str(layout.tmp / "inductor"),
    })
    return env


def cap_resources(pid: int, memory_limit_mib: int | None, niceness: int = 10) -> None:
    """Address-space cap (inherited by every job process it starts) and a lower CPU priority than
    inference, set on the freshly started client."""
    if memory_limit_mib is not None:
        limit = memory_limit_mib * 1024 * 1024
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.setpriority(os.PRIO_PROCESS, pid, niceness)


# ---- the process tree, from /proc ----------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    if fields[0] == "Z":  # a zombie is already dead
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid`` → its start time."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[1]
    out: dict[int, int] = {}
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        if child in starts and child not in out:
            out[child] = starts[child]
            stack.extend(children.get(child, []))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


def kill_tree(procs: dict[int, int], timeout: float) -> int:
    """SIGTERM each (pid, start time) still alive, SIGKILL those left after ``timeout``; how many ended."""
    live = {p: s for p, s in procs.items() if _alive(p, s)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in live.items()):
            time.sleep(0.1)
        if not any(_alive(p, s) for p, s in live.items()):
            break
    return len(live)


def job_id_of(argv: Iterable[str]) -> str | None:
    """The job id in an NVFlare job process's command line (``-n <job_id>``)."""
    args = list(argv)
    if not any("client.worker_process" in a or "client_train" in a for a in args):
        return None
    for flag in ("-n", "--job_id"):
        if flag in args[:-1]:
            return args[args.index(flag) + 1]
    return None


class FLSupervisor:
    """The NVFlare client of this appliance. ``start()``/``stop()`` with the service; ``status()`` any time.

    Parameters
    ----------
    settings
        The ``fl`` settings section.
    data_dir
        The appliance's data folder; FL state lives in ``data_dir / settings.workspace``.
    models_dir
        Installed model packages (architectures to train, templates for candidates).
    on_event
        Called (from the supervisor's thread) for each :class:`FLEvent`; the appliance audits them.
    on_job_finished
        Called with the job id when a job's final global model arrived here (automatic export).
    """

    def __init__(self, settings: FLSettings, data_dir: Path, *, models_dir: Path | None = None,
                 on_event: Callable[[FLEvent], None] | None = None,
                 on_job_finished: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.layout = SiteLayout(data_dir / settings.workspace)
        self.models_dir = models_dir or data_dir / "models"
        self.on_event = on_event
        self.on_job_finished = on_job_finished
        self._proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self.backoff_until: float | None = None
        self._seen_rounds: dict[str, int] = {}
        self._seen_pending: set[str] = set()
        self._seen_running: set[str] = set()
        self._finished: set[str] = set()
        self._seen_spent: set[str] = set()
        self._seen_refused: set[str] = set()
        #: who the NVFlare processes run as (None: Portico's own user), decided at start
        self.user: FLUser | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the client and its watchdog thread; returns at once.

        Raises
        ------
        NotEnrolledError
            When no startup kit is installed.
        BoxError
            When Portico runs as root and the FL user (``fl.run_as``) does not exist or cannot reach
            the FL folder.
        """
        info = enrolment(self.layout)
        if info is None:
            raise NotEnrolledError(f"no startup kit installed in {self.layout.site} (portico fl enrol)")
        self.user = box_user(self.settings.run_as)
        if self.user is None and os.geteuid() == 0:
            log.warning("NVFlare runs as root (fl.run_as: null): it can read every instance and the configuration")
        self.layout.ensure()
        self._reap_previous()
        models = self.models_dir
        if self.user is not None:
            models = stage_models(self.models_dir, self.layout.control / "models", self.settings.allowed_models,
                                  self.user, base=self.data_dir)
        write_policy(self.settings, self.layout, models)
        if self.user is not None:
            # no NVFlare process is alive here (reaped above): the folder is handed over before one starts
            changed = hand_over(self.layout.root, self.user)
            open_the_way(self.layout, self.data_dir, self.user)
            log.info("NVFlare runs as %s (uid %d); %d entries of %s handed over", self.user.name, self.user.uid,
                     changed, self.layout.root)
        self._finished = {p.parent.name for p in self.layout.jobs.glob("*/final.json")}
        self._seen_refused = {p.parent.name for p in self.layout.jobs.glob("*/refused.json")}
        self._seen_spent = {name for name, entry in PrivacyBudget(self.layout).read().items()
                            if isinstance(entry, dict) and entry.get("exhausted")}
        self._seen_rounds = {p.parent.name: self._last_round(p.parent.name) for p in self.layout.jobs.glob("*/")}
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(info.site, info.org), name="fl-supervisor",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the client and every process it started; returns when they are gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.stop_timeout_s + 15)
            self._thread = None
        self._terminate()
        write_json(self.layout.supervisor_file, {"pid": None, "stopped_at": time.time()})
        self._emit(FLEvent(FLEventKind.STOPPED))

    def _spawn(self, site: str, org: str) -> subprocess.Popen[bytes]:
        python = self.settings.python or sys.executable
        logfile = self.layout.site / LOG_NAME
        if logfile.exists() and logfile.stat().st_size > LOG_ROTATE_BYTES:
            logfile.replace(logfile.with_suffix(".log.1"))
        argv = [python, "-u", "-m", CLIENT_MODULE, "-m", str(self.layout.site), "-s", "fed_client.json",
                "--set", "secure_train=true", f"uid={site}", f"org={org}", "config_folder=config"]
        user = self.user
        with logfile.open("ab") as out:
            # as the FL user: real, effective and saved ids, no supplementary groups (root's are dropped)
            proc = subprocess.Popen(argv, cwd=self.layout.site, env=nvflare_env(self.layout,
                                                                                self.settings.train_threads),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, user=user.uid if user else None,
                                    group=user.gid if user else None, extra_groups=[] if user else None)
        cap_resources(proc.pid, self.settings.memory_limit_mib)
        st = _stat(proc.pid)
        self._known = {proc.pid: st[1]} if st else {}
        write_json(self.layout.supervisor_file, {"pid": proc.pid, "start": st[1] if st else None,
                                                 "argv0": python, "started_at": time.time()})
        log.info("NVFlare client started (pid %d, site %s)", proc.pid, site)
        return proc

    def _watch(self, site: str, org: str) -> None:
        backoff = self.settings.restart_backoff_s
        while not self._stop.is_set():
            with self._lock:
                try:
                    self._proc = self._spawn(site, org)
                except OSError as exc:  # e.g. the FL user may not run the interpreter (fl.python)
                    log.error("cannot start the NVFlare client (%s on %s%s); retrying in %.0f s",
                              type(exc).__name__, exc.filename or "the interpreter",
                              f" as {self.user.name}" if self.user else "", backoff)
                    self._emit(FLEvent(FLEventKind.EXITED, detail={"returncode": None, "error": type(exc).__name__}))
                    self.restarts += 1
                    self.backoff_until = time.time() + backoff
                    if self._stop.wait(backoff):
                        break
                    backoff = min(backoff * 2, self.settings.restart_backoff_max_s)
                    continue
                self.started_at = time.time()
                self.backoff_until = None
            self._emit(FLEvent(FLEventKind.STARTED, detail={"pid": self._proc.pid, "restarts": self.restarts}))
            while not self._stop.is_set() and self._proc.poll() is None:
                self._track()
                self._poll_state()
                self._stop.wait(1.0)
            if self._stop.is_set():
                break
            code = self._proc.returncode
            ran = time.time() - (self.started_at or time.time())
            self.last_exit = code
            orphans = kill_tree(self._known, self.settings.stop_timeout_s)
            self._emit(FLEvent(FLEventKind.EXITED, detail={"returncode": code, "ran_s": round(ran, 1),
                                                           "orphans_stopped": orphans}))
            backoff = self.settings.restart_backoff_s if ran >= self.settings.healthy_after_s else backoff
            log.warning("NVFlare client exited with %s after %.0f s; restarting in %.1f s", code, ran, backoff)
            self.backoff_until = time.time() + backoff
            self.restarts += 1
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.settings.restart_backoff_max_s)

    def _track(self) -> None:
        """Remember every descendant, so job processes are found even after the parent died."""
        if self._proc is None:
            return
        for pid, start in descendants(self._proc.pid).items():
            self._known.setdefault(pid, start)
        self._known = {p: s for p, s in self._known.items() if _alive(p, s)}

    def _terminate(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._track()
                ended = kill_tree(self._known, self.settings.stop_timeout_s)
                if self._proc.poll() is None:
                    self._proc.kill()
                self._proc.wait(timeout=10)
                log.info("NVFlare client stopped (%d process(es))", ended)
                self._proc = None
                self._known = {}

    def _reap_previous(self) -> None:
        """End a client left running by an earlier appliance process (crash, kill -9)."""
        old = read_json(self.layout.supervisor_file, {}) or {}
        pid, start = old.get("pid"), old.get("start")
        if isinstance(pid, int) and isinstance(start, int) and _alive(pid, start) \
                and CLIENT_MODULE in " ".join(cmdline(pid)):
            procs = {pid: start, **descendants(pid)}
            log.warning("stopping %d NVFlare process(es) left by an earlier run", len(procs))
            kill_tree(procs, self.settings.stop_timeout_s)
        # job processes whose parent died earlier: found by their workspace in the command line
        site = str(self.layout.site)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                argv = cmdline(int(entry.name))
                if job_id_of(argv) and site in argv:
                    st = _stat(int(entry.name))
                    if st:
                        kill_tree({int(entry.name): st[1]}, self.settings.stop_timeout_s)

    # ---- state -----------------------------------------------------------------------------------

    def running_jobs(self) -> dict[str, int]:
        """Job id → pid of each job process of the current client."""
        out: dict[str, int] = {}
        for pid in list(self._known):
            job = job_id_of(cmdline(pid))
            if job and (self._proc is None or pid != self._proc.pid):
                out[job] = pid
        return out

    def _last_round(self, job_id: str) -> int:
        rounds = self.rounds(job_id)
        return int(rounds[-1]["round"]) if rounds else -1

    def rounds(self, job_id: str) -> list[dict[str, Any]]:
        path = self.layout.job_dir(job_id) / "rounds.jsonl"
        out = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def _poll_state(self) -> None:
        """Turn new files from the site components and the trainer into events."""
        for pending in Approvals(self.layout).pending():
            if pending.job_id not in self._seen_pending:
                self._seen_pending.add(pending.job_id)
                self._emit(FLEvent(FLEventKind.JOB_WAITING, pending.job_id,
                                   {"name": pending.name, "reason": pending.reason}))
        for job in self.running_jobs():
            if job not in self._seen_running:
                self._seen_running.add(job)
                self._emit(FLEvent(FLEventKind.JOB_STARTED, job))
        info = enrolment(self.layout)
        project = info.project if info else ""
        spent = PrivacyBudget(self.layout).exhausted(project) if project else None
        if spent and project not in self._seen_spent:
            self._seen_spent.add(project)
            self._emit(FLEvent(FLEventKind.PRIVACY_BUDGET_SPENT, None, {"project": project, "reason": spent}))
        for job_dir in self.layout.jobs.glob("*/"):
            job = job_dir.name
            refused = read_json(job_dir / "refused.json")
            if isinstance(refused, dict) and job not in self._seen_refused:
                self._seen_refused.add(job)
                self._emit(FLEvent(FLEventKind.JOB_REFUSED, job, {"reason": str(refused.get("reason", ""))}))
            for entry in self.rounds(job):
                if int(entry.get("round", -1)) > self._seen_rounds.get(job, -1):
                    self._seen_rounds[job] = int(entry["round"])
                    self._emit(FLEvent(FLEventKind.ROUND, job, {k: v for k, v in entry.items()
                                                                if isinstance(v, (int, float, str))}))
            if job not in self._finished and (job_dir / "final.json").is_file():
                self._finished.add(job)
                final = read_json(job_dir / "final.json", {}) or {}
                self._emit(FLEvent(FLEventKind.JOB_FINISHED, job, {k: v for k, v in final.items()
                                                                   if isinstance(v, (int, float, str))}))
                if self.on_job_finished is not None and self.settings.auto_export:
                    try:
                        self.on_job_finished(job)
                    except Exception as exc:  # the export is retried by hand; the client keeps running
                        log.exception("automatic export of job %s failed", job)
                        self._emit(FLEvent(FLEventKind.EXPORT_FAILED, job, {"error": str(exc)[:200]}))

    def _emit(self, event: FLEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("FL event handler failed for %s", event.kind)

    def status(self) -> dict[str, Any]:
        """Process, connection, jobs and rounds, approvals: for ``portico fl status`` and the API."""
        return site_status(self.layout, proc=self._proc, restarts=self.restarts, last_exit=self.last_exit,
                           backoff_until=self.backoff_until, running=self.running_jobs(),
                           privacy=self.settings.privacy)


def site_status(layout: SiteLayout, *, proc: subprocess.Popen[bytes] | None = None, restarts: int = 0,
                last_exit: int | None = None, backoff_until: float | None = None,
                running: dict[str, int] | None = None, privacy: PrivacySettings | None = None) -> dict[str, Any]:
    """The status from files alone (the CLI runs in another process than ``portico serve``)."""
    floor = privacy or PrivacySettings()
    info = enrolment(layout)
    sup = read_json(layout.supervisor_file, {}) or {}
    pid = proc.pid if proc is not None and proc.poll() is None else sup.get("pid")
    alive = bool(isinstance(pid, int) and isinstance(sup.get("start"), int) and _alive(pid, sup["start"]))
    if proc is not None:
        alive = proc.poll() is None
    nv = read_json(layout.status_file, {}) or {}
    if running is None and alive and isinstance(pid, int):
        running = {j: p for p, _ in descendants(pid).items() if (j := job_id_of(cmdline(p)))}
    jobs: dict[str, Any] = {}
    for job_dir in sorted(layout.jobs.glob("*/")) if layout.jobs.is_dir() else []:
        rounds_file = job_dir / "rounds.jsonl"
        last = rounds_file.read_text(encoding="utf-8").strip().splitlines()[-1:] if rounds_file.is_file() else []
        jobs[job_dir.name] = {"last_round": json.loads(last[0]) if last else None,
                              "refused": read_json(job_dir / "refused.json"),
                              "final": read_json(job_dir / "final.json"),
                              "exported": read_json(job_dir / "exported.json")}
    state = "not_enrolled" if info is None else ("stopped" if not alive else str(nv.get("state", "starting")))
    return {
        "enrolled": info is not None,
        "site": info.site if info else None,
        "project": info.project if info else None,
        "server": info.server_target if info else None,
        "enrolment_mode": info.mode if info else None,
        "state": state,
        "process": {"pid": pid if alive else None, "running": alive, "restarts": restarts,
                    "last_exit": last_exit, "restart_at": backoff_until},
        "last_heartbeat": nv.get("last_heartbeat"),
        "running_jobs": sorted((running or {}).keys()),
        "jobs": jobs,
        "privacy": {"floor": floor_config_of(floor),
                    "budget": budget_view(layout, info.project if info else None, floor.epsilon, floor.delta)},
        "pending_approval": [{"job_id": p.job_id, "name": p.name, "submitter": p.submitter,
                              "reason": p.reason, "attempts": p.attempts, "first_seen": p.first_seen,
                              "deployed": p.meta.get("deployed"), "review": saved_review(layout, p.job_id),
                              "decided": _decided(Approvals(layout), p.job_id)}
                             for p in Approvals(layout).pending()],
        "decisions": [{"job_id": d.job_id, "decision": d.decision, "name": d.name, "actor": d.actor,
                       "reason": d.reason, "at": d.at, "client_app_sha256": d.client_app_sha256}
                      for d in sorted(Approvals(layout).decisions(), key=lambda d: d.at)[-20:]],
    }


def _decided(approvals: Approvals, job_id: str) -> dict[str, Any] | None:
    """A decision already made on a job still listed as waiting (until NVFlare asks again)."""
    made = approvals.decision(job_id)
    return None if made is None else {"decision": made.decision, "actor": made.actor, "at": made.at,
                                      "client_app_sha256": made.client_app_sha256}
