"""Segmentation around a runtime: window, sliding window, resampling, postprocessing, memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from scipy import ndimage

from inference.errors import InferenceError, SeriesError
from inference.packages import Manifest, PostStep
from inference.predict import (
    _Components,
    gaussian_weights,
    postprocess,
    resample_linear,
    resample_nearest,
    resampled_shape,
    segment,
    sliding_window,
    window,
    window_starts,
)
from inference.runtime.base import Runtime
from inference.runtime.onnxruntime import OnnxRuntime

CODE = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}


class Threshold(Runtime):
    """Pointwise model: label 1 above 0.3, label 2 above 0.6 (of the windowed input)."""

    def __init__(self) -> None:
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    def provider(self) -> str:
        return "numpy"

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        self.calls += 1
        self.shapes.append(batch.shape)
        x = batch[:, 0]
        return np.stack([np.zeros_like(x), (x - 0.3) * 10, (x - 0.6) * 20], axis=1)


class Smoothing(Threshold):
    """A model with spatial context: thresholds of a 3x3x3 mean (zero padded at patch edges)."""

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        smooth = ndimage.uniform_filter(batch, size=(1, 1, 3, 3, 3), mode="constant")
        return super().run(smooth.astype(np.float32))


def manifest(patch: tuple[int, int, int] = (4, 16, 16), spacing: tuple[float, float, float] | None = None,
             post: tuple[str, ...] = (), overlap: float = 0.25, min_slices: int = 1) -> Manifest:
    return Manifest.model_validate({
        "name": "test", "version": "1.0.0", "task": "segmentation", "title": "Test",
        "input": {"modality": "CT", "intensity": {"low": -100, "high": 100}, "patch_size": list(patch),
                  "spacing_mm": list(spacing) if spacing else None, "overlap": overlap,
                  "min_slices": min_slices},
        "output": {"segments": [{"label": 1, "name": "a", "category": CODE, "type": CODE},
                                {"label": 2, "name": "b", "category": CODE, "type": CODE}],
                   "postprocessing": list(post)},
        "files": {},
    })


def blobs(shape: tuple[int, int, int], seed: int = 0) -> NDArray[np.float32]:
    """A smooth random volume in [-150, 150] HU."""
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
    v = (v - v.min()) / (v.max() - v.min())
    out: NDArray[np.float32] = (v * 300 - 150).astype(np.float32)
    return out


def test_window() -> None:
    out = window(np.array([-500.0, -100.0, 0.0, 100.0, 900.0]), -100, 100)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert out.dtype == np.float32
    with pytest.raises(ValueError):
        window(np.zeros(3), 5, 5)


@pytest.mark.parametrize(("size", "patch", "overlap"), [(10, 16, 0.25), (16, 16, 0.5), (50, 16, 0.25),
                                                         (7, 1, 0.25), (33, 8, 0.9)])
def test_window_starts_cover_the_axis(size: int, patch: int, overlap: float) -> None:
    starts = window_starts(size, patch, overlap)
    covered = np.zeros(max(size, patch), bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all() and starts[0] == 0
    assert starts[-1] + patch == max(size, patch)


def test_gaussian_weights() -> None:
    w = gaussian_weights((1, 9, 16))
    assert w.shape == (1, 9, 16) and w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[0, 4, 7] > w[0, 0, 0]


def test_sliding_window_matches_whole_volume_for_a_pointwise_model() -> None:
    hu = blobs((13, 37, 41))
    whole = segment(hu, (2.0, 1.0, 1.0), manifest(patch=(13, 37, 41)), Threshold())
    assert set(np.unique(whole)) == {0, 1, 2}
    for patch in [(4, 16, 16), (1, 8, 50), (20, 40, 40), (3, 37, 7)]:
        for batch_size in (1, 3, 16):
            model = Threshold()
            labels = segment(hu, (2.0, 1.0, 1.0), manifest(patch=patch, overlap=0.5), model,
                             batch_size=batch_size)
            np.testing.assert_array_equal(labels, whole)
            # every call gets the same shape: friendly to TensorRT engines
            assert len(set(model.shapes)) == 1


def test_sliding_window_blends_a_model_with_context() -> None:
    hu = blobs((12, 48, 48), seed=1)
    whole = segment(hu, (2.0, 1.0, 1.0), manifest(patch=(12, 48, 48)), Smoothing())
    tiled = segment(hu, (2.0, 1.0, 1.0), manifest(patch=(6, 24, 24), overlap=0.5), Smoothing())
    assert (tiled == whole).mean() > 0.97


def test_small_volume_is_padded() -> None:
    hu = blobs((2, 5, 6))
    model = Threshold()
    labels = segment(hu, (1.0, 1.0, 1.0), manifest(patch=(4, 16, 16)), model)
    assert labels.shape == (2, 5, 6) and labels.dtype == np.uint8
    assert model.shapes == [(1, 1, 4, 16, 16)]
    direct = sliding_window(window(hu, -100, 100), (2, 5, 6), 0.0, Threshold(), 3)
    np.testing.assert_array_equal(labels, direct)


def test_resampled_shape() -> None:
    assert resampled_shape((10, 100, 100), (2.0, 0.5, 0.5), (1.0, 1.0, 1.0)) == (20, 50, 50)
    assert resampled_shape((1, 3, 3), (1.0, 1.0, 1.0), (5.0, 5.0, 5.0)) == (1, 1, 1)


def test_resample_linear_round_trip() -> None:
    hu = blobs((10, 30, 34), seed=2)
    up = resample_linear(hu, (20, 60, 68))
    back = resample_linear(up, (10, 30, 34))
    assert np.abs(back - hu).mean() < 2.0
    np.testing.assert_allclose(resample_linear(hu, (10, 30, 34)), hu, atol=1e-4)


def test_resample_nearest_round_trip() -> None:
    labels = np.random.default_rng(3).integers(0, 4, size=(5, 7, 9)).astype(np.uint8)
    up = resample_nearest(labels, (10, 21, 27))
    np.testing.assert_array_equal(resample_nearest(up, (5, 7, 9)), labels)
    assert up.dtype == np.uint8


def test_segment_resamples_to_the_model_spacing_and_back() -> None:
    hu = blobs((16, 40, 40), seed=4)
    spacing = (2.0, 0.8, 0.8)
    native = segment(hu, spacing, manifest(patch=(4, 16, 16)), Threshold())
    model = Threshold()
    labels = segment(hu, spacing, manifest(patch=(4, 16, 16), spacing=(1.0, 1.6, 1.6)), model)
    assert labels.shape == hu.shape
    assert model.shapes[0] == (4, 1, 4, 16, 16)
    assert (labels == native).mean() > 0.9


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], r: float) -> NDArray[np.bool_]:
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
    inside: NDArray[np.bool_] = d2 <= r**2
    return inside


def test_components_match_scipy() -> None:
    mask = np.random.default_rng(5).random((15, 25, 25)) > 0.6
    comps = _Components(lambda z: mask[z], mask.shape[0])
    lab, _ = ndimage.label(mask)  # default structure: 6-connected
    expected = sorted(np.bincount(lab.ravel())[1:].tolist())
    assert sorted(comps.size[comps.size > 0].tolist()) == expected
    for z in (0, 7, 14):
        roots = comps.roots(z)
        # same partition: each scipy label maps to exactly one root
        for value in np.unique(lab[z])[1:]:
            assert len(np.unique(roots[lab[z] == value])) == 1


def test_largest_component() -> None:
    labels = np.zeros((10, 30, 30), np.uint8)
    labels[_ball(labels.shape, (5, 15, 15), 6)] = 1
    labels[_ball(labels.shape, (5, 15, 15), 3)] = 2  # same component, another label
    labels[_ball(labels.shape, (5, 3, 3), 2)] = 2  # separate: removed
    out = postprocess(labels.copy(), [PostStep.LARGEST_COMPONENT], (1.0, 1.0, 1.0))
    assert out[5, 3, 3] == 0 and out[5, 15, 15] == 2 and out[5, 15, 9] == 1
    assert (out > 0).sum() == (_ball(labels.shape, (5, 15, 15), 6)).sum()
    empty = np.zeros((3, 4, 4), np.uint8)
    assert not postprocess(empty, [PostStep.LARGEST_COMPONENT], (1.0, 1.0, 1.0)).any()


def test_fill_holes_fills_enclosed_background_per_slice() -> None:
    labels = np.zeros((3, 20, 20), np.uint8)
    labels[:, 5:15, 5:15] = 3
    labels[:, 8:12, 8:12] = 0  # marrow hole
    labels[:, 9, 9] = 1  # another label inside stays
    labels[:, 0:3, 0:3] = 2
    labels[:, 1, 1] = 0  # touches nothing open: hole of label 2
    labels[:, 0, 18:20] = 0
    out = postprocess(labels.copy(), ["fill_holes"], (1.0, 1.0, 1.0))  # type: ignore[list-item]
    assert (out[:, 8:12, 8:12][labels[:, 8:12, 8:12] == 0] == 3).all()
    assert (out[:, 9, 9] == 1).all() and (out[:, 1, 1] == 2).all()
    assert (out[:, 16:, :] == 0).all()


def test_remove_small() -> None:
    labels = np.zeros((10, 30, 30), np.uint8)
    labels[_ball(labels.shape, (5, 15, 15), 6)] = 1
    labels[2, 2, 2] = 1
    labels[7:9, 25:27, 25:27] = 2  # 8 voxels of 2 mm³: under 100 mm³
    out = postprocess(labels.copy(), [PostStep.REMOVE_SMALL], (2.0, 1.0, 1.0))
    assert out[2, 2, 2] == 0 and not (out == 2).any() and out[5, 15, 15] == 1


def test_segment_applies_postprocessing_in_order() -> None:
    hu = np.full((6, 32, 32), -100.0, np.float32)
    hu[_ball(hu.shape, (3, 16, 16), 8)] = 100.0
    hu[_ball(hu.shape, (3, 3, 3), 2)] = 100.0
    labels = segment(hu, (1.0, 1.0, 1.0), manifest(post=("largest_component",)), Threshold())
    assert labels[3, 3, 3] == 0 and labels[3, 16, 16] == 2


def test_segment_rejects_bad_input() -> None:
    with pytest.raises(SeriesError):
        segment(blobs((2, 8, 8)), (1.0, 1.0, 1.0), manifest(min_slices=3), Threshold())
    with pytest.raises(SeriesError):
        segment(blobs((2, 8, 8)), (0.0, 1.0, 1.0), manifest(), Threshold())
    with pytest.raises(ValueError):
        segment(np.zeros((8, 8), np.float32), (1.0, 1.0, 1.0), manifest(), Threshold())

    class TwoChannels(Threshold):
        def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
            return super().run(batch)[:, :2]

    with pytest.raises(InferenceError, match="channels"):
        segment(blobs((2, 8, 8)), (1.0, 1.0, 1.0), manifest(), TwoChannels())


def test_memory_stays_below_the_input_size() -> None:
    zz, yy, xx = np.ogrid[:128, :256, :256]
    hu = (150 * np.sin(zz / 9.0) * np.cos(yy / 17.0) * np.sin(xx / 13.0)).astype(np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        segment(hu, (2.0, 1.0, 1.0), manifest(patch=(1, 128, 128), post=("largest_component",)), Threshold(),
                batch_size=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # labels (a quarter of the input) plus per-row buffers; never a float copy of the volume
    assert peak < 0.45 * hu.nbytes, f"peak {peak / 1e6:.0f} MB for a {hu.nbytes / 1e6:.0f} MB volume"


def _onnx_threshold_model(path: Path) -> Path:
    weight = numpy_helper.from_array(np.array([0.0, 10.0, 20.0], np.float32).reshape(3, 1, 1, 1, 1), "w")
    bias = numpy_helper.from_array(np.array([0.0, -3.0, -12.0], np.float32), "b")
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"], kernel_shape=[1, 1, 1])
    graph = helper.make_graph(
        [node], "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "z", "y", "x"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, "z", "y", "x"])],
        initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_segment_with_onnx_runtime_matches_numpy_model(tmp_path: Path) -> None:
    runtime = OnnxRuntime(_onnx_threshold_model(tmp_path / "m.onnx"), ("CPUExecutionProvider",))
    hu = blobs((9, 30, 30), seed=7)
    kwargs: dict[str, Any] = {"spacing": (2.0, 1.0, 1.0), "manifest": manifest(patch=(4, 16, 16))}
    expected = segment(hu, model=Threshold(), **kwargs)
    np.testing.assert_array_equal(segment(hu, model=runtime, **kwargs), expected)


@pytest.mark.parametrize("spacing", [None, (4.0, 1.0, 1.0)])
def test_progress_counts_slices_of_the_series_up_to_all_of_them(spacing: tuple[float, float, float] | None) -> None:
    hu = blobs((24, 20, 20))
    seen: list[tuple[int, int]] = []
    m = manifest(patch=(4, 20, 20), overlap=0.25)
    if spacing is not None:  # the model's grid is coarser than the series': told as series slices still
        m = m.model_copy(update={"input": m.input.model_copy(update={"spacing_mm": spacing})})
    segment(hu, (2.0, 1.0, 1.0), m, Threshold(), batch_size=1, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (24, 24) and {t for _, t in seen} == {24}
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(seen) > 2  # told as it goes, never backwards
