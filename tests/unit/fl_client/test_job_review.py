"""Approval of content, not names: the job review, the hash an approval binds, the launcher's check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.audit import AuditEvent
from appliance.fl import decide_job, layout_of
from appliance.settings import Settings
from appliance.store import Store
from fl_client.approvals import Approvals
from fl_client.errors import PolicyError
from fl_client.job_review import content_hash, review_job
from fl_client.layout import SiteLayout
from fl_client.settings import FLSettings
from fl_client.site_components import ApprovedContentLauncher

JOB = Path(__file__).resolve().parents[3] / "fl_jobs" / "ct-body-composition-fedavg"


@pytest.fixture
def job(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    shutil.copytree(JOB, folder)
    return folder


def _edit_trainer(job: Path, **args: object) -> None:
    path = job / "app_client" / "config" / "config_fed_client.json"
    config = json.loads(path.read_text())
    config["executors"][0]["executor"]["args"].update(args)
    path.write_text(json.dumps(config, indent=4))


def test_review_shows_trainer_model_rounds_floor_and_hash(job: Path) -> None:
    review = review_job(job, FLSettings(), "hospital-a")
    assert not review.problems, review.problems
    assert review.trainer["model"] == "ct-body-composition" and review.trainer["steps"] == 20
    assert review.rounds == 2 and review.client_app == "app_client"
    assert review.privacy["clip_norm"] == 1.0 and review.privacy["min_series"] == 20
    assert len(review.client_app_sha256) == 64 and review.client_app_sha256 != review.job_sha256
    # formatting is not content; a trainer argument is
    path = job / "app_client" / "config" / "config_fed_client.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=1))
    assert review_job(job, FLSettings()).client_app_sha256 == review.client_app_sha256
    _edit_trainer(job, lr=0.1)
    changed = review_job(job, FLSettings())
    assert changed.client_app_sha256 != review.client_app_sha256 and changed.job_sha256 != review.job_sha256


def test_review_names_what_the_floor_refuses(job: Path) -> None:
    _edit_trainer(job, steps=1, batch_size=1, model="other-model")
    (job / "app_client" / "custom").mkdir()
    problems = " | ".join(review_job(job, FLSettings()).problems)
    assert "examples per round" in problems and "not allowed" in problems and "custom" in problems


def test_launcher_starts_only_the_approved_content(job: Path, tmp_path: Path) -> None:
    layout = SiteLayout(tmp_path / "fl")
    layout.ensure()
    launcher = ApprovedContentLauncher(str(layout.control))
    deployed = tmp_path / "site" / "job-1" / "app_hospital-a"
    shutil.copytree(job / "app_client", deployed)
    (deployed / "__nvfl_sig.json").write_text("{}")  # added by NVFlare's job signing: not content
    meta = {"job_id": "job-1", "name": "ct-body-composition-fedavg", "submitter_name": "lead@x"}
    assert "not approved" in str(launcher.check("job-1", deployed, meta))
    sha = review_job(job, FLSettings()).client_app_sha256
    assert content_hash(deployed) == sha
    Approvals(layout).decide("job-1", "approved", actor="alice", client_app_sha256=sha)
    assert launcher.check("job-1", deployed, meta) is None
    # the server deploys something else under the approved id: it does not start, and waits as a new approval
    cfg = deployed / "config" / "config_fed_client.json"
    config = json.loads(cfg.read_text())
    config["executors"][0]["executor"]["args"]["steps"] = 500
    cfg.write_text(json.dumps(config))
    reason = launcher.check("job-1", deployed, meta)
    assert reason is not None and "differs from the approved content" in reason
    pending = Approvals(layout).pending_job("job-1")
    assert pending is not None and pending.meta["deployed"]["trainer"]["steps"] == 500


def test_approval_binds_the_reviewed_content_and_is_audited(job: Path, tmp_path: Path) -> None:
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "var"), "fsync": False,
                                                    "min_free_mb": 0},
                                        "inference": {"models_dir": str(tmp_path / "models")}})
    store = Store(settings.data_dir, fsync=False)
    try:
        layout = layout_of(settings)
        layout.ensure()
        Approvals(layout).note_pending("job-1", name="ct-body-composition-fedavg", submitter="lead@x",
                                       command="check_resources", reason="waiting", meta={})
        with pytest.raises(PolicyError, match="binds the job's content"):
            decide_job(settings, store, "job-1", "approved", "alice")
        other = tmp_path / "other"
        shutil.copytree(job, other)
        meta = json.loads((other / "meta.json").read_text())
        (other / "meta.json").write_text(json.dumps({**meta, "name": "something-else"}))
        with pytest.raises(PolicyError, match="something-else"):
            decide_job(settings, store, "job-1", "approved", "alice", job_folder=other)
        made = decide_job(settings, store, "job-1", "approved", "alice", job_folder=job)
        assert made.client_app_sha256 == review_job(job, settings.fl).client_app_sha256
        assert made.review["trainer"]["steps"] == 20 and made.review["rounds"] == 2
        event = next(e for e in store.audit_events() if e["event"] == AuditEvent.FL_JOB_APPROVED)
        assert event["detail"]["client_app_sha256"] == made.client_app_sha256
        assert event["detail"]["privacy"]["noise_multiplier"] == 1.0
    finally:
        store.close()


def test_review_projects_the_budget_after_the_job(job: Path, tmp_path: Path) -> None:
    from fl_client.privacy import PrivacyBudget, epsilon_spent

    layout = SiteLayout(tmp_path / "fl")
    layout.ensure()
    PrivacyBudget(layout).charge("proj", job_id="old", round_no=0, noise_multiplier=1.0, epsilon=10.0, delta=1e-5)
    privacy = review_job(job, FLSettings(), layout=layout, project="proj").privacy
    assert privacy["epsilon_spent_so_far"] == pytest.approx(epsilon_spent([(1.0, 1)], 1e-5), abs=1e-3)
    assert privacy["epsilon_after_this_job"] == pytest.approx(epsilon_spent([(1.0, 3)], 1e-5), abs=1e-3)
    assert "note" not in privacy
    long_job = review_job(job, FLSettings(privacy={"epsilon": 5.0}), layout=layout, project="proj")  # type: ignore[arg-type]
    assert "runs out" in long_job.privacy["note"]
