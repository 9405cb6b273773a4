"""Inference workers sized to the machine unless the settings say how many."""

from __future__ import annotations

from pathlib import Path

from inference.runtime.workers import gpu_count, plan

CPU = ("CPUExecutionProvider",)
ALL = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def test_one_worker_per_gpu_when_a_gpu_provider_loads() -> None:
    assert plan(None, 0, ALL, ("CUDAExecutionProvider", "CPUExecutionProvider"), cores=16, gpus=2).workers == 2


def test_on_cpu_small_machines_run_one_worker_and_big_ones_two_with_the_cores_split() -> None:
    assert (plan(None, 0, ALL, CPU, cores=2).workers, plan(None, 0, ALL, CPU, cores=2).intra_op_threads) == (1, 0)
    big = plan(None, 0, ALL, CPU, cores=16)
    assert (big.workers, big.intra_op_threads) == (2, 8)
    # a GPU provider available but no device visible: CPU sizing
    assert plan(None, 0, ALL, ALL, cores=2, gpus=0).workers == 1


def test_the_settings_win() -> None:
    chosen = plan(3, 4, ALL, ALL, cores=64, gpus=8)
    assert (chosen.workers, chosen.intra_op_threads, chosen.reason) == (3, 4, "inference.workers")


def test_gpus_are_counted_from_the_environment_or_the_devices(tmp_path: Path) -> None:
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "-1"}) == 0
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert gpu_count({}, tmp_path) == 2
