"""What a reviewer looks at: the job's segmentation over its source images, as PNG key slices.

Rendered from the job's own results (its stored SEG, read back into a label map) on the stored source
series, exactly as the Secondary Capture key images are drawn: CT windowed, each segment filled and
outlined in its manifest colour, a banner and a legend with the run's measurements. The PNGs are kept
beside the job's results (``job-N/review/``), so a second look costs a file read.

A FRACTIONAL SEG is drawn as the label map its probabilities make: each voxel the most probable of
the segments and the background (:func:`inference.results.summary.labels_from_seg`), the map the run's
measurements come from, so the reviewer approves what the SR reports.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pydicom
from PIL import Image

from appliance.models import ModelRegistry
from appliance.store import Job, Store
from inference.measurements import SegmentMeasurement
from inference.results.summary import labels_from_seg, render_key_images
from inference.volume import load_series

log = logging.getLogger(__name__)

#: key slices shown to a reviewer
KEY_SLICES = 3


class ReviewImagesUnavailable(Exception):
    """The job has no images to show (no or an unreadable SEG, source or model gone); value-free."""


@dataclass(frozen=True)
class KeyImage:
    #: 1-based position among the job's key images
    number: int
    #: 0-based slice index in the source series
    slice_index: int
    path: Path


def _folder(store: Store, job: Job) -> Path:
    return store.results_dir / f"job-{job.id}" / "review"


def _cached(folder: Path) -> list[KeyImage]:
    out = []
    for path in sorted(folder.glob("key-*.png")):
        _, number, z = path.stem.split("-")
        out.append(KeyImage(int(number), int(z), path))
    return sorted(out, key=lambda k: k.number)


def key_images(store: Store, registry: ModelRegistry, job: Job) -> list[KeyImage]:
    """The review key images of ``job``, rendered on first use.

    Raises
    ------
    ReviewImagesUnavailable
        When they cannot be made; the message names what is missing, never a value.
    """
    folder = _folder(store, job)
    cached = _cached(folder) if folder.is_dir() else []
    if cached:
        return cached
    results = store.results(job.id)
    segs = [r for r in results if r.kind == "seg" and r.path.is_file()]
    if not segs:
        raise ReviewImagesUnavailable(f"job {job.id} has no stored SEG")
    paths = store.series_of(job.study_uid, job.run_version).get(job.series_uid)
    if not paths:
        raise ReviewImagesUnavailable(f"job {job.id}'s source series is no longer stored")
    try:
        manifest = registry.get(job.model, job.model_version).manifest
    except Exception:  # a removed or unverifiable package: the segments' names and colours are unknown
        raise ReviewImagesUnavailable(f"job {job.id}'s model package is not available") from None
    try:
        seg = pydicom.dcmread(segs[0].path)
        volume = load_series(paths)
        labels = labels_from_seg(seg, volume, manifest)
    except Exception as exc:  # unreadable files, a SEG that does not fit the series
        log.warning("job %d: no review images: %s", job.id, type(exc).__name__)
        raise ReviewImagesUnavailable(f"job {job.id}'s SEG cannot be shown as a label map "
                                      "(unreadable, or it does not match the stored series)") from None
    measurements = [SegmentMeasurement(**m) for r in results if r.kind == "sr"
                    for m in r.detail.get("measurements", [])]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for number, (z, pixels) in enumerate(render_key_images(volume, labels, measurements, manifest, KEY_SLICES),
                                         start=1):
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", optimize=True)
        path = folder / f"key-{number}-{z}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
        out.append(KeyImage(number, z, path))
    log.info("job %d: %d review key image(s) rendered", job.id, len(out))
    return out
