"""MONAI bundle import: metadata and literal config values as data, ONNX axis wrapping, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from inference.bundle import BundleOverrides, Layout, import_bundle
from inference.errors import PackageError
from inference.packages import Code, Segment, load_package

SPLEEN = Code(value="78961009", scheme="SCT", meaning="Spleen")
ANATOMY = Code(value="123037004", scheme="SCT", meaning="Anatomical Structure")


def network(channels: int = 3) -> onnx.ModelProto:
    """A stand-in 3D network on (N, 1, W, H, D): class c's logit is c·x (background 0)."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "w", "h", "d"])
    y = helper.make_tensor_value_info("pred", TensorProto.FLOAT, ["n", channels, "w", "h", "d"])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [1, channels, 1, 1, 1],
                               [float(c) for c in range(channels)])
    nodes = [helper.make_node("Mul", ["image", "scale"], ["pred"])]
    graph = helper.make_graph(nodes, "net", [x], [y], initializer=[scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def metadata(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema.json",
        "version": "0.5.3",
        "monai_version": "1.3.0",
        "name": "Spleen CT segmentation",
        "description": "A pre-trained model for volumetric segmentation of the spleen from CT image",
        "authors": "MONAI team",
        "intended_use": "This is an example, not to be used for diagnostic purposes",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [96, 96, 96], "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                 "spatial_shape": [96, 96, 96],
                                 "channel_def": {"0": "background", "1": "spleen", "2": "liver"}}},
        },
    }
    data.update(changes)
    return data


def inference_config(**scale: Any) -> dict[str, Any]:
    window = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
              "b_min": 0.0, "b_max": 1.0, "clip": True, **scale}
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.25, 2.0], "mode": "bilinear"},
            window,
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [96, 80, 64], "sw_batch_size": 4,
                    "overlap": 0.5},
        "evaluator": {"_target_": "SupervisedEvaluator", "network": "@network",
                      "postprocessing": "%configs/postprocessing"},
    }


def make_bundle(root: Path, meta: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                model: onnx.ModelProto | None = None, licence: bool = True) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "docs").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps(meta or metadata()))
    (root / "configs" / "inference.json").write_text(json.dumps(config or inference_config()))
    (root / "models" / "model.pt").write_bytes(b"pickled weights never loaded")
    if model is not None:
        onnx.save(model, str(root / "models" / "model.onnx"))
    if licence:
        (root / "LICENSE").write_text("Apache License 2.0\n")
    (root / "docs" / "README.md").write_text("# Spleen\nTrained on Task09_Spleen.\n")
    (root / "docs" / "data_license.txt").write_text("CC-BY-SA 4.0\n")
    return root


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "spleen_ct_segmentation", model=network())


def test_import_reads_metadata_and_literals(bundle: Path, tmp_path: Path) -> None:
    package = import_bundle(bundle, tmp_path / "pkg")
    m = package.manifest
    assert package.ref == "spleen-ct-segmentation@0.5.3"
    assert m.title == "Spleen CT segmentation"
    assert m.input.modality == "CT"
    assert (m.input.intensity.low, m.input.intensity.high) == (-57, 164)
    # RAS network axes (x, y, z) → Portico (z, y, x)
    assert m.input.spacing_mm == (2.0, 1.25, 1.5)
    assert m.input.patch_size == (64, 80, 96)
    assert m.input.overlap == 0.5
    assert [(s.label, s.name) for s in m.output.segments] == [(1, "spleen"), (2, "liver")]
    assert all(s.category.meaning == "Tissue" and s.type.scheme == "99PORTICO" for s in m.output.segments)
    assert m.output.segments[0].type.meaning == "spleen"
    assert len({s.type.value for s in m.output.segments}) == 2
    assert m.provenance["segment_codes"].startswith("placeholder")
    assert m.provenance["axcodes"] == "RAS"
    assert not m.clinical_use
    card = (package.root / "MODEL_CARD.md").read_text()
    assert "PLACEHOLDERS" in card and "Trained on Task09_Spleen" in card and "MONAI team" in card
    licence = (package.root / "LICENSE").read_text()
    assert "Apache License 2.0" in licence and "CC-BY-SA" in licence
    assert "bundle/configs/metadata.json" in m.files
    assert load_package(package.root).package_hash == package.package_hash
    assert not (package.root / "model.pt").exists()


def test_wrapped_network_sees_its_own_axes(bundle: Path, tmp_path: Path) -> None:
    package = import_bundle(bundle, tmp_path / "pkg")
    model = onnx.load(str(package.model_path))
    # expose what the network itself receives
    model.graph.output.append(helper.make_tensor_value_info("image__network", TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    patch = np.random.default_rng(0).random((1, 1, 3, 4, 5), dtype=np.float32)  # (n, c, z, y, x)
    pred, seen = session.run(["pred", "image__network"], {"image": patch})
    # RAS: columns run R→L in the series, so reversed; rows P→A reversed; slices already S
    expected = np.flip(np.transpose(patch, (0, 1, 4, 3, 2)), axis=(2, 3))
    np.testing.assert_array_equal(seen, expected)
    assert pred.shape == (1, 3, 3, 4, 5)
    np.testing.assert_allclose(pred[0, 2], 2 * patch[0, 0])


def test_no_axcodes_only_transposes(tmp_path: Path) -> None:
    config = inference_config()
    del config["preprocessing"]["transforms"][1]
    bundle = make_bundle(tmp_path / "b", config=config, model=network())
    package = import_bundle(bundle, tmp_path / "pkg")
    session = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])
    patch = np.random.default_rng(1).random((2, 1, 3, 4, 5), dtype=np.float32)
    (pred,) = session.run(None, {"image": patch})
    np.testing.assert_allclose(pred[:, 1:2], patch)
    assert package.manifest.provenance["axcodes"] == "none"


def test_portico_layout_copies_model(bundle: Path, tmp_path: Path) -> None:
    package = import_bundle(bundle, tmp_path / "pkg", BundleOverrides(layout=Layout.PORTICO))
    assert package.model_path.read_bytes() == (bundle / "models" / "model.onnx").read_bytes()
    assert package.manifest.input.patch_size == (96, 80, 64)


def test_segment_codes_from_overrides(bundle: Path, tmp_path: Path) -> None:
    spleen = Segment(label=1, name="Spleen", category=ANATOMY, type=SPLEEN, colour=(157, 108, 162))
    liver = Segment(label=2, name="Liver", category=ANATOMY,
                    type=Code(value="10200004", scheme="SCT", meaning="Liver"))
    package = import_bundle(bundle, tmp_path / "pkg", BundleOverrides(segments=(spleen, liver),
                                                                       name="spleen", version="1.0.0"))
    assert package.ref == "spleen@1.0.0"
    assert package.manifest.output.segments == (spleen, liver)
    assert package.manifest.provenance["segment_codes"] == "overrides"
    assert "PLACEHOLDERS" not in (package.root / "MODEL_CARD.md").read_text()


def test_segment_override_for_unknown_label_refused(bundle: Path, tmp_path: Path) -> None:
    extra = Segment(label=7, name="Kidney", category=ANATOMY, type=SPLEEN)
    with pytest.raises(PackageError, match=r"labels \[7\]"):
        import_bundle(bundle, tmp_path / "pkg", BundleOverrides(segments=(extra,)))


def test_bundle_without_onnx_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(PackageError, match=r"no ONNX model .*model\.pt.*never loads TorchScript"):
        import_bundle(bundle, tmp_path / "pkg")


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="not a MONAI bundle"):
        import_bundle(tmp_path, tmp_path / "pkg")


def test_expressions_are_not_values(tmp_path: Path) -> None:
    """``$…`` is an expression to MONAI; to the importer it is no value at all (and never run)."""
    marker = tmp_path / "pwned"
    config = inference_config(a_min=f"$open('{marker}', 'w')")
    bundle = make_bundle(tmp_path / "b", config=config, model=network())
    with pytest.raises(PackageError, match="window"):
        import_bundle(bundle, tmp_path / "pkg")
    assert not marker.exists()
    package = import_bundle(bundle, tmp_path / "pkg2", BundleOverrides.model_validate(
        {"intensity": {"low": -100, "high": 200}}))
    assert package.manifest.provenance["intensity_window"] == "overrides"


def test_unscaled_window_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", config=inference_config(b_min=-1.0), model=network())
    with pytest.raises(PackageError, match="window"):
        import_bundle(bundle, tmp_path / "pkg")


def test_label_map_output_refused(tmp_path: Path) -> None:
    meta = metadata()
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 1
    bundle = make_bundle(tmp_path / "b", meta=meta, model=network())
    with pytest.raises(PackageError, match="one channel per class"):
        import_bundle(bundle, tmp_path / "pkg")


def test_multichannel_input_refused(tmp_path: Path) -> None:
    meta = metadata()
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = 4
    bundle = make_bundle(tmp_path / "b", meta=meta, model=network())
    with pytest.raises(PackageError, match="4 input channels"):
        import_bundle(bundle, tmp_path / "pkg")


def test_missing_licence_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", model=network(), licence=False)
    with pytest.raises(PackageError, match="no LICENSE"):
        import_bundle(bundle, tmp_path / "pkg")
    (tmp_path / "terms.txt").write_text("Research use only\n")
    package = import_bundle(bundle, tmp_path / "pkg2", BundleOverrides(licence_file=tmp_path / "terms.txt"))
    assert "Research use only" in (package.root / "LICENSE").read_text()


def test_no_channel_def_needs_segments(tmp_path: Path) -> None:
    meta = metadata()
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    bundle = make_bundle(tmp_path / "b", meta=meta, model=network())
    with pytest.raises(PackageError, match="segments"):
        import_bundle(bundle, tmp_path / "pkg")
    spleen = Segment(label=1, name="Spleen", category=ANATOMY, type=SPLEEN)
    assert import_bundle(bundle, tmp_path / "pkg2", BundleOverrides(segments=(spleen,))).manifest.output


def test_out_dir_must_be_empty(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "x").write_text("")
    with pytest.raises(PackageError, match="not empty"):
        import_bundle(bundle, tmp_path / "pkg")
