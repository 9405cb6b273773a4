"""What a model accepts, as its manifest declares it (:class:`~inference.packages.InputSpec`), enforced.

A job whose series the model does not accept fails before inference with
:class:`~inference.errors.SeriesNotAcceptedError` (permanent: the same series is refused again).
The reasons name the manifest's limits and the series' geometry, never a patient value.
"""

from __future__ import annotations

import logging

from inference.errors import SeriesNotAcceptedError
from inference.packages import InputSpec
from inference.volume import Volume

logger = logging.getLogger(__name__)

#: BodyPartExamined values that name no region: they neither match nor refuse a manifest's body parts
UNSPECIFIC_BODY_PARTS = frozenset({"", "PARTIALBODY", "WHOLEBODY", "BODY", "UNKNOWN"})


def accepts_modality(spec: InputSpec, modality: str) -> bool:
    """Whether a series of ``modality`` can be accepted at all."""
    return modality.strip().upper() == spec.modality


def refusals(volume: Volume, spec: InputSpec) -> list[str]:
    """Why ``spec`` does not accept ``volume``: one reason per unmet limit; empty when it accepts it."""
    reasons: list[str] = []
    if not accepts_modality(spec, volume.modality):
        reasons.append(f"modality {volume.modality or '(none)'} is not {spec.modality}")
    if spec.body_parts:
        part = str(volume.datasets[0].get("BodyPartExamined", "") or "").strip().upper()
        if part not in UNSPECIFIC_BODY_PARTS and part not in spec.body_parts:
            # the source's value is left out: only the model's own list is quoted
            reasons.append(f"body part examined is none of {', '.join(spec.body_parts)}")
    slices = volume.shape[0]
    if slices < spec.min_slices:
        reasons.append(f"{slices} slice(s); at least {spec.min_slices} needed")
    if spec.slice_spacing_mm is not None and slices > 1:
        low, high = spec.slice_spacing_mm
        if not low <= volume.spacing[0] <= high:
            reasons.append(f"slice spacing {volume.spacing[0]:.3g} mm is outside [{low:g}, {high:g}] mm")
    if spec.pixel_spacing_mm is not None:
        low, high = spec.pixel_spacing_mm
        outside = [s for s in volume.spacing[1:] if not low <= s <= high]
        if outside:
            reasons.append(f"pixel spacing {outside[0]:.3g} mm is outside [{low:g}, {high:g}] mm")
    return reasons


def check_accepts(volume: Volume, spec: InputSpec) -> None:
    """Refuse ``volume`` unless ``spec`` accepts it.

    Raises
    ------
    SeriesNotAcceptedError
        With every reason, joined by ``; ``.
    """
    reasons = refusals(volume, spec)
    if reasons:
        raise SeriesNotAcceptedError("the model does not accept this series: " + "; ".join(reasons))
