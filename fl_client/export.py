"""A finished job's global model → ONNX → a *candidate* model package with provenance and a new version.

The candidate takes its input/output spec from the package it was trained for, adapted to how the
trainer saw the data (in-plane pixel size, patch size), and a version one patch above the highest
installed version of that package, tagged with the job (``1.0.1-fl.<job>``). ONNX Runtime's output is
checked against torch before anything is written. The package is never made active here: an
administrator promotes it (``portico models promote``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fl_client.architectures import Slab, build_network, find_package
from fl_client.errors import ExportError
from fl_client.layout import SiteLayout, read_json, write_json
from inference.packages import MANIFEST_NAME, ModelPackage, load_package, read_manifest, write_digests

log = logging.getLogger(__name__)

#: the largest difference between ONNX Runtime and torch logits accepted
ONNX_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExportResult:
    package: ModelPackage
    max_abs_diff: float


def candidate_version(models_dir: Path, name: str, job_id: str) -> str:
    versions = []
    for path in models_dir.glob(f"*/{MANIFEST_NAME}"):
        manifest, _ = read_manifest(path.parent)
        if manifest.name == name:
            versions.append(tuple(int(p) for p in manifest.version.split("-")[0].split(".")[:3]))
    major, minor, patch = max(versions) if versions else (0, 0, 0)
    tag = re.sub(r"[^0-9A-Za-z]", "", job_id)[:8] or "job"
    return f"{major}.{minor}.{patch + 1}-fl.{tag}"


def export_onnx(net: torch.nn.Module, path: Path, patch: tuple[int, int, int]) -> float:
    """Write the Slab-wrapped network as ONNX; the max |ORT - torch| on a probe input."""
    import onnxruntime as ort

    model = Slab(net).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, *patch),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=False, opset_version=17,
                      dynamic_axes={"image": {0: "batch", 2: "z", 3: "y", 4: "x"},
                                    "logits": {0: "batch", 2: "z", 3: "y", 4: "x"}})
    probe = np.random.default_rng(0).random((1, 1, 2, patch[1], patch[2]), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(probe)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": probe})[0]
    return float(np.max(np.abs(np.asarray(got) - expected)))


def export_candidate(layout: SiteLayout, job_id: str, models_dir: Path, dest: Path | None = None) -> ExportResult:
    """Export job ``job_id``'s final global model (kept by the trainer) as a package folder ``dest``.

    ``dest`` defaults to ``jobs/<job>/candidate`` in the FL folder; the appliance then installs it
    into its models folder as a candidate. ``models_dir`` gives the template package and the version.

    Raises
    ------
    ExportError
        When the job left no final model, the weights do not fit the architecture, or ONNX and torch
        disagree.
    """
    job_dir = layout.job_dir(job_id)
    final = read_json(job_dir / "final.json")
    weights = job_dir / "global_model.pt"
    if not isinstance(final, dict) or not weights.is_file():
        raise ExportError(f"job {job_id} has no final global model at this site")
    name = str(final["model"])
    template_dir, template = find_package(models_dir, name)
    net = build_network(name)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ExportError(f"the global model of job {job_id} does not fit {name}: {exc}") from exc
    net.eval()
    size, spacing = int(final.get("image_size", 64)), float(final.get("spacing_mm", 8.0))
    version = candidate_version(models_dir, name, job_id)
    out = dest or job_dir / "candidate"
    if out.exists():
        shutil.rmtree(out)  # an earlier, uninstalled export of the same job
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        work = Path(tmp) / "package"
        work.mkdir()
        diff = export_onnx(net, work / template.model_file, (1, size, size))
        if not diff <= ONNX_TOLERANCE:
            raise ExportError(f"ONNX Runtime differs from torch by {diff:.2e} (> {ONNX_TOLERANCE})")
        shutil.copy2(template_dir / template.licence, work / template.licence)
        (work / template.model_card).write_text(_model_card(template.title, version, job_id, final, diff))
        files = write_digests(work, [template.model_file, template.model_card, template.licence])
        data: dict[str, Any] = template.model_dump(mode="json")
        data["version"] = version
        data["description"] = (f"Federated candidate of {template.name} {template.version} from job {job_id}. "
                               + template.description)[:1000]
        data["input"]["spacing_mm"] = [2.5, spacing, spacing]
        data["input"]["patch_size"] = [1, size, size]
        data["files"] = files
        data["provenance"] = {
            **{k: str(v) for k, v in template.provenance.items()},
            "status": "candidate",
            "fl_job_id": job_id,
            "fl_job_name": str(final.get("job_name") or ""),
            "fl_rounds": str(final.get("rounds")),
            "fl_sites": ",".join(str(s) for s in final.get("contributors", [])),
            "fl_server_metrics": ", ".join(f"{k} {v}" for k, v in (final.get("server_metrics") or {}).items()),
            "fl_local_dice": f"{final.get('dice_local')}",
            "fl_exported_by": str(final.get("site")),
            "fl_base_package": f"{template.name}@{template.version}",
            "onnx_max_abs_diff": f"{diff:.2e}",
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        (work / MANIFEST_NAME).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        load_package(work)  # the same verification the appliance applies
        work.rename(out)
    package = load_package(out)
    write_json(job_dir / "exported.json", {"package": package.ref, "folder": str(out),
                                           "package_hash": package.package_hash, "onnx_max_abs_diff": diff})
    log.info("exported job %s as candidate %s (ONNX vs torch %.1e)", job_id, package.ref, diff)
    return ExportResult(package, diff)


def _model_card(title: str, version: str, job_id: str, final: dict[str, Any], diff: float) -> str:
    sites = ", ".join(str(s) for s in final.get("contributors", [])) or "unknown"
    return f"""# {title} {version} — federated candidate

**Candidate, not active.** Produced by federated training; an administrator must review and promote
it (`portico models promote`) before the appliance uses it. Not for clinical use.

- Federated job: `{job_id}` ({final.get('job_name') or 'unnamed'}), {final.get('rounds')} round(s).
- Sites contributing to the last round: {sites}.
- Dice of this global model on this site's validation data: {final.get('dice_local')}.
- Server-side metrics: {final.get('server_metrics') or {}}.
- Trained slice by slice at {final.get('spacing_mm')} mm pixels, {final.get('image_size')} px patches.
- ONNX Runtime output matches torch to {diff:.1e} (max absolute logit difference).
"""
