"""Generate CustomResourceDefinitions from the pydantic models.

pydantic writes JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3 schema: no `$ref`,
no `anyOf` with null, no `title`, no `additionalProperties` beside `properties`, boolean exclusive bounds.
:func:`structural` converts one into the other.
"""

from __future__ import annotations

import re
from typing import Any

from . import CATEGORY, KINDS, GROUP, VERSION, Kind

DROPPED_KEYS = {"title", "$defs", "discriminator"}
LIST_ITEM = re.compile(r"^([-*]|\d+[.)])\s")


def unwrap(text: str) -> str:
    """A docstring's paragraphs each on one line (list items on their own): `kubectl explain` wraps text to the
    terminal itself, and a hard line break left in would print as a ragged short line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines: list[str] = []
        for line in (raw.strip() for raw in block.splitlines()):
            if lines and not LIST_ITEM.match(line):
                lines[-1] += " " + line
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return `schema` as a structural OpenAPI v3 schema (pure; inputs untouched)."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types structurally: {schema}")
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default") or (k == "default" and v is not None)}
        return structural({**options[0], **rest}, defs)

    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DROPPED_KEYS:
            continue
        if key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and "properties" not in schema:
                out["additionalProperties"] = structural(value, defs)
            elif value is True and "properties" not in schema:
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "const":
            out["enum"] = [value]
        elif key == "description" and isinstance(value, str):
            out["description"] = unwrap(value)
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("type", "object")
        out.pop("additionalProperties", None)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    for name, sub in out.get("properties", {}).items():
        if name not in out.get("required", []) and _all_defaulted(sub):
            # Lets the API server fill the nested defaults when the whole object is left out.
            sub.setdefault("default", {})
    return out


def _all_defaulted(schema: dict[str, Any]) -> bool:
    properties = schema.get("properties")
    return (schema.get("type") == "object" and bool(properties) and not schema.get("required")
            and any("default" in p for p in properties.values()))


def model_schema(model: type) -> dict[str, Any]:
    return structural(model.model_json_schema(by_alias=True, mode="validation"))


def immutability_rule(spec_schema: dict[str, Any]) -> dict[str, str]:
    """Root rule: once the job started (status.startTime set) only spec.suspend may change."""
    terms = []
    for name in sorted(spec_schema.get("properties", {})):
        if name == "suspend":
            continue
        terms.append(f"(has(self.spec.{name}) == has(oldSelf.spec.{name}) && "
                     f"(!has(self.spec.{name}) || self.spec.{name} == oldSelf.spec.{name}))")
    return {
        "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) || (" + " && ".join(terms) + ")",
        "message": "spec is immutable once the job has started (status.startTime is set): only spec.suspend may "
                   "change; create a new resource for a different run",
        "reason": "FieldValueForbidden",
    }


def crd(kind: Kind) -> dict[str, Any]:
    spec_schema = model_schema(kind.spec_model)
    spec_schema["description"] = kind.spec_model.__doc__ and kind.description or kind.description
    status_schema = model_schema(kind.status_model)
    status_schema["description"] = f"Observed state of the {kind.kind}: phase, conditions and results."
    # Until the operator first writes, the API server reads the status as generation 0 observed: GitOps tools
    # (kstatus, Argo CD) then wait for the operator, where an empty status would read as done to kstatus.
    status_schema["default"] = {"observedGeneration": 0}
    root: dict[str, Any] = {
        "type": "object",
        "description": unwrap(kind.description),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    if kind.immutable_once_started:
        root["x-kubernetes-validations"] = [immutability_rule(spec_schema)]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name, "labels": {"app.kubernetes.io/part-of": "llmops"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": list(kind.printer_columns),
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD, for every kind."""
    return {f"{GROUP}_{k.plural}.yaml": crd(k) for k in KINDS.values()}
