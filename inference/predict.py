"""Segmentation of a CT volume with a model package: window, resample, sliding window, postprocess.

Pure numpy/scipy around a :class:`~inference.runtime.base.Runtime`; no torch at inference time.
Memory stays bounded for large series: intensities are windowed patch by patch, class probabilities
are accumulated for one row of patches along z at a time and turned into labels as soon as no later
patch can touch them, and postprocessing labels connected components one slice at a time.

For a FRACTIONAL SEG (:func:`segment_with_probabilities`) the blended softmax probability of each
manifest segment is quantised to uint8 (0..255 for 0..1) as each slab of slices is finalised, so the
extra memory is one byte per voxel per segment, and only when asked for.

Postprocessing vocabulary (:class:`~inference.packages.PostStep`), applied in manifest order:

``largest_component``
    keep the largest 6-connected 3D component of the foreground (all segments together); the
    rest (arms, table, stray voxels) becomes background.
``fill_holes``
    in each axial slice, background enclosed by one segment becomes that segment.
``remove_small``
    drop each segment's 3D components smaller than :data:`REMOVE_SMALL_MM3`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from inference.errors import InferenceError, SeriesError
from inference.packages import Manifest, PostStep
from inference.runtime.base import CPU_PROVIDER, Runtime

#: components of a segment smaller than this (mm³) are removed by ``remove_small``
REMOVE_SMALL_MM3 = 100.0
#: slices resampled at once; bounds the temporary memory of resampling
_CHUNK_SLICES = 16
#: most voxels per runtime call on the CPU: ONNX Runtime's activations grow with the batch (the demo
#: model's: ~110 MB per 512×512 slice, so 4 of them were a job's peak memory), and a CPU gains
#: nothing from batching large patches; outputs are the same whatever the batch
CPU_BATCH_VOXELS = 512 * 512
_CROSS_2D = ndimage.generate_binary_structure(2, 1)

Spacing = tuple[float, float, float]
#: a volume in modality units: float32, or int16 holding the same values (a compact volume)
Intensities = NDArray[np.floating] | NDArray[np.integer]
Shape = tuple[int, int, int]


#: ``progress(done, total)``: slices of the series inferred so far
Progress = Callable[[int, int], None]


def batch_size_for(patch: Sequence[int], provider: str, largest: int = 4) -> int:
    """Patches per runtime call: ``largest`` on an accelerator, at most :data:`CPU_BATCH_VOXELS` on the CPU."""
    if provider != CPU_PROVIDER:
        return largest
    return max(1, min(largest, CPU_BATCH_VOXELS // max(1, math.prod(int(p) for p in patch))))


def segment(hu: Intensities, spacing: Spacing, manifest: Manifest, model: Runtime, *,
            batch_size: int = 4, progress: Progress | None = None) -> NDArray[np.uint8]:
    """Label map of ``hu`` (z, y, x) on its own grid, segment label values as in the manifest.

    See :func:`segment_with_probabilities` for the parameters and errors.
    """
    labels, _ = _segment(hu, spacing, manifest, model, batch_size=batch_size, with_probabilities=False,
                         progress=progress)
    return labels


def segment_with_probabilities(hu: Intensities, spacing: Spacing, manifest: Manifest, model: Runtime, *,
                               batch_size: int = 4,
                               progress: Progress | None = None) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Label map of ``hu`` and the probability of each manifest segment, both on ``hu``'s grid.

    The probabilities are (segments, z, y, x) uint8, ``round(255 * p)``, in manifest segment order;
    off the model's grid they are resampled linearly. Where postprocessing made a voxel background
    (a removed component), every segment's probability is 0; where it took a voxel from a segment,
    that segment's is. Voxels it gave to a segment (filled holes) keep the model's probabilities.

    Parameters
    ----------
    hu
        Volume in modality units (HU for CT), axial slices along the first axis; float32, or int16
        (a compact volume) for the same result.
    spacing
        Voxel spacing (z, y, x) in mm.
    manifest
        The model package's manifest: window, spacing, patch size, overlap, postprocessing.
    model
        A loaded runtime for the package's model.
    batch_size
        Patches per call to the runtime.
    progress
        Told the slices (of ``hu``) done so far, as the sliding window finishes them.

    Raises
    ------
    SeriesError
        When the volume has too few slices or a bad geometry.
    InferenceError
        When the model's output does not fit the manifest.
    """
    labels, probabilities = _segment(hu, spacing, manifest, model, batch_size=batch_size, with_probabilities=True,
                                     progress=progress)
    assert probabilities is not None
    return labels, probabilities


def _segment(hu: Intensities, spacing: Spacing, manifest: Manifest, model: Runtime, *, batch_size: int,
             with_probabilities: bool,
             progress: Progress | None = None) -> tuple[NDArray[np.uint8], NDArray[np.uint8] | None]:
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise SeriesError(f"voxel spacing {spacing} is not positive")
    spec = manifest.input
    if hu.shape[0] < spec.min_slices:
        raise SeriesError(f"{hu.shape[0]} slice(s); the model needs at least {spec.min_slices}")
    low, high = spec.intensity.low, spec.intensity.high
    channels = max(s.label for s in manifest.output.segments) + 1
    native: Shape = (int(hu.shape[0]), int(hu.shape[1]), int(hu.shape[2]))
    target = native if spec.spacing_mm is None else resampled_shape(native, spacing, spec.spacing_mm)
    classes = [s.label for s in manifest.output.segments]
    probabilities = np.zeros((len(classes), *target), dtype=np.uint8) if with_probabilities else None
    # slices of the model's grid done, told as slices of the series
    told = None if progress is None else \
        (lambda done, total: progress(min(native[0], round(done * native[0] / max(total, 1))), native[0]))
    if target == native:
        labels = sliding_window(hu, spec.patch_size, spec.overlap, model, channels,
                                transform=lambda p: window(p, low, high), batch_size=batch_size,
                                probabilities=probabilities, classes=classes, progress=told)
    else:
        work = resample_linear(hu, target, transform=lambda p: window(p, low, high))
        labels = sliding_window(work, spec.patch_size, spec.overlap, model, channels,
                                batch_size=batch_size, probabilities=probabilities, classes=classes,
                                progress=told)
        del work
        labels = resample_nearest(labels, native)
        if probabilities is not None:
            probabilities = resample_probabilities(probabilities, native)
    steps = manifest.output.postprocessing
    before = labels.copy() if probabilities is not None and steps else None
    postprocess(labels, steps, spacing)
    if before is not None and probabilities is not None:
        for z in range(native[0]):  # per slice: the comparisons stay one slice big
            changed = before[z] != labels[z]
            if not changed.any():
                continue
            probabilities[:, z][:, changed & (labels[z] == 0)] = 0  # removed: background for every segment
            for i, label in enumerate(classes):
                probabilities[i, z][changed & (before[z] == label)] = 0
    return labels, probabilities


def window(values: NDArray[np.floating], low: float, high: float) -> NDArray[np.float32]:
    """Clip to ``[low, high]`` and scale to ``[0, 1]``."""
    if not high > low:
        raise ValueError(f"intensity window [{low}, {high}] is empty")
    out: NDArray[np.float32] = np.clip(values, low, high).astype(np.float32, copy=False)
    out -= np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return out


def resampled_shape(shape: Shape, spacing: Spacing, target_spacing: Sequence[float]) -> Shape:
    """Grid size covering the same extent at ``target_spacing``."""
    z, y, x = (max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing, strict=True))
    return (z, y, x)


def _source_coords(n_in: int, n_out: int) -> NDArray[np.float64]:
    # voxel centres aligned on the volume's extent (not its corner voxels), clamped at the edges
    coords = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(coords, 0.0, n_in - 1)


def _linear_axis(n_in: int, n_out: int) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float32]]:
    coords = _source_coords(n_in, n_out)
    lo = np.floor(coords).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (coords - lo).astype(np.float32)


def _nearest_axis(n_in: int, n_out: int) -> NDArray[np.intp]:
    index: NDArray[np.intp] = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.clip(index, 0, n_in - 1)


def resample_linear(volume: Intensities, shape: Shape, *,
                    transform: Callable[[NDArray[np.float32]], NDArray[np.float32]] | None = None,
                    ) -> NDArray[np.float32]:
    """Trilinear resampling of ``volume`` onto ``shape`` (same extent), a few slices at a time.

    ``transform`` is applied to each resampled chunk (e.g. the intensity window).
    """
    out = np.empty(shape, dtype=np.float32)
    _resample_linear_into(volume, out, transform)
    return out


def resample_probabilities(probabilities: NDArray[np.uint8], shape: Shape) -> NDArray[np.uint8]:
    """Trilinear resampling of (segments, z, y, x) uint8 probabilities onto ``shape``, rounded."""
    out = np.empty((probabilities.shape[0], *shape), dtype=np.uint8)
    for i in range(probabilities.shape[0]):
        _resample_linear_into(probabilities[i], out[i], None)
    return out


def _resample_linear_into(volume: NDArray[np.generic], out: NDArray[np.generic],
                          transform: Callable[[NDArray[np.float32]], NDArray[np.float32]] | None) -> None:
    shape = out.shape
    integer = np.issubdtype(out.dtype, np.integer)
    z_lo, z_hi, z_w = _linear_axis(volume.shape[0], shape[0])
    y_lo, y_hi, y_w = _linear_axis(volume.shape[1], shape[1])
    x_lo, x_hi, x_w = _linear_axis(volume.shape[2], shape[2])
    for start in range(0, shape[0], _CHUNK_SLICES):
        sl = slice(start, min(start + _CHUNK_SLICES, shape[0]))
        w = z_w[sl][:, None, None]
        a: NDArray[np.float32] = (volume[z_lo[sl]].astype(np.float32) * (1 - w)
                                  + volume[z_hi[sl]].astype(np.float32) * w)
        wy = y_w[None, :, None]
        a = a[:, y_lo] * (1 - wy) + a[:, y_hi] * wy
        wx = x_w[None, None, :]
        a = a[:, :, x_lo] * (1 - wx) + a[:, :, x_hi] * wx
        if transform is not None:
            a = transform(a)
        out[sl] = np.rint(a) if integer else a


def resample_nearest(labels: NDArray[np.uint8], shape: Shape) -> NDArray[np.uint8]:
    """Nearest-neighbour resampling of a label map onto ``shape`` (same extent)."""
    iz = _nearest_axis(labels.shape[0], shape[0])
    iy = _nearest_axis(labels.shape[1], shape[1])
    ix = _nearest_axis(labels.shape[2], shape[2])
    out = np.empty(shape, dtype=np.uint8)
    for start in range(0, shape[0], _CHUNK_SLICES):
        sl = slice(start, min(start + _CHUNK_SLICES, shape[0]))
        out[sl] = labels[iz[sl]][:, iy][:, :, ix]
    return out


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Patch start positions along one axis: evenly strided, the last one flush with the end."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1.0 - overlap)))
    n = math.ceil((size - patch) / stride) + 1
    return sorted({min(i * stride, size - patch) for i in range(n)})


def gaussian_weights(patch: Sequence[int]) -> NDArray[np.float32]:
    """Blending weights: a separable Gaussian (sigma 1/8 of the patch), never zero."""
    weights = np.ones(tuple(patch), dtype=np.float32)
    for axis, n in enumerate(patch):
        if n == 1:
            continue
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        g = np.exp(-0.5 * (x / (n / 8.0)) ** 2).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = n
        weights = weights * g.reshape(shape)
    weights /= weights.max()
    return np.maximum(weights, np.float32(1e-3))


def _softmax(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    e: NDArray[np.float32] = np.exp(logits - logits.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def sliding_window(volume: Intensities, patch: Sequence[int], overlap: float, model: Runtime,
                   channels: int, *,
                   transform: Callable[[NDArray[np.float32]], NDArray[np.float32]] | None = None,
                   batch_size: int = 4, probabilities: NDArray[np.uint8] | None = None,
                   classes: Sequence[int] = (), progress: Progress | None = None) -> NDArray[np.uint8]:
    """Argmax labels of ``volume`` from Gaussian-blended patch probabilities.

    Volumes smaller than the patch are padded with 0 (after ``transform``). Probabilities live
    only for the rows of patches in flight, so memory is one patch depth of the volume's slices.
    With ``probabilities`` (``(len(classes), z, y, x)`` uint8), the blended probability of each
    channel in ``classes`` is also written there as ``round(255 * p)``. ``progress`` is told the slices
    finished so far (of ``volume``'s) each time a batch completes some.
    """
    if probabilities is not None and probabilities.shape != (len(classes), *volume.shape):
        raise ValueError(f"probabilities has shape {probabilities.shape}; expected "
                         f"{(len(classes), *volume.shape)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    pz, py, px = (int(p) for p in patch)
    nz, ny, nx = (int(n) for n in volume.shape)
    ey, ex = max(ny, py), max(nx, px)  # padded in-plane extent
    z_starts = window_starts(nz, pz, overlap)
    plane = [(y, x) for y in window_starts(ny, py, overlap) for x in window_starts(nx, px, overlap)]
    weights = gaussian_weights((pz, py, px))
    per_batch = min(batch_size, len(z_starts) * len(plane))
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)

    # weighted probability sums over slices [buf_start, buf_start + depth) of the padded volume;
    # the sum of weights is the same for every class, so argmax needs no normalisation
    buf_start = 0
    acc = np.zeros((channels, 0, ey, ex), dtype=np.float32)

    def finalise(upto: int) -> None:
        nonlocal buf_start, acc
        n_done = min(upto, buf_start + acc.shape[1]) - buf_start
        if n_done <= 0:
            return
        stop = min(buf_start + n_done, nz)
        if stop > buf_start:
            k = stop - buf_start
            block = acc[:, :k, :ny, :nx]
            labels[buf_start:stop] = np.argmax(block, axis=0).astype(np.uint8)
            if probabilities is not None:
                # softmax outputs sum to 1, so the weights' sum is the sum over channels
                scale = np.float32(255.0) / np.maximum(block.sum(axis=0), np.float32(1e-12))
                for i, c in enumerate(classes):
                    p = block[c] * scale
                    probabilities[i, buf_start:stop] = np.rint(p, out=p)
        acc = acc[:, n_done:]
        buf_start += n_done

    def extend(upto: int) -> None:
        nonlocal acc
        grow = upto - (buf_start + acc.shape[1])
        if grow > 0:
            acc = np.concatenate([acc, np.zeros((channels, grow, ey, ex), np.float32)], axis=1)

    def extract(z: int, y: int, x: int) -> NDArray[np.float32]:
        block = np.asarray(volume[z:z + pz, y:y + py, x:x + px], dtype=np.float32)
        if transform is not None:
            block = transform(block)
        if block.shape != (pz, py, px):
            padded = np.zeros((pz, py, px), dtype=np.float32)
            padded[:block.shape[0], :block.shape[1], :block.shape[2]] = block
            block = padded
        return block

    for group in _batches(((z, y, x) for z in z_starts for (y, x) in plane), per_batch):
        before = buf_start
        finalise(group[0][0])
        if progress is not None and buf_start > before:
            progress(min(buf_start, nz), nz)
        extend(group[-1][0] + pz)
        batch = np.zeros((per_batch, 1, pz, py, px), dtype=np.float32)
        for i, (z, y, x) in enumerate(group):
            batch[i, 0] = extract(z, y, x)
        out = model.run(batch)
        if out.shape[:2] != (per_batch, channels) or out.shape[2:] != (pz, py, px):
            raise InferenceError(f"model returned shape {out.shape} for a batch {batch.shape}; "
                                 f"the manifest expects {channels} channels")
        probs = _softmax(out[:len(group)])
        del out
        for i, (z, y, x) in enumerate(group):
            zb = z - buf_start
            acc[:, zb:zb + pz, y:y + py, x:x + px] += probs[i] * weights
    finalise(nz + pz)
    if progress is not None:
        progress(nz, nz)
    return labels


def _batches(items: Iterator[tuple[int, int, int]], size: int) -> Iterator[list[tuple[int, int, int]]]:
    group: list[tuple[int, int, int]] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class _Components:
    """6-connected 3D components of a mask given slice by slice; one slice in memory at a time.

    Pass one labels each slice in 2D and unites labels that overlap between neighbouring slices;
    :meth:`roots` relabels a slice (identically) and maps it to component ids.
    """

    def __init__(self, mask_of: Callable[[int], NDArray[np.bool_]], n_slices: int) -> None:
        self._mask_of = mask_of
        self.offsets = np.zeros(n_slices + 1, dtype=np.int64)
        sizes: list[NDArray[np.int64]] = []
        border: list[NDArray[np.bool_]] = []
        pairs: list[NDArray[np.int64]] = []
        previous: NDArray[np.int64] | None = None
        for z in range(n_slices):
            lab, n = self._label(z)
            self.offsets[z + 1] = self.offsets[z] + n
            sizes.append(np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64))
            edge = np.zeros(n + 1, dtype=bool)
            edge[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])] = True
            if z in (0, n_slices - 1):
                edge[:] = True
            border.append(edge[1:])
            if previous is not None:
                both = (previous > 0) & (lab > 0)
                if both.any():  # overlapping (previous, current) label pairs, as one sortable key
                    keys = np.unique(previous[both] * (n + 1) + lab[both])
                    pairs.append(np.stack([keys // (n + 1) + self.offsets[z - 1],
                                           keys % (n + 1) + self.offsets[z]], axis=1))
            previous = lab
        total = int(self.offsets[-1])
        parent = np.arange(total + 1, dtype=np.int64)
        for block in pairs:
            for a, b in block:
                ra, rb = self._find(parent, int(a)), self._find(parent, int(b))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
        while True:  # pointer jumping until every id points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        self.root = parent
        self.size = np.zeros(total + 1, dtype=np.int64)
        self.touches_border = np.zeros(total + 1, dtype=bool)
        if total:
            np.add.at(self.size, parent[1:], np.concatenate(sizes))
            self.touches_border[parent[1:][np.concatenate(border)]] = True

    @staticmethod
    def _find(parent: NDArray[np.int64], i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def _label(self, z: int) -> tuple[NDArray[np.int64], int]:
        lab, n = ndimage.label(self._mask_of(z), structure=_CROSS_2D)
        return lab.astype(np.int64, copy=False), int(n)

    def roots(self, z: int) -> NDArray[np.int64]:
        """Component id of every voxel of slice ``z`` (0 outside the mask)."""
        lab, _ = self._label(z)
        return np.where(lab > 0, self.root[lab + self.offsets[z]], 0)


def _largest_component(labels: NDArray[np.uint8]) -> None:
    comps = _Components(lambda z: labels[z] > 0, labels.shape[0])
    if comps.size.shape[0] <= 1 or comps.size.max() == 0:
        return
    keep = int(np.argmax(comps.size))
    for z in range(labels.shape[0]):
        labels[z][comps.roots(z) != keep] = 0


def _remove_small(labels: NDArray[np.uint8], spacing: Spacing) -> None:
    min_voxels = math.ceil(REMOVE_SMALL_MM3 / (spacing[0] * spacing[1] * spacing[2]))
    for value in np.unique(labels):
        if value == 0:
            continue
        def mask_of(z: int, v: np.uint8 = value) -> NDArray[np.bool_]:
            mask: NDArray[np.bool_] = labels[z] == v
            return mask

        comps = _Components(mask_of, labels.shape[0])
        small = comps.size < min_voxels
        small[0] = False
        if not small.any():
            continue
        for z in range(labels.shape[0]):
            labels[z][small[comps.roots(z)]] = 0


def _fill_holes(labels: NDArray[np.uint8]) -> None:
    for z in range(labels.shape[0]):
        sl = labels[z]
        for value in np.unique(sl):
            if value == 0:
                continue
            outside, _ = ndimage.label(sl != value, structure=_CROSS_2D)
            open_ids = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
            hole = (outside > 0) & ~np.isin(outside, open_ids) & (sl == 0)
            sl[hole] = value


def postprocess(labels: NDArray[np.uint8], steps: Sequence[PostStep], spacing: Spacing) -> NDArray[np.uint8]:
    """Apply the manifest's postprocessing steps in order (in place; returns ``labels``)."""
    for step in steps:
        if step == PostStep.LARGEST_COMPONENT:
            _largest_component(labels)
        elif step == PostStep.FILL_HOLES:
            _fill_holes(labels)
        elif step == PostStep.REMOVE_SMALL:
            _remove_small(labels, spacing)
        else:  # pragma: no cover - the enum is closed; a new member must be handled here
            raise InferenceError(f"unknown postprocessing step {step!r}")
    return labels
