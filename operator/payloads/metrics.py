"""Evaluation metrics for function-call style outputs such as ViGGO meaning representations.

A meaning representation looks like ``give_opinion(name[Diablo II], rating[good], genres[action, rpg])``.
Everything here is pure: strings in, numbers out. ``MetricAccumulator`` folds rows one at a time so a caller can
stream an arbitrarily large result set through it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Tuple

EXACT_MATCH = "exactMatch"
FUNCTION_NAME_ACCURACY = "functionNameAccuracy"
ATTRIBUTE_F1 = "attributeF1"
METRIC_NAMES = (EXACT_MATCH, FUNCTION_NAME_ACCURACY, ATTRIBUTE_F1)

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_FUNCTION_PREFIX = re.compile(rf"\s*({_IDENTIFIER})\s*\(")
_WHOLE_CALL = re.compile(rf"({_IDENTIFIER})\s*\((.*)\)", re.DOTALL)
_ATTRIBUTE_NAME = re.compile(_IDENTIFIER)

AttributePair = Tuple[str, str]


def _text(value: object) -> str:
    return "" if value is None else str(value)


def exact_match(prediction: object, reference: object) -> bool:
    """Strict equality after stripping surrounding whitespace (the reference run's rule)."""
    return _text(prediction).strip() == _text(reference).strip()


def function_name(text: object) -> Optional[str]:
    """The name before the first ``(``, or None when the text does not start like a call."""
    match = _FUNCTION_PREFIX.match(_text(text))
    return match.group(1) if match else None


def function_name_match(prediction: object, reference: object) -> bool:
    expected = function_name(reference)
    return expected is not None and function_name(prediction) == expected


def parse_attributes(text: object) -> Optional[Counter]:
    """(attribute, value) pairs of ``fn(attr[value], attr2[v1, v2])`` as a multiset.

    A list value contributes one pair per element, so ``genres[a, b]`` and ``genres[b, a]`` agree.
    An empty value (``esrb[]``) is the pair ``("esrb", "")``. Returns None when the text is not a
    well-formed call: callers treat that as "no pairs".
    """
    call = _WHOLE_CALL.fullmatch(_text(text).strip())
    if call is None:
        return None
    body = call.group(2)
    pairs: Counter = Counter()
    pos, end = 0, len(body)
    while True:
        while pos < end and body[pos].isspace():
            pos += 1
        if pos == end:
            return pairs
        name = _ATTRIBUTE_NAME.match(body, pos)
        if name is None:
            return None
        pos = name.end()
        while pos < end and body[pos].isspace():
            pos += 1
        if pos == end or body[pos] != "[":
            return None
        close = body.find("]", pos + 1)
        if close < 0:
            return None
        value = body[pos + 1 : close]
        if "[" in value:
            return None
        for element in value.split(","):
            pairs[(name.group(0), element.strip())] += 1
        pos = close + 1
        while pos < end and body[pos].isspace():
            pos += 1
        if pos == end:
            return pairs
        if body[pos] != ",":
            return None
        pos += 1
        # A trailing comma with nothing after it is malformed.
        if not body[pos:].strip():
            return None


@dataclass(frozen=True)
class RowScore:
    exact: bool
    function_name: bool
    attribute_true_positives: int
    attribute_predicted: int
    attribute_expected: int


def score_row(prediction: object, reference: object) -> RowScore:
    predicted = parse_attributes(prediction) or Counter()
    expected = parse_attributes(reference) or Counter()
    return RowScore(
        exact=exact_match(prediction, reference),
        function_name=function_name_match(prediction, reference),
        attribute_true_positives=sum((predicted & expected).values()),
        attribute_predicted=sum(predicted.values()),
        attribute_expected=sum(expected.values()),
    )


def micro_f1(true_positives: int, predicted: int, expected: int) -> float:
    """2TP / (predicted + expected); 1.0 when neither side has any pair (nothing to disagree on)."""
    if predicted + expected == 0:
        return 1.0
    return 2.0 * true_positives / (predicted + expected)


class MetricAccumulator:
    """Folds (prediction, reference) rows into dataset-level metrics.

    exactMatch and functionNameAccuracy are means over rows; attributeF1 is micro-F1, i.e. pair counts
    are pooled over the whole dataset before computing F1.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.exact = 0
        self.function_name = 0
        self.true_positives = 0
        self.predicted = 0
        self.expected = 0

    def add(self, prediction: object, reference: object) -> RowScore:
        score = score_row(prediction, reference)
        self.rows += 1
        self.exact += score.exact
        self.function_name += score.function_name
        self.true_positives += score.attribute_true_positives
        self.predicted += score.attribute_predicted
        self.expected += score.attribute_expected
        return score

    def add_all(self, pairs: Iterable[Tuple[object, object]]) -> "MetricAccumulator":
        for prediction, reference in pairs:
            self.add(prediction, reference)
        return self

    def result(self, names: Iterable[str] = METRIC_NAMES, digits: int = 6) -> Mapping[str, float]:
        """The requested metrics plus ``rows``. Raises ValueError for an unknown metric name."""
        if self.rows == 0:
            raise ValueError("no rows were scored")
        values = {
            EXACT_MATCH: self.exact / self.rows,
            FUNCTION_NAME_ACCURACY: self.function_name / self.rows,
            ATTRIBUTE_F1: micro_f1(self.true_positives, self.predicted, self.expected),
        }
        out = {}
        for name in names:
            if name not in values:
                raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRIC_NAMES)}")
            out[name] = round(values[name], digits)
        out["rows"] = self.rows
        return out
