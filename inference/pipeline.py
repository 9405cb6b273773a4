"""Files and a model package in, derived DICOM datasets out: load → model → measure → SEG + SR."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from inference.accepts import check_accepts
from inference.errors import InferenceError, ResultEncodingError, describe
from inference.measurements import SegmentMeasurement, measure
from inference.packages import ModelPackage, SegType
from inference.predict import batch_size_for, segment, segment_with_probabilities
from inference.results.seg import build_fractional_seg, build_seg
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
    #: the loaded series and the label map (a BINARY SEG encodes it; a FRACTIONAL one the probabilities
    #: behind it), for derived views (key images)
    volume: Volume
    labels: NDArray[np.uint8]
    timings: dict[str, float] = field(default_factory=dict)


def run_segmentation(paths: Sequence[Path], package: ModelPackage, sessions: SessionCache,
                     settings: InferenceSettings, run_key: str,
                     progress: Callable[[int, int], None] | None = None) -> PipelineResult:
    """Segment one series with ``package`` and encode the results.

    ``run_key`` names the run (study, series, run version): derived UIDs come from it and the model
    version, so running the same inputs again yields the same objects. ``progress(done, total)`` is told
    the slices inferred so far.

    Raises
    ------
    SeriesError
        When the files are not one usable series; :class:`~inference.errors.SeriesNotAcceptedError`
        when the model's manifest does not accept it (modality, body part, slices, spacing).
    ResultEncodingError
        When the SEG or SR cannot be built; its message names the failing call, never a value.
    InferenceError
        For other failures of the model or its runtime.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volume = load_series(paths, compact=True)  # int16 where the values allow: half the memory
    check_accepts(volume, package.manifest.input)  # before the model: a refused series costs no inference
    t1 = time.perf_counter()
    timings["load"] = t1 - t0
    model = sessions.get(package, settings.providers)
    manifest = package.manifest
    batch = batch_size_for(manifest.input.patch_size, model.provider)
    if manifest.output.seg_type == SegType.FRACTIONAL:
        labels, probabilities = segment_with_probabilities(volume.hu, volume.spacing, manifest, model,
                                                           batch_size=batch, progress=progress)
    else:
        labels, probabilities = segment(volume.hu, volume.spacing, manifest, model, batch_size=batch,
                                        progress=progress), None
    t2 = time.perf_counter()
    timings["inference"] = t2 - t1
    # measurements (and the SR) always come from the label map, whichever SEG encodes the result
    measurements = measure(labels, volume, manifest.output.segments)
    try:
        if probabilities is not None:
            seg = build_fractional_seg(volume, probabilities, manifest, settings.device, settings.uid_root,
                                       run_key)
            del probabilities
        else:
            seg = build_seg(volume, labels, manifest, settings.device, settings.uid_root, run_key)
        sr = build_sr(seg, volume, measurements, manifest, settings.device, settings.uid_root, run_key,
                      labels=labels)
    except (InferenceError, MemoryError):
        raise
    except Exception as exc:  # highdicom and pydicom raise many types, and their messages may quote values
        raise ResultEncodingError(f"the SEG and SR could not be built: {describe(exc)}") from exc
    timings["encode"] = time.perf_counter() - t2
    return PipelineResult(seg=seg, sr=sr, measurements=measurements, provider=model.provider, volume=volume,
                          labels=labels, timings=timings)
