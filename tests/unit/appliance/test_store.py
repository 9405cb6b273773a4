from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.store import Job, JobState, LeaseLost, OutboxState, ResultFile, Store
from dicom_router.ports import ReceivedInstance, SinkFullError, StoreOutcome
from tests.support.polling import wait_for
from tests.support.postgres import PostgresServer

STUDY = "1.2.3.4"
SERIES = "1.2.3.4.5"


def instance(n: int, study: str = STUDY) -> ReceivedInstance:
    return ReceivedInstance(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"{SERIES}.{n}",
                            study_instance_uid=study, series_instance_uid=SERIES,
                            transfer_syntax_uid="1.2.840.10008.1.2.1",
                            calling_ae_title="PACS", peer_address="127.0.0.1", data=b"DICM" + bytes([n]) * 100)


@pytest.fixture
def store(tmp_path: Path, database_url: str | None) -> Store:
    s = Store(tmp_path / "var", database=database_url)
    yield s
    s.close()


def test_store_writes_file_and_index_and_audits(store: Store) -> None:
    assert store.store(instance(1)) is StoreOutcome.STORED
    path = store.instances_dir / STUDY / SERIES / f"{SERIES}.1.dcm"
    assert path.read_bytes() == instance(1).data
    assert store.instance_count(STUDY) == 1
    assert [e["event"] for e in store.audit_events(STUDY)] == ["received"]
    assert not list(path.parent.glob("*.tmp"))


def test_duplicate_sop_instance_is_idempotent(store: Store) -> None:
    store.store(instance(1))
    assert store.store(instance(1)) is StoreOutcome.DUPLICATE
    assert store.instance_count() == 1
    assert store.open_studies()[0].received_count == 1


@pytest.mark.parametrize("uid", ["../../etc", "1.2.x", "1." * 40, "1..2", "1.02"])
def test_uids_that_could_escape_the_folder_are_refused(store: Store, uid: str) -> None:
    bad = ReceivedInstance("1.2", uid, STUDY, SERIES, "1.2", "PACS", "127.0.0.1", b"x")
    with pytest.raises(ValueError):
        store.store(bad)
    assert store.instance_count() == 0


def test_disk_full_raises_sink_full(tmp_path: Path) -> None:
    s = Store(tmp_path / "v", min_free_mb=10**9)
    with pytest.raises(SinkFullError):
        s.store(instance(1))
    assert s.instance_count() == 0
    s.close()


def test_quarantine_keeps_the_bytes(store: Store) -> None:
    qid = store.quarantine(b"garbage", "cannot parse", "PACS", "127.0.0.1")
    rows = store.quarantined()
    assert rows[0]["id"] == qid and Path(rows[0]["path"]).read_bytes() == b"garbage"


def test_hand_off_versions_and_late_instances(store: Store) -> None:
    store.store(instance(1))
    store.store(instance(2))
    run1 = store.hand_off(STUDY, "quiet")
    assert run1 is not None and run1.version == 1 and run1.instance_count == 2
    assert store.open_studies() == []
    assert store.hand_off(STUDY, "quiet") is None  # nothing new
    store.store(instance(3))  # late: reopens the study
    assert [s.study_uid for s in store.open_studies()] == [STUDY]
    run2 = store.hand_off(STUDY, "quiet")
    assert run2 is not None and run2.version == 2
    assert len(store.series_of(STUDY, 1)[SERIES]) == 2
    assert len(store.series_of(STUDY, 2)[SERIES]) == 3


def test_jobs_are_unique_per_run_and_rule_and_resume_after_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 database_url: str | None) -> None:
    store = Store(tmp_path / "var", database=database_url)
    store.store(instance(1))
    run = store.hand_off(STUDY, "count")
    assert run is not None
    assert len(store.record_routes(run, [("r", "m", None, SERIES, "k1")])) == 1
    assert store.record_routes(run, [("r", "m", None, SERIES, "k1")]) == []  # routing again adds nothing
    job = store.claim_job()
    assert job is not None and job.state is JobState.RUNNING and job.attempts == 1
    store.close()  # "crash" while RUNNING
    monkeypatch.setattr("appliance.store._INCARNATION", "restarted")  # a new process, perhaps with the same pid
    store = Store(tmp_path / "var", database=database_url)
    assert store.claim_job() is None
    assert store.resume_interrupted() == 1
    again = store.claim_job()
    assert again is not None and again.id == job.id and again.attempts == 2
    store.close()


def claimed_job(store: Store) -> Job:
    """One instance, handed off, routed to one rule, and its job claimed (RUNNING)."""
    store.store(instance(1))
    run = store.hand_off(STUDY, "count")
    assert run is not None
    store.record_routes(run, [("r", "m", None, SERIES, "k1")])
    job = store.claim_job()
    assert job is not None
    return job


def test_results_are_queued_once_per_destination(store: Store, tmp_path: Path) -> None:
    job = claimed_job(store)
    res = [ResultFile("9.9.1", "seg", "1.2.840.10008.5.1.4.1.1.66.4", tmp_path / "seg.dcm", {})]
    store.complete_job(job, res, ["pacs", "archive"], "CPUExecutionProvider", "abc", {"load": 0.1})
    with pytest.raises(LeaseLost):  # a worker completing a job no longer its own records nothing
        store.complete_job(job, res, ["pacs", "archive"], "CPUExecutionProvider", "abc", {"load": 0.1})
    due = store.due(10)
    assert sorted(i.destination for i in due) == ["archive", "pacs"]
    store.mark_failed(due[0].id, "refused", retry_in_seconds=3600, permanent=False)
    store.mark_sent(due[1].id)
    assert store.due(10) == []
    states = {o["destination"]: o["state"] for o in store.outbox()}
    assert states[due[1].destination] == OutboxState.SENT
    assert states[due[0].destination] == OutboxState.PENDING
    assert store.jobs()[0].state is JobState.DONE
    events = [e["event"] for e in store.audit_events(STUDY)]
    for expected in ("received", "study_complete", "routed", "job_state", "inferred", "dispatched",
                     "dispatch_failed"):
        assert expected in events


def test_results_can_go_to_their_own_destinations(store: Store, tmp_path: Path) -> None:
    job = claimed_job(store)
    res = [ResultFile("9.9.1", "seg", "1.2.840.10008.5.1.4.1.1.66.4", tmp_path / "seg.dcm", {}),
           ResultFile("9.9.3", "sc", "1.2.840.10008.5.1.4.1.1.7", tmp_path / "sc.dcm", {})]
    store.complete_job(job, res, ["pacs", "archive"], "CPUExecutionProvider", "abc", {},
                       destinations_for={"9.9.3": ["pacs"]})
    queued = sorted((i.sop_instance_uid, i.destination) for i in store.due(10))
    assert queued == [("9.9.1", "archive"), ("9.9.1", "pacs"), ("9.9.3", "pacs")]
    assert {r.kind for r in store.results(job.id)} == {"seg", "sc"}


def _done_job(store: Store, tmp_path: Path) -> str:
    job = claimed_job(store)
    store.complete_job(job, [ResultFile("9.9.1", "seg", "1.2.840.10008.5.1.4.1.1.66.4", tmp_path / "s.dcm", {})],
                       ["pacs"], "CPUExecutionProvider", "abc", {})
    return "9.9.1"


def test_own_result_echoed_back_is_counted_but_never_an_input(store: Store, tmp_path: Path) -> None:
    seg_uid = _done_job(store, tmp_path)
    echoed = ReceivedInstance("1.2.840.10008.5.1.4.1.1.66.4", seg_uid, STUDY, "9.9", "1.2.840.10008.1.2.1", "PACS",
                              "127.0.0.1", b"DICMseg")
    assert store.store(echoed) is StoreOutcome.DUPLICATE
    assert store.open_studies() == []  # no new run can start from our own output
    assert store.instance_count(STUDY) == 1
    assert store.hand_off(STUDY, "quiet") is None
    assert any(e["detail"].get("own_result") for e in store.audit_events(STUDY))


def test_hand_off_forgets_the_pacs_count_and_unchanged_series_are_not_redone(store: Store, tmp_path: Path) -> None:
    _done_job(store, tmp_path)
    store.set_expected_count(STUDY, 1)
    store.store(instance(2))
    assert store.open_studies()[0].expected_count == 1
    run2 = store.hand_off(STUDY, "quiet")
    assert run2 is not None and run2.version == 2
    reopened = store.store(instance(3)) and store.open_studies()
    assert reopened and reopened[0].expected_count is None  # asked afresh for the next run
    # same rule, same series content as the first run: no new job; changed content: a job
    assert store.record_routes(run2, [("r", "m", None, SERIES, "k1")]) == []
    assert len(store.record_routes(run2, [("r", "m", None, SERIES, "k2")])) == 1


def test_reindex_restores_files_the_index_lost(tmp_path: Path, database_url: str | None) -> None:
    """A power loss can drop the last index rows (synchronous=NORMAL); the fsync'd files are the truth."""
    from appliance.demo_study import write_ct_series
    from inference.phantom import make_phantom

    store = Store(tmp_path / "var", database=database_url)
    phantom = make_phantom((2, 32, 32), (2.5, 8.0, 8.0), seed=1)
    written = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "src")
    for p in written.paths:
        from pydicom import dcmread

        ds = dcmread(p, stop_before_pixels=True)
        store.store(ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), written.study_instance_uid,
                                     written.series_instance_uid, "1.2.840.10008.1.2.1", "PACS", "127.0.0.1",
                                     p.read_bytes()))
    (store.instances_dir / "junk").mkdir()
    (store.instances_dir / "junk" / "x").mkdir()
    (store.instances_dir / "junk" / "x" / "bad.dcm").write_bytes(b"not dicom")
    with store.transaction() as tx:
        tx.execute("DELETE FROM instances")  # the index lost its rows
    assert store.instance_count() == 0
    assert store.reindex() == 2
    assert store.instance_count(written.study_instance_uid) == 2
    assert store.reindex() == 0
    store.close()


def test_audit_limit_reads_only_the_newest_rows_oldest_first(store: Store) -> None:
    from appliance.audit import AuditEvent, AuditRecord

    for i in range(12):
        store.record(AuditRecord(AuditEvent.SERVICE, "1.2.3" if i % 2 else None, detail={"n": i}))
    assert [e["detail"]["n"] for e in store.audit_events(limit=3)] == [9, 10, 11]
    assert [e["detail"]["n"] for e in store.audit_events("1.2.3", limit=2)] == [9, 11]
    assert len(store.audit_events()) == 12 and "id" not in store.audit_events(limit=1)[0]


def _spooled(store: Store, n: int) -> Path:
    path = store.spool_dir / f"part-{n}.part"
    path.write_bytes(instance(n).data)
    return path


def test_a_spooled_file_is_moved_in_not_copied(store: Store) -> None:
    spooled = _spooled(store, 1)
    inode = spooled.stat().st_ino
    assert store.store_file(instance(1), spooled) is StoreOutcome.STORED
    path = store.instances_dir / STUDY / SERIES / f"{SERIES}.1.dcm"
    assert path.read_bytes() == instance(1).data and path.stat().st_ino == inode and not spooled.exists()
    assert store.instance_index()[0]["path"] == str(path) and store.instance_count(STUDY) == 1
    # a duplicate leaves the spool file to the caller
    again = _spooled(store, 1)
    assert store.store_file(instance(1), again) is StoreOutcome.DUPLICATE and again.exists()


def test_a_spooled_file_is_quarantined_by_a_move(store: Store) -> None:
    spooled = _spooled(store, 2)
    qid = store.quarantine_file(spooled, "damaged", "PACS", "127.0.0.1")
    row = store.quarantined()[0]
    assert row["id"] == qid and Path(row["path"]).read_bytes() == instance(2).data and not spooled.exists()
    assert [e["event"] for e in store.audit_events()] == ["quarantined"]


def test_store_file_checks_uids_and_free_space(tmp_path: Path) -> None:
    s = Store(tmp_path / "v", min_free_mb=10**9)
    try:
        spooled = _spooled(s, 1)
        with pytest.raises(SinkFullError):
            s.store_file(instance(1), spooled)
        with pytest.raises(ValueError):
            s.store_file(instance(1, study="1..2"), spooled)
        assert spooled.exists() and s.instance_count() == 0
    finally:
        s.close()


def test_stale_spool_files_are_swept_at_start(tmp_path: Path) -> None:
    first = Store(tmp_path / "v")
    stale, fresh = first.spool_dir / "stale.part", first.spool_dir / "fresh.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (1.0, 1.0))
    first.close()
    Store(tmp_path / "v").close()
    assert not stale.exists() and fresh.exists()


def test_a_lease_that_runs_out_goes_to_another_worker_and_the_first_records_nothing(
        store: Store, tmp_path: Path) -> None:
    store.store(instance(1))
    run = store.hand_off(STUDY, "count")
    assert run is not None
    store.record_routes(run, [("r", "m", None, SERIES, "k")])
    first = store.claim_job(owner="elsewhere:1:a", lease_seconds=0.05)
    assert first is not None and first.lease_owner == "elsewhere:1:a"
    assert store.renew_lease(first.id, "elsewhere:1:a", 0.05)
    assert store.resume_interrupted() == 0  # a live lease on another machine is left alone
    wait_for(lambda: store.resume_interrupted() == 1, timeout=10, message="the lease running out")
    second = store.claim_job(owner="here:2:b")
    assert second is not None and second.id == first.id and second.attempts == 2
    assert not store.renew_lease(first.id, "elsewhere:1:a", 60)  # the first worker's heartbeat is refused
    res = [ResultFile("9.9.1", "seg", "1.2.840.10008.5.1.4.1.1.66.4", tmp_path / "seg.dcm", {})]
    with pytest.raises(LeaseLost):
        store.complete_job(first, res, ["pacs"], "CPU", "h", {})
    with pytest.raises(LeaseLost):
        store.fail_job(first, "late", "unexpected", retry_in=None)
    store.set_progress(second.id, 5, 10)
    running = store.job(second.id)
    assert running is not None and running.progress == (5, 10)
    store.complete_job(second, res, ["pacs"], "CPU", "h", {})
    done = store.job(first.id)
    assert [o["destination"] for o in store.outbox()] == ["pacs"] and done is not None and done.state is JobState.DONE


def test_commits_wake_the_loops_that_wait_for_them(store: Store, tmp_path: Path) -> None:
    """A new job, a requeued one and results to send wake their channel's waiters; a token taken before
    looking for work keeps a wake-up that came in between."""
    from appliance.store import JOBS, OUTBOX, RECEIVED

    wake = store.db.wakeups
    tokens = {c: wake.token(c) for c in (JOBS, OUTBOX, RECEIVED)}
    assert not wake.wait(JOBS, tokens[JOBS], 0.01)  # nothing yet
    store.store(instance(1))
    assert wake.wait(RECEIVED, tokens[RECEIVED], 0.01)
    run = store.hand_off(STUDY, "count")
    assert run is not None
    store.record_routes(run, [("r", "m", None, SERIES, "k")])
    assert wake.wait(JOBS, tokens[JOBS], 0.01)  # already moved: returns at once
    assert store.next_due(JOBS) is not None and store.next_due(OUTBOX) is None
    job = store.claim_job()
    assert job is not None
    res = [ResultFile("9.9.1", "seg", "1.2.840.10008.5.1.4.1.1.66.4", tmp_path / "seg.dcm", {})]
    store.complete_job(job, res, ["pacs"], "CPU", "h", {})
    assert wake.wait(OUTBOX, tokens[OUTBOX], 0.01)
    assert store.next_due(OUTBOX) is not None and store.next_due(JOBS) is None
    later = wake.token(OUTBOX)
    wake.interrupt()  # stopping: every waiter returns
    assert wake.wait(OUTBOX, later, 5)


def test_a_commit_in_another_process_wakes_a_postgresql_listener(tmp_path: Path,
                                                                 postgres_server: PostgresServer) -> None:
    from appliance.store import JOBS

    url = postgres_server.new_database()
    here, there = Store(tmp_path / "a", database=url), Store(tmp_path / "b", database=url)
    try:
        there.db.listen(JOBS)
        wait_for(lambda: there.db.wakeups.token("*") >= 1, timeout=10, message="listening")  # LISTEN done
        token = there.db.wakeups.token(JOBS)
        here.store(instance(1))
        run = here.hand_off(STUDY, "count")
        assert run is not None
        here.record_routes(run, [("r", "m", None, SERIES, "k")])
        assert there.db.wakeups.wait(JOBS, token, 10)  # NOTIFY reached the other connection
    finally:
        here.close()
        there.close()


def test_when_a_queue_forms_a_higher_priority_runs_first(store: Store) -> None:
    ids = []
    for n, (study, priority) in enumerate((("1.2.3.10", 0), ("1.2.3.11", 5), ("1.2.3.12", 0))):
        store.store(ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"{study}.1.{n}", study, f"{study}.1",
                                     "1.2.840.10008.1.2.1", "PACS", "127.0.0.1", b"DICM" + bytes([n])))
        run = store.hand_off(study, "count")
        assert run is not None
        ids += store.record_routes(run, [("r", "m", None, f"{study}.1", "k")], priorities={"r": priority})
    order = []
    while (job := store.claim_job()) is not None:
        order.append(job.id)
    assert order == [ids[1], ids[0], ids[2]]  # the urgent one, then oldest first
