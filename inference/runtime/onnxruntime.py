"""ONNX Runtime: execution-provider choice with CPU fallback, and a bounded cache of sessions.

Providers are taken from a preference list (the settings' ``inference.providers``) intersected with
what the installed ONNX Runtime build offers. When a preferred GPU provider is missing or its
session cannot be created, the model runs on the CPU and exactly one warning says so.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference.errors import InferenceError, RuntimeUnavailableError
from inference.packages import ModelPackage
from inference.runtime.base import CPU_PROVIDER, Runtime

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS: tuple[str, ...] = ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_PROVIDER)


def is_available() -> bool:
    """Whether the ``onnxruntime`` library is installed."""
    return importlib.util.find_spec("onnxruntime") is not None


def available_providers() -> tuple[str, ...]:
    """The execution providers this ONNX Runtime build offers, in its own priority order."""
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


def choose_providers(preferred: Sequence[str], available: Sequence[str]) -> tuple[str, ...]:
    """The preferred providers that are available, in preference order, CPU always last.

    Raises
    ------
    RuntimeUnavailableError
        When neither a preferred provider nor the CPU provider is available.
    """
    chosen = [p for p in dict.fromkeys(preferred) if p in available and p != CPU_PROVIDER]
    if CPU_PROVIDER in available:
        chosen.append(CPU_PROVIDER)
    if not chosen:
        raise RuntimeUnavailableError(
            f"none of the execution providers {list(preferred)} is available (have {list(available)})"
        )
    return tuple(chosen)


class OnnxRuntime(Runtime):
    """One ONNX model loaded in an ONNX Runtime session.

    Parameters
    ----------
    model_path
        The ``.onnx`` file.
    providers
        Execution providers in order of preference.
    intra_op_threads
        Threads per operator; 0 lets ONNX Runtime decide.
    cpu_memory_arena
        Keep ONNX Runtime's CPU memory arena: about 10 % faster on the CPU, but the arena keeps every
        batch's peak for good (about twice the resident memory).
    """

    def __init__(self, model_path: Path, providers: Sequence[str] = DEFAULT_PROVIDERS, *,
                 intra_op_threads: int = 0, cpu_memory_arena: bool = False) -> None:
        if not is_available():
            raise RuntimeUnavailableError("onnxruntime is not installed")
        self.model_path = Path(model_path)
        self.model_bytes = self.model_path.stat().st_size
        self.preferred = tuple(providers)
        self.cpu_memory_arena = cpu_memory_arena
        self._session = self._create_session(intra_op_threads)
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self._input_name: str = self._session.get_inputs()[0].name
        self._output_name: str = self._session.get_outputs()[0].name

    @classmethod
    def is_available(cls) -> bool:
        return is_available()

    @property
    def provider(self) -> str:
        return self.providers[0]

    def _create_session(self, intra_op_threads: int) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT's own provider warnings go to stderr; we log instead
        options.enable_cpu_mem_arena = self.cpu_memory_arena
        available = available_providers()
        wanted = choose_providers(self.preferred, available)
        failure = ""
        try:
            session = onnxruntime.InferenceSession(str(self.model_path), options, providers=list(wanted))
        except Exception as exc:  # ORT raises bare RuntimeError/Fail subclasses for provider failures
            if wanted == (CPU_PROVIDER,):
                raise RuntimeUnavailableError(f"cannot load {self.model_path.name}: {exc}") from exc
            failure = f"session creation failed: {type(exc).__name__}: {str(exc)[:200]}"
            try:
                session = onnxruntime.InferenceSession(str(self.model_path), options,
                                                       providers=[CPU_PROVIDER])
            except Exception as cpu_exc:
                raise RuntimeUnavailableError(f"cannot load {self.model_path.name}: {cpu_exc}") from cpu_exc
        used: str = session.get_providers()[0]
        rank = self.preferred.index(used) if used in self.preferred else len(self.preferred)
        skipped = self.preferred[:rank]
        if skipped:
            if failure:
                reason = failure
            elif all(p not in available for p in skipped):
                reason = "not available in this onnxruntime build"
            else:  # ORT drops a provider it cannot initialise (e.g. CUDA libraries missing)
                reason = "dropped by onnxruntime at session creation"
            log.warning("%s: execution provider(s) %s unusable (%s); running on %s",
                        self.model_path.name, ", ".join(skipped), reason, used)
        return session

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        if batch.ndim != 5:
            raise ValueError(f"expected a batch (N, 1, z, y, x), got shape {batch.shape}")
        feed = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            (out,) = self._session.run([self._output_name], {self._input_name: feed})
        except Exception as exc:  # ORT's own exception types are not importable in a stable way
            raise InferenceError(f"{self.model_path.name} failed on a batch {batch.shape}: {exc}") from exc
        return np.asarray(out, dtype=np.float32)


class SessionCache:
    """Loaded runtimes kept across jobs, keyed by (package hash, providers), least recently used out.

    Parameters
    ----------
    max_sessions
        Most runtimes held at once.
    max_bytes
        Budget for the summed model file sizes; ``None`` for no byte limit. The newest runtime is
        always kept, even when it alone exceeds the budget.
    intra_op_threads, cpu_memory_arena
        Passed to every :class:`OnnxRuntime` created.
    """

    def __init__(self, max_sessions: int = 4, max_bytes: int | None = None, *,
                 intra_op_threads: int = 0, cpu_memory_arena: bool = False) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.intra_op_threads = intra_op_threads
        self.cpu_memory_arena = cpu_memory_arena
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, tuple[str, ...]], OnnxRuntime] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def loaded_bytes(self) -> int:
        return sum(r.model_bytes for r in self._entries.values())

    def get(self, package: ModelPackage, providers: Sequence[str] = DEFAULT_PROVIDERS) -> OnnxRuntime:
        """The runtime for ``package``, loading it (and evicting old ones) on a miss."""
        key = (package.package_hash, tuple(providers))
        with self._lock:
            runtime = self._entries.get(key)
            if runtime is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return runtime
            self.misses += 1
            # created under the lock so two workers never load the same model twice on a GPU
            runtime = OnnxRuntime(package.model_path, providers, intra_op_threads=self.intra_op_threads,
                                  cpu_memory_arena=self.cpu_memory_arena)
            self._entries[key] = runtime
            self._evict()
            log.info("loaded %s on %s (%d session(s) cached)", package.ref, runtime.provider,
                     len(self._entries))
            return runtime

    def _evict(self) -> None:
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_sessions
            or (self.max_bytes is not None and self.loaded_bytes > self.max_bytes)
        ):
            self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
