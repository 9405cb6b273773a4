"""A planar view of each segment for the SR: its reference slice, area there, and outline.

Viewers that read TID 1500 (OHIF among them) draw planar measurements (a SCOORD on one source
image) and ignore volumetric groups that reference a SEG. So each segment also gets its
cross-section on a *reference slice*: the slice where the segment's area is largest (ties go to the
lowest slice index). A model cannot name an anatomical level (such as L3, the body-composition
convention) without locating it; a model that does so would pass that slice in instead.

The outline encloses exactly what the area measures: the segment's pixels on that slice, every
region and every hole, traced along pixel edges in SCOORD image coordinates ((column, row), the
top-left corner of the top-left pixel at (0, 0)) and joined into one closed polyline by zero-width
bridges. A viewer that computes the area or statistics inside the polyline (OHIF does, once it
loads the measurement into its own tool) so gets the segment's, not those of its largest region's
hull; the bridges show as thin lines between the regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

#: a closed outline is simplified (Douglas–Peucker) to within this many pixels of the pixel edges
SIMPLIFY_PX = 0.5
#: …and never keeps more than this many points
MAX_POINTS = 4000


@dataclass(frozen=True)
class PlanarRegion:
    """One segment on its reference slice."""

    label: int
    #: z index of the reference slice in the volume
    slice_index: int
    #: pixels of the segment on that slice
    pixel_count: int
    #: cm² (pixel count × row spacing × column spacing / 100)
    area_cm2: float
    #: closed polyline (first point repeated last), (column, row) in SCOORD image coordinates
    outline: NDArray[np.float32]


def reference_slice(mask: NDArray[np.bool_]) -> int | None:
    """The z index where ``mask`` (z, y, x) has most pixels; ``None`` when it is empty."""
    counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if not counts.any():
        return None
    return int(np.argmax(counts))


def _loops(region: NDArray[np.bool_]) -> list[list[tuple[int, int]]]:
    """Closed loops of pixel corners (row, column) around ``region``, interior on the right."""
    padded = np.pad(region, 1)
    inside = padded[1:-1, 1:-1]
    # a directed edge per foreground pixel side that faces background, clockwise on screen
    nexts: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(edges_from: NDArray[np.intp], d_start: tuple[int, int], d_end: tuple[int, int]) -> None:
        for r, c in edges_from:
            start = (int(r) + d_start[0], int(c) + d_start[1])
            nexts.setdefault(start, []).append((int(r) + d_end[0], int(c) + d_end[1]))

    add(np.argwhere(inside & ~padded[:-2, 1:-1]), (0, 0), (0, 1))      # top: left → right
    add(np.argwhere(inside & ~padded[1:-1, 2:]), (0, 1), (1, 1))       # right: top → bottom
    add(np.argwhere(inside & ~padded[2:, 1:-1]), (1, 1), (1, 0))       # bottom: right → left
    add(np.argwhere(inside & ~padded[1:-1, :-2]), (1, 0), (0, 0))      # left: bottom → top
    loops = []
    while nexts:
        start = min(nexts)
        loop = [start]
        here = start
        heading = (0, 1)
        while True:
            options = nexts[here]
            if len(options) == 1:
                step = options.pop()
            else:
                # two pixels touch diagonally at this corner: turn right, staying with the pixel on our
                # right (4-connectivity); with rows down, right of heading (dr, dc) is (dc, -dr)
                turn = (here[0] + heading[1], here[1] - heading[0])
                step = turn if turn in options else options[0]
                options.remove(step)
            if not options:
                del nexts[here]
            heading = (step[0] - here[0], step[1] - here[1])
            here = step
            if here == start:
                break
            loop.append(here)
        loops.append(loop)
    return loops


def _simplify(points: NDArray[np.float64], tolerance: float) -> NDArray[np.float64]:
    """Douglas–Peucker on an open polyline (both ends kept)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        a, b = points[first], points[last]
        span = points[first + 1:last]
        ab = b - a
        norm = float(np.hypot(*ab))
        if norm == 0.0:
            distances = np.hypot(*(span - a).T)
        else:
            distances = np.abs(ab[0] * (span[:, 1] - a[1]) - ab[1] * (span[:, 0] - a[0])) / norm
        index = int(np.argmax(distances))
        if distances[index] > tolerance:
            middle = first + 1 + index
            keep[middle] = True
            stack.extend([(first, middle), (middle, last)])
    return points[keep]


def _closed_simplified(points: NDArray[np.float64], tolerance: float) -> NDArray[np.float64]:
    """Douglas–Peucker on a closed loop (first point not repeated), split at its farthest point."""
    far = int(np.argmax(np.hypot(*(points - points[0]).T)))
    closed = np.vstack([points, points[:1]])
    return np.vstack([_simplify(closed[:far + 1], tolerance)[:-1], _simplify(closed[far:], tolerance)[:-1]])


def _bridged(loops: list[NDArray[np.float64]]) -> NDArray[np.float64]:
    """One closed path through ``loops``: each joins the path at its nearest vertex by a bridge walked there
    and back. A bridge adds nothing to the shoelace area (its two walks cancel) nor to an even–odd fill."""
    order = sorted(loops, key=lambda loop: -abs(_signed_area(loop)))
    path = order[0]
    for loop in order[1:]:
        distances = np.hypot(path[:, None, 0] - loop[None, :, 0], path[:, None, 1] - loop[None, :, 1])
        i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
        entered = np.vstack([loop[j:], loop[:j + 1]])  # round the loop from its vertex j back to it
        path = np.vstack([path[:i + 1], entered, path[i:]])
    return path


def _signed_area(points: NDArray[np.float64]) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def outline(mask2d: NDArray[np.bool_]) -> NDArray[np.float32]:
    """A closed polyline (column, row) that encloses exactly the pixels of ``mask2d``.

    Every region's boundary and every hole's is traced along pixel edges (regions clockwise on the
    screen, holes the other way round), simplified to within :data:`SIMPLIFY_PX`, and the loops are
    joined into one path by zero-width bridges: its shoelace area (what a viewer computes for a closed
    polyline) is the segment's area on the slice, and an even–odd fill covers its pixels.

    Raises
    ------
    ValueError
        When ``mask2d`` is empty.
    """
    if not mask2d.any():
        raise ValueError("no region to outline")
    # (row, column) corners → (column, row) points
    loops = [np.array([(c, r) for r, c in loop], dtype=np.float64) for loop in _loops(np.asarray(mask2d, dtype=bool))]
    tolerance = SIMPLIFY_PX
    while True:
        simplified = [_closed_simplified(loop, tolerance) for loop in loops]
        # a loop simplified to a line encloses nothing; drop it (only a coarse tolerance does that)
        simplified = [loop for loop in simplified if len(loop) >= 3 and _signed_area(loop) != 0.0]
        if not simplified:  # nothing left at this tolerance: the largest loop at the finest one
            simplified = [max((_closed_simplified(loop, SIMPLIFY_PX) for loop in loops),
                              key=lambda loop: abs(_signed_area(loop)))]
            path = _bridged(simplified)
            break
        path = _bridged(simplified)
        if len(path) + 1 <= MAX_POINTS:
            break
        tolerance *= 2
    return np.vstack([path, path[:1]]).astype(np.float32)


def planar_regions(labels: NDArray[np.uint8], label_values: list[int],
                   spacing_yx: tuple[float, float]) -> dict[int, PlanarRegion]:
    """The :class:`PlanarRegion` of each label in ``label_values`` that is present in ``labels``."""
    out = {}
    # one slice at a time: a whole-volume mask per label was the SR build's peak memory (a byte a voxel)
    counts = np.zeros((len(label_values), labels.shape[0]), dtype=np.int64)
    lut = np.full(256, len(label_values), dtype=np.intp)
    lut[label_values] = np.arange(len(label_values))
    for z in range(labels.shape[0]):
        counts[:, z] = np.bincount(lut[labels[z].ravel()], minlength=len(label_values) + 1)[:len(label_values)]
    for i, label in enumerate(label_values):
        if not counts[i].any():
            continue
        z = int(np.argmax(counts[i]))  # as reference_slice: the first slice with the most pixels
        plane = labels[z] == label
        count = int(plane.sum())
        out[label] = PlanarRegion(label=label, slice_index=z, pixel_count=count,
                                  area_cm2=count * spacing_yx[0] * spacing_yx[1] / 100.0,
                                  outline=outline(plane))
    return out
