"""A small FRACTIONAL and BINARY SEG on a phantom CT series, written to files, for dispatch tests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from appliance.demo_study import write_ct_series
from inference.packages import Code, InputSpec, IntensityWindow, Manifest, OutputSpec, Segment, SegType, Task
from inference.phantom import ADIPOSE, BONE, MUSCLE, make_phantom
from inference.results.seg import build_fractional_seg, build_seg
from inference.settings import DeviceIdentity
from inference.volume import Volume, load_series

ROOT = "1.2.826.0.1.3680043.8.498."
TISSUE = Code(value="85756007", scheme="SCT", meaning="Tissue")
WHEN = dt.datetime(2024, 5, 6, 7, 8, 9)


def seg_manifest(seg_type: SegType = SegType.FRACTIONAL) -> Manifest:
    """Three tissue segments (adipose, muscle, bone), labels as the phantom's."""
    segments = tuple(
        Segment(label=label, name=name, category=TISSUE, type=Code(value=value, scheme="SCT", meaning=name))
        for label, name, value in ((ADIPOSE, "Adipose tissue", "55603005"), (MUSCLE, "Muscle", "127954009"),
                                   (BONE, "Bone", "56329008")))
    return Manifest(name="seg-test", version="1.0.0", task=Task.SEGMENTATION, title="SEG test",
                    input=InputSpec(modality="CT", intensity=IntensityWindow(low=-200, high=300),
                                    patch_size=(4, 32, 32)),
                    output=OutputSpec(segments=segments, seg_type=seg_type), files={})


def soft_probabilities(labels: NDArray[np.uint8], manifest: Manifest, seed: int = 0) -> NDArray[np.uint8]:
    """(segments, z, y, x) uint8: high inside each segment, a noisy low rim of 1 voxel around it."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(manifest.output.segments), *labels.shape), dtype=np.uint8)
    for i, segment in enumerate(manifest.output.segments):
        inside = labels == segment.label
        rim = np.zeros_like(inside)
        rim[:, 1:] |= inside[:, :-1]
        rim[:, :, 1:] |= inside[:, :, :-1]
        rim &= ~inside
        out[i][inside] = rng.integers(128, 256, int(inside.sum()), dtype=np.uint8)
        out[i][rim] = rng.integers(1, 128, int(rim.sum()), dtype=np.uint8)
    return out


@dataclass(frozen=True)
class SegFiles:
    volume: Volume
    probabilities: NDArray[np.uint8]
    fractional: Path
    binary: Path


def write_segs(folder: Path, shape: tuple[int, int, int] = (6, 64, 64)) -> SegFiles:
    """A phantom series in ``folder/ct`` and its FRACTIONAL and BINARY SEGs in ``folder``."""
    phantom = make_phantom(shape, (2.5, 1.4, 1.4), seed=5)
    volume = load_series(write_ct_series(phantom.hu, phantom.spacing, folder / "ct", seed=3).paths)
    manifest = seg_manifest()
    probabilities = soft_probabilities(phantom.labels, manifest)
    fractional = build_fractional_seg(volume, probabilities, manifest, DeviceIdentity(), ROOT, "run",
                                      content_datetime=WHEN)
    binary = build_seg(volume, phantom.labels, manifest, DeviceIdentity(), ROOT, "run", content_datetime=WHEN)
    paths = folder / "seg-fractional.dcm", folder / "seg-binary.dcm"
    fractional.save_as(paths[0], enforce_file_format=True)
    binary.save_as(paths[1], enforce_file_format=True)
    return SegFiles(volume, probabilities, *paths)
