"""Metrics on ViGGO-shaped meaning representations; expected numbers are counted by hand."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from payload_testkit import PAYLOAD_DATA

from payloads import metrics as m

OPINION = "give_opinion(name[Little Big Adventure], release_year[1994], rating[excellent], genres[action-adventure])"


def test_exact_match_is_strict_but_ignores_surrounding_whitespace():
    assert m.exact_match(" request_attribute(esrb[])\n", "request_attribute(esrb[])")
    assert not m.exact_match("request_attribute(esrb[ ])", "request_attribute(esrb[])")
    assert not m.exact_match("Request_attribute(esrb[])", "request_attribute(esrb[])")
    assert not m.exact_match(None, "request_attribute(esrb[])")


@pytest.mark.parametrize(
    "text, name",
    [(OPINION, "give_opinion"), ("  inform (name[X])", "inform"), ("request(esrb[M", "request"),
     ("The answer is inform(name[X])", None), ("", None), (None, None)],
)
def test_function_name(text, name):
    assert m.function_name(text) == name


def test_function_name_match_needs_a_named_reference():
    assert m.function_name_match("inform(name[A])", "inform(name[B], rating[good])")
    assert not m.function_name_match("inform(name[A])", "request(name[A])")
    assert not m.function_name_match("garbage", "garbage")


def test_attributes_are_pairs_with_list_values_split_and_empty_values_kept():
    assert m.parse_attributes(
        "inform(name[Dirt: Showdown], genres[driving/racing, sport], esrb[E 10+ (for Everyone 10 and Older)], "
        "platforms[])"
    ) == Counter({
        ("name", "Dirt: Showdown"): 1,
        ("genres", "driving/racing"): 1,
        ("genres", "sport"): 1,
        ("esrb", "E 10+ (for Everyone 10 and Older)"): 1,
        ("platforms", ""): 1,
    })
    assert m.parse_attributes("request_explanation()") == Counter()


@pytest.mark.parametrize(
    "text",
    [
        "request(esrb[M (for Mature), genres[shooter]",  # unclosed bracket
        "inform(name[X]",  # unclosed call
        "inform(name[X]) and more",  # trailing text
        "inform(name[X] rating[good])",  # missing comma
        "inform(name[X],)",  # trailing comma
        "inform(name X)",  # no value brackets
        "inform(name[a[b]])",  # nested brackets
        "name[X], rating[good]",  # no function
        "",
        None,
    ],
)
def test_malformed_meaning_representations_have_no_pairs(text):
    assert m.parse_attributes(text) is None
    assert m.score_row(text, OPINION).attribute_predicted == 0


def test_score_row_is_order_insensitive_for_attributes_and_values():
    reordered = (
        "give_opinion(genres[action-adventure], rating[excellent], release_year[1994], name[Little Big Adventure])"
    )
    score = m.score_row(reordered, OPINION)
    assert (score.exact, score.function_name) == (False, True)
    assert (score.attribute_true_positives, score.attribute_predicted, score.attribute_expected) == (4, 4, 4)
    swapped = m.score_row("inform(genres[shooter, role-playing])", "inform(genres[role-playing, shooter])")
    assert swapped.attribute_true_positives == 2


def test_micro_f1_pools_counts_over_rows():
    acc = m.MetricAccumulator()
    # row 1: 2 of 3 reference pairs found, 1 wrong pair predicted; row 2: malformed prediction, 2 reference pairs.
    acc.add("inform(name[A], rating[good], genres[rpg])", "inform(name[A], rating[poor], genres[rpg])")
    acc.add("inform(name[B]", "confirm(name[B], esrb[E])")
    assert (acc.true_positives, acc.predicted, acc.expected) == (2, 3, 5)
    assert acc.result() == {"exactMatch": 0.0, "functionNameAccuracy": 0.5, "attributeF1": 0.5, "rows": 2}


def test_micro_f1_edge_cases():
    assert m.micro_f1(0, 0, 0) == 1.0
    assert m.micro_f1(0, 3, 0) == 0.0
    assert m.micro_f1(3, 3, 3) == 1.0


def test_fixture_predictions_score_as_counted_by_hand():
    references = {r["input"]: r["output"] for r in map(json.loads, (PAYLOAD_DATA / "viggo_test.jsonl").open())}
    predictions = {r["input"]: r["generated_text"]
                   for r in map(json.loads, (PAYLOAD_DATA / "viggo_fake_predictions.jsonl").open())}
    acc = m.MetricAccumulator().add_all((predictions[k], references[k]) for k in references)
    assert (acc.rows, acc.exact, acc.function_name) == (20, 14, 18)
    assert (acc.true_positives, acc.predicted, acc.expected) == (78, 80, 83)
    assert acc.result() == {"exactMatch": 0.7, "functionNameAccuracy": 0.9, "attributeF1": round(156 / 163, 6),
                            "rows": 20}


def test_result_selects_metrics_and_rejects_unknown_ones():
    acc = m.MetricAccumulator()
    acc.add("inform(name[A])", "inform(name[A])")
    assert acc.result(["exactMatch"]) == {"exactMatch": 1.0, "rows": 1}
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        acc.result(["bleu"])
    with pytest.raises(ValueError, match="no rows"):
        m.MetricAccumulator().result()
