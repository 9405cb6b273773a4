"""The cost and the effect of the site privacy floor (``fl.privacy``) on the demo task.

Two parts, both through the site's real NVFlare filters (:class:`fl_client.privacy.GlobalModelKeeper`
and :class:`fl_client.privacy.PrivacyFloor` on real Shareables), without a federation:

1. **Dice after N rounds**, floor off vs on: two simulated sites (synthetic phantoms, the trainer's own
   ``train_steps`` and ``dice_score``), FedAvg of what the filters let out (weight differences, local
   BatchNorm statistics), for a few clip/noise settings; with the epsilon each spends.
2. **Gradient inversion**: in :mod:`benchmarks.gradient_inversion` (its own BENCHMARKS.md section).

    python -m benchmarks.fl_privacy [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey

from fl_client.architectures import BODY_COMPOSITION_WINDOW, build_network
from fl_client.dataset import Slices, to_grid
from fl_client.layout import SiteLayout
from fl_client.privacy import GlobalModelKeeper, PrivacyFloor, epsilon_spent
from fl_client.trainer import dice_score, merge_global, train_steps
from inference.phantom import make_phantom

SIZE = 64


def phantom_slices(seeds: list[int]) -> Slices:
    low, high = BODY_COMPOSITION_WINDOW
    images, labels = [], []
    for seed in seeds:
        p = make_phantom((6, 128, 128), (2.5, 400.0 / 128, 400.0 / 128), seed=seed)
        windowed = (np.clip(p.hu, low, high) - low) / (high - low)
        yx = (p.spacing[1], p.spacing[2])
        images.append(to_grid(windowed, yx, 8.0, SIZE, nearest=False).astype(np.float32))
        labels.append(to_grid(p.labels, yx, 8.0, SIZE, nearest=True).astype(np.int64))
    return Slices(np.concatenate(images)[:, None], np.concatenate(labels))


def _ctx(job: str) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=False)
    return ctx


def through_floor(floor: PrivacyFloor | None, global_state: dict[str, torch.Tensor],
                  local_state: dict[str, torch.Tensor], job: str, task: str) -> dict[str, np.ndarray[Any, Any]]:
    """What leaves the site: the floor's weight difference, or (floor off) the raw trainable difference."""
    g = {k: v.detach().numpy().astype(np.float32) for k, v in global_state.items()}
    x = {k: v.detach().numpy().astype(np.float32) for k, v in local_state.items()}
    if floor is None:
        return {k: x[k] - g[k] for k in g if g[k].dtype.kind == "f" and "running_" not in k and k != "0.levels"}
    incoming = DXO(DataKind.WEIGHTS, data=g).to_shareable()
    incoming.set_header(ReservedHeaderKey.TASK_ID, task)
    GlobalModelKeeper().process(incoming, _ctx(job))
    result = DXO(DataKind.WEIGHTS, data=x, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 1}).to_shareable()
    result.set_header(ReservedHeaderKey.TASK_ID, task)
    out = from_shareable(floor.process(result, _ctx(job)))
    return {k: np.asarray(v) for k, v in out.data.items()}


def fedavg(rounds: int, clip: float | None, sigma: float, steps: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    sites = {"site-a": (phantom_slices([11, 12, 13, 14]), phantom_slices([15])),
             "site-b": (phantom_slices([21, 22, 23]), phantom_slices([24]))}
    nets = {name: build_network("ct-body-composition") for name in sites}
    global_state = {k: v.clone() for k, v in build_network("ct-body-composition").state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        layout = SiteLayout(Path(tmp) / "fl")
        layout.ensure()
        floor = None if clip is None else PrivacyFloor(str(layout.control), "bench", clip, sigma,
                                                       1e300 if sigma > 0 else None, 1e-5)
        rng = np.random.default_rng(seed)
        dice0 = {}
        t0 = time.monotonic()
        for r in range(rounds):
            updates = []
            for name, (train, val) in sites.items():
                net = nets[name]
                merge_global(net, {k: v for k, v in global_state.items()})
                if r == 0:
                    dice0[name] = dice_score(net, val, torch.device("cpu"))
                before = {k: v.clone() for k, v in net.state_dict().items()}
                train_steps(net, train, steps=steps, lr=3e-3, batch_size=8, device=torch.device("cpu"), rng=rng)
                updates.append(through_floor(floor, before, net.state_dict(), name, f"{name}-{r}"))
            for key in updates[0]:
                mean = np.asarray(np.mean([u[key] for u in updates], axis=0), np.float32)
                global_state[key] = global_state[key] + torch.from_numpy(mean).to(global_state[key].dtype)
        final = {}
        for name, (_, val) in sites.items():
            merge_global(nets[name], global_state)
            final[name] = dice_score(nets[name], val, torch.device("cpu"))
    eps = epsilon_spent([(sigma, rounds)], 1e-5) if clip is not None and sigma > 0 else math.inf
    return {"rounds": rounds, "clip_norm": clip, "noise_multiplier": sigma, "epsilon": eps,
            "dice_initial": {k: round(v, 3) for k, v in dice0.items()},
            "dice_final": {k: round(v, 3) for k, v in final.items()},
            "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"dice": []}
    for clip, sigma in ((None, 0.0), (100.0, 1e-5), (1.0, 0.0), (1.0, 0.1), (1.0, 1.0)):
        results["dice"].append(fedavg(a.rounds, clip, sigma, a.steps))
        sys.stdout.write(json.dumps(results["dice"][-1]) + "\n")
    if a.out is not None:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
