"""Studies at every stage, made through the store as the receiver, router, workers and dispatcher would.

Shared by the API tests of ``/studies`` and the dashboard's browser test. Instance bytes carry a patient
name (never a real DICOM file): nothing the study pages show may quote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.review import Reviews
from appliance.settings import Settings
from appliance.store import ResultFile, Store
from dicom_router.ports import ReceivedInstance

PATIENT = "Doe^Jane"
ROOT = "1.2.826.0.1.3680043.8.498"
CT = "1.2.840.10008.5.1.4.1.1.2"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: a study sent with a failed job beside a done one whose result went to ``pacs``
SENT = f"{ROOT}.5101"
#: a study no rule matched
NO_MATCH = f"{ROOT}.5102"
#: a study still arriving (not handed off)
RECEIVING = f"{ROOT}.5103"
#: a study whose result is held for review (``held-model``)
HELD = f"{ROOT}.5104"
#: a study whose result a reviewer rejected
REJECTED = f"{ROOT}.5105"


@dataclass(frozen=True)
class Seeded:
    done_job: int
    failed_job: int
    held_job: int
    rejected_job: int


def receive(store: Store, study: str, series: list[str], per_series: int, ae: str) -> None:
    for s in series:
        for i in range(per_series):
            store.store(ReceivedInstance(CT, f"{s}.{i}", study, s, "1.2.840.10008.1.2.1", ae, "127.0.0.1",
                                         b"DICM" + PATIENT.encode() + bytes([i]) * 64))


def _finish(store: Store, settings: Settings, results_dir: Path, uid: str, hold: bool) -> int:
    job = store.claim_job()
    assert job is not None
    folder = results_dir / f"job-{job.id}"
    folder.mkdir(parents=True, exist_ok=True)
    result = ResultFile(uid, "seg", SEG_CLASS, folder / "seg.dcm", {"model": job.model})
    result.path.write_bytes(b"DICM")
    reviews = Reviews(store, settings.review)
    store.complete_job(job, [result], ["pacs"], "CPUExecutionProvider", "abc", {"predict": 1.5},
                       hold=reviews.hold_for(job) if hold else None)
    return job.id


def seed(store: Store, settings: Settings) -> Seeded:
    """Five studies: sent (+ a failed job), no match, receiving, held for review, rejected in review.

    ``settings.review.models`` must name ``held-model``.
    """
    receive(store, SENT, [f"{SENT}.1"], 3, "CT_SCANNER")
    run = store.hand_off(SENT, "quiet")
    assert run is not None
    store.record_routes(run, [("liver", "liver-seg", "1.0.0", f"{SENT}.1", "k1"),
                              ("spleen", "spleen-seg", "1.0.0", f"{SENT}.1", "k2")])
    done = _finish(store, settings, store.results_dir, f"9.{SENT}.1", hold=False)
    (item,) = store.due(10)
    store.mark_sent(item.id)
    failed = store.claim_job()
    assert failed is not None
    store.fail_job(failed, "series has inconsistent slice spacing", "series_unusable", None)

    receive(store, NO_MATCH, [f"{NO_MATCH}.1", f"{NO_MATCH}.2"], 2, "MR_SCANNER")
    run = store.hand_off(NO_MATCH, "quiet")
    assert run is not None
    store.record_routes(run, [], no_match={"series": []})

    receive(store, RECEIVING, [f"{RECEIVING}.1"], 1, "CT_SCANNER")

    reviews = Reviews(store, settings.review)
    ids: list[int] = []
    for study in (HELD, REJECTED):
        receive(store, study, [f"{study}.1"], 2, "CT_SCANNER")
        run = store.hand_off(study, "quiet")
        assert run is not None
        store.record_routes(run, [("held", "held-model", "2.0.0", f"{study}.1", "k")])
        ids.append(_finish(store, settings, store.results_dir, f"9.{study}.1", hold=True))
    reviews.reject(ids[1], "rita", "wrong organ", via="cli")
    return Seeded(done, failed.id, ids[0], ids[1])
