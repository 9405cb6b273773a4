"""``/models``: installed model versions (signature, accepted inputs, model card), and promoting, enabling or
disabling one (audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel

from appliance.api.auth import principal_of
from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.identity import Principal
from appliance.models import ModelRegistry, Signature, VersionStatus
from inference.errors import PackageError

_REF = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"
Name = Annotated[str, Path(min_length=1, max_length=128, pattern=_REF)]
Version = Annotated[str, Path(min_length=1, max_length=64, pattern=_REF)]
Who = Annotated[Principal, Depends(principal_of)]


class SignatureOut(BaseModel):
    #: ``verified``, ``invalid``, ``unchecked`` or ``unsigned`` (:class:`appliance.models.Signature`)
    state: str
    signed_by: str | None
    detail: str


class InputOut(BaseModel):
    """What a version accepts (its manifest's ``input``)."""

    modality: str
    body_parts: list[str]
    orientation: str
    spacing_mm: list[float] | None
    min_slices: int
    slice_spacing_mm: list[float] | None
    pixel_spacing_mm: list[float] | None


class ModelVersionOut(BaseModel):
    name: str
    version: str
    role: str
    enabled: bool
    #: False: nothing was recorded for the name; ``role`` is what runs by default
    recorded: bool
    #: False: recorded but its folder is gone
    installed: bool
    title: str | None
    task: str | None
    package_hash: str | None
    description: str | None = None
    signature: SignatureOut | None = None
    input: InputOut | None = None
    #: the segments it outputs, by name
    segments: list[str] = []

    @classmethod
    def of(cls, s: VersionStatus, signature: Signature | None = None) -> ModelVersionOut:
        i = s.installed
        m = i.manifest if i else None
        return cls(name=s.name, version=s.version, role=str(s.role), enabled=s.enabled, recorded=s.recorded,
                   installed=i is not None, title=m.title if m else None,
                   task=str(m.task) if m else None, package_hash=i.package_hash if i else None,
                   description=m.description if m else None,
                   signature=SignatureOut(state=signature.state, signed_by=signature.signed_by,
                                          detail=signature.detail) if signature else None,
                   input=InputOut(modality=m.input.modality, body_parts=list(m.input.body_parts),
                                  orientation=m.input.orientation,
                                  spacing_mm=list(m.input.spacing_mm) if m.input.spacing_mm else None,
                                  min_slices=m.input.min_slices,
                                  slice_spacing_mm=list(m.input.slice_spacing_mm) if m.input.slice_spacing_mm
                                  else None,
                                  pixel_spacing_mm=list(m.input.pixel_spacing_mm) if m.input.pixel_spacing_mm
                                  else None) if m else None,
                   segments=[seg.name for seg in m.output.segments] if m else [])


class ModelCardOut(BaseModel):
    name: str
    version: str
    file: str
    #: Markdown, as the package holds it: show it as text, never as HTML
    text: str
    #: the file matches the sha256 its manifest lists
    intact: bool
    truncated: bool


class Promoted(BaseModel):
    name: str
    version: str
    previous: str | None


class EnabledChange(BaseModel):
    name: str
    version: str
    enabled: bool
    was_enabled: bool


def _require_installed(registry: ModelRegistry, name: str, version: str) -> None:
    """404 when ``name@version`` is not installed, 409 when it is installed twice."""
    matches = [i for i in registry.installed(name) if i.manifest.version == version]
    if not matches:
        raise ApiError(404, "not_found", f"model package {name}@{version} is not installed")
    if len(matches) > 1:
        raise ApiError(409, "conflict", f"{name}@{version} is installed twice; remove one copy")


def _refused(exc: PackageError) -> ApiError:
    """What is left once existence and state were checked: the package fails verification."""
    return ApiError(422, exc.code, str(exc))


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/models")

    @router.get("")
    def models() -> list[ModelVersionOut]:
        registry = ctx.registry
        return [ModelVersionOut.of(s, registry.signature(s.installed) if s.installed else None)
                for s in registry.statuses()]

    @router.get("/{name}/{version}/card")
    def card(name: Name, version: Version) -> ModelCardOut:
        """The version's model card (Markdown as text; the first 256 KiB)."""
        registry = ctx.registry
        _require_installed(registry, name, version)
        try:
            found = registry.model_card(registry.find(name, version))
        except PackageError as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        return ModelCardOut(name=name, version=version, file=found.file, text=found.text, intact=found.intact,
                            truncated=found.truncated)

    @router.post("/{name}/{version}/promote")
    def promote(name: Name, version: Version, who: Who) -> Promoted:
        registry = ctx.registry
        _require_installed(registry, name, version)
        state = registry.states.get(name, version) if registry.states is not None else None
        if state is not None and not state.enabled:
            raise ApiError(409, "conflict", f"{name}@{version} is disabled; enable it before promoting it")
        try:
            previous = registry.promote(name, version, who.name)
        except PackageError as exc:
            raise _refused(exc) from None
        return Promoted(name=name, version=version, previous=previous)

    def set_enabled(name: str, version: str, enabled: bool, actor: str) -> EnabledChange:
        registry = ctx.registry
        recorded = registry.states is not None and registry.states.get(name, version) is not None
        if enabled or not recorded:  # disabling a recorded version whose folder is gone is allowed
            _require_installed(registry, name, version)
        try:
            before = registry.set_enabled(name, version, enabled, actor)
        except PackageError as exc:
            raise _refused(exc) from None
        return EnabledChange(name=name, version=version, enabled=enabled, was_enabled=before)

    @router.post("/{name}/{version}/enable")
    def enable(name: Name, version: Version, who: Who) -> EnabledChange:
        return set_enabled(name, version, True, who.name)

    @router.post("/{name}/{version}/disable")
    def disable(name: Name, version: Version, who: Who) -> EnabledChange:
        return set_enabled(name, version, False, who.name)

    return router
