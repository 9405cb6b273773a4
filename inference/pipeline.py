"""Files and a model package in, derived DICOM datasets out: load → model → measure → SEG + SR."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from inference.measurements import SegmentMeasurement, measure
from inference.packages import ModelPackage
from inference.predict import segment
from inference.results.seg import build_seg
from inference.results.sr import build_sr
from inference.runtime.onnxruntime import SessionCache
from inference.settings import InferenceSettings
from inference.volume import Volume, load_series


@dataclass
class PipelineResult:
    seg: Dataset
    sr: Dataset
    measurements: list[SegmentMeasurement]
    provider: str
    #: the loaded series and the label map the SEG encodes, for derived views (key images)
    volume: Volume
    labels: NDArray[np.uint8]
    timings: dict[str, float] = field(default_factory=dict)


def run_segmentation(paths: Sequence[Path], package: ModelPackage, sessions: SessionCache,
                     settings: InferenceSettings, run_key: str) -> PipelineResult:
    """Segment one series with ``package`` and encode the results.

    ``run_key`` names the run (study, series, run version): derived UIDs come from it and the model
    version, so running the same inputs again yields the same objects.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volume = load_series(paths)
    t1 = time.perf_counter()
    timings["load"] = t1 - t0
    model = sessions.get(package, settings.providers)
    labels = segment(volume.hu, volume.spacing, package.manifest, model)
    t2 = time.perf_counter()
    timings["inference"] = t2 - t1
    measurements = measure(labels, volume, package.manifest.output.segments)
    seg = build_seg(volume, labels, package.manifest, settings.device, settings.uid_root, run_key)
    sr = build_sr(seg, volume, measurements, package.manifest, settings.device, settings.uid_root, run_key)
    timings["encode"] = time.perf_counter() - t2
    return PipelineResult(seg=seg, sr=sr, measurements=measurements, provider=model.provider, volume=volume,
                          labels=labels, timings=timings)
