"""How many inference workers a machine runs by default, and how many threads each model session gets.

On a GPU machine: one worker per GPU the CUDA/TensorRT provider can use (``CUDA_VISIBLE_DEVICES`` when set,
else the ``/dev/nvidiaN`` devices). On CPU: two workers from eight cores, so one study's loading and decoding
(single-threaded Python and codecs) overlaps the other's model run, with the cores split between their
sessions; below that one worker with every core (two would halve each model run's threads and double the
peak memory for little gain: measured work for later, #14).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
#: from this many cores a CPU machine runs two workers
CPU_CORES_FOR_TWO = 8


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    #: ONNX Runtime intra-op threads per session (0: ONNX Runtime's own choice)
    intra_op_threads: int
    #: why, for the start-up log
    reason: str


def gpu_count(environ: dict[str, str] | None = None, dev: Path = Path("/dev")) -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else the NVIDIA device files."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)])


def plan(workers: int | None, intra_op_threads: int, preferred: Sequence[str], available: Sequence[str],
         cores: int | None = None, gpus: int | None = None) -> WorkerPlan:
    """The workers and session threads to run: ``workers``/``intra_op_threads`` when set, else sized here."""
    cores = cores or os.cpu_count() or 1
    if workers is not None:
        return WorkerPlan(workers, intra_op_threads, "inference.workers")
    on_gpu = any(p in available for p in preferred if p in GPU_PROVIDERS)
    if on_gpu:
        count = gpu_count() if gpus is None else gpus
        if count > 0:
            return WorkerPlan(count, intra_op_threads, f"one per GPU ({count})")
    if cores >= CPU_CORES_FOR_TWO:
        threads = intra_op_threads or max(1, cores // 2)
        return WorkerPlan(2, threads, f"CPU: two workers on {cores} cores (loading overlaps the model), "
                                      f"{threads} thread(s) each")
    return WorkerPlan(1, intra_op_threads, f"CPU: one worker on {cores} core(s)")
