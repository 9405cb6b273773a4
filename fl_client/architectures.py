"""The architectures the pre-installed trainer may build: an allow-list keyed by model package name.

No code from a model package or a job is ever executed: a package only names which of these
networks it is, and the weights are plain tensors loaded into it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from monai.networks.nets.basic_unet import BasicUNet

from fl_client.errors import PolicyError
from inference.packages import MANIFEST_NAME, Manifest, read_manifest

#: the demo model's intensity window (HU) and the HU-rule thresholds it sees as extra input channels
BODY_COMPOSITION_WINDOW = (-600.0, 1000.0)
BODY_COMPOSITION_THRESHOLDS_HU = (-499.5, -190.5, -29.5, 150.5, 199.5)
BODY_COMPOSITION_FEATURES = (16, 16, 32, 64, 128, 16)


class ThresholdFeatures(torch.nn.Module):
    """Fixed input features: the windowed CT plus one indicator per HU threshold of the rule.

    Half-integer thresholds separate integer HU exactly, whatever the float rounding of the window.
    """

    def __init__(self, window: tuple[float, float] = BODY_COMPOSITION_WINDOW,
                 thresholds_hu: tuple[float, ...] = BODY_COMPOSITION_THRESHOLDS_HU) -> None:
        super().__init__()
        low, high = window
        levels = [(t - low) / (high - low) for t in thresholds_hu]
        self.levels: torch.Tensor
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, (x > self.levels).to(x.dtype)], dim=1)


def body_composition_unet() -> torch.nn.Module:
    """The network of ``ct-body-composition`` (built by models/build_ct_body_composition.py).

    A 2D BasicUNet, run slice by slice, fed the windowed CT plus fixed HU-threshold indicators.
    """
    unet = BasicUNet(spatial_dims=2, in_channels=1 + len(BODY_COMPOSITION_THRESHOLDS_HU), out_channels=4,
                     features=BODY_COMPOSITION_FEATURES,
                     act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                     norm=("batch", {"affine": True}), upsample="deconv")
    return torch.nn.Sequential(ThresholdFeatures(), unet)


#: package name → network constructor
ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "ct-body-composition": body_composition_unet,
}


def build_network(package_name: str) -> torch.nn.Module:
    """A fresh network for ``package_name``.

    Raises
    ------
    PolicyError
        When the name is not on the allow-list.
    """
    try:
        return ARCHITECTURES[package_name]()
    except KeyError:
        raise PolicyError(f"no allow-listed architecture for model {package_name!r}") from None


class Slab(torch.nn.Module):
    """The package ONNX contract (N, 1, z, y, x) → (N, C, z, y, x) around a per-slice 2D network."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        y: torch.Tensor = self.net(x.permute(0, 2, 1, 3, 4).reshape(n * d, c, h, w))
        return y.reshape(n, d, y.shape[1], h, w).permute(0, 2, 1, 3, 4)


def find_package(models_dir: Path, name: str) -> tuple[Path, Manifest]:
    """The folder and manifest of the highest installed version of ``name`` (no verification here)."""
    found: list[tuple[tuple[int, ...], Path, Manifest]] = []
    for manifest_path in sorted(models_dir.glob(f"*/{MANIFEST_NAME}")):
        manifest, _ = read_manifest(manifest_path.parent)
        if manifest.name == name:
            key = tuple(int(p) for p in manifest.version.split("-")[0].split(".")[:3])
            found.append((key, manifest_path.parent, manifest))
    if not found:
        raise PolicyError(f"model package {name!r} is not installed in {models_dir}")
    _, folder, manifest = max(found, key=lambda f: f[0])
    return folder, manifest
