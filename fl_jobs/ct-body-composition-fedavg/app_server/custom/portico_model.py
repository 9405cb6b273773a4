"""The ct-body-composition network, for the server's model persistor (the global model).

It must equal ``fl_client.architectures.body_composition_unet`` at the sites, which is what the
shipped package's ONNX model was exported from; the server may not have Portico installed, so the
definition travels with the job. A test checks the two give identical state-dict keys and shapes.
"""

from __future__ import annotations

import torch
from monai.networks.nets.basic_unet import BasicUNet

WINDOW = (-600.0, 1000.0)
THRESHOLDS_HU = (-499.5, -190.5, -29.5, 150.5, 199.5)
FEATURES = (16, 16, 32, 64, 128, 16)


class ThresholdFeatures(torch.nn.Module):
    """The windowed CT plus one indicator channel per HU threshold of the tissue rule."""

    def __init__(self) -> None:
        super().__init__()
        low, high = WINDOW
        levels = [(t - low) / (high - low) for t in THRESHOLDS_HU]
        self.levels: torch.Tensor
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, (x > self.levels).to(x.dtype)], dim=1)


class BodyCompositionNet(torch.nn.Sequential):
    """``Sequential(ThresholdFeatures, BasicUNet 2D)``, as at the sites."""

    def __init__(self) -> None:
        super().__init__(
            ThresholdFeatures(),
            BasicUNet(spatial_dims=2, in_channels=1 + len(THRESHOLDS_HU), out_channels=4, features=FEATURES,
                      act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                      norm=("batch", {"affine": True}), upsample="deconv"),
        )
