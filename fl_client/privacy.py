"""The site's privacy floor on what leaves: allowed variables, clipping, Gaussian noise, a privacy budget.

Two NVFlare filters that the site's ``local/privacy.json`` puts on every job (a job cannot drop them):

- :class:`GlobalModelKeeper` (task data filter): remembers the global weights a task brought in, in the
  job process's memory, so that the result filter can form the update.
- :class:`PrivacyFloor` (task result filter): turns the trainer's weights into the round's *update*
  (trained minus global), keeps only trainable variables (normalisation running statistics and the
  site's ``exclude_vars`` stay here), clips the update's L2 norm to ``clip_norm``, adds Gaussian noise
  of std ``noise_multiplier x clip_norm`` to every coordinate, charges the project's privacy budget
  *before* anything leaves, and sends the result as a weight difference (``WEIGHT_DIFF``). When the
  budget would be exceeded it blocks the result and records why.

Accounting: each round is one release of the Gaussian mechanism with L2 sensitivity ``clip_norm``
(the whole clipped update of this site: site-level adjacency, as in DP-FedAvg, McMahan et al. 2018)
and sampling rate 1. Rounds compose across jobs of the same project with Opacus's RDP accountant;
the (epsilon, delta) spent is kept in ``<control>/privacy_budget.json``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import ContentBlockedException, Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fl_client.layout import SiteLayout
from fl_client.privacy_budget import (
    FIXED_BUFFERS,
    NORM_STATS,
    PrivacyBudget,
    budget_view,
    clip_and_noise,
    epsilon_spent,
    exclude_pattern,
    is_sendable,
    projected_epsilon,
)

__all__ = ["FIXED_BUFFERS", "NORM_STATS", "GlobalModelKeeper", "PrivacyBudget", "PrivacyFloor", "budget_view",
           "clip_and_noise", "epsilon_spent", "exclude_pattern", "is_sendable", "projected_epsilon"]

log = logging.getLogger(__name__)


# ---- the filters (inside NVFlare's job process) ---------------------------------------------------

#: job id -> (task id, global weights as float64 arrays) of the task being worked on in this process
_GLOBALS: dict[str, tuple[str, dict[str, np.ndarray[Any, Any]]]] = {}
_GLOBALS_LOCK = threading.Lock()


def _to_numpy(value: Any) -> np.ndarray[Any, Any] | None:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        return np.asarray(value)
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return np.asarray(value.detach().cpu().numpy())
    return None


def _task_id(shareable: Shareable, fl_ctx: FLContext) -> str:
    from nvflare.apis.shareable import ReservedHeaderKey

    return str(shareable.get_header(ReservedHeaderKey.TASK_ID) or fl_ctx.get_prop(FLContextKey.TASK_ID, "") or "")


class GlobalModelKeeper(Filter):  # type: ignore[misc]
    """Task data filter: keeps the incoming global weights for :class:`PrivacyFloor`; changes nothing."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable
        if dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
            return shareable
        params = {}
        for key, value in dxo.data.items():
            array = _to_numpy(value)
            if array is not None:
                params[str(key)] = np.array(array, dtype=np.float64, copy=True)
        with _GLOBALS_LOCK:
            _GLOBALS[str(fl_ctx.get_job_id() or "")] = (_task_id(shareable, fl_ctx), params)
        return shareable


class PrivacyFloor(Filter):  # type: ignore[misc]
    """Task result filter: allowed variables only, clipped and noised update, budget charged first."""

    def __init__(self, control_dir: str, project: str, clip_norm: float, noise_multiplier: float,
                 epsilon: float | None, delta: float, exclude_vars: list[str] | None = None) -> None:
        super().__init__()
        self.layout = SiteLayout.from_control(Path(control_dir))
        self.project = project
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.epsilon = None if epsilon is None else float(epsilon)
        self.delta = float(delta)
        self.exclude_vars = list(exclude_vars or [])
        self._exclude = exclude_pattern(self.exclude_vars)
        # noise from the OS's entropy, not from a seed a job could choose
        self._rng = np.random.default_rng(secrets.randbits(128))

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable
        if dxo.data_kind == DataKind.METRICS:
            return shareable
        job_id = str(fl_ctx.get_job_id() or "unknown")
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise ContentBlockedException(f"site privacy floor: data kind {dxo.data_kind} may not leave")
        with _GLOBALS_LOCK:
            task, global_params = _GLOBALS.get(job_id, ("", {}))
        this_task = _task_id(shareable, fl_ctx)
        if not global_params or (task and this_task and task != this_task):
            self._record(job_id, {"blocked": True, "reason": "no global model recorded for this task"})
            raise ContentBlockedException("site privacy floor: no global model known for this result")
        update: dict[str, np.ndarray[Any, Any]] = {}
        dropped: list[str] = []
        as_torch = False
        for key, value in (dxo.data or {}).items():
            name = str(key)
            if not is_sendable(name, self._exclude):
                dropped.append(name)
                continue
            array = _to_numpy(value)
            as_torch = as_torch or type(value).__module__.startswith("torch")
            if array is None or array.dtype.kind != "f" or name not in global_params \
                    or global_params[name].shape != array.shape:
                self._record(job_id, {"blocked": True, "reason": f"variable {name!r} is not a weight of the model"})
                raise ContentBlockedException(f"site privacy floor: variable {name!r} is not a weight of the model")
            update[name] = array.astype(np.float64) if dxo.data_kind == DataKind.WEIGHT_DIFF \
                else array.astype(np.float64) - global_params[name]
        round_no = shareable.get_header("current_round")
        allowed, eps, reason = PrivacyBudget(self.layout).charge(
            self.project, job_id=job_id, round_no=int(round_no) if isinstance(round_no, int) else None,
            noise_multiplier=self.noise_multiplier, epsilon=self.epsilon, delta=self.delta)
        if not allowed:
            self._record(job_id, {"blocked": True, "reason": reason, "epsilon_spent": eps})
            log.error("%s", reason)
            raise ContentBlockedException(f"site privacy floor: {reason}")
        noised, norm, scale = clip_and_noise(update, self.clip_norm, self.noise_multiplier, self._rng)
        data: dict[str, Any] = dict(noised)
        if as_torch:
            import torch

            data = {k: torch.from_numpy(v) for k, v in noised.items()}
        meta = dict(dxo.meta or {})
        out = DXO(data_kind=DataKind.WEIGHT_DIFF, data=data, meta=meta)
        if MetaKey.NUM_STEPS_CURRENT_ROUND in meta:
            out.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, meta[MetaKey.NUM_STEPS_CURRENT_ROUND])
        out.update_shareable(shareable)
        self._record(job_id, {
            "blocked": False, "round": round_no if isinstance(round_no, int) else None, "sent": len(noised),
            "dropped": sorted(dropped), "norm_before_clip": round(norm, 6), "clip_norm": self.clip_norm,
            "scale": round(scale, 6), "noise_std": self.noise_multiplier * self.clip_norm,
            "epsilon_spent": None if self.epsilon is None else round(eps, 6), "epsilon_budget": self.epsilon,
            "delta": self.delta})
        return shareable

    def _record(self, job_id: str, entry: dict[str, Any]) -> None:
        import json

        path = self.layout.job_dir(job_id) / "privacy.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"at": time.time(), **entry}, sort_keys=True, default=str) + "\n")
