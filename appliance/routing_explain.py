"""Why a study got the jobs it got: each series, each rule, and why it matched or not.

Used by ``portico rules explain STUDY_UID``, ``GET /studies/{uid}/routing``, the ``no_match`` audit
row, and ``portico rules check``'s warnings about rules that can route a modality their model does
not accept. Nothing here quotes a patient value: series are named by UID, modality and count, and
reasons by keyword and condition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from appliance.models import ModelRegistry
from appliance.store import Store
from dicom_router.rules import RuleSet, RuleVerdict, SeriesHeaders, StudyHeaders
from inference.accepts import accepts_modality


def study_headers(study_uid: str, series: Mapping[str, Sequence[Path]]) -> StudyHeaders:
    """What routing looks at: one header (no pixels) and the instance count per series."""
    return StudyHeaders(
        study_uid=study_uid,
        series=tuple(SeriesHeaders(series_uid=uid, header=dcmread(paths[0], stop_before_pixels=True),
                                   instance_count=len(paths)) for uid, paths in series.items() if paths),
    )


@dataclass(frozen=True)
class StudyExplanation:
    """Every rule against every series of one stored study."""

    study_uid: str
    #: per series: its UID, modality and instance count
    series: tuple[dict[str, Any], ...]
    rules: tuple[RuleVerdict, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the API's answer and ``--json``."""
        return {
            "study_uid": self.study_uid,
            "series": list(self.series),
            "rules": [{"rule": r.rule, "model": r.model, "model_version": r.model_version,
                       "study_reasons": list(r.study_reasons), "chosen_series": r.chosen,
                       "series": [{"series_uid": s.series_uid, "matched": s.matched, "chosen": s.chosen,
                                   "reasons": list(s.reasons)} for s in r.series]}
                      for r in self.rules],
        }

    def lines(self) -> list[str]:
        """Readable lines for the CLI."""
        out = [f"study {self.study_uid}: {len(self.series)} series, {len(self.rules)} rule(s)"]
        for info in self.series:
            out.append(f"  series {info['series_uid']} ({info['modality'] or 'no modality'}, "
                       f"{info['instances']} instance(s))")
        if not self.rules:
            out.append("  no rules are configured")
        for r in self.rules:
            verdict = f"runs {r.model} on {r.chosen}" if r.chosen else "matches no series"
            out.append(f"  rule {r.rule}: {verdict}")
            for s in r.series:
                if s.chosen:
                    out.append(f"    {s.series_uid}: matched, chosen")
                elif s.matched:
                    out.append(f"    {s.series_uid}: matched, not chosen (select took another)")
                else:
                    out.append(f"    {s.series_uid}: no match: {'; '.join(s.reasons)}")
        return out


def explain(rules: RuleSet, headers: StudyHeaders) -> StudyExplanation:
    """Explain how ``rules`` route the study of ``headers``."""
    series = tuple({"series_uid": s.series_uid, "modality": str(s.header.get("Modality", "") or ""),
                    "instances": s.instance_count} for s in headers.series)
    return StudyExplanation(headers.study_uid, series, tuple(rules.explain(headers)))


def explain_stored(store: Store, rules: RuleSet, study_uid: str) -> StudyExplanation | None:
    """Explain a stored study (every instance held, handed off or not); ``None`` when none is held."""
    series: dict[str, list[Path]] = {}
    for row in store.instance_index():
        if row["study_uid"] == study_uid:
            series.setdefault(str(row["series_uid"]), []).append(Path(row["path"]))
    if not series:
        return None
    return explain(rules, study_headers(study_uid, series))


def no_match_detail(explanation: StudyExplanation) -> dict[str, Any]:
    """What the ``no_match`` audit row records: the series considered and, per rule, why each failed."""
    return {
        "series": [dict(s) for s in explanation.series],
        "reasons": {r.rule: {s.series_uid: list(s.reasons) for s in r.series} for r in explanation.rules}
        if explanation.rules else "no rules are configured",
    }


def modality_warnings(rules: RuleSet, registry: ModelRegistry) -> list[str]:
    """Rules that can route a modality their model does not accept, or name a model not installed."""
    warnings = []
    for rule in rules.rules:
        installed = [i for i in registry.installed(rule.model)
                     if rule.model_version is None or i.manifest.version == rule.model_version]
        if not installed:
            version = f"@{rule.model_version}" if rule.model_version else ""
            warnings.append(f"rule {rule.name}: model {rule.model}{version} is not installed")
            continue
        accepted = sorted({i.manifest.input.modality for i in installed})
        routable = rule.modalities()
        if routable is None:
            warnings.append(f"rule {rule.name}: has no Modality condition, so it can route any modality; "
                            f"{rule.model} accepts only {', '.join(accepted)}")
            continue
        refused = sorted(m for m in routable
                         if not any(accepts_modality(i.manifest.input, m) for i in installed))
        if refused:
            warnings.append(f"rule {rule.name}: can route {', '.join(refused)}, which {rule.model} does not "
                            f"accept (it accepts {', '.join(accepted)}); such jobs fail with series_not_accepted")
    return warnings
