"""``RuleSet.explain``: each rule, each series, why it matched or not; and the modalities a rule can route."""

from __future__ import annotations

from dicom_router.rules import Route, SeriesHeaders, StudyHeaders, parse_rules

RULES = """
rules:
  - name: body
    model: ct-body-composition
    study:
      StudyDescription: {regex: "(?i)abdo"}
    series:
      Modality: {in: [CT]}
      SliceThickness: {range: [0.5, 6.0]}
  - name: any-series
    model: other
    select: first
"""


def study(description: str = "CT ABDOMEN") -> StudyHeaders:
    return StudyHeaders("1.2.3", (
        SeriesHeaders("1.2.3.1", {"Modality": "CT", "SliceThickness": "2.5", "StudyDescription": description}, 40),
        SeriesHeaders("1.2.3.2", {"Modality": "MR", "SliceThickness": "3", "StudyDescription": description}, 90),
        SeriesHeaders("1.2.3.3", {"Modality": "CT", "StudyDescription": description}, 200),
        SeriesHeaders("1.2.3.4", {"Modality": "CT", "SliceThickness": "2", "StudyDescription": description}, 10),
    ))


def test_explain_names_the_failed_conditions_without_values() -> None:
    rules = parse_rules(RULES)
    body, anything = rules.explain(study())
    assert body.study_reasons == ()
    by_uid = {s.series_uid: s for s in body.series}
    assert by_uid["1.2.3.1"].matched and by_uid["1.2.3.1"].chosen  # most instances among the matches
    assert by_uid["1.2.3.4"].matched and not by_uid["1.2.3.4"].chosen
    assert by_uid["1.2.3.2"].reasons == ("Modality not in {CT}",)
    assert by_uid["1.2.3.3"].reasons == ("SliceThickness absent or empty",)
    assert anything.chosen == "1.2.3.1" and all(s.matched for s in anything.series)


def test_explain_chooses_what_route_routes() -> None:
    rules = parse_rules(RULES)
    routes = rules.route(study())
    assert [(v.rule, v.model, v.chosen) for v in rules.explain(study())] == [
        (r.rule, r.model, r.series_uid) for r in routes]
    assert routes[0] == Route("body", "ct-body-composition", None, "1.2.3.1")


def test_a_failed_study_condition_fails_every_series() -> None:
    body = parse_rules(RULES).explain(study("HEAD ^ SMITH"))[0]
    assert body.study_reasons == ("study.StudyDescription not ~ /(?i)abdo/",)
    assert body.chosen is None and all(not s.matched for s in body.series)
    assert all("SMITH" not in r for s in body.series for r in s.reasons)


def test_modalities_a_rule_can_route() -> None:
    rules = parse_rules("""
rules:
  - {name: a, model: m, series: {Modality: {in: [CT, mr]}}}
  - {name: b, model: m, series: {Modality: {regex: "^(CT|PT)$"}}}
  - {name: c, model: m, series: {SeriesDescription: {regex: "abdo"}}}
""")
    a, b, c = rules.rules
    assert a.modalities() == frozenset({"CT", "MR"})
    assert b.modalities() == frozenset({"CT", "PT"})
    assert c.modalities() is None
