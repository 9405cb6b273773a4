"""The privacy floor's arithmetic, without NVFlare: which variables may leave, clip and noise, the budget.

Kept apart from :mod:`fl_client.privacy` (the NVFlare filters) so that ``portico serve``, the CLI and
the API can show and check the budget without importing NVFlare, which only the ``fl`` extra installs.
"""


from __future__ import annotations

import fcntl
import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

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


