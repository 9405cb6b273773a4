"""Synthetic CT phantoms and the HU-rule tissue reference.

The phantom is a torso-like body: skin, subcutaneous fat, a muscle wall, a spine with cortex and
marrow, paraspinal muscles, ribs, visceral fat, organs (liver-, kidney- and lung-like) and noise. Its
tissue labels are not painted: they come from :func:`hu_reference_labels`, the same HU-rule plus
morphology reference that real CT is scored against, so a model trained on phantoms learns the rule.

Labels: 0 background, 1 adipose tissue, 2 skeletal muscle, 3 bone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

ADIPOSE, MUSCLE, BONE = 1, 2, 3

#: HU ranges of the rule (inclusive); the classic body-composition windows
ADIPOSE_HU = (-190.0, -30.0)
MUSCLE_HU = (-29.0, 150.0)
BONE_HU_MIN = 200.0
#: voxels below this are outside the body or air
BODY_HU_MIN = -500.0


@dataclass(frozen=True)
class Phantom:
    hu: NDArray[np.float32]  # (z, y, x), Hounsfield units
    labels: NDArray[np.uint8]  # (z, y, x), HU-rule reference
    spacing: tuple[float, float, float]  # (z, y, x) mm


def body_mask(hu: NDArray[np.floating], spacing: tuple[float, float, float]) -> NDArray[np.bool_]:
    """The patient's body: the largest connected region above -500 HU in each slice, holes filled.

    Table, clothing and air are outside it; lungs and bowel gas inside it.
    """
    mask = np.zeros(hu.shape, dtype=bool)
    structure = ndimage.generate_binary_structure(2, 1)
    for z in range(hu.shape[0]):
        above = hu[z] > BODY_HU_MIN
        above = ndimage.binary_opening(above, structure, iterations=2)
        lab, n = ndimage.label(above)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(above, lab, index=np.arange(1, n + 1))
        mask[z] = ndimage.binary_fill_holes(lab == (int(np.argmax(sizes)) + 1))
    return mask


def hu_reference_labels(hu: NDArray[np.floating], spacing: tuple[float, float, float]) -> NDArray[np.uint8]:
    """Tissue labels by HU rule plus morphology.

    Inside the body: bone ≥ 200 HU (holes in bone filled slice by slice, so marrow counts as bone),
    adipose -190..-30 HU, muscle -29..150 HU. Each class is opened with a 3x3 cross per slice to drop
    isolated noise voxels.
    """
    body = body_mask(hu, spacing)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    cross = ndimage.generate_binary_structure(2, 1)
    for z in range(hu.shape[0]):
        sl = hu[z]
        inside = body[z]
        bone = ndimage.binary_fill_holes(inside & (sl >= BONE_HU_MIN))
        bone = ndimage.binary_opening(bone, cross)
        fat = inside & (sl >= ADIPOSE_HU[0]) & (sl <= ADIPOSE_HU[1]) & ~bone
        fat = ndimage.binary_opening(fat, cross)
        muscle = inside & (sl >= MUSCLE_HU[0]) & (sl <= MUSCLE_HU[1]) & ~bone & ~fat
        muscle = ndimage.binary_opening(muscle, cross)
        labels[z][fat] = ADIPOSE
        labels[z][muscle] = MUSCLE
        labels[z][bone] = BONE
    return labels


def _ellipse(yy: NDArray[np.float64], xx: NDArray[np.float64], cy: float, cx: float, ry: float,
             rx: float) -> NDArray[np.bool_]:
    return bool_((yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 <= 1.0)


def bool_(a: NDArray[np.bool_]) -> NDArray[np.bool_]:
    return np.asarray(a, dtype=bool)


def make_phantom(
    shape: tuple[int, int, int] = (40, 256, 256),
    spacing: tuple[float, float, float] = (2.5, 1.4, 1.4),
    seed: int = 0,
    noise_hu: float = 12.0,
) -> Phantom:
    """Build a random torso phantom; ``seed`` varies size, fat thickness, organs and noise."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    hu = np.full(shape, -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    cy, cx = ny * rng.uniform(0.47, 0.53), nx * rng.uniform(0.47, 0.53)
    # body radii in mm → voxels
    ry_mm, rx_mm = rng.uniform(100, 150), rng.uniform(150, 190)
    fat_mm = rng.uniform(8, 35)
    muscle_mm = rng.uniform(8, 16)
    sy, sx = spacing[1], spacing[2]
    table_y = cy + ry_mm / sy + rng.uniform(4, 10)
    for z in range(nz):
        t = z / max(nz - 1, 1)
        scale = 1.0 + 0.06 * np.sin(np.pi * t + rng.uniform(0, 0.3))
        ry, rx = ry_mm * scale / sy, rx_mm * scale / sx
        s = hu[z]
        body = _ellipse(yy, xx, cy, cx, ry, rx)
        s[body] = 40.0  # skin
        fat_outer = _ellipse(yy, xx, cy, cx, ry - 2.0 / sy, rx - 2.0 / sx)
        s[fat_outer] = -100.0
        wall = _ellipse(yy, xx, cy, cx, ry - fat_mm / sy, rx - fat_mm / sx)
        s[wall] = 45.0  # abdominal wall muscle
        cavity_ry, cavity_rx = ry - (fat_mm + muscle_mm) / sy, rx - (fat_mm + muscle_mm) / sx
        cavity = _ellipse(yy, xx, cy, cx, cavity_ry, cavity_rx)
        s[cavity] = -90.0  # visceral fat
        # organs inside the cavity
        liver = _ellipse(yy, xx, cy - 0.1 * cavity_ry, cx - 0.45 * cavity_rx, 0.55 * cavity_ry, 0.35 * cavity_rx)
        s[liver & cavity] = 60.0
        if t < 0.35:  # lung bases in the upper slices
            for side in (-1, 1):
                lung = _ellipse(yy, xx, cy - 0.15 * cavity_ry, cx + side * 0.45 * cavity_rx,
                                0.45 * cavity_ry * (1 - t / 0.35), 0.25 * cavity_rx)
                s[lung & cavity] = -850.0
        for side in (-1, 1):
            kidney = _ellipse(yy, xx, cy + 0.35 * cavity_ry, cx + side * 0.38 * cavity_rx, 0.18 * cavity_ry,
                              0.1 * cavity_rx)
            s[kidney & cavity] = 30.0
        bowel = _ellipse(yy, xx, cy - 0.3 * cavity_ry, cx + 0.25 * cavity_rx, 0.15 * cavity_ry, 0.15 * cavity_rx)
        s[bowel & cavity] = -600.0
        # spine: vertebral body (cortex + marrow) and paraspinal muscles, posterior (larger y)
        vy, vx = cy + 0.55 * cavity_ry, cx
        vr = 16.0 / sx
        for side in (-1, 1):
            para = _ellipse(yy, xx, vy + 1.6 * vr, vx + side * 2.2 * vr, 1.4 * vr, 1.6 * vr)
            s[para & body & ~fat_outer | para & wall] = 50.0
        s[_ellipse(yy, xx, vy, vx, vr, vr)] = 700.0
        s[_ellipse(yy, xx, vy, vx, vr - 2.5 / sx, vr - 2.5 / sy)] = 250.0
        s[_ellipse(yy, xx, vy + 1.5 * vr, vx, 0.5 * vr, 0.4 * vr)] = 600.0  # spinous process
        # ribs: small bone ellipses in the muscle wall
        for k in range(int(rng.integers(4, 9))):
            ang = np.pi * (0.15 + 0.7 * k / 8) + rng.uniform(-0.05, 0.05)
            rr_y, rr_x = ry - (fat_mm + muscle_mm / 2) / sy, rx - (fat_mm + muscle_mm / 2) / sx
            rib = _ellipse(yy, xx, cy - rr_y * np.sin(ang), cx + rr_x * np.cos(ang), 4.0 / sy, 5.0 / sx)
            s[rib & body] = 500.0
        # a table under the patient, outside the body
        s[(yy > table_y) & (yy < table_y + 6.0 / sy)] = 150.0
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, sigma=(0.0, 0.6, 0.6)).astype(np.float32)
    return Phantom(hu=hu, labels=hu_reference_labels(hu, spacing), spacing=spacing)
