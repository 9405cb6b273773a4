"""Portico split into roles over one PostgreSQL and one file store: two receivers, three workers, one dispatcher,
a real Orthanc. Workers and receivers are killed (SIGKILL) mid-job and mid-study, trial after trial: nothing is
lost, nothing reaches the PACS twice, no job is left stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.demo import portico_config
from appliance.store import JobState, Store
from tests.conftest import REPO
from tests.integration.conftest import Pacs
from tests.integration.test_pacs_roundtrip import phantom_study
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.slow

TRIALS = 10
LEASE_SECONDS = 4.0


@dataclass
class RoleProcess:
    """``portico ROLE`` as a real subprocess in its own process group."""

    role: str
    config: Path
    log: Path
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "appliance", self.role, "-c", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"})
        if self.port is not None:
            port = self.port
            wait_for(lambda: self.alive() and port_open(port), timeout=60, message=f"{self.role} listening")

    def alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"portico {self.role} exited with {self.proc.returncode}; see {self.log}")
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Site:
    receivers: list[RoleProcess]
    workers: list[RoleProcess]
    dispatcher: RoleProcess
    data_dir: Path
    database: str

    def store(self) -> Store:
        return Store(self.data_dir, fsync=False, database=self.database)

    def everyone(self) -> list[RoleProcess]:
        return [*self.receivers, *self.workers, self.dispatcher]


@pytest.fixture
def site(tmp_path: Path, postgres_server: PostgresServer,
         orthanc_factory: Callable[..., Pacs]) -> Iterator[tuple[Site, Pacs]]:
    ports = [free_port(), free_port()]
    pacs = orthanc_factory(ports[0])
    database = postgres_server.new_database()
    shared = tmp_path / "shared-var"

    def config(name: str, port: int) -> Path:
        return portico_config(tmp_path / name, port=port, orthanc_dicom_port=pacs.dicom_port,
                              models_dir=REPO / "models", rules_file=REPO / "config" / "rules.yaml",
                              quiet_seconds=600.0, extra={
                                  "storage": {"data_dir": str(shared), "database": database, "min_free_mb": 0},
                                  "api": {"enabled": False},
                                  "jobs": {"lease_seconds": LEASE_SECONDS, "retry_seconds": 0.5}})

    receivers = [RoleProcess("receive", config(f"receiver-{n}", port), tmp_path / f"receiver-{n}.log", port)
                 for n, port in enumerate(ports)]
    workers = [RoleProcess("work", config(f"worker-{n}", free_port()), tmp_path / f"worker-{n}.log")
               for n in range(3)]
    dispatcher = RoleProcess("dispatch", config("dispatcher", free_port()), tmp_path / "dispatcher.log")
    built = Site(receivers, workers, dispatcher, shared, database)
    try:
        for process in built.everyone():
            process.start()
        yield built, pacs
    finally:
        for process in built.everyone():
            process.stop()


def _send(port: int, paths: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["storescu", "-aet", "ORTHANC", "-aec", "PORTICO", "127.0.0.1", str(port),
                             *map(str, paths)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})


def _pid(owner: str | None) -> int | None:
    parts = (owner or "").rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def test_receivers_and_workers_killed_mid_study_lose_and_duplicate_nothing(
        tmp_path: Path, site: tuple[Site, Pacs]) -> None:
    roles, pacs = site
    store = roles.store()
    studies: dict[str, str] = {}  # Orthanc id -> StudyInstanceUID
    try:
        for trial in range(TRIALS):
            paths = phantom_study(tmp_path / f"study-{trial}", slices=24, seed=100 + trial)
            study_id = pacs.upload(paths)
            study_uid = str(pacs.client.get_studies_id(study_id)["MainDicomTags"]["StudyInstanceUID"])
            studies[study_id] = study_uid
            halves = (paths[0::2], paths[1::2])
            # the study arrives over two associations, one to each receiver
            senders = [_send(r.port or 0, half) for r, half in zip(roles.receivers, halves, strict=True)]
            victim = roles.receivers[trial % 2]
            wait_for(lambda uid=study_uid: store.instance_count(uid) >= 6, timeout=60, interval=0.01,
                     message="instances arriving")
            victim.kill()  # mid-study: what it acknowledged is kept, the rest its sender must send again
            for sender in senders:
                sender.wait(timeout=120)
            victim.start()
            _send(victim.port or 0, halves[trial % 2]).wait(timeout=120)  # the PACS retries
            # a worker dies in the middle of the study's inference
            running = wait_for(lambda uid=study_uid: [j for j in store.jobs(uid) if j.state is JobState.RUNNING],
                               timeout=120, interval=0.01, message="a job running")
            pid = _pid(running[0].lease_owner)
            (worker,) = [w for w in roles.workers if w.proc is not None and w.proc.pid == pid]
            worker.kill()
            worker.start()
        for study_id in studies:
            derived = wait_for(lambda sid=study_id: (d := pacs.derived(sid)) and set(d) == {"SEG", "SR"} and d,
                               timeout=300, interval=0.25, message="SEG and SR in Orthanc")
            assert len(derived["SEG"]) == 1 and len(derived["SR"]) == 1, derived
        for study_uid in studies.values():
            assert store.instance_count(study_uid) == 24  # nothing lost: every slice, from either receiver
            jobs = store.jobs(study_uid)
            assert len(jobs) == 1 and jobs[0].state is JobState.DONE and jobs[0].attempts >= 2, jobs
        # every result went out exactly once, and nothing waits
        sent = [o for o in store.outbox() if o["state"] == "SENT"]
        assert len(sent) == len({(o["destination"], o["sop_instance_uid"]) for o in sent})
        assert all(o["state"] == "SENT" for o in store.outbox())
        handed_off = [e for e in store.audit_events() if e["event"] == "study_complete"]
        assert sorted(e["study_uid"] for e in handed_off) == sorted(studies.values())  # each once
    finally:
        store.close()
