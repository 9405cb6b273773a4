"""``/models``: installed model versions, and promoting, enabling or disabling one (audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel

from appliance.api.auth import principal_of
from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.identity import Principal
from appliance.models import ModelRegistry, VersionStatus
from inference.errors import PackageError

_REF = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"
Name = Annotated[str, Path(min_length=1, max_length=128, pattern=_REF)]
Version = Annotated[str, Path(min_length=1, max_length=64, pattern=_REF)]
Who = Annotated[Principal, Depends(principal_of)]


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

    @classmethod
    def of(cls, s: VersionStatus) -> ModelVersionOut:
        i = s.installed
        return cls(name=s.name, version=s.version, role=str(s.role), enabled=s.enabled, recorded=s.recorded,
                   installed=i is not None, title=i.manifest.title if i else None,
                   task=str(i.manifest.task) if i else None, package_hash=i.package_hash if i else None)


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
        return [ModelVersionOut.of(s) for s in ctx.registry.statuses()]

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
