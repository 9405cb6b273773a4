"""MONAI bundle → Portico model package, reading the bundle as data only.

What is read: ``configs/metadata.json`` (name, version, description, authors, licence text,
``network_data_format``: input modality and channels, output channel definitions), literal values
in ``configs/inference.json`` (``ScaleIntensityRange[d]``, ``Spacing[d]``, ``Orientation[d]``,
``SlidingWindowInferer``), ``models/*.onnx``, ``LICENSE`` and ``docs/README.md``. Config
expressions (``$…``, ``@…``, ``%…``) are never evaluated and never taken as values; TorchScript and
pickled weights are never loaded: a bundle without an ONNX model is refused.

Segment codes: MONAI metadata names output channels but does not code them. Codes come from the
``segments`` override (a list of :class:`~inference.packages.Segment`); any channel without one gets
the generic category *Tissue* (SCT 85756007) and a local ``99PORTICO`` type code whose meaning is
the channel's name, and the model card and provenance say so.

Axis order: Portico runs a network on (batch, channel, z, y, x) patches of the series as stored,
(slice, row, column). A MONAI network was trained on what ``LoadImage`` gives, (column, row, slice),
possibly reoriented by ``Orientation``. With the default ``layout: monai`` the imported ONNX graph is
wrapped in transposes (and flips, for ``axcodes``) so that it takes Portico's order and the network
still sees its own. The flips assume axial slices stored in the standard orientation (columns
towards the patient's left, rows towards posterior, slices towards superior).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference.errors import PackageError
from inference.onnx_axes import axis_map, to_portico, write_model
from inference.packages import (
    Code,
    IntensityWindow,
    Manifest,
    Measurement,
    ModelPackage,
    PostStep,
    Segment,
    Task,
    load_package,
    write_digests,
    write_manifest,
)

log = logging.getLogger(__name__)

METADATA = Path("configs") / "metadata.json"
INFERENCE_CONFIGS = (Path("configs") / "inference.json", Path("configs") / "inference.yaml")
TISSUE = Code(value="85756007", scheme="SCT", meaning="Tissue")
LOCAL_SCHEME = "99PORTICO"
#: MONAI's "AI algorithm" family
ALGORITHM_FAMILY = Code(value="123110", scheme="DCM", meaning="Artificial Intelligence")
_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


class Layout(StrEnum):
    """The axis order the bundle's ONNX network takes."""

    #: (column, row, slice) as MONAI's ``LoadImage`` gives, reoriented by ``axcodes``: wrap the graph
    MONAI = "monai"
    #: already (slice, row, column), as Portico feeds it: no wrapping
    PORTICO = "portico"


class BundleOverrides(BaseModel):
    """What the importer cannot (or should not) take from the bundle; every field optional.

    Spacing and patch size are in Portico's (z, y, x) order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    version: str | None = None
    title: str | None = None
    description: str | None = None
    modality: str | None = None
    body_parts: tuple[str, ...] = ()
    intensity: IntensityWindow | None = None
    spacing_mm: tuple[float, float, float] | None = None
    patch_size: tuple[int, int, int] | None = None
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    min_slices: Annotated[int, Field(ge=1)] = 1
    segments: tuple[Segment, ...] = ()
    measurements: tuple[Measurement, ...] = (Measurement.VOLUME, Measurement.MEAN)
    postprocessing: tuple[PostStep, ...] = ()
    #: which ``models/*.onnx`` to use when there are several
    model_file: str | None = None
    layout: Layout = Layout.MONAI
    #: MONAI orientation codes (e.g. ``RAS``) the network was trained in; ``None``: from
    #: ``Orientation[d]`` in inference.json; ``""``: none
    axcodes: str | None = None
    #: licence text to use when the bundle has no ``LICENSE``
    licence_file: Path | None = None


def load_overrides(path: Path) -> BundleOverrides:
    """Overrides from a YAML file (data only).

    Raises
    ------
    PackageError
        When the file is not valid YAML or not valid overrides.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return BundleOverrides.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise PackageError(f"{path}: invalid bundle overrides: {exc}") from exc


def import_bundle(bundle_dir: Path, out_dir: Path, overrides: BundleOverrides | None = None) -> ModelPackage:
    """Convert the MONAI bundle in ``bundle_dir`` into a new, unsigned Portico package in ``out_dir``.

    Parameters
    ----------
    bundle_dir
        The bundle folder (holding ``configs/metadata.json``).
    out_dir
        Where the package is written; must not exist or be empty.
    overrides
        Values that replace or complete what the bundle says.

    Raises
    ------
    PackageError
        When the bundle has no ONNX model, no licence, unusable metadata, or lacks something
        Portico needs that no override supplies; the message names it.
    """
    o = overrides or BundleOverrides()
    meta = _read_json(bundle_dir / METADATA)
    config = _read_inference_config(bundle_dir)
    onnx_src = _find_onnx(bundle_dir, o.model_file)
    image, pred = _formats(meta)
    if _int(image.get("num_channels"), 1) != 1:
        raise PackageError(f"{bundle_dir}: the network takes {image.get('num_channels')} input channels; "
                           "Portico feeds one (a single series)")
    licence = _licence_text(bundle_dir, o.licence_file)
    modality = o.modality or _modality(image.get("modality"))
    if modality is None:
        raise PackageError(f"{bundle_dir}: metadata gives no input modality; set `modality`")
    axcodes = o.axcodes if o.axcodes is not None else _literal_str(config, "Orientation", "axcodes") or ""
    axes, flips = ((0, 1, 2), ()) if o.layout is Layout.PORTICO else axis_map(axcodes)
    window, window_source = _window(config, o, bundle_dir)
    overlap = o.overlap if o.overlap is not None else \
        _literal_number(config, "SlidingWindowInferer", "overlap")
    segments, codes_source = _segments(pred, o.segments, bundle_dir)
    fields: dict[str, Any] = {
        "name": o.name or _slug(str(meta.get("name") or bundle_dir.name)),
        "version": o.version or str(meta.get("version", "")),
        "task": Task.SEGMENTATION,
        "title": (o.title or str(meta.get("name") or bundle_dir.name))[:64],
        "description": str(o.description or meta.get("description", ""))[:2000],
        "algorithm_family": ALGORITHM_FAMILY,
        "clinical_use": False,
        "input": {"modality": modality, "body_parts": o.body_parts, "intensity": window,
                  "spacing_mm": o.spacing_mm or to_portico(_literal_numbers(config, "Spacing", "pixdim"),
                                                            axes),
                  "patch_size": o.patch_size or _patch(config, image, axes, bundle_dir),
                  "overlap": 0.25 if overlap is None else overlap, "min_slices": o.min_slices},
        "output": {"segments": segments, "measurements": o.measurements, "postprocessing": o.postprocessing},
        "provenance": {
            "source": "MONAI bundle",
            "bundle_name": str(meta.get("name", bundle_dir.name)),
            "bundle_version": str(meta.get("version", "")),
            "monai_version": str(meta.get("monai_version", "")),
            "onnx_file": onnx_src.name,
            "layout": str(o.layout),
            "axcodes": axcodes or "none",
            "intensity_window": window_source,
            "segment_codes": codes_source,
        },
    }
    _manifest(fields, {"model.onnx": "0" * 64}, bundle_dir)  # refuse before writing anything

    notes = [f"Intensity window {window.low:g}..{window.high:g} from {window_source}."]
    if o.layout is Layout.MONAI:
        notes.append(f"ONNX graph wrapped: Portico's (z, y, x) patches are transposed to the network's "
                     f"(column, row, slice) order{f' and flipped into {axcodes}' if axcodes else ''}, "
                     "and its output back. Flips assume axial slices in the standard orientation.")
    if codes_source != "overrides":
        notes.append("Segment codes are PLACEHOLDERS: category Tissue (SCT 85756007) and a local "
                     f"{LOCAL_SCHEME} type code named after each output channel. Replace them with "
                     "proper SNOMED CT / DCM codes (segments override) before clinical use.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise PackageError(f"{out_dir} is not empty")
    try:
        fields["provenance"]["onnx_sha256"] = write_model(onnx_src, out_dir / "model.onnx", axes, flips)
        (out_dir / "LICENSE").write_text(licence, encoding="utf-8")
        card = _model_card(str(fields["title"]), meta, bundle_dir, notes)
        (out_dir / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        listed = ["model.onnx", "MODEL_CARD.md", "LICENSE"]
        for rel in [METADATA, *INFERENCE_CONFIGS]:
            if _regular(bundle_dir / rel):
                target = out_dir / "bundle" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bundle_dir / rel, target)
                listed.append(f"bundle/{rel.as_posix()}")
        manifest = _manifest(fields, write_digests(out_dir, listed), bundle_dir)
        write_manifest(out_dir, manifest)
        package = load_package(out_dir)
    except BaseException:
        for child in out_dir.iterdir():  # leave the folder as empty as it was
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        raise
    log.info("imported bundle %s as %s (codes: %s)", bundle_dir.name, package.ref, codes_source)
    return package


def _manifest(fields: dict[str, Any], files: dict[str, str], bundle_dir: Path) -> Manifest:
    try:
        return Manifest.model_validate({**fields, "files": files})
    except ValidationError as exc:
        raise PackageError(f"{bundle_dir}: cannot make a valid manifest (override the fields named): "
                           f"{exc}") from exc


# ---- reading the bundle as data ---------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not _regular(path):
        raise PackageError(f"{path.parent.parent}: not a MONAI bundle (no {METADATA})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PackageError(f"{path}: top level must be an object")
    return data


def _read_inference_config(bundle_dir: Path) -> Any:
    for rel in INFERENCE_CONFIGS:
        path = bundle_dir / rel
        if _regular(path):
            try:
                text = path.read_text(encoding="utf-8")
                return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
                raise PackageError(f"{path}: cannot be read as data: {exc}") from exc
    return {}


def _find_onnx(bundle_dir: Path, chosen: str | None) -> Path:
    models = bundle_dir / "models"
    found = sorted(p for p in models.glob("*.onnx") if _regular(p)) \
        if models.is_dir() else []
    if chosen is not None:
        match = [p for p in found if p.name == chosen]
        if not match:
            raise PackageError(f"{bundle_dir}: no models/{chosen}")
        return match[0]
    if not found:
        others = sorted(p.name for p in models.iterdir()) if models.is_dir() else []
        raise PackageError(
            f"{bundle_dir}: the bundle has no ONNX model (models/*.onnx; found {others or 'nothing'}). "
            "Portico runs ONNX only and never loads TorchScript or pickled weights: export the "
            "network to ONNX first (e.g. `python -m monai.bundle onnx_export`).")
    if len(found) > 1:
        preferred = [p for p in found if p.name == "model.onnx"]
        if preferred:
            return preferred[0]
        raise PackageError(f"{bundle_dir}: several ONNX models ({', '.join(p.name for p in found)}); "
                           "choose one with `model_file`")
    return found[0]


def _formats(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    fmt = meta.get("network_data_format")
    inputs = fmt.get("inputs") if isinstance(fmt, dict) else None
    outputs = fmt.get("outputs") if isinstance(fmt, dict) else None
    image = _first_dict(inputs)
    pred = _first_dict(outputs)
    if image is None or pred is None:
        raise PackageError("metadata.json has no network_data_format inputs/outputs")
    return image, pred


def _first_dict(section: Any) -> dict[str, Any] | None:
    if not isinstance(section, dict):
        return None
    return next((v for v in section.values() if isinstance(v, dict)), None)


def _targets(config: Any, kind: str) -> Iterator[dict[str, Any]]:
    """Every component in ``config`` whose ``_target_`` names ``kind`` (or ``kind`` + ``d``)."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if isinstance(target, str) and target.rsplit(".", 1)[-1] in (kind, kind + "d"):
            yield config
        for value in config.values():
            yield from _targets(value, kind)
    elif isinstance(config, list):
        for value in config:
            yield from _targets(value, kind)


def _literal(value: Any) -> bool:
    """A plain value, not a config expression or reference (``$``, ``@``, ``%``)."""
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, list):
        return all(_literal(v) for v in value)
    return isinstance(value, (int, float, bool)) or value is None


def _agreed(config: Any, kind: str, key: str) -> Any:
    """The one literal value of ``key`` across every ``kind`` component; ``None`` if absent or ambiguous."""
    values = [c[key] for c in _targets(config, kind) if key in c and _literal(c[key])]
    if not values or any(v != values[0] for v in values):
        return None
    return values[0]


def _literal_str(config: Any, kind: str, key: str) -> str | None:
    value = _agreed(config, kind, key)
    return value if isinstance(value, str) else None


def _literal_number(config: Any, kind: str, key: str) -> float | None:
    value = _agreed(config, kind, key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _literal_numbers(config: Any, kind: str, key: str) -> tuple[float, float, float] | None:
    value = _agreed(config, kind, key)
    if isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        return float(value[0]), float(value[1]), float(value[2])
    return None


def _window(config: Any, o: BundleOverrides, bundle_dir: Path) -> tuple[IntensityWindow, str]:
    if o.intensity is not None:
        return o.intensity, "overrides"
    a_min = _literal_number(config, "ScaleIntensityRange", "a_min")
    a_max = _literal_number(config, "ScaleIntensityRange", "a_max")
    b_min = _literal_number(config, "ScaleIntensityRange", "b_min")
    b_max = _literal_number(config, "ScaleIntensityRange", "b_max")
    clip = _agreed(config, "ScaleIntensityRange", "clip")
    if a_min is not None and a_max is not None and a_max > a_min and (b_min, b_max) == (0.0, 1.0) \
            and clip is True:
        return IntensityWindow(low=a_min, high=a_max), "inference.json ScaleIntensityRanged"
    raise PackageError(f"{bundle_dir}: no literal ScaleIntensityRanged(a_min, a_max, b_min=0, b_max=1, "
                       "clip=True) in configs/inference.json; Portico windows intensities to [0, 1] and "
                       "needs the window: set `intensity: {low, high}` (or --window LOW HIGH)")


def _patch(config: Any, image: dict[str, Any], axes: tuple[int, int, int],
           bundle_dir: Path) -> tuple[int, int, int]:
    roi = _agreed(config, "SlidingWindowInferer", "roi_size")
    for candidate in (roi, image.get("spatial_shape")):
        if isinstance(candidate, list) and len(candidate) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in candidate):
            net = (int(candidate[0]), int(candidate[1]), int(candidate[2]))
            z, y, x = to_portico(net, axes) or net
            return int(z), int(y), int(x)
    raise PackageError(f"{bundle_dir}: no literal 3D patch size (SlidingWindowInferer roi_size or "
                       "metadata spatial_shape); set `patch_size: [z, y, x]`")


def _segments(pred: dict[str, Any], given: tuple[Segment, ...],
              bundle_dir: Path) -> tuple[tuple[Segment, ...], str]:
    channel_def = pred.get("channel_def")
    names: dict[int, str] = {}
    if isinstance(channel_def, dict):
        for key, value in channel_def.items():
            if not str(key).isdigit():
                raise PackageError(f"{bundle_dir}: output channel_def key {key!r} is not a channel number")
            if int(key) >= 1:
                names[int(key)] = str(value)
    num_channels = _int(pred.get("num_channels"), 0) or None
    if num_channels == 1:
        raise PackageError(f"{bundle_dir}: the network outputs one channel (a label map or a single "
                           "probability); Portico needs one channel per class, background first")
    by_label = {s.label: s for s in given}
    if names:
        unknown = sorted(set(by_label) - set(names))
        if unknown:
            raise PackageError(f"{bundle_dir}: segments override labels {unknown} that the bundle's "
                               f"output channels do not define ({sorted(names)})")
    elif not given:
        raise PackageError(f"{bundle_dir}: metadata defines no output channels (channel_def); give "
                           "`segments` with label, name and codes")
    labels = sorted(set(names) | set(by_label))
    if isinstance(num_channels, int) and labels[-1] >= num_channels:
        raise PackageError(f"{bundle_dir}: label {labels[-1]} but the network outputs "
                           f"{num_channels} channels")
    segments = []
    for i, label in enumerate(labels):
        if label in by_label:
            segments.append(by_label[label])
            continue
        name = names[label][:64] or f"Segment {label}"
        code = Code(value=f"{_slug(name)[:10]}-{label}", scheme=LOCAL_SCHEME, meaning=name)
        segments.append(Segment(label=label, name=name, category=TISSUE, type=code,
                                colour=_PALETTE[i % len(_PALETTE)]))
    source = "overrides" if set(labels) <= set(by_label) else \
        "placeholder (generic Tissue category, local type codes)" if not by_label else \
        "overrides, placeholders for the rest"
    return tuple(segments), source


def _modality(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    code = value.strip().upper()
    code = {"MRI": "MR"}.get(code, code)
    return code if re.fullmatch(r"[A-Z]{2,4}", code) else None


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:64] or "bundle"


# ---- axes ---------------------------------------------------------------------------------------


def _licence_text(bundle_dir: Path, given: Path | None) -> str:
    candidates = [bundle_dir / n for n in ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE")] + \
        [bundle_dir / "docs" / n for n in ("LICENSE", "LICENSE.txt", "license.txt")]
    source = given if given is not None else next((p for p in candidates if _regular(p)), None)
    if source is None or not source.is_file():
        raise PackageError(f"{bundle_dir}: no LICENSE in the bundle; give the licence text "
                           "(`licence_file`, or --licence FILE)")
    text = source.read_text(encoding="utf-8", errors="replace")
    data_licence = bundle_dir / "docs" / "data_license.txt"
    if _regular(data_licence):
        text += "\n\n---\nTraining data licence (docs/data_license.txt):\n\n" + \
            data_licence.read_text(encoding="utf-8", errors="replace")
    return text


def _regular(path: Path) -> bool:
    """A plain file: bundles are read without following links out of them."""
    return path.is_file() and not path.is_symlink()


def _int(value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _model_card(title: str, meta: dict[str, Any], bundle_dir: Path, notes: list[str]) -> str:
    lines = [f"# {title}", "", f"Imported from the MONAI bundle `{bundle_dir.name}` "
             f"(version {meta.get('version', '?')}). Not for clinical use until reviewed.", ""]
    fields = ("description", "authors", "copyright", "intended_use", "data_source", "data_type",
              "image_classes", "label_classes", "pred_classes", "eval_metrics", "references", "license")
    shown = [(f, meta[f]) for f in fields if meta.get(f)]
    if shown:
        lines += ["## From the bundle's metadata", ""]
        for key, value in shown:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            lines.append(f"- **{key.replace('_', ' ')}**: {text}")
        lines.append("")
    lines += ["## Import notes", "", *[f"- {n}" for n in notes], ""]
    readmes = (bundle_dir / "docs" / "README.md", bundle_dir / "README.md")
    readme = next((p for p in readmes if _regular(p)), None)
    if readme is not None:
        lines += ["## Bundle README", "", readme.read_text(encoding="utf-8", errors="replace").strip(), ""]
    return "\n".join(lines)
