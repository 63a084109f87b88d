"""What `kubectl explain` and `kubectl get` print from the generated CRDs."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from llmops.api.crd import all_crds, unwrap


def descriptions(schema: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(schema, dict):
        if isinstance(schema.get("description"), str):
            yield path, schema["description"]
        for key, value in schema.items():
            yield from descriptions(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from descriptions(value, f"{path}[{i}]")


CRDS = all_crds()


def test_unwrap_joins_lines_of_a_paragraph_and_keeps_paragraphs_and_list_items():
    text = "First line of a paragraph\n    goes on here.\n\nSecond paragraph:\n- one item\n  continued\n- two"
    assert unwrap(text) == ("First line of a paragraph goes on here.\n\nSecond paragraph:\n- one item continued\n"
                            "- two")


@pytest.mark.parametrize("name", sorted(CRDS))
def test_descriptions_have_no_hard_line_breaks(name):
    """kubectl explain wraps text itself: a docstring's line break would print as a ragged short line."""
    ragged = [(path, text) for path, text in descriptions(CRDS[name]) if "\n" in text.replace("\n\n", "")
              and not all(line.startswith(("- ", "* ")) for line in text.split("\n")[1:] if line)]
    assert not ragged, ragged[:3]


def undescribed(schema: dict[str, Any], path: str) -> Iterator[str]:
    for name, sub in (schema.get("properties") or {}).items():
        if not sub.get("description"):
            yield f"{path}.{name}"
        yield from undescribed(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from undescribed(schema["items"], f"{path}[]")


@pytest.mark.parametrize("name", sorted(CRDS))
def test_every_status_field_is_described(name):
    version = CRDS[name]["spec"]["versions"][0]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["conditions"]["items"].get("description")
    assert not list(undescribed(status, "status"))
    # Until the operator's first write the status reads as generation 0 observed (kstatus: InProgress).
    assert status["default"] == {"observedGeneration": 0}
    reason = next(c for c in version["additionalPrinterColumns"] if c["name"] == "Reason")
    assert reason["jsonPath"] == '.status.conditions[?(@.type=="Reconciling")].reason'
