"""The shipped demo model package: it verifies, and it reproduces the HU rule on real CT and phantoms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from inference.errors import PackageError
from inference.packages import ModelPackage, load_package
from inference.phantom import ADIPOSE, BONE, MUSCLE, hu_reference_labels, make_phantom
from inference.predict import segment
from inference.runtime.onnxruntime import OnnxRuntime

PACKAGE = Path("models") / "ct-body-composition"
REAL_CT = Path("totalsegmentator") / "example_ct_dicom"
#: a predicted segment's mean HU must lie in its tissue's range (bone includes marrow)
HU_RANGES = {ADIPOSE: (-190.0, -30.0), MUSCLE: (-29.0, 150.0), BONE: (200.0, 1000.0)}


@pytest.fixture(scope="module")
def package(repo_root: Path) -> ModelPackage:
    return load_package(repo_root / PACKAGE)


@pytest.fixture(scope="module")
def runtime(package: ModelPackage) -> OnnxRuntime:
    return OnnxRuntime(package.model_path, ("CPUExecutionProvider",))


def read_ct(folder: Path) -> tuple[NDArray[np.float32], tuple[float, float, float]]:
    datasets = sorted((pydicom.dcmread(f) for f in folder.iterdir() if f.is_file()),
                      key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in datasets])
    dz = float(np.median(np.diff([float(d.ImagePositionPatient[2]) for d in datasets])))
    row, col = (float(v) for v in datasets[0].PixelSpacing)
    return hu, (dz, row, col)


def dice(pred: NDArray[np.uint8], ref: NDArray[np.uint8], label: int) -> float:
    p, r = pred == label, ref == label
    return 2.0 * float((p & r).sum()) / float(p.sum() + r.sum())


def check_against_rule(hu: NDArray[np.float32], spacing: tuple[float, float, float], package: ModelPackage,
                       runtime: OnnxRuntime) -> None:
    pred = segment(hu, spacing, package.manifest, runtime)
    ref = hu_reference_labels(hu, spacing)
    assert pred.shape == hu.shape and pred.dtype == np.uint8
    for label, (low, high) in HU_RANGES.items():
        assert dice(pred, ref, label) >= 0.8, f"label {label}: Dice {dice(pred, ref, label):.3f}"
        mean = float(hu[pred == label].mean())
        assert low <= mean <= high, f"label {label}: mean {mean:.0f} HU outside [{low}, {high}]"


def test_package_verifies(package: ModelPackage) -> None:
    m = package.manifest
    assert package.ref == "ct-body-composition@1.0.0"
    assert m.clinical_use is False
    assert (m.algorithm_family.value, m.algorithm_family.scheme) == ("123110", "DCM")
    # an HU rule tells adipose, other soft tissue and bone apart, and the labels say no more than that
    assert [(s.label, s.name, s.type.value) for s in m.output.segments] == [
        (1, "Adipose tissue", "55603005"), (2, "Non-adipose soft tissue", "87784001"), (3, "Bone", "3138006")]
    assert all(s.category.value == "85756007" for s in m.output.segments)
    assert package.model_path.stat().st_size < 8_000_000
    card = (package.root / m.model_card).read_text()
    assert "Not for clinical use" in card and "synthetic" in card
    for s in m.output.segments:  # the card's segment table is the manifest's coding
        assert f"| {s.label} | {s.name} | {s.category.meaning} (SCT {s.category.value}) | {s.type.meaning} " \
               f"({s.type.scheme} {s.type.value}) |" in card
    assert "Skeletal muscle" not in m.description + "".join(s.name for s in m.output.segments)


def test_tampered_package_is_refused(package: ModelPackage, tmp_path: Path) -> None:
    copy = tmp_path / "pkg"
    shutil.copytree(package.root, copy)
    with (copy / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(PackageError, match="sha256"):
        load_package(copy)


@pytest.mark.slow
def test_fresh_phantom_matches_the_rule(package: ModelPackage, runtime: OnnxRuntime) -> None:
    phantom = make_phantom((6, 512, 512), (2.0, 0.8, 0.8), seed=987_654, noise_hu=15.0)
    check_against_rule(phantom.hu, phantom.spacing, package, runtime)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ct_matches_the_rule(real_data: Path, package: ModelPackage, runtime: OnnxRuntime) -> None:
    hu, spacing = read_ct(real_data / REAL_CT)
    assert hu.shape == (20, 512, 512)
    check_against_rule(hu, spacing, package, runtime)
