"""The API server's Warning headers (deprecated APIs, fields it dropped) reach the operator's log, each once."""

from __future__ import annotations

import logging

from llmops.kube import WARNINGS_REMEMBERED, Credentials, Kube, warnings_of


def test_texts_of_warning_headers():
    assert warnings_of(['299 - "unknown field \\"spec.backoffLimit\\""']) == ['unknown field "spec.backoffLimit"']
    assert warnings_of(['299 - "one", 299 - "two"', '299 kube-apiserver "three"']) == ["one", "two", "three"]
    assert warnings_of(["not a warning", '299 - "back\\\\slash"']) == ["back\\slash"]


def test_each_warning_logged_once(caplog):
    kube = Kube(Credentials(server="https://127.0.0.1:6443"), "llmops")
    with caplog.at_level(logging.DEBUG, logger="llmops"):
        for _ in range(3):
            kube._warn("PATCH", "/apis/ray.io/v1/namespaces/a/rayjobs/x", ['unknown field "spec.x"'])
        kube._warn("PATCH", "/apis/ray.io/v1/namespaces/a/rayjobs/y", ['unknown field "spec.x"', "other"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ['the API server warns about PATCH /apis/ray.io/v1/namespaces/a/rayjobs/x: unknown field '
                      '"spec.x" (each warning is logged once)',
                      "the API server warns about PATCH /apis/ray.io/v1/namespaces/a/rayjobs/y: other "
                      "(each warning is logged once)"]


def test_distinct_warnings_past_the_limit_go_to_debug(caplog):
    kube = Kube(Credentials(server="https://127.0.0.1:6443"), "llmops")
    with caplog.at_level(logging.DEBUG, logger="llmops"):
        kube._warn("GET", "/x", [f"note {i}" for i in range(WARNINGS_REMEMBERED + 5)])
    levels = [r.levelno for r in caplog.records]
    assert levels.count(logging.WARNING) == WARNINGS_REMEMBERED and levels.count(logging.DEBUG) == 5
