"""ONNX Runtime wrapper: provider choice, CPU fallback with one log line, the session cache."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from inference.errors import InferenceError, RuntimeUnavailableError
from inference.packages import MANIFEST_NAME, ModelPackage, load_package, write_digests
from inference.runtime import onnxruntime as ort_runtime
from inference.runtime.onnxruntime import OnnxRuntime, SessionCache, choose_providers, is_available

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
LOGGER = "inference.runtime.onnxruntime"


def tiny_model(path: Path, gains: tuple[float, ...] = (0.0, 10.0, 20.0),
               biases: tuple[float, ...] = (0.0, -3.0, -12.0)) -> Path:
    """A 1x1x1 Conv: (N, 1, z, y, x) → (N, C, z, y, x) logits ``gain * x + bias`` per channel."""
    c = len(gains)
    weight = numpy_helper.from_array(np.array(gains, np.float32).reshape(c, 1, 1, 1, 1), "w")
    bias = numpy_helper.from_array(np.array(biases, np.float32), "b")
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"], kernel_shape=[1, 1, 1])
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "z", "y", "x"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", c, "z", "y", "x"])],
        initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_package(root: Path, version: str = "1.0.0", **model_kwargs: Any) -> ModelPackage:
    root.mkdir(parents=True, exist_ok=True)
    tiny_model(root / "model.onnx", **model_kwargs)
    (root / "MODEL_CARD.md").write_text("test model\n")
    (root / "LICENSE").write_text("Apache-2.0\n")
    code = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}
    manifest = {
        "name": "tiny", "version": version, "task": "segmentation", "title": "Tiny",
        "input": {"modality": "CT", "intensity": {"low": -1000, "high": 1000}, "patch_size": [1, 8, 8]},
        "output": {"segments": [{"label": 1, "name": "a", "category": code, "type": code},
                                {"label": 2, "name": "b", "category": code, "type": code}]},
        "files": write_digests(root, ["model.onnx", "MODEL_CARD.md", "LICENSE"]),
    }
    (root / MANIFEST_NAME).write_text(yaml.safe_dump(manifest))
    return load_package(root)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "model.onnx")


@pytest.fixture
def no_gpu() -> None:
    if any(p in onnxruntime.get_available_providers() for p in (CUDA, TRT)):
        pytest.skip("a GPU provider is available here; these tests need a CPU-only onnxruntime")


def fallback_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_is_available() -> None:
    assert is_available()
    assert OnnxRuntime.is_available()


@pytest.mark.parametrize(
    ("preferred", "available", "expected"),
    [
        ((TRT, CUDA, CPU), (CUDA, CPU), (CUDA, CPU)),
        ((TRT, CUDA, CPU), (CPU,), (CPU,)),
        ((CUDA,), (CPU,), (CPU,)),  # CPU is always the last resort
        ((CPU, CUDA), (TRT, CUDA, CPU), (CUDA, CPU)),  # CPU goes last even when asked first
        ((CUDA, CUDA, CPU), (CUDA, CPU), (CUDA, CPU)),
    ],
)
def test_choose_providers(preferred: tuple[str, ...], available: tuple[str, ...],
                          expected: tuple[str, ...]) -> None:
    assert choose_providers(preferred, available) == expected


def test_choose_providers_without_cpu_raises() -> None:
    with pytest.raises(RuntimeUnavailableError) as info:
        choose_providers((CUDA,), ("AzureExecutionProvider",))
    assert info.value.code == "runtime_unavailable"


@pytest.mark.usefixtures("no_gpu")
def test_cuda_unavailable_falls_back_to_cpu_with_one_log_line(model_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    runtime = OnnxRuntime(model_path, (TRT, CUDA, CPU))
    assert runtime.provider == CPU
    records = fallback_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert CUDA in message and TRT in message and "running on CPUExecutionProvider" in message
    assert "not available" in message


def test_cpu_only_preference_logs_nothing(model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    runtime = OnnxRuntime(model_path, (CPU,))
    assert runtime.provider == CPU
    assert fallback_records(caplog) == []


def test_session_failure_on_gpu_retries_on_cpu(model_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    real_session: Callable[..., Any] = onnxruntime.InferenceSession
    requested: list[list[str]] = []

    def session(path: str, options: Any, providers: list[str]) -> Any:
        requested.append(list(providers))
        if CUDA in providers:
            raise RuntimeError("CUDA failure 35: driver version is insufficient")
        return real_session(path, options, providers=providers)

    monkeypatch.setattr(ort_runtime, "available_providers", lambda: (CUDA, CPU))
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    caplog.set_level(logging.INFO, logger=LOGGER)
    runtime = OnnxRuntime(model_path, (CUDA, CPU))
    assert runtime.provider == CPU
    assert requested == [[CUDA, CPU], [CPU]]
    (record,) = fallback_records(caplog)
    assert "session creation failed" in record.getMessage() and "driver version" in record.getMessage()


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_provider_dropped_by_onnxruntime_is_logged(model_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # onnxruntime-gpu without CUDA libraries lists CUDA as available, then quietly runs on the CPU
    monkeypatch.setattr(ort_runtime, "available_providers", lambda: (CUDA, CPU))
    caplog.set_level(logging.INFO, logger=LOGGER)
    runtime = OnnxRuntime(model_path, (CUDA, CPU))
    if runtime.provider == CUDA:
        pytest.skip("CUDA really works here")
    (record,) = fallback_records(caplog)
    assert "dropped by onnxruntime" in record.getMessage()


def test_unloadable_model_raises(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(RuntimeUnavailableError):
        OnnxRuntime(bad, (CPU,))


def test_run_computes_the_model(model_path: Path) -> None:
    runtime = OnnxRuntime(model_path, (CPU,))
    batch = np.random.default_rng(0).random((2, 1, 3, 4, 5), dtype=np.float32)
    out = runtime.run(batch)
    assert out.shape == (2, 3, 3, 4, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 1], 10 * batch[:, 0] - 3, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch"):
        runtime.run(batch[0])
    with pytest.raises(InferenceError, match="failed on a batch"):
        runtime.run(np.zeros((1, 2, 3, 4, 5), np.float32))  # two channels for a one-channel model


def test_session_cache_reuses_sessions(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "a")
    cache = SessionCache(max_sessions=2)
    first = cache.get(package, (CPU,))
    again = cache.get(load_package(tmp_path / "a"), (CPU,))  # same bytes, same hash, same session
    assert again is first
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    other = cache.get(package, (CUDA, CPU))  # another provider list is another key
    assert other is not first
    assert cache.misses == 2


def test_session_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    a, b, c = (tiny_package(tmp_path / n, version=f"1.0.{i}") for i, n in enumerate("abc"))
    assert len({a.package_hash, b.package_hash, c.package_hash}) == 3
    cache = SessionCache(max_sessions=2)
    ra = cache.get(a, (CPU,))
    cache.get(b, (CPU,))
    assert cache.get(a, (CPU,)) is ra  # a is now the most recently used
    cache.get(c, (CPU,))  # evicts b
    assert len(cache) == 2
    assert cache.get(a, (CPU,)) is ra
    misses = cache.misses
    cache.get(b, (CPU,))
    assert cache.misses == misses + 1


def test_session_cache_byte_budget(tmp_path: Path) -> None:
    a, b = (tiny_package(tmp_path / n, version=f"2.0.{i}") for i, n in enumerate("ab"))
    size = a.model_path.stat().st_size
    cache = SessionCache(max_sessions=10, max_bytes=size + size // 2)
    cache.get(a, (CPU,))
    cache.get(b, (CPU,))
    assert len(cache) == 1 and cache.loaded_bytes == size
    tiny = SessionCache(max_sessions=10, max_bytes=1)  # the newest session is kept even over budget
    tiny.get(a, (CPU,))
    assert len(tiny) == 1
    tiny.clear()
    assert len(tiny) == 0


def test_session_cache_key_is_the_package_hash(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "a")
    manifest_bytes = (tmp_path / "a" / MANIFEST_NAME).read_bytes()
    assert package.package_hash == hashlib.sha256(manifest_bytes).hexdigest()
    with pytest.raises(ValueError):
        SessionCache(max_sessions=0)


def test_cpu_memory_arena_is_a_choice_passed_to_every_session(tmp_path: Path) -> None:
    package = tiny_package(tmp_path / "a")
    lean = SessionCache().get(package, (CPU,))
    fast = SessionCache(cpu_memory_arena=True).get(package, (CPU,))
    assert lean._session.get_session_options().enable_cpu_mem_arena is False
    assert fast._session.get_session_options().enable_cpu_mem_arena is True
