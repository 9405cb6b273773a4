"""Model packages: a folder with ``portico-model.yaml``, ``model.onnx``, a model card and a licence.

The manifest lists the sha256 of every other file; a package holds exactly those files, the
manifest and, optionally, ``signature.ed25519``: a detached ed25519 signature over the manifest's
bytes (:mod:`inference.signing`), which so covers the whole package.

The manifest is data only (``yaml.safe_load``). Nothing from a package is ever executed or
evaluated: pre- and post-processing steps come from a fixed vocabulary interpreted by
:mod:`inference.pipeline`; the model is ONNX, never a pickle.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from inference.errors import PackageError
from inference.signing import SIGNATURE_NAME, sign, verify_manifest

MANIFEST_NAME = "portico-model.yaml"
#: a manifest is a few kB; anything near this is not one
MAX_MANIFEST_BYTES = 1 << 20
#: what one zip may unpack to, in bytes and in entries
MAX_UNPACKED_BYTES = 32 << 30
MAX_ZIP_ENTRIES = 10_000
#: zip entries that archivers add on their own; skipped when unpacking
_ZIP_JUNK = re.compile(r"(^|/)(__MACOSX/|\.DS_Store$)")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:[.-]([0-9A-Za-z.]+))?$")


class Code(BaseModel):
    """A coded concept (SNOMED CT ``SCT``, DICOM ``DCM``, UCUM ``UCUM``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class Task(StrEnum):
    SEGMENTATION = "segmentation"


class IntensityWindow(BaseModel):
    """Clip the input to ``[low, high]`` (in modality units, e.g. HU) and scale to ``[0, 1]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float


class InputSpec(BaseModel):
    """What the model expects and which series it can accept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: str = Field(pattern=r"^[A-Z]{2,4}$")
    body_parts: tuple[str, ...] = ()
    orientation: Literal["axial"] = "axial"
    #: target voxel spacing (z, y, x) in mm; ``None`` means the native grid
    spacing_mm: tuple[float, float, float] | None = None
    intensity: IntensityWindow
    #: spatial patch size (z, y, x) the network runs on; sliding window beyond it
    patch_size: tuple[int, int, int]
    #: fraction of overlap between neighbouring sliding-window patches
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    #: fewest slices a series may have (enforced before inference, :mod:`inference.accepts`)
    min_slices: Annotated[int, Field(ge=1)] = 1
    #: inclusive [min, max] spacing between slices (mm) a series may have; ``None`` accepts any
    slice_spacing_mm: tuple[PositiveFloat, PositiveFloat] | None = None
    #: inclusive [min, max] in-plane pixel spacing (mm), both directions; ``None`` accepts any
    pixel_spacing_mm: tuple[PositiveFloat, PositiveFloat] | None = None

    @field_validator("slice_spacing_mm", "pixel_spacing_mm")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"range lower bound {value[0]} is above upper bound {value[1]}")
        return value

    @field_validator("body_parts")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in value)


class Segment(BaseModel):
    """One output class of a segmentation model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: Annotated[int, Field(ge=1, le=255)]
    name: str = Field(min_length=1, max_length=64)
    category: Code
    type: Code
    colour: tuple[int, int, int] = (255, 0, 0)

    @field_validator("colour")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("colour components must be 0..255")
        return value


class Measurement(StrEnum):
    VOLUME = "volume"
    MEAN = "mean"
    STDDEV = "stddev"
    MIN = "min"
    MAX = "max"


class PostStep(StrEnum):
    """Post-processing vocabulary; applied in order to the label map."""

    LARGEST_COMPONENT = "largest_component"
    FILL_HOLES = "fill_holes"
    REMOVE_SMALL = "remove_small"


class SegType(StrEnum):
    """How the DICOM SEG encodes the result.

    ``binary``: one bit a voxel, from the (postprocessed) label map. ``fractional``: the model's
    per-segment probability, 0..255 for 0..1 (FRACTIONAL, PROBABILITY), resampled onto the
    series' grid; voxels postprocessing made background carry probability 0 for every segment.
    """

    BINARY = "binary"
    FRACTIONAL = "fractional"


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    segments: tuple[Segment, ...] = Field(min_length=1)
    measurements: tuple[Measurement, ...] = (Measurement.VOLUME, Measurement.MEAN)
    postprocessing: tuple[PostStep, ...] = ()
    #: BINARY (default) or FRACTIONAL SEG; measurements always come from the label map
    seg_type: SegType = SegType.BINARY

    @field_validator("segments")
    @classmethod
    def _unique_labels(cls, value: tuple[Segment, ...]) -> tuple[Segment, ...]:
        labels = [s.label for s in value]
        if len(set(labels)) != len(labels):
            raise ValueError("segment labels must be unique")
        return value


class Manifest(BaseModel):
    """The contents of ``portico-model.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str = Field(pattern=r"^\d+\.\d+\.\d+([.-][0-9A-Za-z.]+)?$")
    task: Task
    title: str = Field(min_length=1, max_length=64)
    description: str = ""
    algorithm_family: Code = Code(value="123110", scheme="DCM", meaning="Artificial Intelligence")
    clinical_use: bool = False
    input: InputSpec
    output: OutputSpec
    model_file: str = "model.onnx"
    model_card: str = "MODEL_CARD.md"
    licence: str = "LICENSE"
    #: sha256 hex digest of every file in the package other than the manifest and signature
    files: dict[str, str]
    provenance: dict[str, str] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _safe_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            problem = unsafe_name(name)
            if problem:
                raise ValueError(f"file name {name!r} {problem}")
            if name in (MANIFEST_NAME, SIGNATURE_NAME):
                raise ValueError(f"{name} cannot list itself")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"sha256 of {name!r} is not 64 lowercase hex digits")
        return value

    @field_validator("model_file", "model_card", "licence")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        problem = unsafe_name(value)
        if problem:
            raise ValueError(f"file name {value!r} {problem}")
        return value

    @field_validator("model_file")
    @classmethod
    def _onnx(cls, value: str) -> str:
        if not value.endswith(".onnx"):
            raise ValueError(f"model_file {value!r} must be an ONNX file (*.onnx)")
        return value


def unsafe_name(name: str) -> str | None:
    """Why ``name`` is not a safe relative file name inside a package, or ``None`` when it is.

    Safe: forward slashes only, no absolute path, drive, ``.``/``..`` or empty part, no hidden
    (dot) file or folder, no control characters.
    """
    if not name or len(name) > 255:
        return "is empty or too long"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if "\\" in name or ":" in name:
        return "contains a backslash or colon (use forward slashes, no drive letters)"
    if name.startswith("/"):
        return "is absolute: it leaves the package"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part: it may leave the package"
    if any(p.startswith(".") for p in parts):
        return "is a hidden (dot) file or folder"
    return None


@dataclass(frozen=True)
class ModelPackage:
    """A verified package on disk."""

    root: Path
    manifest: Manifest
    #: sha256 over the manifest bytes: identifies exactly this package
    package_hash: str
    #: fingerprint of the trusted key whose signature verified, ``None`` when not checked
    signed_by: str | None = None

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


def version_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key of a package version: numeric parts, and a pre-release (``1.0.0-rc1``) before its release."""
    match = _VERSION.match(version)
    if match is None:
        raise ValueError(f"not a package version: {version!r}")
    major, minor, patch, suffix = match.groups()
    return int(major), int(minor), int(patch), 0 if suffix else 1, suffix or ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> tuple[Manifest, bytes]:
    """The parsed manifest of ``root`` and its exact bytes; data only (``yaml.safe_load``)."""
    path = root / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        raise PackageError(f"{root}: no {MANIFEST_NAME}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{root}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
        return Manifest.model_validate(data), raw
    except (yaml.YAMLError, ValidationError) as exc:
        raise PackageError(f"{root}: invalid manifest: {exc}") from exc


def load_package(root: Path, trusted_keys: Sequence[str | bytes] = (),
                 require_signature: bool = False) -> ModelPackage:
    """Read and verify a package folder.

    Checks, in order: the manifest is valid; the signature (when present and keys are given, or
    when required) verifies with one of ``trusted_keys``; the folder holds exactly the listed
    files (plus manifest and signature), no links; every file matches its sha256.

    Parameters
    ----------
    root
        The package folder.
    trusted_keys
        PEM ed25519 public keys. A signed package is checked against them when any are given.
    require_signature
        Refuse a package without a signature that verifies with a trusted key.

    Raises
    ------
    PackageError
        With a message naming the first problem found.
    """
    root = Path(root)
    if not root.is_dir():
        raise PackageError(f"{root}: not a package folder")
    manifest, raw = read_manifest(root)
    required = {manifest.model_file, manifest.model_card, manifest.licence}
    missing = required - manifest.files.keys()
    if missing:
        raise PackageError(f"{root}: manifest lists no digest for {sorted(missing)}")
    signed_by = _check_signature(root, raw, trusted_keys, require_signature)
    _check_tree(root, manifest)
    for name, expected in sorted(manifest.files.items()):
        path = root / name
        if not path.is_file():
            raise PackageError(f"{root}: missing file {name}")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageError(f"{root}: {name} does not match its sha256 (tampered or corrupt)")
    return ModelPackage(root=root, manifest=manifest, package_hash=hashlib.sha256(raw).hexdigest(),
                        signed_by=signed_by)


def _check_signature(root: Path, manifest: bytes, trusted_keys: Sequence[str | bytes],
                     require_signature: bool) -> str | None:
    path = root / SIGNATURE_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise PackageError(f"{root}: {SIGNATURE_NAME} is not a regular file")
    if not path.is_file():
        if require_signature:
            raise PackageError(f"{root}: the package is unsigned and signatures are required")
        return None
    if not trusted_keys and not require_signature:
        return None  # nothing to check it against; treated as unsigned
    try:
        return verify_manifest(manifest, path.read_bytes(), trusted_keys)
    except PackageError as exc:
        raise PackageError(f"{root}: {exc}") from exc


def _check_tree(root: Path, manifest: Manifest) -> None:
    """Refuse links, special files and any file the manifest does not list."""
    for folder, dirs, names in os.walk(root, followlinks=False):
        base = Path(folder)
        for name in [*dirs, *names]:
            path = base / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise PackageError(f"{root}: {rel} is a symbolic link; packages hold regular files only")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise PackageError(f"{root}: {rel} is not a regular file")
            if rel not in manifest.files and rel not in (MANIFEST_NAME, SIGNATURE_NAME):
                raise PackageError(f"{root}: {rel} is in the package but not listed in the manifest")


def write_digests(root: Path, names: list[str]) -> dict[str, str]:
    """Digests for the given files, for package build scripts."""
    return {name: sha256_file(root / name) for name in sorted(names)}


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest`` as ``root/portico-model.yaml`` (any signature must be made afresh)."""
    path = root / MANIFEST_NAME
    data = manifest.model_dump(mode="json")
    if manifest.output.seg_type == SegType.BINARY:
        # the default is left out, so packages built before the option existed rebuild byte for byte
        del data["output"]["seg_type"]
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def sign_package(root: Path, private_key_pem: str | bytes) -> Path:
    """Sign ``root``'s manifest with an ed25519 key; writes and returns :data:`SIGNATURE_NAME`.

    Sign once the manifest is final: any later change to it invalidates the signature.
    """
    path = root / SIGNATURE_NAME
    path.write_bytes(sign((root / MANIFEST_NAME).read_bytes(), private_key_pem))
    return path


def extract_zip(archive: Path, dest: Path, *, max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack ``archive`` into the empty folder ``dest``, refusing anything that could escape it.

    Entries with absolute or ``..`` paths, backslashes, drive letters, links or encryption are
    refused; ``__MACOSX/`` and ``.DS_Store`` entries are skipped.

    Returns
    -------
    Path
        ``dest``, or its only sub-folder when the archive wraps everything in one folder.

    Raises
    ------
    PackageError
        When the archive is unreadable, unsafe, or unpacks to more than ``max_bytes``.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_ENTRIES:
                raise PackageError(f"{archive}: more than {MAX_ZIP_ENTRIES} entries")
            written = 0
            for info in infos:
                name = info.filename
                if _ZIP_JUNK.search(name):
                    continue
                problem = _unsafe_zip_name(name)
                if problem:
                    raise PackageError(f"{archive}: entry {name!r} {problem}")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise PackageError(f"{archive}: entry {name!r} is a symbolic link")
                if info.flag_bits & 0x1:
                    raise PackageError(f"{archive}: entry {name!r} is encrypted")
                target = dest.joinpath(*PurePosixPath(name).parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("xb") as out:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        written += len(block)
                        if written > max_bytes:
                            raise PackageError(f"{archive}: unpacks to more than {max_bytes} bytes")
                        out.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise PackageError(f"{archive}: cannot unpack: {exc}") from exc
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return dest


def _unsafe_zip_name(name: str) -> str | None:
    if not name or "\\" in name or any(ord(c) < 32 for c in name):
        return "has an empty name, a backslash or control characters"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is absolute: it would leave the folder"
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part: it would leave the folder"
    return None


def copy_package(package: ModelPackage, dest: Path) -> None:
    """Copy exactly the package's listed files, manifest and signature into the new folder ``dest``."""
    dest.mkdir(parents=True)
    names = [*package.manifest.files, MANIFEST_NAME]
    if (package.root / SIGNATURE_NAME).is_file():
        names.append(SIGNATURE_NAME)
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package.root / name, target)
