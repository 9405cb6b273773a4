"""The pre-installed trainer: NVFlare Client API loop around local training on the site's cohort.

Runs inside NVFlare's job process (started by :class:`fl_client.executor.PorticoTrainer` through
``train_task.py``). Per ``train`` task: load the global weights, measure their Dice on the local
validation slices, train a few steps, send the weights with the Dice and the step count (the site's
privacy filter turns them into a clipped, noised update without normalisation statistics). On the
final ``validate`` task: measure and keep the final global model here (``jobs/<job>/``), so that the
appliance can export it as a candidate package. Only weights and metrics are sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses.dice import DiceCELoss
from monai.transforms.compose import Compose
from monai.transforms.spatial.dictionary import RandFlipd, RandRotate90d

from fl_client.architectures import build_network, find_package
from fl_client.dataset import CohortIndex, Slices, load_slices, read_index
from fl_client.errors import PolicyError
from fl_client.layout import CONTROL_ENV, SiteLayout, read_json, write_json
from fl_client.privacy_budget import NORM_STATS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainArgs:
    model: str
    cohort: str
    steps: int
    lr: float
    batch_size: int
    image_size: int
    spacing_mm: float
    seed: int


def parse_args(argv: Sequence[str]) -> TrainArgs:
    p = argparse.ArgumentParser(prog="portico-trainer")
    p.add_argument("--model", required=True)
    p.add_argument("--cohort", default="default")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--spacing-mm", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(list(argv))
    return TrainArgs(a.model, a.cohort, a.steps, a.lr, a.batch_size, a.image_size, a.spacing_mm, a.seed)


def device_for(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def dice_score(net: torch.nn.Module, data: Slices, device: torch.device, classes: int = 4,
               batch: int = 16) -> float:
    """Mean Dice over the foreground classes present in prediction or reference."""
    if len(data) == 0:
        return float("nan")
    inter = np.zeros(classes)
    total = np.zeros(classes)
    net.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch):
            x = torch.from_numpy(data.image[start:start + batch]).to(device)
            pred = net(x).argmax(1).cpu().numpy()
            ref = data.labels[start:start + batch]
            for c in range(1, classes):
                p, r = pred == c, ref == c
                inter[c] += np.logical_and(p, r).sum()
                total[c] += p.sum() + r.sum()
    present = [c for c in range(1, classes) if total[c] > 0]
    return float(np.mean([2 * inter[c] / total[c] for c in present])) if present else 1.0


def augmentation() -> Compose:
    """Flips and right-angle rotations: the HU-rule labels do not depend on orientation."""
    keys = ["image", "label"]
    return Compose([RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1),
                    RandRotate90d(keys, prob=0.5, spatial_axes=(0, 1))])


def train_steps(net: torch.nn.Module, data: Slices, *, steps: int, lr: float, batch_size: int,
                device: torch.device, rng: np.random.Generator) -> float:
    """``steps`` optimiser steps on random batches; the mean loss."""
    if len(data) == 0:
        raise PolicyError("the local cohort has no training slices")
    transform = augmentation()
    transform.set_random_state(seed=int(rng.integers(2**31)))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    net.train()
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(data), size=batch_size)
        xs, ys = [], []
        for i in idx:
            sample = transform({"image": torch.from_numpy(data.image[i]),
                                "label": torch.from_numpy(data.labels[i][None])})
            xs.append(torch.as_tensor(sample["image"]))
            ys.append(torch.as_tensor(sample["label"]))
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return float(np.mean(losses))


def _append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def run(argv: Sequence[str]) -> None:
    """The Client API loop (called by ``train_task.py`` inside the job process)."""
    import nvflare.client as flare

    args = parse_args(argv)
    layout = SiteLayout.from_control(Path(os.environ[CONTROL_ENV]))
    config = read_json(layout.site_config, {}) or {}
    if args.model not in config.get("allowed_models", []):
        raise PolicyError(f"model {args.model!r} is not allowed at this site")
    cohorts = config.get("cohorts", {})
    if args.cohort not in cohorts:
        raise PolicyError(f"cohort {args.cohort!r} is not defined at this site")
    torch.set_num_threads(int(config.get("threads", 1)))
    device = device_for(str(config.get("device", "auto")))
    _, manifest = find_package(Path(config["models_dir"]), args.model)
    index = read_index(Path(cohorts[args.cohort]))
    t0 = time.monotonic()
    train = load_slices(index.split("train"), manifest, args.image_size, args.spacing_mm)
    val = load_slices(index.split("val"), manifest, args.image_size, args.spacing_mm)
    log.info("cohort %s: %d training and %d validation slices loaded in %.1f s", args.cohort, len(train),
             len(val), time.monotonic() - t0)
    net = build_network(args.model).to(device)

    flare.init()
    job_id = str(flare.get_job_id())
    site = str(flare.get_site_name())
    job_dir = layout.job_dir(job_id)
    refusal = floor_refusal(config.get("privacy", {}) or {}, index, args)
    if refusal is not None:
        write_json(job_dir / "refused.json", {"reason": refusal, "at": time.time()})
        log.error("not training: %s", refusal)
        raise PolicyError(refusal)
    rng = np.random.default_rng([args.seed, _site_seed(site)])
    torch.manual_seed(args.seed)
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        merge_global(net, received.params or {})
        started = time.monotonic()
        dice = dice_score(net, val, device)
        if flare.is_evaluate():
            _keep_final(job_dir, net, received.meta or {}, dice, args, site, len(train), len(val))
            flare.send(flare.FLModel(metrics={"dice": dice}))
            continue
        if not flare.is_train():
            flare.send(flare.FLModel(metrics={"dice": dice}))
            continue
        loss = train_steps(net, train, steps=args.steps, lr=args.lr, batch_size=args.batch_size, device=device,
                           rng=rng)
        params = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        flare.send(flare.FLModel(params=params, metrics={"dice": dice},
                                 meta={"NUM_STEPS_CURRENT_ROUND": args.steps}))
        _append_jsonl(job_dir / "rounds.jsonl", {
            "round": int(received.current_round or 0), "dice_global": round(dice, 5), "loss": round(loss, 5),
            "steps": args.steps, "train_slices": len(train), "val_slices": len(val),
            "seconds": round(time.monotonic() - started, 2), "at": time.time()})
        log.info("round %s: global Dice %.3f, local loss %.3f", received.current_round, dice, loss)


def floor_refusal(floor: dict[str, Any], index: CohortIndex, args: TrainArgs) -> str | None:
    """Why the site's privacy floor forbids training this job on this cohort, or None."""
    train = index.split("train")
    patients = {s.patient for s in train if s.patient}
    min_series, min_patients = int(floor.get("min_series", 1)), int(floor.get("min_patients", 1))
    min_examples = int(floor.get("min_examples_per_round", 1))
    if len(train) < min_series:
        return (f"site privacy floor: cohort {index.name!r} has {len(train)} training series, "
                f"fewer than the site's minimum of {min_series}")
    if len(patients) < min_patients:
        return (f"site privacy floor: cohort {index.name!r} has {len(patients)} patients, "
                f"fewer than the site's minimum of {min_patients}")
    if args.steps * args.batch_size < min_examples:
        return (f"site privacy floor: the job trains on {args.steps} x {args.batch_size} = "
                f"{args.steps * args.batch_size} examples per round, fewer than the site's minimum of {min_examples}")
    return None


def merge_global(net: torch.nn.Module, params: dict[str, Any]) -> None:
    """Load the global weights but keep this site's normalisation statistics (never sent, never taken)."""
    local = net.state_dict()
    state = {}
    for key, value in local.items():
        if NORM_STATS.search(key) or key not in params:
            state[key] = value
        else:
            state[key] = torch.as_tensor(params[key]).to(value.dtype)
    net.load_state_dict(state)


def _site_seed(site: str) -> int:
    return zlib.crc32(site.encode())


def _keep_final(job_dir: Path, net: torch.nn.Module, meta: dict[str, Any], dice: float, args: TrainArgs,
                site: str, n_train: int, n_val: int) -> None:
    """Keep the final global model and what is known about it, for the export to a candidate."""
    job_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, job_dir / "global_model.pt")
    provenance = {k: v for k, v in meta.items() if k.startswith("portico_")
                  and isinstance(v, (int, float, str, list, dict))}
    contributors = provenance.get("portico_contributors", [])
    write_json(job_dir / "final.json", {
        "job_id": job_dir.name, "model": args.model, "cohort": args.cohort, "site": site,
        "dice_local": round(dice, 5), "rounds": provenance.get("portico_rounds"),
        "contributors": contributors if isinstance(contributors, list) else [],
        "server_metrics": provenance.get("portico_metrics", {}),
        "job_name": provenance.get("portico_job_name"), "image_size": args.image_size,
        "spacing_mm": args.spacing_mm, "train_slices": n_train, "val_slices": n_val, "received_at": time.time()})
