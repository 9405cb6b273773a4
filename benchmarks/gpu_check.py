"""GPU check: can ONNX Runtime run the demo model on CUDA here, how fast against the CPU, and alike?

Prepared for a machine with an NVIDIA GPU; on one without, it says why there is no CUDA provider,
measures the CPU only and still exits 0.

1. Cheap probe (a subprocess, so a hanging or crashing CUDA initialisation cannot take this
   script down): is ``CUDAExecutionProvider`` in this onnxruntime build, and does a session on it
   really come up on CUDA (onnxruntime silently drops a provider whose libraries are missing)?
   ``nvidia-smi`` and onnxruntime's own messages are kept for the reason.
2. A synthetic 64-slice 512x512 CT (ellipses of fat, muscle and bone with noise; numpy only),
   windowed as the demo manifest says, run through the model on the CPU and, when the probe
   passed, on CUDA: warm-up runs, then timed repeats (median, min, max) at the pipeline's batch
   size, and on CUDA at larger batches too.
3. Agreement: max absolute difference of the logits, and the fraction of voxels whose argmax
   label is the same on both providers.
4. When the ``inference`` package imports, the appliance's own runtime is asked for its default
   providers (it must pick CUDA without a fallback warning) and ``inference.predict.segment``
   labels from CUDA and CPU are compared.

Results go to JSON: ``--out``, else ``$OUT/gpu_check.json``, else the system temp folder.

    python benchmarks/gpu_check.py [--slices 64] [--repeats 5] [--cpu-repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.markdown import write_section  # noqa: E402

PACKAGE = REPO / "models" / "ct-body-composition"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: the demo manifest's intensity window, used when its YAML cannot be read
DEFAULT_WINDOW = (-600.0, 1000.0)
#: label agreement below this between CPU and CUDA fails the check
MIN_AGREEMENT = 0.999

PROBE = r"""
import json, sys
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    try:
        ort.preload_dlls()  # CUDA/cuDNN from pip wheels (nvidia-*-cu12), when installed
    except Exception as exc:
        print("preload_dlls:", exc, file=sys.stderr)
options = ort.SessionOptions()
options.log_severity_level = 1
session = ort.InferenceSession(sys.argv[1], options, providers=[("CUDAExecutionProvider", {"device_id": 0}),
                                                                 "CPUExecutionProvider"])
print(json.dumps({"providers": session.get_providers()}))
"""


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --- probe ------------------------------------------------------------------------------------

def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    return (run.stdout or run.stderr).strip()


def probe_cuda(model: Path) -> dict[str, Any]:
    """Whether a CUDA session comes up, and if not, why; cheap and isolated in a subprocess."""
    import onnxruntime as ort

    out: dict[str, Any] = {"available_providers": list(ort.get_available_providers()), "nvidia_smi": nvidia_smi(),
                           "onnxruntime": ort.__version__, "ok": False, "reason": None}
    if CUDA not in out["available_providers"]:
        package = "onnxruntime-gpu" if out["nvidia_smi"] else "onnxruntime-gpu and an NVIDIA GPU"
        out["reason"] = (f"this onnxruntime {ort.__version__} build offers {out['available_providers']}, "
                         f"no {CUDA} (needs {package})")
        return out
    try:
        run = subprocess.run([sys.executable, "-c", PROBE, str(model)], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        out["reason"] = "creating a CUDA session did not finish within 180 s"
        return out
    messages = [line for line in run.stderr.splitlines() if line.strip()][-12:]
    out["probe_messages"] = messages
    if run.returncode != 0:
        out["reason"] = f"CUDA session creation failed (exit {run.returncode}): " + " | ".join(messages[-3:])
        return out
    providers = json.loads(run.stdout.strip().splitlines()[-1])["providers"]
    out["session_providers"] = providers
    if providers[0] != CUDA:
        out["reason"] = ("onnxruntime dropped CUDA at session creation (CUDA/cuDNN libraries missing or no "
                         "usable GPU): " + " | ".join(messages[-3:]))
        return out
    out["ok"] = True
    return out


# --- data and runs ----------------------------------------------------------------------------

def intensity_window() -> tuple[float, float]:
    try:
        import yaml

        manifest = yaml.safe_load((PACKAGE / "portico-model.yaml").read_text(encoding="utf-8"))
        return float(manifest["input"]["intensity"]["low"]), float(manifest["input"]["intensity"]["high"])
    except Exception:  # no yaml here: the demo package's known window
        return DEFAULT_WINDOW


def synthetic_ct(slices: int, size: int = 512, seed: int = 11) -> np.ndarray:
    """(z, y, x) HU: an elliptical body (fat ring, muscle), a spine and noise, varying along z."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    hu = np.full((slices, size, size), -1000.0, dtype=np.float32)
    for z in range(slices):
        t = z / max(slices - 1, 1)
        ry, rx = 0.30 + 0.03 * np.sin(3 * t), 0.42 + 0.03 * np.cos(2 * t)
        body = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1
        inner = (yy / (ry - 0.05)) ** 2 + (xx / (rx - 0.07)) ** 2 <= 1
        spine = ((yy - 0.12) / 0.045) ** 2 + (xx / 0.045) ** 2 <= 1
        s = hu[z]
        s[body] = -100.0
        s[inner] = 45.0
        s[spine] = 700.0
        s += rng.normal(0, 15, s.shape).astype(np.float32)
    return hu


def as_batches(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """(N, 1, 1, y, x) float32 in [0, 1], one 2D patch per slice as the pipeline feeds the model."""
    x = (np.clip(hu, low, high) - low) / (high - low)
    return np.ascontiguousarray(x[:, None, None], dtype=np.float32)


def session(model: Path, provider: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    providers: list[Any] = [(CUDA, {"device_id": 0}), CPU] if provider == CUDA else [CPU]
    s = ort.InferenceSession(str(model), options, providers=providers)
    if s.get_providers()[0] != provider:
        raise RuntimeError(f"asked for {provider}, got {s.get_providers()}")
    return s


def run_all(s: Any, x: np.ndarray, batch: int) -> np.ndarray:
    name, out_name = s.get_inputs()[0].name, s.get_outputs()[0].name
    parts = [s.run([out_name], {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(parts)


def measure(s: Any, x: np.ndarray, batch: int, warmup: int, repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    for _ in range(warmup):
        logits = run_all(s, x, batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = run_all(s, x, batch)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "warmup": warmup, "repeats": repeats, "median_s": med, "min_s": min(times),
            "max_s": max(times), "ms_per_slice": 1000 * med / len(x), "times_s": times}, logits


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    la, lb = a.argmax(axis=1), b.argmax(axis=1)
    return {"max_abs_logit_diff": float(np.max(np.abs(a - b))),
            "mean_abs_logit_diff": float(np.mean(np.abs(a - b))),
            "label_agreement": float(np.mean(la == lb))}


def appliance_runtime(hu: np.ndarray, cuda_ok: bool) -> dict[str, Any]:
    """The appliance's own runtime and ``segment`` on this machine; skipped when it does not import."""
    try:
        from inference.packages import load_package
        from inference.predict import segment
        from inference.runtime.onnxruntime import DEFAULT_PROVIDERS, OnnxRuntime
    except Exception as exc:
        return {"skipped": f"inference package not importable: {type(exc).__name__}: {exc}"}
    package = load_package(PACKAGE)
    spacing = (2.5, 0.8, 0.8)
    out: dict[str, Any] = {}
    default = OnnxRuntime(package.model_path, DEFAULT_PROVIDERS)
    out["default_providers_pick"] = default.provider
    cpu = OnnxRuntime(package.model_path, (CPU,))
    t0 = time.perf_counter()
    cpu_labels = segment(hu, spacing, package.manifest, cpu)
    out["cpu_segment_s"] = time.perf_counter() - t0
    if cuda_ok:
        gpu = OnnxRuntime(package.model_path, (CUDA, CPU))
        out["cuda_runtime_provider"] = gpu.provider
        segment(hu[:8], spacing, package.manifest, gpu)  # warm-up
        t0 = time.perf_counter()
        gpu_labels = segment(hu, spacing, package.manifest, gpu)
        out["cuda_segment_s"] = time.perf_counter() - t0
        out["segment_label_agreement"] = float(np.mean(gpu_labels == cpu_labels))
    return out


# --- main -------------------------------------------------------------------------------------

def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return Path(tempfile.gettempdir()) / "portico-bench" / "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="the pipeline's batch size; CPU and CUDA compared at it")
    parser.add_argument("--cuda-batches", default="16,64", help="further CUDA batch sizes to time")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats on CUDA")
    parser.add_argument("--cpu-repeats", type=int, default=3)
    parser.add_argument("--skip-appliance", action="store_true", help="skip step 4 (the appliance's runtime)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="also write the 'gpu' section of BENCHMARKS.md")
    parser.add_argument("--note", default="", help="a sentence for that section (e.g. why no GPU was available)")
    args = parser.parse_args(argv)
    out_path = args.out or default_out()
    model = PACKAGE / "model.onnx"

    result: dict[str, Any] = {"date": dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": {"cpus": os.cpu_count(), "arch": platform.machine(),
                                          "python": platform.python_version(), "node": platform.node()},
                              "slices": args.slices, "model": str(model.relative_to(REPO))}
    t0 = time.perf_counter()
    probe = probe_cuda(model)
    probe["probe_s"] = time.perf_counter() - t0
    result["cuda_probe"] = probe
    if probe["ok"]:
        say(f"CUDA provider OK: session providers {probe['session_providers']}; GPU: {probe['nvidia_smi']}")
    else:
        say(f"no CUDA provider: {probe['reason']}; CPU figures only")

    low, high = intensity_window()
    hu = synthetic_ct(args.slices)
    x = as_batches(hu, low, high)
    cpu_stats, cpu_logits = measure(session(model, CPU), x, args.batch, min(args.warmup, 1), args.cpu_repeats)
    result["cpu"] = cpu_stats
    say(f"CPU  batch {args.batch}: {cpu_stats['median_s']:.3f} s per {args.slices} slices "
        f"({cpu_stats['ms_per_slice']:.1f} ms/slice)")
    status = 0
    if probe["ok"]:
        gpu = session(model, CUDA)
        cuda_stats, cuda_logits = measure(gpu, x, args.batch, args.warmup, args.repeats)
        result["cuda"] = cuda_stats
        result["speedup_cuda_vs_cpu"] = cpu_stats["median_s"] / cuda_stats["median_s"]
        result["agreement"] = agreement(cpu_logits, cuda_logits)
        say(f"CUDA batch {args.batch}: {cuda_stats['median_s']:.3f} s ({cuda_stats['ms_per_slice']:.2f} ms/slice), "
            f"{result['speedup_cuda_vs_cpu']:.1f}x the CPU; max |Δlogit| "
            f"{result['agreement']['max_abs_logit_diff']:.2e}, labels agree on "
            f"{100 * result['agreement']['label_agreement']:.4f} % of voxels")
        result["cuda_batches"] = []
        for batch in (int(b) for b in args.cuda_batches.split(",") if b.strip()):
            if batch == args.batch:
                continue
            stats, _ = measure(gpu, x, batch, args.warmup, args.repeats)
            result["cuda_batches"].append(stats)
            say(f"CUDA batch {batch}: {stats['median_s']:.3f} s ({stats['ms_per_slice']:.2f} ms/slice)")
        if result["agreement"]["label_agreement"] < MIN_AGREEMENT:
            say(f"FAIL: CPU and CUDA labels agree on fewer than {100 * MIN_AGREEMENT:.1f} % of voxels")
            status = 2
    if not args.skip_appliance:
        result["appliance"] = appliance_runtime(hu, probe["ok"])
        say(f"appliance runtime: {json.dumps(result['appliance'])}")
        agree = result["appliance"].get("segment_label_agreement")
        if agree is not None and agree < MIN_AGREEMENT:
            say("FAIL: the appliance's segment() gives different labels on CUDA and CPU")
            status = 2
    result["total_s"] = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    say(f"results: {out_path}")
    if args.markdown:
        say(f"wrote {write_section('gpu', markdown(result, args.note))}")
    return status


def markdown(result: dict[str, Any], note: str) -> str:
    """The BENCHMARKS.md section for one run: CUDA vs CPU, or why there was no CUDA."""
    cpu = result["cpu"]
    m = result["machine"]
    lines = ["## GPU: the demo model on CUDA vs CPU", "",
             f"`python benchmarks/gpu_check.py --markdown` ({result['date']}, {m['cpus']} CPUs, {m['arch']}, "
             f"{result['slices']} synthetic 512×512 slices, {result['model']}).", ""]
    if note:
        lines += [note, ""]
    lines += ["| provider | median s | ms / slice | runs |", "|---|---|---|---|",
              f"| CPU | {cpu['median_s']:.3f} | {cpu['ms_per_slice']:.1f} | {cpu['repeats']} |"]
    if "cuda" in result:
        cuda, agree = result["cuda"], result["agreement"]
        lines.append(f"| CUDA | {cuda['median_s']:.3f} | {cuda['ms_per_slice']:.2f} | {cuda['repeats']} |")
        lines += ["", f"CUDA is **{result['speedup_cuda_vs_cpu']:.1f}×** the CPU at batch {cuda['batch']}; "
                  f"max |Δlogit| {agree['max_abs_logit_diff']:.2e}, labels agree on "
                  f"{100 * agree['label_agreement']:.4f} % of voxels."]
    else:
        lines += ["", f"No CUDA figures: {result['cuda_probe']['reason']}. The runtime fell back to the CPU "
                  "with one log line, as it must."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
