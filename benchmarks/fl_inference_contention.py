"""Inference time of the demo model on a 300-slice CT, with and without FL training on the same box.

The training load is the site trainer's own training loop (:func:`fl_client.trainer.train_steps`:
``ct-body-composition``, batch 8 at 64x64, AdamW, the job's default 20 steps a round, rounds back to
back) in a subprocess started the way Portico's supervisor starts NVFlare: the environment of
:func:`fl_client.supervisor.nvflare_env` (``fl.train_threads`` threads for OpenMP/MKL, and
``torch.set_num_threads`` as the trainer sets it) and :func:`fl_client.supervisor.cap_resources`
(niceness 10, ``RLIMIT_AS`` of ``fl.memory_limit_mib``). No NVFlare process and no federation: the
CPU that a round takes is its training; NVFlare's own messaging adds seconds per round, not CPU.

Inference is :func:`inference.pipeline.run_segmentation` with the demo model as the service runs it
(session loaded, warmed up on 8 slices, ONNX Runtime's default thread count). Repetitions alternate
without and with training, so that other load on the machine falls on both.

    .venv/bin/python -m benchmarks.fl_inference_contention [--reps 3] [--slices 300] [--write]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "models" / "ct-body-composition"


def trainer_loop(rounds_file: Path, threads: int, steps: int) -> int:
    """The training load (in the subprocess): rounds of the trainer's ``train_steps`` until SIGTERM."""
    import numpy as np
    import torch

    from benchmarks.fl_privacy import phantom_slices
    from fl_client.architectures import build_network
    from fl_client.trainer import train_steps

    stop = False

    def _stop(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    torch.set_num_threads(threads)
    data = phantom_slices([11, 12, 13, 14])
    net = build_network("ct-body-composition")
    rng = np.random.default_rng(0)
    done = 0
    while not stop:
        started = time.monotonic()
        train_steps(net, data, steps=steps, lr=1e-3, batch_size=8, device=torch.device("cpu"), rng=rng)
        done += 1
        with rounds_file.open("a", encoding="utf-8") as fh:
            fh.write(f"{done} {time.monotonic() - started:.2f}\n")
    return 0


class Trainer:
    """The training subprocess with the supervisor's environment and caps."""

    def __init__(self, root: Path, threads: int, memory_limit_mib: int | None, steps: int,
                 capped: bool = True) -> None:
        from fl_client.layout import SiteLayout
        from fl_client.supervisor import nvflare_env

        self.layout = SiteLayout(root / "fl")
        self.env = nvflare_env(self.layout, threads)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.rounds = root / "rounds.txt"
        self.threads, self.memory_limit_mib, self.steps, self.capped = threads, memory_limit_mib, steps, capped
        self.proc: subprocess.Popen[bytes] | None = None

    def round_seconds(self) -> list[float]:
        if not self.rounds.is_file():
            return []
        return [float(line.split()[1]) for line in self.rounds.read_text().splitlines() if line.strip()]

    def start(self) -> None:
        from fl_client.supervisor import cap_resources
        from tests.support.polling import wait_for

        before = len(self.round_seconds())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fl_inference_contention", "--trainer", str(self.rounds),
             "--threads", str(self.threads), "--steps", str(self.steps)],
            cwd=REPO, env=self.env, stdin=subprocess.DEVNULL)
        if self.capped:
            cap_resources(self.proc.pid, self.memory_limit_mib)
        # training under way (imports and data done, one round finished) before inference is timed
        wait_for(lambda: len(self.round_seconds()) > before or self.proc is None or self.proc.poll() is not None,
                 300, 0.2, "the trainer's first round")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the trainer exited with {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--steps", type=int, default=20, help="training steps per round")
    p.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    p.add_argument("--uncapped", action="store_true",
                   help="also run with training uncapped (all cores' threads, niceness 0, no memory cap)")
    p.add_argument("--trainer", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.trainer is not None:
        return trainer_loop(a.trainer, a.threads or 1, a.steps)

    from benchmarks.ingest import ensure_study
    from benchmarks.markdown import run_context, write_section
    from fl_client.settings import FLSettings
    from inference.packages import load_package
    from inference.pipeline import run_segmentation
    from inference.runtime.onnxruntime import SessionCache
    from inference.settings import InferenceSettings

    fl = FLSettings()
    paths = ensure_study() if a.slices == 300 else ensure_study(f"ct{a.slices}x512", (a.slices, 512, 512))
    settings = InferenceSettings(providers=("CPUExecutionProvider",))
    package = load_package(PACKAGE)
    sessions = SessionCache(intra_op_threads=settings.intra_op_threads)
    run_segmentation(paths[:8], package, sessions, settings, "warm-up")
    load = os.getloadavg()[0]
    modes = ["idle", "training", *(["uncapped"] if a.uncapped else [])]
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="portico-contention-") as tmp:
        trainers = {"training": Trainer(Path(tmp) / "capped", fl.train_threads, fl.memory_limit_mib, a.steps),
                    "uncapped": Trainer(Path(tmp) / "uncapped", os.cpu_count() or 1, None, a.steps, capped=False)}
        try:
            for rep in range(a.reps):
                for mode in modes:
                    trainer = trainers.get(mode)
                    if trainer is not None:
                        trainer.start()
                    t0 = time.perf_counter()
                    try:
                        run_segmentation(paths, package, sessions, settings, f"bench-{rep}-{mode}")
                    finally:
                        times[mode].append(time.perf_counter() - t0)
                        if trainer is not None:
                            trainer.stop()
                    sys.stderr.write(f"rep {rep + 1} {mode}: {times[mode][-1]:.1f} s\n")
        finally:
            for trainer in trainers.values():
                trainer.stop()
        rounds = trainers["training"].round_seconds()
    idle, busy = statistics.median(times["idle"]), statistics.median(times["training"])
    # each training run against the idle run just before it: other load on the machine drifts slowly
    paired = [t / i for i, t in zip(times["idle"], times["training"], strict=True)]
    ctx = run_context(load)
    fmt = ", ".join
    per_round = statistics.median(rounds) if rounds else float("nan")
    command = f"--reps {a.reps} --slices {a.slices}" + (" --uncapped" if a.uncapped else "") + \
        (" --write" if a.write else "")
    uncapped = ""
    if a.uncapped:
        free = [t / i for i, t in zip(times["idle"], times["uncapped"], strict=True)]
        each = ", ".join(f"{t:.1f}" for t in times["uncapped"])
        uncapped = (f"| training without the caps ({os.cpu_count()} threads, niceness 0) | "
                    f"{statistics.median(times['uncapped']):.1f} | {each} |\n")
        ratios = ", ".join(f"{r:.2f}x" for r in free)
        uncapped_line = (f"\nWithout the caps (for comparison, not how Portico runs it): each run over the idle run "
                         f"before it {ratios} (median **{statistics.median(free):.2f}x**).")
    else:
        uncapped_line = ""
    body = f"""## FL: inference time with a training round running (`benchmarks/fl_inference_contention.py`)

`.venv/bin/python -m benchmarks.fl_inference_contention {command}`,
{ctx['date']}, {ctx['machine']}, load {ctx['load']}. `run_segmentation` of the demo model
(`ct-body-composition`, CPUExecutionProvider, ONNX Runtime's default threads, session warm) on a
{a.slices}-slice 512x512 phantom CT, alone and while the site trainer's training loop runs rounds back to
back ({a.steps} steps of batch 8 at 64x64 per round) in a subprocess with Portico's NVFlare caps:
`nvflare_env` ({fl.train_threads} training thread), niceness 10, `RLIMIT_AS` {fl.memory_limit_mib} MiB
(`fl_client.supervisor.cap_resources`). Not a full NVFlare round: the trainer's loop alone, which is
where a round's CPU goes. Repetitions alternate idle / training (/ uncapped training).

| Inference of {a.slices} slices | median (s) | each run (s) |
|---|---|---|
| alone | {idle:.1f} | {fmt(f'{t:.1f}' for t in times['idle'])} |
| with training running | {busy:.1f} | {fmt(f'{t:.1f}' for t in times['training'])} |
{uncapped}
Ratio with / without training: **{busy / idle:.2f}x** of the medians; each training run over the
idle run just before it: {fmt(f'{r:.2f}x' for r in paired)} (median **{statistics.median(paired):.2f}x**).
Training rounds completed meanwhile: {len(rounds)} (median
{per_round:.1f} s per round of {a.steps} steps, under inference).{uncapped_line}
"""
    if a.write:
        write_section("fl-contention", body)
    sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
