"""The model packages installed on this appliance."""

from __future__ import annotations

import logging
from pathlib import Path

from inference.errors import PackageError
from inference.packages import MANIFEST_NAME, ModelPackage, load_package, read_manifest

log = logging.getLogger(__name__)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("-")[0].split(".")[:3])


class ModelRegistry:
    """Packages found under ``models_dir`` (one folder per package, any depth of one)."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._verified: dict[Path, ModelPackage] = {}

    def folders(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.parent for p in self.models_dir.glob(f"*/{MANIFEST_NAME}"))

    def get(self, name: str, version: str | None = None) -> ModelPackage:
        """The verified package ``name`` at ``version`` (the highest version when not pinned)."""
        candidates = []
        for folder in self.folders():
            manifest, _ = read_manifest(folder)
            if manifest.name == name and (version is None or manifest.version == version):
                candidates.append((_version_key(manifest.version), folder))
        if not candidates:
            raise PackageError(f"no model package {name}{'@' + version if version else ''} installed")
        folder = max(candidates)[1]
        if folder not in self._verified:
            self._verified[folder] = load_package(folder)
        return self._verified[folder]
