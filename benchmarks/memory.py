"""Memory per study: peak RSS of one job, RSS after it, and a soak of many jobs in a loop.

A job here is what :class:`appliance.jobs.JobRunner` does for one series, in one long-lived worker
thread as in ``portico serve``: :func:`inference.pipeline.run_segmentation` on a cached phantom CT
with the demo model, the SEG and SR written to files, the opt-in Secondary Capture summary built
and written, the result dropped and :func:`inference.memory.release_memory` called (as the runner
does after each job). Each figure comes from a fresh process that has loaded the model package and
its session (the service's idle state):

* ``idle``: VmRSS before the first job, with the modules the job runner imports already imported;
* ``peak``: VmHWM after the job (the process's high-water mark; nothing else ran in it), and the
  stage at which a 5 ms VmRSS sampler saw the peak;
* ``after``: VmRSS once the job is done and its memory released (target: idle + 50 MB).

The soak runs ``--studies`` jobs of ``--soak-slices`` slices in one process and reports VmRSS after
each: first, last, the maximum, and the least-squares slope over the second half (MB per study).

    .venv/bin/python benchmarks/memory.py [--slices 300 600] [--studies 200] [--soak-slices 24]
        [--soak-minutes 0] [--no-write]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.inference import PACKAGE, ensure_series, status_kb  # noqa: E402
from benchmarks.markdown import run_context, write_section  # noqa: E402

#: the stages a job goes through, in order, as the sampler names them
STAGES = ("load", "segment", "measure", "seg_build", "sr_build", "write", "summary", "release")


class Sampler:
    """VmRSS every few milliseconds in a thread, the highest per stage."""

    def __init__(self, every: float = 0.005) -> None:
        self.every = every
        self.stage = "idle"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            mb = status_kb("VmRSS") / 1024
            if mb > self.peaks.get(self.stage, 0.0):
                self.peaks[self.stage] = mb

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def staged(*args: Any, **kwargs: Any) -> Any:
            before, self.stage = self.stage, stage
            try:
                return fn(*args, **kwargs)
            finally:
                self.stage = before
        return staged


def one_job(paths: list[Path], package: Any, sessions: Any, settings: Any, out: Path, key: str,
            sampler: Sampler | None) -> None:
    """The job runner's work for one series, its result dropped at the end."""
    import inference.pipeline as pipeline
    from inference.memory import release_memory
    from inference.results.summary import build_summary

    stage: Callable[[str, Callable[..., Any]], Callable[..., Any]] = (
        (lambda _, fn: fn) if sampler is None else sampler.wrap)
    saved = {name: getattr(pipeline, name) for name in ("load_series", "segment", "measure", "build_seg",
                                                        "build_sr")}
    names = {"load_series": "load", "segment": "segment", "measure": "measure", "build_seg": "seg_build",
             "build_sr": "sr_build"}
    for name, fn in saved.items():
        setattr(pipeline, name, stage(names[name], fn))
    try:
        result = pipeline.run_segmentation(paths, package, sessions, settings, key)
    finally:
        for name, fn in saved.items():
            setattr(pipeline, name, fn)

    def write(result: Any) -> None:
        for ds in (result.seg, result.sr):
            ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)

    def summary(result: Any) -> None:
        for ds in build_summary(result.volume, result.labels, result.measurements, package.manifest,
                                settings.device, settings.uid_root, key):
            ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)

    stage("write", write)(result)
    stage("summary", summary)(result)
    del result
    for f in out.iterdir():
        f.unlink()
    stage("release", release_memory)()


class Worker:
    """One long-lived worker thread that runs jobs handed to it, as the service's inference worker."""

    def __init__(self) -> None:
        import queue

        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._done: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="inference-0", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (fn := self._jobs.get()) is not None:
            try:
                fn()
                self._done.put(None)
            except BaseException as exc:  # handed to the caller
                self._done.put(exc)

    def run(self, fn: Callable[[], None]) -> None:
        self._jobs.put(fn)
        failure = self._done.get()
        if failure is not None:
            raise failure

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def child(folder: Path, studies: int, seconds: float) -> int:
    """In this fresh process: ``studies`` jobs on ``folder``; print the figures as JSON."""
    # what a running service has imported before its first job (appliance.jobs imports these)
    import inference.pipeline
    import inference.results.summary  # noqa: F401
    from inference.memory import tune_allocator
    from inference.packages import load_package
    from inference.runtime.onnxruntime import SessionCache
    from inference.settings import InferenceSettings

    tune_allocator()  # as the job runner does when it starts
    settings = InferenceSettings(providers=("CPUExecutionProvider",))
    package = load_package(PACKAGE)
    sessions = SessionCache(settings.max_sessions, settings.session_memory_mb * 2**20,
                            intra_op_threads=settings.intra_op_threads, cpu_memory_arena=settings.cpu_memory_arena)
    sessions.get(package, settings.providers)
    paths = sorted(folder.glob("*.dcm"))
    worker = Worker()
    idle = status_kb("VmRSS") / 1024
    after: list[float] = []
    peaks: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="portico-mem-") as tmp, Sampler() as sampler:
        for n in range(studies):
            if n and time.perf_counter() - t0 > seconds:
                break  # out of time: the report states the count run
            worker.run(functools.partial(one_job, paths, package, sessions, settings, Path(tmp), f"mem-{n}",
                                         sampler if n == 0 else None))
            after.append(status_kb("VmRSS") / 1024)
            if n == 0:
                peaks = dict(sampler.peaks)
    worker.close()
    print(json.dumps({"idle_mb": idle, "peak_mb": status_kb("VmHWM") / 1024, "after_mb": after,
                      "stage_peaks_mb": peaks, "slices": len(paths), "seconds": time.perf_counter() - t0}))
    return 0


def start_child(slices: int, studies: int, seconds: float = 1e9) -> subprocess.Popen[str]:
    folder = ensure_series(slices)[0].parent
    return subprocess.Popen([sys.executable, __file__, "--child", str(folder), "--child-studies", str(studies),
                             "--child-seconds", str(seconds)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)


def child_figures(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"memory child exited with {proc.returncode}")
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def soak_slope(after: list[float]) -> float:
    """MB per study over the second half of the soak (least squares)."""
    half = after[len(after) // 2:]
    if len(half) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(half), dtype=np.float64), np.asarray(half), 1)[0])


def report(args: argparse.Namespace, singles: dict[int, dict[str, Any]], soak: dict[str, Any] | None,
           env: dict[str, str]) -> str:
    lines = [
        "## Memory per study (`benchmarks/memory.py`)",
        "",
        f"{env['date']}; {env['machine']}; `benchmarks/memory.py --slices "
        f"{' '.join(str(s) for s in args.slices)} --studies {args.studies} --soak-slices {args.soak_slices}"
        + (f" --soak-minutes {args.soak_minutes:g}" if args.soak_minutes > 0 else "") + "`. "
        "One job as the job runner does it (pipeline, SEG + SR written, SC summary built and written, "
        "result dropped, memory released), in a long-lived worker thread of a fresh process that has "
        "loaded the demo model's session (CPU, no ONNX Runtime arena: the default settings). Idle = VmRSS "
        "before the job; peak = VmHWM; after = VmRSS once the job is done.",
        "",
        "| series | idle MB | peak MB | stage at peak | after MB | after − idle | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for slices, r in singles.items():
        goal = 600 if slices <= 300 else 1024
        stage = max(r["stage_peaks_mb"], key=lambda k: r["stage_peaks_mb"][k]) if r["stage_peaks_mb"] else "-"
        growth = r["after_mb"][0] - r["idle_mb"]
        verdict = "met" if r["peak_mb"] <= goal and growth <= 50 else "missed"
        lines.append(f"| {slices} × 512×512 CT | {r['idle_mb']:.0f} | **{r['peak_mb']:.0f}** | {stage} | "
                     f"{r['after_mb'][0]:.0f} | **{growth:+.0f}** | peak ≤ {goal}, after ≤ idle + 50: {verdict} |")
    if singles:
        first = next(iter(singles.values()))
        lines += ["", "Highest VmRSS seen per stage, first series above (5 ms sampler): " + ", ".join(
            f"{k} {v:.0f}" for k, v in first["stage_peaks_mb"].items() if k in STAGES) + " MB."]
    if soak is not None:
        after = soak["after_mb"]
        lines += [
            "",
            f"Soak: {len(after)} jobs (of {args.studies} asked) of {soak['slices']} slices in one process "
            f"({soak['seconds'] / 60:.1f} min): idle {soak['idle_mb']:.0f} MB; VmRSS after job "
            + ", ".join(f"{n} {after[n - 1]:.0f}" for n in (1, 5, 10, 20, 50, 100, 150) if n < len(after))
            + f", {len(after)} (the last) {after[-1]:.0f} MB; highest after-job {max(after):.0f} MB; peak (VmHWM) "
            f"{soak['peak_mb']:.0f} MB; slope over the second half **{soak_slope(after):+.3f} MB/study**.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="*", default=[300, 600],
                        help="series lengths for the single-job figures (none: skip)")
    parser.add_argument("--studies", type=int, default=200, help="jobs in the soak (0 skips it)")
    parser.add_argument("--soak-slices", type=int, default=24)
    parser.add_argument("--soak-minutes", type=float, default=0.0,
                        help="stop the soak after this long even if fewer studies ran (0: no limit)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-studies", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child-seconds", type=float, default=1e9, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.child_studies, args.child_seconds)
    import os

    load_before = os.getloadavg()[0]
    # the soak runs alongside the single jobs (each in its own process: RSS is per process)
    limit = args.soak_minutes * 60 if args.soak_minutes > 0 else 1e9
    soaking = start_child(args.soak_slices, args.studies, limit) if args.studies else None
    singles: dict[int, dict[str, Any]] = {}
    for slices in args.slices:
        singles[slices] = child_figures(start_child(slices, 1))
        sys.stderr.write(f"{slices} slices: {json.dumps(singles[slices])}\n")
    soak = child_figures(soaking) if soaking is not None else None
    if soak is not None:
        sys.stderr.write(f"soak: {json.dumps(soak)}\n")
    text = report(args, singles, soak, run_context(load_before))
    sys.stdout.write(text + "\n")
    if not args.no_write:
        write_section("memory", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
