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

import fcntl
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import ContentBlockedException, Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fl_client.layout import SiteLayout, read_json, write_json

log = logging.getLogger(__name__)

#: normalisation statistics computed from this site's pixels: never sent (SiloBN-style local BN)
NORM_STATS = re.compile(r"(^|\.)(running_mean|running_var|num_batches_tracked)$")
#: fixed, non-trained buffers of Portico's architectures (identical at every site; nothing learnt here)
FIXED_BUFFERS = re.compile(r"(^|\.)levels$")


def is_sendable(name: str, exclude: re.Pattern[str] | None = None) -> bool:
    """Whether variable ``name`` may leave the site at all (before clipping and noise)."""
    if NORM_STATS.search(name) or FIXED_BUFFERS.search(name):
        return False
    return exclude is None or not exclude.search(name)


def exclude_pattern(exclude_vars: list[str] | tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{v})" for v in exclude_vars)) if exclude_vars else None


def clip_and_noise(update: Mapping[str, np.ndarray[Any, Any]], clip_norm: float, noise_multiplier: float,
                   rng: np.random.Generator) -> tuple[dict[str, np.ndarray[Any, Any]], float, float]:
    """(clipped + noised update, L2 norm before clipping, scale applied). float32 out."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out: dict[str, np.ndarray[Any, Any]] = {}
    for key, value in update.items():
        clipped = value.astype(np.float64) * scale
        if std > 0:
            clipped = clipped + rng.normal(0.0, std, size=clipped.shape)
        out[key] = clipped.astype(np.float32)
    return out, norm, scale


def epsilon_spent(history: list[tuple[float, int]], delta: float) -> float:
    """(epsilon) of ``history`` = [(noise multiplier, rounds)] with sampling rate 1 (Opacus RDP)."""
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _ in history):
        return float("inf")
    from opacus.accountants import RDPAccountant  # torch is loaded only where a round is accounted

    accountant = RDPAccountant()
    accountant.history = [(float(sigma), 1.0, int(n)) for sigma, n in history]
    return float(accountant.get_epsilon(delta))


class PrivacyBudget:
    """The per-project budget file ``<control>/privacy_budget.json`` (locked; shared by job processes)."""

    def __init__(self, layout: SiteLayout) -> None:
        self.layout = layout
        self.path = layout.control / "privacy_budget.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.layout.control.mkdir(parents=True, exist_ok=True)
        with (self.layout.control / ".privacy_budget.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        data = read_json(self.path, {})
        return data if isinstance(data, dict) else {}

    def project(self, project: str) -> dict[str, Any]:
        entry = self.read().get(project)
        return entry if isinstance(entry, dict) else {"rounds": [], "epsilon_spent": 0.0, "exhausted": None}

    def charge(self, project: str, *, job_id: str, round_no: int | None, noise_multiplier: float,
               epsilon: float | None, delta: float) -> tuple[bool, float, str]:
        """Spend one round; (allowed, epsilon after, reason). Written before the result leaves."""
        with self._locked():
            data = self.read()
            entry = self.project(project)
            rounds = list(entry.get("rounds", []))
            history = [*_history(rounds), (noise_multiplier, 1)]
            after = epsilon_spent(_merge(history), delta) if epsilon is not None else float("nan")
            if epsilon is not None and (entry.get("exhausted") or not after <= epsilon):
                spent = float(entry.get("epsilon_spent", 0.0))
                reason = (f"privacy budget of project {project!r} spent: epsilon {spent:.3g} of {epsilon:g} "
                          f"(delta {delta:g}) used; one more round would reach {after:.3g}")
                if not entry.get("exhausted"):
                    entry["exhausted"] = {"at": time.time(), "job_id": job_id, "reason": reason}
                entry.update(epsilon_budget=epsilon, delta=delta)
                data[project] = entry
                write_json(self.path, data)
                return False, spent, reason
            rounds.append({"job_id": job_id, "round": round_no, "noise_multiplier": noise_multiplier,
                           "at": time.time()})
            entry.update(rounds=rounds, epsilon_spent=after if epsilon is not None else None,
                         epsilon_budget=epsilon, delta=delta)
            data[project] = entry
            write_json(self.path, data)
            return True, after, ""

    def exhausted(self, project: str) -> str | None:
        """The reason the project's budget is spent, or None."""
        found = self.project(project).get("exhausted")
        return str(found.get("reason")) if isinstance(found, dict) else None


def _history(rounds: list[dict[str, Any]]) -> list[tuple[float, int]]:
    return [(float(r.get("noise_multiplier", 0.0)), 1) for r in rounds]


def _merge(history: list[tuple[float, int]]) -> list[tuple[float, int]]:
    merged: dict[float, int] = {}
    for sigma, n in history:
        merged[sigma] = merged.get(sigma, 0) + n
    return sorted(merged.items())


def projected_epsilon(layout: SiteLayout, project: str, noise_multiplier: float, rounds: int,
                      delta: float) -> tuple[float, float]:
    """(epsilon spent so far, epsilon after ``rounds`` more rounds) for ``project``."""
    history = _history(list(PrivacyBudget(layout).project(project).get("rounds", [])))
    now = epsilon_spent(_merge(history), delta)
    return now, epsilon_spent(_merge([*history, (noise_multiplier, rounds)]), delta)


def budget_view(layout: SiteLayout, project: str | None, epsilon: float | None, delta: float) -> dict[str, Any]:
    """What ``portico fl status`` and ``/fl/status`` show about the budget."""
    entry: dict[str, Any] = PrivacyBudget(layout).project(project) if project else {"rounds": []}
    spent = entry.get("epsilon_spent")
    return {"project": project, "epsilon_budget": epsilon, "delta": delta,
            "epsilon_spent": spent if spent is not None else None,
            "epsilon_left": (max(0.0, epsilon - float(spent or 0.0)) if epsilon is not None else None),
            "rounds_accounted": len(entry.get("rounds", [])),
            "exhausted": entry.get("exhausted")}


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
