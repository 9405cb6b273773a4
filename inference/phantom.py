"""Synthetic CT phantoms and the HU-rule tissue reference.

The phantom is a torso-like body: skin, subcutaneous fat with septa, a muscle wall with ribs and
intermuscular fat, a spine (vertebral body with cortex and marrow, neural arch around the canal),
paraspinal and psoas muscles, visceral fat, organs (liver, spleen, kidneys, stomach, bowel loops, an
aorta with or without contrast, lung bases), sometimes arms beside the body, a curved table, smooth
texture and noise. Every size and HU level is drawn from ``seed``. Its tissue labels are not painted:
they come from :func:`hu_reference_labels`, the same HU-rule plus morphology reference that real CT
is scored against, so a model trained on phantoms learns the rule.

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

Grid = NDArray[np.float64]
Mask = NDArray[np.bool_]


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


def _box(yy: Grid, xx: Grid, cy: float, cx: float, r: float) -> tuple[slice, slice]:
    """Rows and columns of the regular mm grid within ``r`` of (cy, cx): where a shape can be."""
    ys, xs = yy[:, 0], xx[0, :]
    return (slice(int(np.searchsorted(ys, cy - r)), int(np.searchsorted(ys, cy + r, side="right"))),
            slice(int(np.searchsorted(xs, cx - r)), int(np.searchsorted(xs, cx + r, side="right"))))


def _ellipse(yy: Grid, xx: Grid, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> Mask:
    """Points of an ellipse; coordinates and radii in mm, ``angle`` in radians.

    Evaluated only inside the ellipse's bounding box (the grids are regular), which is what makes a
    300-slice 512x512 phantom affordable.
    """
    inside: Mask = np.zeros(yy.shape, dtype=bool)
    box = _box(yy, xx, cy, cx, max(abs(ry), abs(rx), 1e-3))
    dy, dx = yy[box] - cy, xx[box] - cx
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dy, dx = c * dy - s * dx, s * dy + c * dx
    inside[box] = dy**2 / max(ry, 1e-3) ** 2 + dx**2 / max(rx, 1e-3) ** 2 <= 1.0
    return inside


def _bone(s: NDArray[np.float32], yy: Grid, xx: Grid, cy: float, cx: float, ry: float, rx: float,
          cortex_mm: float, cortex_hu: float, marrow_hu: float, rng: np.random.Generator,
          angle: float = 0.0, open_p: float = 0.3) -> Mask:
    """Paint a bone cross-section, a cortical shell around marrow, sometimes with gaps; return the bone.

    Real cortex is thin and uneven, so in CT its ring above 200 HU is often open and the marrow inside
    it (often below 200 HU) is then not bone by the rule.
    """
    outer = _ellipse(yy, xx, cy, cx, ry, rx, angle)
    marrow = _ellipse(yy, xx, cy, cx, ry - cortex_mm, rx - cortex_mm, angle)
    s[outer] = cortex_hu
    s[marrow] = marrow_hu
    box = _box(yy, xx, cy, cx, max(abs(ry), abs(rx), 1e-3))
    shell = outer[box] & ~marrow[box]
    for _ in range(int(rng.binomial(3, open_p))):
        theta = np.arctan2(yy[box] - cy, xx[box] - cx) - rng.uniform(-np.pi, np.pi)
        wedge = np.abs(np.angle(np.exp(1j * theta))) < rng.uniform(0.05, 0.4)
        s[box][shell & wedge] = marrow_hu
    return outer


@dataclass(frozen=True)
class _Body:
    """Per-phantom random anatomy (mm and HU), drawn once so neighbouring slices agree."""

    ry: float
    rx: float
    posterior_flat: float
    fat_mm: float
    fat_front_extra: float
    muscle_mm: float
    skin_hu: float
    fat_hu: float
    muscle_hu: float
    visceral_hu: float
    liver_hu: float
    spleen_hu: float
    kidney_hu: float
    aorta_hu: float
    bowel_contrast_hu: float
    marrow_hu: float
    cortex_hu: float
    vertebra_r: float
    n_ribs: int
    rib_marrow_hu: float
    arms: tuple[bool, bool]
    arm_gap_mm: float
    septa: int
    streaks: int
    lung_fraction: float
    table: bool
    table_hu: float
    texture_hu: float
    trabecular_hu: float


def _draw_body(rng: np.random.Generator) -> _Body:
    u = rng.uniform
    return _Body(
        ry=u(85, 150), rx=u(130, 200), posterior_flat=u(0.8, 1.0), fat_mm=u(4, 40),
        fat_front_extra=u(0, 25), muscle_mm=u(6, 18), skin_hu=u(10, 80), fat_hu=u(-125, -75),
        muscle_hu=u(15, 75), visceral_hu=u(-120, -70), liver_hu=u(35, 140), spleen_hu=u(35, 140),
        kidney_hu=u(25, 220), aorta_hu=u(30, 380), bowel_contrast_hu=u(-20, 450), marrow_hu=u(60, 320),
        cortex_hu=u(250, 1000), vertebra_r=u(13, 22), n_ribs=int(rng.integers(0, 11)),
        rib_marrow_hu=u(-50, 250), arms=(bool(rng.random() < 0.7), bool(rng.random() < 0.7)),
        arm_gap_mm=u(-6, 14),
        septa=int(rng.integers(0, 12)), streaks=int(rng.integers(0, 25)),
        lung_fraction=u(0.0, 0.5), table=bool(rng.random() < 0.8), table_hu=u(-200, 900),
        texture_hu=u(0, 15), trabecular_hu=u(0, 120),
    )


def _arm(s: NDArray[np.float32], yy: Grid, xx: Grid, cy: float, side: int, body_rx: float, b: _Body,
         rng: np.random.Generator) -> Mask:
    """An arm beside the body: touching it (so inside the body mask) or apart from it."""
    ry, rx = rng.uniform(35, 55), rng.uniform(35, 55)
    cx = side * (body_rx + b.arm_gap_mm + rx)
    s[_ellipse(yy, xx, cy, cx, ry, rx)] = b.skin_hu
    s[_ellipse(yy, xx, cy, cx, ry - 2, rx - 2)] = b.fat_hu
    s[_ellipse(yy, xx, cy, cx, ry - 2 - rng.uniform(3, 15), rx - 2 - rng.uniform(3, 15))] = b.muscle_hu
    r = rng.uniform(9, 14)
    return _bone(s, yy, xx, cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8), r, r * rng.uniform(0.8, 1.1),
                 rng.uniform(1.5, 5), b.cortex_hu, rng.uniform(-100, 120), rng, open_p=0.1)


def _slice(yy: Grid, xx: Grid, t: float, b: _Body, rng: np.random.Generator) -> NDArray[np.float32]:
    """One axial slice; ``t`` in [0, 1] runs head to feet, ``yy`` grows posteriorly."""
    s = np.full(yy.shape, -1000.0, dtype=np.float32)
    scale = 1.0 + 0.06 * np.sin(np.pi * t)
    ry, rx = b.ry * scale, b.rx * scale
    ry_post = ry * b.posterior_flat
    post = yy > 0

    def torso(inset_front: float, inset_back: float, inset_side: float) -> Mask:
        front = _ellipse(yy, xx, 0.0, 0.0, ry - inset_front, rx - inset_side)
        back = _ellipse(yy, xx, 0.0, 0.0, ry_post - inset_back, rx - inset_side)
        return np.where(post, back, front)

    body = torso(0, 0, 0)
    s[body] = b.skin_hu
    s[torso(2, 2, 2)] = b.fat_hu
    fat_front = b.fat_mm + b.fat_front_extra
    wall = torso(2 + fat_front, 2 + b.fat_mm, 2 + b.fat_mm)
    for _ in range(b.septa):  # fibrous septa crossing the subcutaneous fat
        ang = rng.uniform(0, 2 * np.pi)
        line = np.abs(np.sin(ang) * yy - np.cos(ang) * xx) < rng.uniform(0.4, 1.2)
        s[line & body & ~wall & (yy * np.sin(ang) + xx * np.cos(ang) > 0)] = rng.uniform(-60, 40)
    s[wall] = b.muscle_hu
    m = b.muscle_mm
    cavity = torso(2 + fat_front + m, 2 + b.fat_mm + m * 1.5, 2 + b.fat_mm + m)
    cry, crx = ry - 2 - fat_front - m, rx - 2 - b.fat_mm - m
    # ribs in the wall, a cortical ring around marrow
    bones = np.zeros(yy.shape, dtype=bool)
    for k in range(b.n_ribs):
        ang = np.pi * (-0.1 + 1.2 * k / max(b.n_ribs - 1, 1)) + rng.uniform(-0.05, 0.05)
        side = 1 if k % 2 == 0 else -1
        py = -(ry - 2 - fat_front - m / 2) * np.sin(ang) * side
        px = (rx - 2 - b.fat_mm - m / 2) * np.cos(ang)
        bones |= _bone(s, yy, xx, py, px, rng.uniform(3, 6), rng.uniform(4, 9), rng.uniform(0.7, 2.5),
                        b.cortex_hu, b.rib_marrow_hu, rng, angle=ang)
    s[cavity] = b.visceral_hu
    # organs
    liver = _ellipse(yy, xx, -0.1 * cry, -0.4 * crx, 0.7 * cry * (1.1 - 0.6 * t), 0.5 * crx, 0.3)
    s[liver & cavity] = b.liver_hu
    spleen = _ellipse(yy, xx, 0.2 * cry, 0.6 * crx, 0.35 * cry * (1 - t), 0.25 * crx, -0.5)
    s[spleen & cavity] = b.spleen_hu
    for side in (-1, 1):
        if t > 0.3:
            kidney = _ellipse(yy, xx, 0.45 * cry, side * 0.38 * crx, 0.2 * cry, 0.12 * crx, side * 0.4)
            s[kidney & cavity] = b.kidney_hu
            hilum = _ellipse(yy, xx, 0.45 * cry, side * 0.33 * crx, 0.06 * cry, 0.04 * crx)
            s[hilum & cavity] = b.visceral_hu
    stomach = _ellipse(yy, xx, -0.45 * cry, 0.25 * crx, 0.3 * cry * (1 - t), 0.3 * crx)
    s[stomach & cavity] = rng.uniform(0, 40)
    s[stomach & cavity & (yy < -0.45 * cry - 0.1 * cry)] = -1000.0  # air above the fluid level
    for _ in range(int(rng.integers(3, 12))):  # bowel loops: wall, then air, fluid or contrast
        by, bx, r = rng.uniform(-0.6, 0.5) * cry, rng.uniform(-0.6, 0.7) * crx, rng.uniform(6, 18)
        loop = _ellipse(yy, xx, by, bx, r, r * rng.uniform(0.7, 1.3)) & cavity
        s[loop] = rng.uniform(20, 60)
        content = rng.choice([-1000.0, rng.uniform(-10, 30), b.bowel_contrast_hu])
        s[_ellipse(yy, xx, by, bx, r - 2, r * 0.9 - 2) & cavity] = content
    for side in (-1, 1):  # lung bases
        lung_r = 0.55 * cry * (b.lung_fraction - t) / max(b.lung_fraction, 1e-3)
        if lung_r > 2:
            lung = _ellipse(yy, xx, 0.1 * cry, side * 0.5 * crx, lung_r, 0.3 * crx)
            s[lung & cavity] = -850.0
    # spine, posterior: vertebral body, aorta in front of it, psoas beside it, arch behind it
    vr = b.vertebra_r
    vy = ry_post - 2 - b.fat_mm - m * 1.5 - rng.uniform(35, 60)
    vy = max(vy, 0.2 * ry_post)
    s[_ellipse(yy, xx, vy - vr - 14, -0.3 * vr, 12, 12) & cavity] = b.aorta_hu
    for side in (-1, 1):
        psoas = _ellipse(yy, xx, vy, side * (vr + 14 * t + 5), 10 + 12 * t, 8 + 10 * t)
        s[psoas & cavity] = b.muscle_hu + rng.uniform(-10, 10)
        para = _ellipse(yy, xx, vy + vr + 28, side * 28, 22, 24)
        s[para & torso(2, 2 + b.fat_mm, 2)] = b.muscle_hu + rng.uniform(-10, 10)
    bones |= _bone(s, yy, xx, vy, 0.0, vr, vr * 1.1, rng.uniform(0.5, 2.5), b.cortex_hu, b.marrow_hu, rng,
                    open_p=0.4)
    canal_y = vy + vr + 9
    bones |= _bone(s, yy, xx, canal_y, 0.0, 12, 13, rng.uniform(2, 5), b.cortex_hu, rng.uniform(0, 30), rng)
    # spinous and transverse processes
    bones |= _bone(s, yy, xx, canal_y + 16, 0, 10, 4, rng.uniform(0.7, 2), b.cortex_hu, b.marrow_hu, rng)
    for side in (-1, 1):
        bones |= _bone(s, yy, xx, canal_y, side * 22, 4, 12, rng.uniform(0.7, 2), b.cortex_hu, b.marrow_hu,
                        rng)
    # intermuscular fat streaks in all muscle
    muscle = np.abs(s - b.muscle_hu) < 12
    for _ in range(b.streaks):
        ang = rng.uniform(0, np.pi)
        off = rng.uniform(-0.8, 0.8) * ry
        line = np.abs(np.sin(ang) * xx - np.cos(ang) * yy - off) < rng.uniform(0.5, 2.0)
        s[line & muscle & _ellipse(yy, xx, rng.uniform(-ry, ry), rng.uniform(-rx, rx), 40, 40)] = \
            rng.uniform(-110, -40)
    # small vessels and nodes everywhere inside, many near the 150 and 200 HU thresholds
    for _ in range(int(rng.integers(2, 14))):
        r = rng.uniform(1.5, 7)
        vessel = _ellipse(yy, xx, rng.uniform(-0.8, 0.8) * cry, rng.uniform(-0.8, 0.8) * crx, r, r)
        s[vessel & cavity] = rng.uniform(60, 320)
    for side, present in zip((-1, 1), b.arms, strict=True):
        if present:
            bones |= _arm(s, yy, xx, rng.uniform(-0.15, 0.15) * ry, side, rx, b, rng)
    if b.trabecular_hu > 0:  # cancellous bone is not uniform: some of it falls below 200 HU
        field = ndimage.gaussian_filter(rng.normal(0.0, 1.0, size=s.shape), 0.8) * (b.trabecular_hu / 0.33)
        s[bones] += field[bones].astype(np.float32)
    if b.table:  # curved table shells under the patient
        top = ry_post + rng.uniform(3, 25)
        for depth in (0.0, rng.uniform(15, 40)):
            curve = top + depth + (xx / 250.0) ** 2 * rng.uniform(-60, -10)
            s[(np.abs(yy - curve) < rng.uniform(0.6, 2.5)) & (np.abs(xx) < rx * 1.3) & ~body] = b.table_hu
    return s


def make_phantom(
    shape: tuple[int, int, int] = (40, 256, 256),
    spacing: tuple[float, float, float] = (2.5, 1.4, 1.4),
    seed: int = 0,
    noise_hu: float = 12.0,
) -> Phantom:
    """Build a random torso phantom; ``seed`` varies anatomy, HU levels, arms, table and texture."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    b = _draw_body(rng)
    cy, cx = rng.uniform(-0.05, 0.05) * ny * spacing[1], rng.uniform(-0.05, 0.05) * nx * spacing[2]
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    yy = (yy - ny / 2) * spacing[1] - cy
    xx = (xx - nx / 2) * spacing[2] - cx
    hu = np.empty(shape, dtype=np.float32)
    z0 = rng.uniform(0, 0.5)
    for z in range(nz):
        t = z0 + 0.5 * z / max(nz - 1, 1)
        # the same generator state for every slice: small parts stay put from slice to slice
        hu[z] = _slice(yy, xx, t, b, np.random.default_rng([seed, 1]))
    soft = (hu > -200) & (hu < 200)
    if b.texture_hu > 0:  # smooth, low-frequency tissue inhomogeneity
        coarse = rng.normal(0.0, b.texture_hu, size=(nz, max(ny // 16, 2), max(nx // 16, 2)))
        field = ndimage.zoom(coarse, (1, ny / coarse.shape[1], nx / coarse.shape[2]), order=1)
        hu += np.where(soft, field[:, :ny, :nx], 0).astype(np.float32)
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    blur = rng.uniform(0.4, 1.0)  # scanner resolution, in pixels
    hu = ndimage.gaussian_filter(hu, sigma=(0.0, blur, blur)).astype(np.float32)
    return Phantom(hu=hu, labels=hu_reference_labels(hu, spacing), spacing=spacing)
