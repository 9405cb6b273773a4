"""The site privacy floor at NVFlare's filter boundary (real Shareables and DXOs), the budget, the trainer's
floor checks, local normalisation statistics, and the scrubbed, capped NVFlare environment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import ContentBlockedException
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from pydantic import ValidationError

from fl_client.architectures import build_network
from fl_client.dataset import CohortIndex, SeriesRecord
from fl_client.layout import SiteLayout, write_json
from fl_client.policy import write_policy
from fl_client.privacy import (
    GlobalModelKeeper,
    PrivacyBudget,
    PrivacyFloor,
    epsilon_spent,
    is_sendable,
)
from fl_client.settings import CohortRule, FLSettings, PrivacySettings
from fl_client.site_components import SiteJobGate, inspect_dxo
from fl_client.supervisor import FLEventKind, FLSupervisor, cap_resources, nvflare_env
from fl_client.trainer import TrainArgs, floor_refusal, merge_global

PROJECT = "unit_project"


def _enrolled(tmp_path: Path) -> SiteLayout:
    """A layout with an enrolment record (the project name is what the budget is kept under)."""
    layout = SiteLayout(tmp_path / "fl")
    layout.ensure()
    (layout.site / "startup").mkdir(parents=True)
    (layout.site / "startup" / "fed_client.json").write_text("{}")
    write_json(layout.enrolment_file, {"site": "site-1", "org": "h", "project": PROJECT, "server_target": "x:1",
                                       "scheme": "grpc", "connection_security": "mtls",
                                       "root_ca_fingerprint": "SHA256:00", "certificate_not_after": "2030"})
    return layout


def _ctx(job_id: str = "job-1") -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    return ctx


def _state() -> dict[str, np.ndarray[Any, Any]]:
    torch.manual_seed(0)
    return {k: v.detach().numpy().copy() for k, v in build_network("ct-body-composition").state_dict().items()}


def _round(floor: PrivacyFloor, global_params: dict[str, Any], local_params: dict[str, Any],
           job_id: str = "job-1", task_id: str = "t1") -> DXO:
    """One task through the site's filters: global weights in, the trainer's weights out."""
    incoming = DXO(DataKind.WEIGHTS, data=global_params).to_shareable()
    incoming.set_header(ReservedHeaderKey.TASK_ID, task_id)
    GlobalModelKeeper().process(incoming, _ctx(job_id))
    result = DXO(DataKind.WEIGHTS, data=local_params, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 20}).to_shareable()
    result.set_header(ReservedHeaderKey.TASK_ID, task_id)
    result.set_header("current_round", 0)
    out = floor.process(result, _ctx(job_id))
    assert isinstance(out, Shareable)
    return from_shareable(out)


def _floor(layout: SiteLayout, **kw: Any) -> PrivacyFloor:
    args: dict[str, Any] = {"control_dir": str(layout.control), "project": PROJECT, "clip_norm": 1.0,
                            "noise_multiplier": 0.0, "epsilon": None, "delta": 1e-5}
    return PrivacyFloor(**{**args, **kw})


def _norm(data: dict[str, Any]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in data.values())))


def test_only_trainable_variables_leave_clipped(tmp_path: Path) -> None:
    layout = _enrolled(tmp_path)
    glob = _state()
    rng = np.random.default_rng(1)
    local = {k: (v + rng.normal(0, 0.05, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v + 7)
             for k, v in glob.items()}
    sent = _round(_floor(layout, clip_norm=1.0, exclude_vars=[r"^1\.final_conv\."]), glob, local)
    assert sent.data_kind == DataKind.WEIGHT_DIFF
    names = set(sent.data)
    assert not [n for n in names if re.search(r"running_mean|running_var|num_batches_tracked|levels$", n)]
    assert not [n for n in names if n.startswith("1.final_conv.")]
    expected = {k for k in glob if is_sendable(k, re.compile(r"^1\.final_conv\."))}
    assert names == expected and len(names) > 10
    # the update was far larger than the clip: it leaves with norm exactly clip_norm, in its own direction
    assert _norm(sent.data) == pytest.approx(1.0, rel=1e-4)
    key = sorted(names)[3]
    direction = (local[key] - glob[key]).ravel()
    cos = float(np.dot(direction, np.asarray(sent.data[key]).ravel()) /
                (np.linalg.norm(direction) * np.linalg.norm(np.asarray(sent.data[key]).ravel())))
    assert cos > 0.999
    assert sent.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 20
    # the ledger sees a weight difference with numbers only
    problems, _ = inspect_dxo(sent.data_kind, sent.data, sent.meta)
    assert not problems
    record = json.loads((layout.job_dir("job-1") / "privacy.jsonl").read_text().splitlines()[-1])
    assert record["scale"] < 1 and record["norm_before_clip"] > 1
    assert any(d.startswith("1.final_conv.") for d in record["dropped"])


def test_noise_is_present_at_the_configured_scale(tmp_path: Path) -> None:
    layout = _enrolled(tmp_path)
    glob = _state()
    # no training at all: what leaves is the noise alone, N(0, (sigma * C)^2) per coordinate
    sent = _round(_floor(layout, clip_norm=0.5, noise_multiplier=2.0, epsilon=1e6), glob, dict(glob))
    values = np.concatenate([np.asarray(v, np.float64).ravel() for v in sent.data.values()])
    assert values.size > 100_000
    assert values.std() == pytest.approx(1.0, rel=0.02)
    assert abs(values.mean()) < 0.01
    # and a second round draws fresh noise
    again = _round(_floor(layout, clip_norm=0.5, noise_multiplier=2.0, epsilon=1e6), glob, dict(glob), task_id="t2")
    key = next(iter(sent.data))
    assert not np.allclose(np.asarray(sent.data[key]), np.asarray(again.data[key]))


def test_budget_is_accounted_across_jobs_then_the_site_stops(tmp_path: Path) -> None:
    layout = _enrolled(tmp_path)
    two, three = epsilon_spent([(1.0, 2)], 1e-5), epsilon_spent([(1.0, 3)], 1e-5)
    assert 0 < two < three
    budget = (two + three) / 2
    glob = _state()
    floor = _floor(layout, noise_multiplier=1.0, epsilon=budget)
    _round(floor, glob, dict(glob), job_id="job-1")
    _round(floor, glob, dict(glob), job_id="job-2")  # another job of the same project
    view = PrivacyBudget(layout).project(PROJECT)
    assert len(view["rounds"]) == 2 and view["epsilon_spent"] == pytest.approx(two)
    with pytest.raises(ContentBlockedException, match="privacy budget"):
        _round(floor, glob, dict(glob), job_id="job-2", task_id="t3")
    reason = PrivacyBudget(layout).exhausted(PROJECT)
    assert reason is not None and "spent" in reason
    blocked = json.loads((layout.job_dir("job-2") / "privacy.jsonl").read_text().splitlines()[-1])
    assert blocked["blocked"] and "privacy budget" in blocked["reason"]
    # the gate refuses new jobs of the project, saying why
    gate_reason = SiteJobGate(str(layout.control)).check("check_resources", {"job_id": "j9", "name": "x"}, "u")
    assert gate_reason is not None and "privacy budget" in gate_reason
    # the supervisor turns it into an (audited) event, once
    events: list[Any] = []
    sup = FLSupervisor(FLSettings(), tmp_path, on_event=events.append)
    sup.layout = layout
    sup._poll_state()
    sup._poll_state()
    spent = [e for e in events if e.kind == FLEventKind.PRIVACY_BUDGET_SPENT]
    assert len(spent) == 1 and spent[0].detail["project"] == PROJECT


def test_a_result_that_is_not_the_model_is_blocked(tmp_path: Path) -> None:
    layout = _enrolled(tmp_path)
    glob = _state()
    with pytest.raises(ContentBlockedException, match="not a weight"):
        _round(_floor(layout), glob, {**glob, "extra": np.ones(3, np.float32)})
    fresh = _floor(layout)
    result = DXO(DataKind.WEIGHTS, data=glob).to_shareable()
    with pytest.raises(ContentBlockedException, match="no global model"):
        fresh.process(result, _ctx("never-seen"))


def test_settings_refuse_a_budget_without_noise() -> None:
    with pytest.raises(ValidationError):
        PrivacySettings(noise_multiplier=0.0)
    with pytest.raises(ValidationError):
        PrivacySettings(noise_multiplier=1.0, epsilon=None)
    assert PrivacySettings(noise_multiplier=0.0, epsilon=None).epsilon is None


def test_policy_puts_the_floor_on_every_job(tmp_path: Path) -> None:
    layout = _enrolled(tmp_path)
    write_policy(FLSettings(privacy=PrivacySettings(percentile=10, clip_norm=2.0)), layout, tmp_path / "models")
    scope = json.loads((layout.site / "local" / "privacy.json").read_text())["scopes"][0]
    assert [f["path"].rsplit(".", 1)[-1] for f in scope["task_result_filters"]] == \
        ["PrivacyFloor", "PercentilePrivacy", "OutgoingLedger"]
    assert [f["path"].rsplit(".", 1)[-1] for f in scope["task_data_filters"]] == ["GlobalModelKeeper"]
    args = scope["task_result_filters"][0]["args"]
    assert (args["project"], args["clip_norm"], args["noise_multiplier"]) == (PROJECT, 2.0, 1.0)
    site = json.loads(layout.site_config.read_text())
    assert site["privacy"]["min_series"] == 20 and site["privacy"]["noise_std"] == 2.0


def _index(series: int, patients: int) -> CohortIndex:
    return CohortIndex(name="default", rule=CohortRule(), created=time.time(), series=tuple(
        SeriesRecord(study_uid=f"1.{i}", series_uid=f"1.{i}.1", split="train", image_paths=(), seg_paths=(),
                     patient=f"p{i % patients}") for i in range(series)))


def test_trainer_refuses_below_the_floor() -> None:
    floor = {"min_series": 5, "min_patients": 3, "min_examples_per_round": 64}
    args = TrainArgs("ct-body-composition", "default", 8, 1e-3, 8, 64, 8.0, 0)
    assert floor_refusal(floor, _index(5, 3), args) is None
    assert "training series" in str(floor_refusal(floor, _index(4, 3), args))
    assert "patients" in str(floor_refusal(floor, _index(6, 2), args))
    assert "examples per round" in str(floor_refusal(floor, _index(5, 3), TrainArgs(
        "ct-body-composition", "default", 1, 1e-3, 1, 64, 8.0, 0)))


def test_local_normalisation_statistics_survive_the_global_model(tmp_path: Path) -> None:
    """The site keeps its own BatchNorm statistics; the exported global model works here."""
    from fl_client.export import export_candidate
    from fl_client.trainer import _keep_final
    from tests.integration.fl.harness import make_base_package

    torch.manual_seed(3)
    site_net = build_network("ct-body-composition")
    site_net.train()
    with torch.no_grad():
        for _ in range(20):  # this site's intensity distribution shapes its running statistics
            site_net(torch.rand(8, 1, 64, 64) * 0.3 + 0.5)
    site_stats = {k: v.clone() for k, v in site_net.state_dict().items() if "running_mean" in k}
    # what the server sends back: learnt weights, and its own (never-updated) statistics
    server = {k: v.clone() for k, v in build_network("ct-body-composition").state_dict().items()}
    merge_global(site_net, server)
    after = site_net.state_dict()
    for key, value in site_stats.items():
        assert torch.equal(after[key], value), key
    weight = next(k for k in server if k.endswith("conv.weight"))
    assert torch.equal(after[weight], server[weight])
    # the final model as the trainer keeps it, exported as a candidate, runs in ONNX Runtime like torch
    layout = SiteLayout(tmp_path / "fl")
    layout.ensure()
    models = tmp_path / "models"
    make_base_package(models)
    job_dir = layout.job_dir("job-x")
    _keep_final(job_dir, site_net, {"portico_rounds": 1}, 0.5,
                TrainArgs("ct-body-composition", "default", 8, 1e-3, 8, 64, 8.0, 0), "site-1", 10, 3)
    result = export_candidate(layout, "job-x", models)
    assert result.max_abs_diff < 1e-3
    kept = torch.load(job_dir / "global_model.pt", weights_only=True)
    for key, value in site_stats.items():
        assert torch.equal(kept[key], value), key


def test_nvflare_gets_a_scrubbed_capped_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTICO_API__TOKEN", "s3cret-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-s3cret")
    layout = SiteLayout(tmp_path / "fl")
    env = nvflare_env(layout, threads=2)
    child = subprocess.Popen([sys.executable, "-c", "import os,sys,time; sys.stdout.write(repr(dict(os.environ))); "
                              "sys.stdout.flush(); time.sleep(2)"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        cap_resources(child.pid, 4096)
        limits = Path(f"/proc/{child.pid}/limits").read_text()
        niceness = os.getpriority(os.PRIO_PROCESS, child.pid)
        seen = child.communicate(timeout=30)[0]
    finally:
        if child.poll() is None:
            child.kill()
    assert "s3cret" not in seen and "PORTICO_API__TOKEN" not in seen and "AWS_SECRET" not in seen
    assert "'OMP_NUM_THREADS': '2'" in seen and str(layout.home) in seen
    line = next(x for x in limits.splitlines() if x.startswith("Max address space"))
    assert str(4096 * 1024 * 1024) in line
    assert niceness == 10
