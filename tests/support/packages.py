"""A tiny, valid model package for tests: a two-channel ONNX model and a one-segment manifest."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from inference.packages import (
    Code,
    InputSpec,
    IntensityWindow,
    Manifest,
    OutputSpec,
    Segment,
    Task,
    write_digests,
    write_manifest,
)

TISSUE = Code(value="85756007", scheme="SCT", meaning="Tissue")
FAT = Code(value="55603005", scheme="SCT", meaning="Fat")


def tiny_onnx() -> onnx.ModelProto:
    """(N, 1, z, y, x) → (N, 2, z, y, x): background −x, foreground x."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "z", "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2, "z", "y", "x"])
    nodes = [helper.make_node("Neg", ["image"], ["neg"]),
             helper.make_node("Concat", ["neg", "image"], ["logits"], axis=1)]
    graph = helper.make_graph(nodes, "tiny", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def make_package(root: Path, version: str = "1.0.0", name: str = "tiny", card: str = "# Tiny\n",
                 provenance: dict[str, str] | None = None) -> Path:
    """Write the package into ``root`` (which must not exist) and return ``root``."""
    root.mkdir(parents=True)
    onnx.save(tiny_onnx(), str(root / "model.onnx"))
    (root / "MODEL_CARD.md").write_text(card)
    (root / "LICENSE").write_text("Apache-2.0\n")
    write_manifest(root, Manifest(
        name=name, version=version, task=Task.SEGMENTATION, title="Tiny",
        input=InputSpec(modality="CT", intensity=IntensityWindow(low=-100, high=100), patch_size=(4, 8, 8)),
        output=OutputSpec(segments=(Segment(label=1, name="Fat", category=TISSUE, type=FAT),)),
        files=write_digests(root, ["model.onnx", "MODEL_CARD.md", "LICENSE"]), provenance=provenance or {},
    ))
    return root
