"""Per-segment measurements of a label map on its source volume: size and intensity statistics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from inference.packages import Segment
from inference.volume import Volume

logger = logging.getLogger(__name__)

#: slices per step of the intensity statistics
_SLAB = 16


@dataclass(frozen=True)
class SegmentMeasurement:
    """What was measured for one segment; intensity statistics are ``None`` for an empty segment.

    Intensities are in the volume's modality units (HU for CT); the standard deviation is the
    population one (``ddof=0``) over the segment's voxels.
    """

    label: int
    name: str
    voxel_count: int
    #: millilitres (cm³)
    volume_ml: float
    mean: float | None
    stddev: float | None
    min: float | None
    max: float | None


def as_label_map(labels: NDArray[np.integer] | NDArray[np.bool_],
                 shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """``labels`` as a uint8 label map of ``shape`` (no copy when it already is one).

    Raises
    ------
    ValueError
        When the shape differs or a value lies outside 0..255.
    TypeError
        When ``labels`` is not an integer or boolean array.
    """
    if labels.shape != shape:
        raise ValueError(f"label map shape {labels.shape} does not match the volume {shape}")
    if labels.dtype.kind not in "biu":
        raise TypeError(f"label map must be an integer array, not {labels.dtype}")
    if labels.dtype != np.uint8 and labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise ValueError("label map values must lie in 0..255")
    return labels.astype(np.uint8, copy=False)


def measure(labels: NDArray[np.integer] | NDArray[np.bool_], volume: Volume,
            segments: Sequence[Segment]) -> list[SegmentMeasurement]:
    """Measure each segment of ``labels`` (z, y, x) on ``volume``, in the order of ``segments``.

    Raises
    ------
    ValueError
        When ``labels`` does not have the volume's shape or holds values outside 0..255.
    TypeError
        When ``labels`` is not an integer or boolean array.
    """
    label_map = as_label_map(labels, volume.hu.shape)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    # a per-slice histogram finds each segment's z extent, so each segment is masked only where it is
    per_slice = np.stack([np.bincount(plane.ravel(), minlength=256) for plane in label_map])
    out = []
    for segment in segments:
        counts = per_slice[:, segment.label]
        count = int(counts.sum())
        if count == 0:
            out.append(SegmentMeasurement(segment.label, segment.name, 0, 0.0, None, None, None, None))
            continue
        mean, stddev, low, high = _statistics(volume.hu, label_map, segment.label, np.flatnonzero(counts))
        out.append(SegmentMeasurement(
            label=segment.label,
            name=segment.name,
            voxel_count=count,
            volume_ml=count * voxel_ml,
            mean=mean,
            stddev=stddev,
            min=low,
            max=high,
        ))
    logger.debug("measured %d segment(s) over %d voxels", len(out), label_map.size)
    return out


def _statistics(hu: NDArray[np.float32] | NDArray[np.int16], label_map: NDArray[np.uint8], label: int,
                slices: NDArray[np.intp]) -> tuple[float, float, float, float]:
    """Mean, population standard deviation, min and max of ``hu`` where ``label_map == label``.

    A slab of slices at a time, merged with Chan et al.'s pairwise update, so a large segment never
    needs a float64 copy of all its voxels (that copy was the pipeline's peak memory on long series).
    """
    n, mean, m2 = 0, 0.0, 0.0
    low, high = np.inf, -np.inf
    for start in range(int(slices[0]), int(slices[-1]) + 1, _SLAB):
        stop = min(start + _SLAB, int(slices[-1]) + 1)
        values = hu[start:stop][label_map[start:stop] == label].astype(np.float64)
        if not values.size:
            continue
        k, slab_mean = values.size, float(values.mean())
        slab_m2 = float(np.square(values - slab_mean).sum())
        delta = slab_mean - mean
        total = n + k
        mean += delta * k / total
        m2 += slab_m2 + delta * delta * n * k / total
        n = total
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return mean, float(np.sqrt(m2 / n)), low, high
