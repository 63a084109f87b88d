"""The API models: examples validate, the invalid table is refused with the field named, CRDs are structural."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmops.api import KINDS
from llmops.api.crd import all_crds, structural
from llmops.api.validation import spec_errors
from manifests import INVALID, example

EXAMPLES = ["viggo/finetune.yaml", "viggo/batchinference.yaml", "viggo/llmservice.yaml",
            "gateway/llmservice.yaml"]


@pytest.mark.parametrize("path", EXAMPLES)
def test_examples_validate(path):
    doc = example(path)
    KINDS[doc["kind"]].spec_model.model_validate(doc["spec"])


@pytest.mark.parametrize("case_id,doc,field", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_rejected_naming_field(case_id, doc, field):
    with pytest.raises(ValidationError) as info:
        KINDS[doc["kind"]].spec_model.model_validate(doc["spec"])
    assert field in spec_errors(info.value), spec_errors(info.value)


def test_invalid_table_is_large_enough():
    assert len(INVALID) >= 30


def _walk(schema, path="openAPIV3Schema"):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_crd_schema_is_structural(name):
    crd = all_crds()[name]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_structural_inlines_refs_and_drops_null_unions():
    schema = {
        "$defs": {"Inner": {"title": "Inner", "type": "object", "properties": {"x": {"type": "integer", "title": "X"}}}},
        "type": "object",
        "properties": {"inner": {"anyOf": [{"$ref": "#/$defs/Inner"}, {"type": "null"}], "default": None},
                       "ratio": {"type": "number", "exclusiveMinimum": 0}},
    }
    assert structural(schema) == {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
                       "ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": True}},
    }


def test_descriptions_reach_the_schema():
    crd = all_crds()["llmops.dev_finetunes.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "LoRA rank" in spec["properties"]["method"]["properties"]["rank"]["description"]
    assert spec["properties"]["method"]["description"]


def test_crd_names_and_category():
    for crd in all_crds().values():
        names = crd["spec"]["names"]
        assert names["categories"] == ["llmops"]
        assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}
    short = sorted(c["spec"]["names"]["shortNames"][0] for c in all_crds().values())
    assert short == ["bi", "ft", "llms"]


def test_the_api_server_fills_nothing_into_a_status_but_observed_generation():
    """A default inside status (an all-defaulted nested object gets `default: {}`) would show on a resource the
    operator has not written yet, and kstatus and Argo CD read the status from its first apply on."""
    from llmops.api.crd import all_crds

    def defaults(node, path):
        if not isinstance(node, dict):
            return []
        found = [path] if "default" in node and path != "status" else []
        for key, sub in (node.get("properties") or {}).items():
            found += defaults(sub, f"{path}.{key}")
        return found + defaults(node.get("items"), f"{path}[]")

    for crd in all_crds().values():
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["default"] == {"observedGeneration": 0}
        found = [p for p in defaults(status, "status") if p != "status.conditions[].message"]
        assert found == [], crd["metadata"]["name"]


def test_a_status_is_read_typed_past_fields_this_version_cannot_read():
    from llmops.api.finetune import FineTuneStatus
    status = FineTuneStatus.read({
        "phase": "Running", "startTime": "2026-01-01T00:00:00Z",
        "fromANewerOperator": {"x": 1},                    # unknown: ignored
        "retries": {"used": "many", "limit": 3},            # unreadable: dropped, the rest kept
        "adapter": {"uri": "s3://b/a", "since": "later"},   # unknown inside a known field: ignored
    })
    assert (status.phase, status.start_time, status.retries, status.adapter.uri) == (
        "Running", "2026-01-01T00:00:00Z", None, "s3://b/a")
    assert FineTuneStatus.read(None) == FineTuneStatus()
