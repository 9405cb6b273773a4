"""Routing rules: conditions, study and series level, selection, and clear errors for bad files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_router.errors import RulesError
from dicom_router.rules import (
    Condition,
    Route,
    RuleSet,
    SeriesHeaders,
    StudyHeaders,
    load_rules,
    main_check,
    parse_rules,
)

EXAMPLE = """\
rules:
  - name: body-composition
    model: ct-body-composition      # model package name
    model_version: null             # optional pin
    study:
      StudyDescription: {regex: "(?i)abdo|phantom"}
    series:
      Modality: {in: [CT]}
      ImageType: {regex: "ORIGINAL"}
      SliceThickness: {range: [0.5, 6.0]}
    select: most_instances
"""


def ct_header(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.StudyDescription = "Synthetic CT phantom (not a patient)"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "2.5"
    ds.SeriesNumber = 2
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def study(*series: SeriesHeaders) -> StudyHeaders:
    return StudyHeaders(study_uid="1.2.3", series=series)


def rules_from(text: str) -> RuleSet:
    return parse_rules(text, "rules.yaml")


def test_example_from_the_design_routes_the_ct_series() -> None:
    rules = rules_from(EXAMPLE)
    routes = rules.route(study(SeriesHeaders("1.2.3.1", ct_header(), 300)))
    assert routes == [Route("body-composition", "ct-body-composition", None, "1.2.3.1")]
    # a Route is a plain tuple as well
    assert tuple(routes[0]) == ("body-composition", "ct-body-composition", None, "1.2.3.1", 0)  # priority 0


def test_no_match_is_an_empty_list() -> None:
    rules = rules_from(EXAMPLE)
    mr = ct_header(Modality="MR")
    thick = ct_header(SliceThickness="10")
    derived = ct_header(ImageType=["DERIVED", "SECONDARY"])
    assert rules.route(study(SeriesHeaders("a", mr, 10), SeriesHeaders("b", thick, 10),
                             SeriesHeaders("c", derived, 10))) == []
    assert rules.route(study()) == []


def test_study_level_condition_is_tested_on_the_study_header() -> None:
    rules = rules_from(EXAMPLE)
    head = ct_header(StudyDescription="CHEST routine")
    assert rules.route(study(SeriesHeaders("a", head, 10))) == []
    explicit = StudyHeaders("1.2.3", (SeriesHeaders("a", head, 10),),
                            study_header={"StudyDescription": "ABDOMEN"})
    assert [r.series_uid for r in rules.route(explicit)] == ["a"]


def test_missing_attribute_fails_the_condition() -> None:
    rules = rules_from(EXAMPLE)
    assert rules.route(study(SeriesHeaders("a", ct_header(SliceThickness=None), 10))) == []
    assert rules.route(study(SeriesHeaders("a", ct_header(SliceThickness=""), 10))) == []


def test_select_most_instances_and_first() -> None:
    def text(select: str) -> str:
        return EXAMPLE.replace("select: most_instances", f"select: {select}")

    a, b, c = (SeriesHeaders("a", ct_header(), 40), SeriesHeaders("b", ct_header(), 300),
               SeriesHeaders("c", ct_header(), 300))
    most = rules_from(text("most_instances")).route(study(a, b, c))
    assert [r.series_uid for r in most] == ["b"]  # ties go to the earlier series
    first = rules_from(text("first")).route(study(a, b, c))
    assert [r.series_uid for r in first] == ["a"]


def test_several_rules_give_several_routes_with_pinned_versions() -> None:
    text = EXAMPLE + """\
  - name: everything-ct
    model: ct-other
    model_version: "2.1"
    series:
      Modality: {in: [CT, PT]}
"""
    routes = rules_from(text).route(study(SeriesHeaders("a", ct_header(), 10)))
    assert routes == [Route("body-composition", "ct-body-composition", None, "a"),
                      Route("everything-ct", "ct-other", "2.1", "a")]


def test_dict_headers_work_like_datasets() -> None:
    rules = rules_from(EXAMPLE)
    header = {"StudyDescription": "abdomen", "Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY"],
              "SliceThickness": 1.0}
    assert rules.route(study(SeriesHeaders("a", header, 1)))[0].series_uid == "a"


@pytest.mark.parametrize(
    ("condition", "value", "expected"),
    [
        ({"regex": "^CT$"}, "CT", True),
        ({"regex": "^CT$"}, "CTX", False),
        ({"regex": r"ORIGINAL\\PRIMARY"}, ["ORIGINAL", "PRIMARY", "AXIAL"], True),
        ({"in": ["CT", "MR"]}, "MR", True),
        ({"in": ["CT"]}, "PT", False),
        ({"in": ["AXIAL"]}, ["ORIGINAL", "PRIMARY", "AXIAL"], True),
        ({"in": [2, 3]}, 2, True),
        ({"range": [0.5, 6.0]}, "0.5", True),
        ({"range": [0.5, 6.0]}, 6.0, True),
        ({"range": [0.5, 6.0]}, 6.01, False),
        ({"range": [None, 3]}, -100, True),
        ({"range": [1, None]}, 1e9, True),
        ({"range": [0.5, 1.0]}, ["0.7", "0.7"], True),
        ({"range": [0.5, 1.0]}, ["0.7", "1.7"], False),
        ({"range": [0, 10]}, "thick", False),
        ({"regex": "."}, None, False),
        ({"in": ["x"]}, b"x", False),
    ],
)
def test_condition_matching(condition: dict[str, object], value: object, expected: bool) -> None:
    assert Condition.model_validate(condition).matches(value) is expected


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:\n  - name: r\n    model: m\n    series:\n      Modlity: {in: [CT]}\n",
         ":5: rules[0] (r).series.Modlity: 'Modlity' is not a DICOM keyword"),
        ("rules:\n  - name: r\n    model: m\n    series:\n      Modality: {in: [CT], regex: C}\n",
         ":5: rules[0] (r).series.Modality: give exactly one of regex, in, range (got regex, in)"),
        ("rules:\n  - name: r\n    model: m\n    series:\n      Modality: {}\n",
         "give exactly one of regex, in, range"),
        ("rules:\n  - name: r\n    model: m\n    series:\n      Modality: {regex: '(('}\n",
         ":5: rules[0] (r).series.Modality.regex: invalid regular expression"),
        ("rules:\n  - name: r\n    model: m\n    series:\n      SliceThickness: {range: [5, 1]}\n",
         "range lower bound 5.0 is above upper bound 1.0"),
        ("rules:\n  - name: r\n    model: m\n    series:\n      Modality: {in: CT}\n",
         "must be a list of strings"),
        ("rules:\n  - name: r\n    model: m\n    model_version: 1.0\n",
         ':4: rules[0] (r).model_version: write the version as a quoted string, e.g. "1.0"'),
        ("rules:\n  - name: r\n    model: m\n    selct: first\n", ":4: rules[0] (r).selct: unknown field"),
        ("rules:\n  - name: r\n    model: m\n    select: biggest\n", "rules[0] (r).select"),
        ("rules:\n  - name: r\n    model: m\n  - name: r\n    model: n\n", "rule name 'r' is used twice"),
        ("rules:\n  - name: r\n", ":2: rules[0] (r).model: Field required"),
        ("rules:\n  - name: r\n    model: m\n    series:\n      Modality: {in: [CT]\n", "not valid YAML"),
        ("", "empty file"),
        ("- just a list\n", "expected a mapping with a 'rules' list"),
        ("rulez: []\n", ":1: rulez: unknown field"),
    ],
)
def test_invalid_files_give_clear_line_oriented_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert info.value.code == "rules_invalid"
    assert info.value.problems
    assert any(expected in line for line in info.value.problems), info.value.problems
    assert all(line.startswith(str(path)) for line in info.value.problems)


def test_missing_file_is_a_rules_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "nope.yaml")


def test_no_eval_anywhere() -> None:
    source = (Path(__file__).resolve().parents[3] / "dicom_router" / "rules.py").read_text()
    assert "eval(" not in source and "exec(" not in source and "yaml.load(" not in source


def test_python_tags_in_yaml_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "rules: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RulesError, match="not valid YAML"):
        load_rules(path)


def test_main_check_reports_ok_summary_or_errors(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main_check(write(tmp_path, EXAMPLE), out, err) == 0
    assert "OK" in out.getvalue() and "1 rule(s)" in out.getvalue()
    assert "body-composition: ct-body-composition on study.StudyDescription" in out.getvalue()
    assert err.getvalue() == ""

    out, err = io.StringIO(), io.StringIO()
    assert main_check(write(tmp_path, "rules:\n  - name: r\n"), out, err) == 1
    assert "model: Field required" in err.getvalue()
    assert out.getvalue() == ""


def test_a_rule_priority_is_bounded_and_reaches_its_routes() -> None:
    from dicom_router.rules import Rule

    rule = Rule.model_validate({"name": "urgent", "model": "m", "priority": 10})
    assert rule.priority == 10 and "(priority 10)" in rule.describe()
    with pytest.raises(ValueError):
        Rule.model_validate({"name": "too", "model": "m", "priority": 1000})
