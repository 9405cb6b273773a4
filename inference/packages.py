"""Model packages: a folder with ``portico-model.yaml``, ``model.onnx``, a model card and a licence.

The manifest is data only. Nothing from a package is ever executed or evaluated: pre- and
post-processing steps come from a fixed vocabulary interpreted by :mod:`inference.pipeline`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inference.errors import PackageError

MANIFEST_NAME = "portico-model.yaml"


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
    min_slices: Annotated[int, Field(ge=1)] = 1


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


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    segments: tuple[Segment, ...] = Field(min_length=1)
    measurements: tuple[Measurement, ...] = (Measurement.VOLUME, Measurement.MEAN)
    postprocessing: tuple[PostStep, ...] = ()

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
    algorithm_family: Code = Code(value="123109", scheme="DCM", meaning="Manual Processing")
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
            if name.startswith("/") or ".." in Path(name).parts:
                raise ValueError(f"file name {name!r} leaves the package")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"sha256 of {name!r} is not 64 lowercase hex digits")
        return value


@dataclass(frozen=True)
class ModelPackage:
    """A verified package on disk."""

    root: Path
    manifest: Manifest
    #: sha256 over the manifest bytes: identifies exactly this package
    package_hash: str

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> tuple[Manifest, bytes]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{root}: no {MANIFEST_NAME}")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
        return Manifest.model_validate(data), raw
    except (yaml.YAMLError, ValidationError) as exc:
        raise PackageError(f"{root}: invalid manifest: {exc}") from exc


def load_package(root: Path) -> ModelPackage:
    """Read and verify a package folder: manifest valid, every listed file present with its digest.

    Raises
    ------
    PackageError
        With a message naming the first problem found.
    """
    manifest, raw = read_manifest(root)
    required = {manifest.model_file, manifest.model_card, manifest.licence}
    missing = required - manifest.files.keys()
    if missing:
        raise PackageError(f"{root}: manifest lists no digest for {sorted(missing)}")
    for name, expected in sorted(manifest.files.items()):
        path = root / name
        if not path.is_file():
            raise PackageError(f"{root}: missing file {name}")
        actual = sha256_file(path)
        if actual != expected:
            raise PackageError(f"{root}: {name} does not match its sha256 (tampered or corrupt)")
    return ModelPackage(root=root, manifest=manifest, package_hash=hashlib.sha256(raw).hexdigest())


def write_digests(root: Path, names: list[str]) -> dict[str, str]:
    """Digests for the given files, for package build scripts."""
    return {name: sha256_file(root / name) for name in sorted(names)}
