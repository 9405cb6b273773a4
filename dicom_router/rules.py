"""Routing rules: which model runs on which series of a complete study.

Rules are YAML data validated by pydantic; conditions compare DICOM attributes (by keyword) with a
regular expression, a set of strings or a numeric range. Nothing in a rules file is executed.

.. code-block:: yaml

    rules:
      - name: body-composition
        model: ct-body-composition
        model_version: null            # optional pin
        study:                         # study-level conditions (optional)
          StudyDescription: {regex: "(?i)abdo|phantom"}
        series:                        # series-level conditions
          Modality: {in: [CT]}
          ImageType: {regex: "ORIGINAL"}
          SliceThickness: {range: [0.5, 6.0]}
        select: most_instances         # most_instances | first

Matching: ``regex`` is :func:`re.search` on the value as text (a multi-valued attribute joined with
backslashes); ``in`` matches when any value of the attribute is one of the strings; ``range`` is
inclusive, needs every value to be a number inside it, and ``null`` leaves a bound open. A missing or
empty attribute fails every condition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TextIO

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from dicom_router.errors import RulesError

Header = Dataset | Mapping[str, Any]

#: modality defined terms (PS3.3 C.7.3.1.1.1) a ``Modality`` regex is tried on, for ``rules check``
KNOWN_MODALITIES = ("CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "IO", "PX", "OT", "OP", "OPT",
                    "SM", "ES", "XC", "ECG", "BMD", "IVUS", "OCT")


def _dicom_keyword(value: str) -> str:
    if tag_for_keyword(value) is None:
        raise ValueError(f"{value!r} is not a DICOM keyword")
    return value


def _text_items(value: Any) -> list[str]:
    if value is None or isinstance(value, bool | int | float | str):
        return [] if value is None else [str(value)]
    raise ValueError("must be a list of strings")


def _no_number_version(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f'write the version as a quoted string, e.g. "{value}"')
    return value


Keyword = Annotated[str, AfterValidator(_dicom_keyword)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class Select(StrEnum):
    """Which series a rule takes when several match."""

    MOST_INSTANCES = "most_instances"
    FIRST = "first"


class Condition(BaseModel):
    """One test on one attribute: exactly one of ``regex``, ``in`` or ``range``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    regex: str | None = None
    in_: tuple[str, ...] | None = Field(default=None, alias="in")
    range: tuple[float | None, float | None] | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return value

    @field_validator("in_", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise ValueError("must be a list of strings, e.g. [CT, MR]")
        items = [item for v in value for item in _text_items(v)]
        if not items:
            raise ValueError("must list at least one value")
        return tuple(items)

    @model_validator(mode="after")
    def _exactly_one(self) -> Condition:
        given = [name for name, v in (("regex", self.regex), ("in", self.in_), ("range", self.range))
                 if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of regex, in, range"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.range is not None:
            lo, hi = self.range
            if lo is None and hi is None:
                raise ValueError("range needs at least one bound")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"range lower bound {lo} is above upper bound {hi}")
        return self

    def matches(self, value: Any) -> bool:
        """Whether ``value`` (a header value; ``None`` when absent) satisfies this condition."""
        items = _values(value)
        if not items:
            return False
        if self.regex is not None:
            return re.search(self.regex, "\\".join(str(v) for v in items)) is not None
        if self.in_ is not None:
            wanted = set(self.in_)
            return any(str(v).strip() in wanted for v in items)
        lo, hi = self.range if self.range is not None else (None, None)
        for item in items:
            number = _number(item)
            if number is None or (lo is not None and number < lo) or (hi is not None and number > hi):
                return False
        return True


class Rule(BaseModel):
    """Run ``model`` on the series of a study that satisfy every condition."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    model: Name
    model_version: Annotated[str | None, BeforeValidator(_no_number_version)] = None
    study: dict[Keyword, Condition] = Field(default_factory=dict)
    series: dict[Keyword, Condition] = Field(default_factory=dict)
    select: Select = Select.MOST_INSTANCES
    #: when a queue forms, jobs of a higher priority run first (equal: oldest first)
    priority: Annotated[int, Field(ge=-100, le=100)] = 0

    def describe(self) -> str:
        """One line for ``portico rules check``."""
        version = f"@{self.model_version}" if self.model_version else ""
        if self.priority:
            version += f" (priority {self.priority})"
        conditions = [f"study.{k} {_describe(c)}" for k, c in self.study.items()]
        conditions += [f"{k} {_describe(c)}" for k, c in self.series.items()]
        where = "; ".join(conditions) if conditions else "every series"
        return f"{self.name}: {self.model}{version} on {where} (select {self.select})"

    def modalities(self) -> frozenset[str] | None:
        """The modalities this rule can route, from its ``Modality`` condition; ``None``: any at all.

        A ``regex`` is tried on :data:`KNOWN_MODALITIES`; a ``range`` matches none (not numbers).
        """
        cond = self.series.get("Modality")
        if cond is None:
            return None
        if cond.in_ is not None:
            return frozenset(v.strip().upper() for v in cond.in_)
        if cond.regex is not None:
            pattern = re.compile(cond.regex)
            return frozenset(m for m in KNOWN_MODALITIES if pattern.search(m))
        return frozenset()


class Route(NamedTuple):
    """Run ``model`` (at ``model_version`` when pinned) on ``series_uid``, because of rule ``rule``."""

    rule: str
    model: str
    model_version: str | None
    series_uid: str
    priority: int = 0


@dataclass(frozen=True)
class SeriesHeaders:
    """One series of a study: a representative header and how many instances arrived."""

    series_uid: str
    header: Header
    instance_count: int


@dataclass(frozen=True)
class StudyHeaders:
    """What routing looks at: the study's series, in the order ``select: first`` should prefer.

    Study-level conditions are tested on ``study_header`` when given, else on the first series'
    header (study attributes are the same in every instance of a study).
    """

    study_uid: str
    series: tuple[SeriesHeaders, ...]
    study_header: Header | None = field(default=None)


@dataclass(frozen=True)
class SeriesVerdict:
    """One series under one rule: whether it matched, and if not, which conditions failed."""

    series_uid: str
    matched: bool
    #: the failed conditions in words that quote no value (``Modality not in {CT}``)
    reasons: tuple[str, ...]
    #: the series this rule runs on (the one ``select`` took among those that matched)
    chosen: bool = False


@dataclass(frozen=True)
class RuleVerdict:
    """One rule applied to one study: its study-level failures and a verdict per series."""

    rule: str
    model: str
    model_version: str | None
    #: failed study-level conditions; when any, no series matches
    study_reasons: tuple[str, ...]
    series: tuple[SeriesVerdict, ...]

    @property
    def chosen(self) -> str | None:
        return next((s.series_uid for s in self.series if s.chosen), None)


class RuleSet(BaseModel):
    """The whole rules file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[Rule, ...] = ()

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, value: tuple[Rule, ...]) -> tuple[Rule, ...]:
        seen: set[str] = set()
        for rule in value:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            seen.add(rule.name)
        return value

    def route(self, study: StudyHeaders) -> list[Route]:
        """The (rule, model, series) pairs to run for ``study``; empty when nothing matches."""
        if not study.series:
            return []
        study_header = study.study_header if study.study_header is not None else study.series[0].header
        routes: list[Route] = []
        for rule in self.rules:
            if not all(cond.matches(_get(study_header, kw)) for kw, cond in rule.study.items()):
                continue
            candidates = [s for s in study.series
                          if all(cond.matches(_get(s.header, kw)) for kw, cond in rule.series.items())]
            if not candidates:
                continue
            chosen = candidates[0]
            if rule.select is Select.MOST_INSTANCES:
                # max() keeps the first of equals, so ties go to the earlier series
                chosen = max(candidates, key=lambda s: s.instance_count)
            routes.append(Route(rule.name, rule.model, rule.model_version, chosen.series_uid, rule.priority))
        return routes

    def explain(self, study: StudyHeaders) -> list[RuleVerdict]:
        """Each rule against each series of ``study``: why it matched or not, and which series it runs on.

        The chosen series are the ones :meth:`route` routes. Reasons name keywords and conditions,
        never the values found (they may be a patient's).
        """
        study_header = (study.study_header if study.study_header is not None
                        else study.series[0].header if study.series else {})
        verdicts = []
        for rule in self.rules:
            study_reasons = tuple(_why_not(kw, cond, _get(study_header, kw), "study.")
                                  for kw, cond in rule.study.items() if not cond.matches(_get(study_header, kw)))
            per_series = []
            for s in study.series:
                reasons = tuple(_why_not(kw, cond, _get(s.header, kw))
                                for kw, cond in rule.series.items() if not cond.matches(_get(s.header, kw)))
                per_series.append(SeriesVerdict(s.series_uid, not study_reasons and not reasons,
                                                study_reasons + reasons))
            chosen = self._select(rule, [s for s, v in zip(study.series, per_series, strict=True) if v.matched])
            verdicts.append(RuleVerdict(rule.name, rule.model, rule.model_version, study_reasons, tuple(
                SeriesVerdict(v.series_uid, v.matched, v.reasons, v.series_uid == chosen) for v in per_series)))
        return verdicts

    @staticmethod
    def _select(rule: Rule, candidates: list[SeriesHeaders]) -> str | None:
        if not candidates:
            return None
        if rule.select is Select.MOST_INSTANCES:
            return max(candidates, key=lambda s: s.instance_count).series_uid
        return candidates[0].series_uid

    def summary(self) -> list[str]:
        """Human-readable lines, one per rule."""
        return [rule.describe() for rule in self.rules]


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Validate rules YAML; raises :class:`RulesError` whose lines read ``source:LINE: where: what``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise _error(source, [f"{source}{at}: not valid YAML: {problem}"]) from exc
    if data is None:
        raise _error(source, [f"{source}: empty file; expected a mapping with a 'rules' list"])
    if not isinstance(data, dict):
        raise _error(source, [f"{source}:1: expected a mapping with a 'rules' list"])
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = [p for p in err["loc"] if p != "[key]"]
            line = _line_of(root, loc)
            where = _describe_loc(loc, data)
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(f"{source}{f':{line}' if line else ''}: {where}: {message}")
        raise _error(source, problems) from exc


def load_rules(path: str | Path) -> RuleSet:
    """Read and validate a rules file; raises :class:`RulesError` with one line per problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _error(str(path), [f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    return parse_rules(text, str(path))


def main_check(path: str | Path, out: TextIO, err: TextIO) -> int:
    """``portico rules check FILE``: a summary on ``out`` and 0, or the problems on ``err`` and 1."""
    try:
        rules = load_rules(path)
    except RulesError as exc:
        err.write(f"{exc}\n")
        return 1
    out.write(f"OK: {path}: {len(rules.rules)} rule(s)\n")
    for line in rules.summary():
        out.write(f"  {line}\n")
    return 0


# --- helpers ----------------------------------------------------------------------------------

def _error(source: str, problems: list[str]) -> RulesError:
    head = f"{source}: {len(problems)} problem(s) in routing rules"
    return RulesError("\n".join([head, *problems]), problems=problems)


def _get(header: Header, keyword: str) -> Any:
    # Dataset.get(keyword) gives the value, as a mapping's get does
    return header.get(keyword)


def _values(value: Any) -> list[Any]:
    if value is None or isinstance(value, bytes | bytearray | DicomSequence | Dataset):
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [v for v in items if v is not None and str(v).strip() != ""]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _why_not(keyword: str, cond: Condition, value: Any, prefix: str = "") -> str:
    """Why ``value`` fails ``cond``, without quoting it."""
    if not _values(value):
        return f"{prefix}{keyword} absent or empty"
    return f"{prefix}{keyword} not {_describe(cond)}"


def _describe(cond: Condition) -> str:
    if cond.regex is not None:
        return f"~ /{cond.regex}/"
    if cond.in_ is not None:
        return f"in {{{', '.join(cond.in_)}}}"
    lo, hi = cond.range if cond.range is not None else (None, None)
    return f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its deepest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
                return key.start_mark.line + 1 if key is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def _describe_loc(loc: Sequence[int | str], data: Any) -> str:
    """``rules[0] (name).series.Modality`` for pydantic's ``('rules', 0, 'series', 'Modality')``."""
    text = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                text += f" ({node['name']})"
        else:
            text += f".{part}" if text else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text or "file"
