"""Inference pipeline overhead: everything around the ONNX Runtime calls, stage by stage.

A cached 300-slice 512x512 phantom CT goes through :func:`inference.pipeline.run_segmentation`
with the demo model (session loaded beforehand, as in a running service). Stages are timed by
wrapping the functions the pipeline calls: load (files → volume), window (intensity
preprocessing, per patch), the ONNX Runtime session's ``run`` alone, the rest of the sliding
window (batching, softmax, accumulation, argmax), postprocess, measurements, SEG build, SR build.
Overhead = end to end minus the ORT calls, as a share of end to end (target ≤ 20 %).

Peer, same run: our :func:`inference.results.seg.build_seg` against a plain highdicom
``Segmentation`` call on the same label map (label-map input, as we use), and against the
stacked boolean masks a naive caller would pass. Memory: a fresh subprocess runs the pipeline on a
600-slice CT and reports its peak RSS (VmHWM; target ≤ 1 GB, issue #14; ``benchmarks/memory.py`` has
the whole job, the memory left after it and a soak). Also timed, outside the end to end:
writing the SEG and SR to bytes, and the opt-in Secondary Capture summary (reload + read the SEG
back + render 3 key images) as the job runner does it.

    .venv/bin/python benchmarks/inference.py [--reps 2] [--slices 300] [--rss-slices 600] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.markdown import run_context, write_section  # noqa: E402

CACHE = Path(os.environ.get("PORTICO_BENCH_CACHE", Path(tempfile.gettempdir()) / "portico-bench"))
PACKAGE = REPO / "models" / "ct-body-composition"
SPACING = (2.5, 0.8, 0.8)
SEED = 7
STAGES = ("load", "window", "ort", "sliding_window_rest", "postprocess", "measure", "seg_build", "sr_build")
LABELS = {
    "load": "load (read + decode + geometry)",
    "window": "preprocess: intensity window (per patch)",
    "ort": "**ONNX Runtime `session.run` calls**",
    "sliding_window_rest": "sliding window rest (batching, softmax, accumulate, argmax)",
    "postprocess": "postprocess (manifest steps; none for the demo model)",
    "measure": "measurements",
    "seg_build": "SEG build (highdicom)",
    "sr_build": "SR build (highdicom)",
}


# --- data -------------------------------------------------------------------------------------

def ensure_series(slices: int) -> list[Path]:
    """A cached phantom CT series of ``slices`` 512x512 slices; 600 mirrors the 300-slice phantom."""
    from appliance.demo_study import write_ct_series
    from inference.phantom import make_phantom
    from inference.volume import load_series

    name = f"inference-ct{slices}"
    folder, done = CACHE / name, CACHE / f"{name}.complete"
    if done.is_file():
        return sorted(folder.glob("*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    if slices > 300:  # a longer body from the cached shorter one: far cheaper than a new phantom
        base = load_series(ensure_series(300)).hu
        hu = np.concatenate([base, base[::-1]])[:slices]
    else:
        hu = make_phantom((slices, 512, 512), SPACING, seed=SEED).hu
    written = write_ct_series(hu, SPACING, folder, seed=SEED + slices,
                              series_description=f"Benchmark phantom {slices}")
    done.write_text(f"{len(written.paths)}\n")
    return sorted(written.paths)


# --- timing -----------------------------------------------------------------------------------

class Clock:
    """Seconds accumulated per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return timed


@contextmanager
def patched(clock: Clock) -> Iterator[None]:
    """Time the functions the pipeline calls, by their names in the calling modules."""
    import inference.pipeline as pipeline
    import inference.predict as predict

    targets = [(pipeline, "load_series", "load"), (pipeline, "segment", "segment"),
               (predict, "window", "window"), (predict, "postprocess", "postprocess"),
               (pipeline, "measure", "measure"), (pipeline, "build_seg", "seg_build"),
               (pipeline, "build_sr", "sr_build")]
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in targets]
    for module, attr, name in targets:
        setattr(module, attr, clock.wrap(name, getattr(module, attr)))
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def timed_run(paths: list[Path], package: Any, sessions: Any, settings: Any, session: Any,
              run_key: str) -> tuple[dict[str, float], Any]:
    from inference.pipeline import run_segmentation

    clock = Clock()
    original = session.run
    session.run = clock.wrap("ort", original)  # the ORT InferenceSession's run, nothing around it
    try:
        with patched(clock):
            t0 = time.perf_counter()
            result = run_segmentation(paths, package, sessions, settings, run_key)
            clock.seconds["end_to_end"] = time.perf_counter() - t0
    finally:
        session.run = original
    s = clock.seconds
    s["sliding_window_rest"] = s["segment"] - s.get("ort", 0.0) - s.get("window", 0.0) - s.get("postprocess", 0.0)
    s["overhead"] = s["end_to_end"] - s.get("ort", 0.0)
    return s, result


def seg_peers(volume: Any, labels: Any, manifest: Any) -> dict[str, float]:
    """Seconds for ours and for plain highdicom calls on the same label map."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    from inference.results.seg import build_seg, segment_descriptions
    from inference.settings import DeviceIdentity

    descriptions = segment_descriptions(manifest, "1.2.826.0.1.3680043.8.498.", "peer")
    plain: dict[str, Any] = {"segmentation_type": hd.seg.SegmentationTypeValues.BINARY,
                             "segment_descriptions": descriptions,
             "series_number": 1, "instance_number": 1, "manufacturer": "peer",
             "manufacturer_model_name": "peer", "software_versions": "1", "device_serial_number": "1"}
    out: dict[str, float] = {}
    # untimed first build: pydicom converts the source headers' raw elements on first access, which
    # would otherwise be charged to whichever build runs first
    hd.seg.Segmentation(source_images=volume.datasets, pixel_array=labels, series_instance_uid=generate_uid(),
                        sop_instance_uid=generate_uid(), **plain)
    t0 = time.perf_counter()
    build_seg(volume, labels, manifest, DeviceIdentity(), "1.2.826.0.1.3680043.8.498.", "peer")
    out["ours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hd.seg.Segmentation(source_images=volume.datasets, pixel_array=labels, series_instance_uid=generate_uid(),
                        sop_instance_uid=generate_uid(), **plain)
    out["plain_labelmap"] = time.perf_counter() - t0
    stacked = np.stack([labels == s.label for s in manifest.output.segments], axis=-1)
    t0 = time.perf_counter()
    hd.seg.Segmentation(source_images=volume.datasets, pixel_array=stacked, series_instance_uid=generate_uid(),
                        sop_instance_uid=generate_uid(), **plain)
    out["plain_stacked"] = time.perf_counter() - t0
    return out


def write_seconds(result: Any) -> float:
    t0 = time.perf_counter()
    for ds in (result.seg, result.sr):
        ds.save_as(io.BytesIO(), enforce_file_format=True)
    return time.perf_counter() - t0


def summary_seconds(paths: list[Path], result: Any, package: Any, settings: Any) -> float:
    """The opt-in SC summary as :class:`appliance.jobs.JobRunner` makes it: from the volume and label map
    the pipeline already holds (``paths`` is kept for the caller's symmetry)."""
    from inference.results.summary import build_summary

    t0 = time.perf_counter()
    build_summary(result.volume, result.labels, result.measurements, package.manifest, settings.device,
                  settings.uid_root, "bench")
    return time.perf_counter() - t0


# --- peak memory, in a fresh process ----------------------------------------------------------

def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_rss(folder: Path) -> int:
    """Run the pipeline on ``folder`` in this (fresh) process; print memory figures as JSON."""
    from inference.packages import load_package
    from inference.pipeline import run_segmentation
    from inference.runtime.onnxruntime import SessionCache
    from inference.settings import InferenceSettings

    settings = InferenceSettings(providers=("CPUExecutionProvider",))
    package = load_package(PACKAGE)
    sessions = SessionCache()
    sessions.get(package, settings.providers)
    baseline = status_kb("VmRSS")
    t0 = time.perf_counter()
    result = run_segmentation(sorted(folder.glob("*.dcm")), package, sessions, settings, "rss")
    print(json.dumps({"baseline_mb": baseline / 1024, "peak_mb": status_kb("VmHWM") / 1024,
                      "seconds": time.perf_counter() - t0, "frames": int(result.seg.NumberOfFrames)}))
    return 0


def peak_rss(slices: int) -> dict[str, float]:
    paths = ensure_series(slices)
    run = subprocess.run([sys.executable, __file__, "--child-rss", str(paths[0].parent)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    figures: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
    return figures


# --- report -----------------------------------------------------------------------------------

def med(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def report(args: argparse.Namespace, runs: list[dict[str, float]], peers: list[dict[str, float]],
           extra: dict[str, list[float]], rss: dict[str, float] | None, env: dict[str, str]) -> str:
    e2e = [r["end_to_end"] for r in runs]
    share = [100 * r["overhead"] / r["end_to_end"] for r in runs]
    lines = [
        "## Inference pipeline overhead (`benchmarks/inference.py`)",
        "",
        f"{env['date']}; {env['machine']}; {args.slices}-slice 512×512 phantom CT "
        f"(spacing {SPACING[0]}×{SPACING[1]}×{SPACING[2]} mm), demo model `ct-body-composition` "
        f"(2D, patch 1×512×512, batch 4), {env['provider']}, onnxruntime {env['ort']}, "
        f"{len(runs)} rep(s): median [min–max]. The session is loaded and the pipeline warmed up on 8 "
        f"slices before timing, as in a running service (cold session load {env['session_load']} s). "
        f"Load average {env['load']}.",
        "",
        "| stage | seconds | share of end to end |",
        "|---|---|---|",
    ]
    for stage in STAGES:
        values = [r.get(stage, 0.0) for r in runs]
        pct = statistics.median(100 * r.get(stage, 0.0) / r["end_to_end"] for r in runs)
        lines.append(f"| {LABELS[stage]} | {med(values)} | {pct:.1f} % |")
    lines += [
        f"| **end to end** (`run_segmentation`) | **{med(e2e)}** | 100 % |",
        f"| **overhead** (end to end − ORT calls) | **{med([r['overhead'] for r in runs])}** | "
        f"**{statistics.median(share):.1f} %** (target ≤ 20 %) |",
        "",
        "Outside the end to end:",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| write SEG + SR to bytes (`save_as`) | {med(extra['write'])} |",
        f"| SC summary, opt-in (3 key images from the volume and label map in hand) | {med(extra['summary'])} |",
        "",
        "SEG encode against plain highdicom on the same label map, same run (after one untimed build, "
        "so no build pays pydicom's first access to the source headers):",
        "",
        "| build | seconds | ours ÷ this |",
        "|---|---|---|",
    ]
    ours = [p["ours"] for p in peers]
    for key, label in (("ours", "ours: `build_seg` (descriptions, renumbering, derived UIDs)"),
                       ("plain_labelmap", "plain `hd.seg.Segmentation`, 3D label map input"),
                       ("plain_stacked", "plain `hd.seg.Segmentation`, stacked boolean masks (naive)")):
        values = [p[key] for p in peers]
        ratio = statistics.median(o / v for o, v in zip(ours, values, strict=True))
        lines.append(f"| {label} | {med(values)} | {ratio:.2f}× |")
    if rss is not None:
        verdict = "meets" if rss["peak_mb"] <= 1024 else "misses"
        lines += [
            "",
            f"Peak memory, {args.rss_slices}-slice 512×512 CT (the 300-slice phantom and its mirror image), "
            f"whole `run_segmentation` in a fresh process: **{rss['peak_mb']:.0f} MB** VmHWM ({verdict} the "
            f"≤ 1 GB target); {rss['baseline_mb']:.0f} MB resident after imports and session load; the "
            f"volume alone is {args.rss_slices * 512 * 512 * 2 / 2**20:.0f} MB (int16: CT values are "
            f"integers), was {args.rss_slices * 512 * 512 * 4 / 2**20:.0f} MB in float32; run "
            f"{rss['seconds']:.1f} s, SEG with {rss['frames']:.0f} frames.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rss-slices", type=int, default=600, help="0 skips the peak-memory run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--child-rss", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_rss:
        return child_rss(args.child_rss)

    import onnxruntime

    from inference.packages import load_package
    from inference.runtime.onnxruntime import SessionCache
    from inference.settings import InferenceSettings
    from inference.volume import load_series

    paths = ensure_series(args.slices)
    settings = InferenceSettings(providers=("CPUExecutionProvider",))
    package = load_package(PACKAGE)
    sessions = SessionCache()
    t0 = time.perf_counter()
    runtime = sessions.get(package, settings.providers)
    session_load = time.perf_counter() - t0
    # warm-up on a few slices: a running service has paid the one-time costs (highdicom's tables)
    timed_run(paths[:8], package, sessions, settings, runtime._session, "warm-up")
    load_before = os.getloadavg()[0]
    runs: list[dict[str, float]] = []
    peers: list[dict[str, float]] = []
    extra: dict[str, list[float]] = {"write": [], "summary": []}
    for rep in range(args.reps):
        stages, result = timed_run(paths, package, sessions, settings, runtime._session, f"bench-{rep}")
        runs.append(stages)
        extra["write"].append(write_seconds(result))
        extra["summary"].append(summary_seconds(paths, result, package, settings))
        volume = load_series(paths)
        from inference.results.summary import labels_from_seg

        peers.append(seg_peers(volume, labels_from_seg(result.seg, volume, package.manifest), package.manifest))
        del volume, result
        sys.stderr.write(f"rep {rep + 1}: end to end {stages['end_to_end']:.2f} s, ORT {stages['ort']:.2f} s\n")
    rss = peak_rss(args.rss_slices) if args.rss_slices else None
    env = {**run_context(load_before), "provider": runtime.provider, "ort": onnxruntime.__version__,
           "session_load": f"{session_load:.2f}"}
    text = report(args, runs, peers, extra, rss, env)
    sys.stdout.write(text + "\n")
    if not args.no_write:
        write_section("inference", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
