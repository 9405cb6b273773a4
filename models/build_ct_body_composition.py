"""Build the demo model package ``ct-body-composition`` from synthetic phantoms, reproducibly.

Trains a small 2D MONAI BasicUNet, slice by slice, on phantoms from :mod:`inference.phantom` whose
labels are the HU-rule reference (:func:`inference.phantom.hu_reference_labels`), exports it to ONNX,
measures it with the same code the appliance runs (:func:`inference.predict.segment` on ONNX
Runtime) on fresh phantoms and, when present, on the real CT in ``../shared/data``, and writes the
package folder: manifest, ``model.onnx``, model card, licence, sha256 of every file.

Run: ``.venv/bin/python models/build_ct_body_composition.py --out models/ct-body-composition``
(needs the ``train`` extra: torch, monai, onnx, onnxscript).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# passive OpenMP waits: on a shared machine, spinning threads slow training several times over
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import yaml
from monai.losses.dice import DiceCELoss
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fl_client.architectures import (  # noqa: E402  (one definition, shared with federated training)
    BODY_COMPOSITION_FEATURES,
    BODY_COMPOSITION_THRESHOLDS_HU,
    BODY_COMPOSITION_WINDOW,
    Slab,
)
from fl_client.architectures import body_composition_unet as make_network  # noqa: E402
from inference.packages import MANIFEST_NAME, Manifest, load_package, write_digests  # noqa: E402
from inference.phantom import ADIPOSE, BONE, MUSCLE, hu_reference_labels, make_phantom  # noqa: E402
from inference.predict import segment  # noqa: E402
from inference.runtime.onnxruntime import OnnxRuntime  # noqa: E402

log = logging.getLogger("build_ct_body_composition")

NAME, VERSION = "ct-body-composition", "1.0.0"
WINDOW = BODY_COMPOSITION_WINDOW
PATCH = (1, 512, 512)
FEATURES = BODY_COMPOSITION_FEATURES
#: the rule's HU thresholds (body, adipose low, adipose/muscle, muscle high, bone), as input features
THRESHOLDS_HU = BODY_COMPOSITION_THRESHOLDS_HU
CLASSES = {ADIPOSE: "adipose", MUSCLE: "soft tissue", BONE: "bone"}
#: tissue HU ranges a predicted segment's mean must fall in (bone includes marrow)
HU_RANGES = {ADIPOSE: (-190.0, -30.0), MUSCLE: (-29.0, 150.0), BONE: (200.0, 1500.0)}
REAL_CT = REPO.parent / "shared" / "data" / "totalsegmentator" / "example_ct_dicom"
#: what the model accepts (enforced before inference): trunk CT of at least two slices
BODY_PARTS = ("ABDOMEN", "CHEST", "ABDOMENPELVIS", "CHESTABDOMEN", "CHESTABDPELVIS")
MIN_SLICES = 2
SLICE_SPACING_MM = (0.5, 10.0)
PIXEL_SPACING_MM = (0.4, 8.0)


@dataclass(frozen=True)
class Config:
    seed: int = 20240501
    phantoms: int = 150
    slices_per_phantom: int = 2
    size: int = 384
    crop: int = 192
    batch: int = 6
    steps: int = 500
    lr: float = 3e-3
    eval_phantoms: int = 3


def window(hu: NDArray[np.float32]) -> NDArray[np.float32]:
    low, high = WINDOW
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def training_slices(cfg: Config, rng: np.random.Generator) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """Phantom slices at varied pixel spacing, noise and anatomy, with their HU-rule labels."""
    hus, labels = [], []
    for i in range(cfg.phantoms):
        pixel = float(rng.uniform(0.75, 1.3))
        p = make_phantom((cfg.slices_per_phantom, cfg.size, cfg.size), (2.5, pixel, pixel),
                         seed=cfg.seed + i, noise_hu=float(rng.uniform(4, 28)))
        hus.append(p.hu)
        labels.append(p.labels)
    return np.concatenate(hus), np.concatenate(labels)


def batches(hu: NDArray[np.float32], labels: NDArray[np.uint8], cfg: Config,
            rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of random crops; flips and transposes keep the HU rule.

    A third of the crops centre on bone, a third on tissue outside the body (arms apart from the
    trunk, the table): the two places where the rule is not a matter of HU alone.
    """
    xs = np.empty((cfg.batch, 1, cfg.crop, cfg.crop), np.float32)
    ys = np.empty((cfg.batch, cfg.crop, cfg.crop), np.int64)
    half = cfg.crop // 2
    for b in range(cfg.batch):
        i = int(rng.integers(hu.shape[0]))
        if b % 3 == 1:
            centres = np.flatnonzero(labels[i] == BONE)
        elif b % 3 == 2:
            centres = np.flatnonzero((labels[i] == 0) & (hu[i] > -200) & (hu[i] < 150))
        else:
            centres = np.empty(0, np.intp)
        if centres.size:
            cy, cx = divmod(int(centres[rng.integers(centres.size)]), cfg.size)
            y0, x0 = (min(max(c - half + int(rng.integers(-half // 2, half // 2 + 1)), 0), cfg.size - cfg.crop)
                      for c in (cy, cx))
        else:
            y0, x0 = (int(rng.integers(0, cfg.size - cfg.crop + 1)) for _ in range(2))
        x, y = hu[i, y0:y0 + cfg.crop, x0:x0 + cfg.crop], labels[i, y0:y0 + cfg.crop, x0:x0 + cfg.crop]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        if rng.random() < 0.5:
            x, y = x[::-1], y[::-1]
        if rng.random() < 0.5:
            x, y = x.T, y.T
        xs[b, 0], ys[b] = window(x), y
    return torch.from_numpy(xs), torch.from_numpy(ys)


def train(cfg: Config) -> tuple[torch.nn.Module, float]:
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    hu, labels = training_slices(cfg, rng)
    log.info("%d training slices in %.0f s; class fractions %s", hu.shape[0], time.monotonic() - t0,
             np.round(np.bincount(labels.ravel(), minlength=4) / labels.size, 3).tolist())
    net = make_network()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    net.train()
    for step in range(cfg.steps):
        x, y = batches(hu, labels, cfg, rng)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y[:, None])
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.info("step %d/%d loss %.4f (%.0f s)", step, cfg.steps, loss.item(), time.monotonic() - t0)
    net.eval()
    return net, time.monotonic() - t0


def export(net: torch.nn.Module, path: Path) -> None:
    model = Slab(net).eval()
    example = torch.zeros(1, 1, *PATCH)
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamo=False, opset_version=17,
                      dynamic_axes={"image": {0: "batch", 2: "z", 3: "y", 4: "x"},
                                    "logits": {0: "batch", 2: "z", 3: "y", 4: "x"}})


def dice(pred: NDArray[np.uint8], ref: NDArray[np.uint8], label: int) -> float:
    p, r = pred == label, ref == label
    denom = int(p.sum()) + int(r.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & r).sum()) / denom


def read_ct(folder: Path) -> tuple[NDArray[np.float32], tuple[float, float, float]]:
    """A single-series CT folder → HU volume sorted by ImagePositionPatient z, and its spacing."""
    import pydicom

    datasets = sorted((pydicom.dcmread(f) for f in sorted(folder.iterdir()) if f.is_file()),
                      key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in datasets])
    z = [float(d.ImagePositionPatient[2]) for d in datasets]
    dz = float(np.median(np.diff(z))) if len(z) > 1 else float(datasets[0].SliceThickness)
    row, col = (float(v) for v in datasets[0].PixelSpacing)
    return hu, (dz, row, col)


def evaluate(hu: NDArray[np.float32], spacing: tuple[float, float, float], manifest: Manifest,
             runtime: OnnxRuntime) -> dict[str, float]:
    pred = segment(hu, spacing, manifest, runtime)
    ref = hu_reference_labels(hu, spacing)
    figures: dict[str, float] = {}
    for label, name in CLASSES.items():
        figures[f"dice_{name}"] = dice(pred, ref, label)
        figures[f"mean_hu_{name}"] = mean_hu(hu, pred == label)
        figures[f"ref_mean_hu_{name}"] = mean_hu(hu, ref == label)
    return figures


def mean_hu(hu: NDArray[np.float32], mask: NDArray[np.bool_]) -> float:
    return float(hu[mask].mean()) if mask.any() else float("nan")


def segments() -> list[dict[str, object]]:
    """The output segments: named for what an HU rule can tell apart, coded to match (SNOMED CT)."""
    def tissue() -> dict[str, str]:  # a fresh dict each time: no YAML anchors in the manifest
        return {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}

    return [
        {"label": ADIPOSE, "name": "Adipose tissue", "category": tissue(),
         "type": {"value": "55603005", "scheme": "SCT", "meaning": "Adipose tissue"},
         "colour": [255, 214, 0]},
        # -29..150 HU inside the body: muscle, liver, spleen, kidneys, bowel wall, vessels; not "muscle"
        {"label": MUSCLE, "name": "Non-adipose soft tissue", "category": tissue(),
         "type": {"value": "87784001", "scheme": "SCT", "meaning": "Soft tissue"},
         "colour": [214, 40, 40]},
        {"label": BONE, "name": "Bone", "category": tissue(),
         "type": {"value": "3138006", "scheme": "SCT", "meaning": "Bone tissue"},
         "colour": [240, 240, 220]},
    ]


def manifest_data(files: dict[str, str], cfg: Config,
                  figures: dict[str, dict[str, float]], train_s: float = 0.0) -> dict[str, object]:
    return {
        "name": NAME,
        "version": VERSION,
        "task": "segmentation",
        "title": "CT body composition (demo)",
        "description": "Adipose tissue, non-adipose soft tissue (muscle and organs alike) and bone on "
                       "axial CT, slice by slice, by HU range. Demo model trained on synthetic phantoms "
                       "with HU-rule labels; not for clinical use.",
        "algorithm_family": {"value": "123110", "scheme": "DCM", "meaning": "Artificial Intelligence"},
        "clinical_use": False,
        "input": {
            "modality": "CT",
            "body_parts": list(BODY_PARTS),
            "orientation": "axial",
            "spacing_mm": None,
            "intensity": {"low": WINDOW[0], "high": WINDOW[1]},
            "patch_size": list(PATCH),
            "overlap": 0.25,
            "min_slices": MIN_SLICES,
            "slice_spacing_mm": list(SLICE_SPACING_MM),
            "pixel_spacing_mm": list(PIXEL_SPACING_MM),
        },
        "output": {
            "segments": segments(),
            "measurements": ["volume", "mean", "stddev", "min", "max"],
            "postprocessing": [],
        },
        "model_file": "model.onnx",
        "model_card": "MODEL_CARD.md",
        "licence": "LICENSE",
        "files": files,
        "provenance": {
            "builder": "models/build_ct_body_composition.py",
            "training_data": f"{cfg.phantoms * cfg.slices_per_phantom} synthetic phantom slices "
                             f"(inference.phantom, seeds {cfg.seed}..{cfg.seed + cfg.phantoms - 1})",
            "labels": "inference.phantom.hu_reference_labels (HU rule)",
            "network": f"MONAI BasicUNet 2D, features {list(FEATURES)}, HU-threshold input channels",
            "torch": str(torch.__version__),
            "real_ct_dice": ", ".join(f"{k[5:]} {v:.3f}" for k, v in figures.get("real", {}).items()
                                      if k.startswith("dice_")) or "not measured",
            "training_seconds": f"{train_s:.0f}",
        },
    }


def segment_table() -> str:
    """The segments as a Markdown table, from the same data as the manifest (so the two agree)."""
    rows = ["| Label | Segment | Category | Type (coded) | Colour (RGB) |", "|---|---|---|---|---|"]
    for seg in segments():
        category, kind = seg["category"], seg["type"]
        assert isinstance(category, dict) and isinstance(kind, dict)
        rows.append(f"| {seg['label']} | {seg['name']} | {category['meaning']} ({category['scheme']} "
                    f"{category['value']}) | {kind['meaning']} ({kind['scheme']} {kind['value']}) | "
                    f"{', '.join(str(c) for c in seg['colour'])} |")  # type: ignore[attr-defined]
    return "\n".join(rows)


def model_card(cfg: Config, train_s: float, onnx_bytes: int, figures: dict[str, dict[str, float]]) -> str:
    def table(rows: dict[str, dict[str, float]]) -> str:
        head = "| Data | " + " | ".join(f"Dice {n}" for n in CLASSES.values()) + " | " + \
               " | ".join(f"mean HU {n} (reference)" for n in CLASSES.values()) + " |"
        lines = [head, "|" + "---|" * (1 + 2 * len(CLASSES))]
        for name, f in rows.items():
            cells = [f"{f[f'dice_{n}']:.3f}" for n in CLASSES.values()]
            cells += [f"{f[f'mean_hu_{n}']:.0f} ({f[f'ref_mean_hu_{n}']:.0f})" for n in CLASSES.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    slice_mm = f"{SLICE_SPACING_MM[0]:g}-{SLICE_SPACING_MM[1]:g}"
    pixel_mm = f"{PIXEL_SPACING_MM[0]:g}-{PIXEL_SPACING_MM[1]:g}"
    real = ("the real CT was not available when this package was built"
            if "real" not in figures else
            "`real` is the 20-slice upper-abdomen Siemens CT from TotalSegmentator's example data "
            "(Apache-2.0), 512x512, 0.98 mm pixels, 2 mm slice spacing, contrast enhanced")
    return f"""# {NAME} {VERSION} — model card

**Not for clinical use.** A demonstration model for the Portico appliance. It exists so the
appliance has something real to run end to end (DICOM in, ONNX inference, SEG and SR out).

## What it is
- Task: per-voxel labels on axial CT by HU range: 1 adipose tissue, 2 non-adipose soft tissue, 3 bone
  (0 background). The segments, as the manifest codes them and the SEG and SR carry them:

{segment_table()}
- Network: MONAI `BasicUNet`, 2D, features {list(FEATURES)}, batch norm, run slice by slice. Its
  input is the windowed CT plus fixed indicator channels for the rule's HU thresholds
  ({", ".join(f"{t:g}" for t in THRESHOLDS_HU)} HU), computed inside the graph, so the learning goes
  into the rule's morphology (opening, filled bone, body region). Exported to ONNX (opset 17) with
  the contract input `(N, 1, z, y, x)` → logits `(N, 4, z, y, x)`; {onnx_bytes / 1e6:.1f} MB.
- Input: native voxel grid, HU clipped to [{WINDOW[0]:.0f}, {WINDOW[1]:.0f}] and scaled to [0, 1],
  patches of {PATCH[1]}x{PATCH[2]} pixels (smaller slices are padded).
- Postprocessing: none. The network itself leaves out what the rule leaves out (table, arms apart
  from the trunk); `largest_component` is not used because an arm pressed against the trunk belongs
  to the body by the rule yet is not connected to it in the label map (the skin line between them is
  thinner than the rule's opening).

## How it was made
- Training data: **synthetic phantoms only** ({cfg.phantoms} phantoms x {cfg.slices_per_phantom} slices,
  {cfg.size}x{cfg.size} pixels of 0.75-1.3 mm, noise 4-28 HU; torso, organs, spine, ribs, arms, table)
  from `inference/phantom.py`. No patient data was used.
- Labels: **an HU rule, not expert annotation** (`inference.phantom.hu_reference_labels`): inside the
  largest body region of each slice, bone >= 200 HU with enclosed holes filled, adipose -190..-30 HU,
  soft tissue -29..150 HU, each opened with a 3x3 cross. "Non-adipose soft tissue" is therefore
  *everything in the muscle HU range*: skeletal muscle, liver, spleen, kidneys, bowel wall and vessels
  alike (which is why it is not called skeletal muscle); contrast-filled vessels above 200 HU count as
  bone. The model learns to imitate this rule, nothing more.
- Training: {cfg.steps} steps of {cfg.batch} random {cfg.crop}x{cfg.crop} crops, AdamW, one-cycle LR
  {cfg.lr}, Dice + cross-entropy; seed {cfg.seed}; {train_s:.0f} s on {torch.get_num_threads()} CPU threads
  ({platform.machine()}). Rebuild: `.venv/bin/python models/build_ct_body_composition.py --out
  models/ct-body-composition`.

## Performance (measured by the build, ONNX Runtime on CPU, agreement with the HU rule)
{table(figures)}

`phantom-N` are fresh phantoms (seeds never used in training); {real}.
Dice measures agreement with the HU rule, not anatomical truth.

## Intended use and limits
- Intended use: demonstrating and testing the appliance (routing, inference, DICOM SEG / TID 1500 SR,
  review, federated learning). Not a medical device; never use its output for diagnosis, treatment
  or body-composition reporting.
- Expects axial CT in HU of the trunk; other modalities, non-axial reconstructions or HU-miscalibrated
  series give meaningless output.
- Accepts (the manifest's `input`, enforced before inference; a series outside it fails its job at
  once with `series_not_accepted`): modality CT; body part one of {", ".join(BODY_PARTS)},
  or none named (absent, PARTIALBODY, WHOLEBODY); at least {MIN_SLICES} slices; slice spacing
  {slice_mm} mm; pixel spacing {pixel_mm} mm. The spacing ranges are wide on purpose: the tests
  run this demo model on small, coarse phantoms (up to 8 mm pixels), while it was trained on
  0.75-1.3 mm pixels; a clinical package would declare its training range.
- Single-slice series are refused (`min_slices: {MIN_SLICES}`): the model reports volumes (cm³), and a
  volume needs a slice spacing measured between slice positions, where one slice has only its nominal
  SliceThickness. Single-slice body composition (an L3 slice) reports areas (cm²) at a chosen
  vertebral level, which this model neither measures nor checks.
- Muscle is not separated from organs (hence "non-adipose soft tissue"); intermuscular fat inside
  muscle is labelled adipose; bone includes contrast-enhanced vessels and enclosed marrow.

## Known errors (where it disagrees with the rule)
- Arms: the rule keeps an arm only when it touches the trunk in that slice (after its opening), a
  matter of a few pixels of skin contact. The model usually labels both arms; on the real CT above
  it labels the right arm, which the rule leaves out, and most of the bone disagreement comes from it.
- Bone marrow and the spinal canal: the rule fills them only where the cortex above 200 HU closes a
  ring in that slice. The model gets this wrong on some vertebrae (too little or too much filled).
- Boundaries: partial-volume voxels near a threshold (fat/soft tissue at -30 HU, bone at 200 HU) go either
  way.
"""


APACHE_NOTICE = """Copyright 2024 The Portico authors

Licensed under the Apache License, Version 2.0 (the "License"); you may not use this model package
except in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is
distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or
implied. See the License for the specific language governing permissions and limitations under the
License.

The model was trained on synthetic data only (inference/phantom.py); no third-party data is included.
"""


def previous_training_seconds(out: Path) -> float:
    """The training time of the package already in ``out`` (manifest, or the card of older builds)."""
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        seconds = (yaml.safe_load(manifest.read_text()).get("provenance") or {}).get("training_seconds")
        if seconds is not None:
            return float(seconds)
    card = out / "MODEL_CARD.md"
    found = re.search(r"seed \d+; (\d+) s on", card.read_text()) if card.is_file() else None
    return float(found.group(1)) if found else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "models" / NAME)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--real-ct", type=Path, default=REAL_CT,
                        help="a CT series folder to measure on, if present")
    parser.add_argument("--reuse-model", action="store_true",
                        help="keep the model.onnx in --out (no training): re-measure it and rewrite the model "
                             "card and manifest, e.g. after a change of segment names or codes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    cfg = Config(steps=args.steps)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    onnx_path = out / "model.onnx"
    if args.reuse_model:
        train_s = previous_training_seconds(out)
        runtime = OnnxRuntime(onnx_path, ("CPUExecutionProvider",), intra_op_threads=args.threads)
    else:
        net, train_s = train(cfg)
        export(net, onnx_path)
        with torch.no_grad():  # the exported graph must match the network
            probe = torch.from_numpy(window(make_phantom((2, 96, 128), (2.5, 3.0, 3.0), seed=1).hu))[None, None]
            expected = Slab(net)(probe).numpy()
        runtime = OnnxRuntime(onnx_path, ("CPUExecutionProvider",), intra_op_threads=args.threads)
        np.testing.assert_allclose(runtime.run(probe.numpy()), expected, rtol=1e-3, atol=1e-3)

    (out / "MODEL_CARD.md").write_text("pending\n")
    (out / "LICENSE").write_text(APACHE_NOTICE)
    draft = Manifest.model_validate(manifest_data({}, cfg, {}))
    figures: dict[str, dict[str, float]] = {}
    for k in range(cfg.eval_phantoms):
        rng = np.random.default_rng(cfg.seed - 1 - k)
        pixel = float(rng.uniform(0.7, 1.0))
        p = make_phantom((12, 512, 512), (2.0, pixel, pixel), seed=cfg.seed - 1000 - k,
                         noise_hu=float(rng.uniform(6, 20)))
        figures[f"phantom-{k + 1}"] = evaluate(p.hu, p.spacing, draft, runtime)
    if args.real_ct.is_dir():
        hu, spacing = read_ct(args.real_ct)
        figures["real"] = evaluate(hu, spacing, draft, runtime)
    for name, f in figures.items():
        log.info("%s: %s", name, {k: round(v, 3) for k, v in f.items()})

    onnx_bytes = onnx_path.stat().st_size
    (out / "MODEL_CARD.md").write_text(model_card(cfg, train_s, onnx_bytes, figures))
    files = write_digests(out, ["model.onnx", "MODEL_CARD.md", "LICENSE"])
    (out / MANIFEST_NAME).write_text(yaml.safe_dump(manifest_data(files, cfg, figures, train_s), sort_keys=False,
                                                    allow_unicode=True))
    package = load_package(out)
    log.info("built %s: %.0f s training, model.onnx %.2f MB", package.ref, train_s, onnx_bytes / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
