"""Hostile manifests from the CRDs' own schemas (hypothesis strategies).

Every case starts from a realistic valid manifest (tests/manifests.py), takes a few schema-valid edits anywhere
in its spec (whole objects or single fields, drawn from the schema the API server enforces: crds/*.yaml), and
then at most one mutation at one field. Mutations are either certainly invalid by the schema (wrong types,
numbers out of range, unknown enum values, missing required fields, strings one past maxLength, lists one past
maxItems, pattern violations, unknown fields) or awkward but allowed (strings exactly at maxLength, unicode in
free text, unicode whitespace in URIs, null values, references to resources that do not exist).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from manifests import batchinference, finetune, llmservice

REPO = Path(__file__).resolve().parents[2]
PLURAL_FILES = {"FineTune": "finetunes", "BatchInference": "batchinferences", "LLMService": "llmservices"}
DROP = object()  # a mutation value meaning "remove the field"

# Fields whose values create pods: an unsuspended manifest asking for more than this is suspended instead, so a
# few hundred generated manifests cannot flood the plane with thousands of pods (see docs/reliability.md).
POD_COUNT_CAPS = {("resources", "workers"): 2, ("autoscaling", "minReplicas"): 1, ("autoscaling", "maxReplicas"): 2,
                  ("engine", "tensorParallelSize"): 4, ("engine", "pipelineParallelSize"): 2}
# Names present in the namespace before the run (a FineTune and a BatchInference), so references hit or miss.
PRESENT = {"FineTune": "present-ft", "BatchInference": "present-bi"}
UNICODE_SAMPLES = ["ünïcödé", "名前とモデル", "🙂🚀🔥", "\u202eRTL\u202c", "zero\u200bwidth", "tab\there",
                   "new\nline", "quote\"'`", "{{ .Values }}", "${HOME}", "nul\x00byte", "\x7f\x01ctl", "a: b\n- c"]


def spec_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / f"llmops.dev_{PLURAL_FILES[kind]}.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


SCHEMAS = {kind: spec_schema(kind) for kind in PLURAL_FILES}


def dotted(path: tuple) -> str:
    """('resources', 'workers') -> 'spec.resources.workers'; list indexes as [i], as the API server writes."""
    out = "spec"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


@dataclass(frozen=True)
class Node:
    path: tuple
    schema: dict[str, Any]
    required: bool  # named in its parent's `required`


def nodes(schema: dict[str, Any], path: tuple = (), required: bool = True) -> list[Node]:
    out = [Node(path, schema, required)] if path else []
    for name, sub in (schema.get("properties") or {}).items():
        out += nodes(sub, path + (name,), name in (schema.get("required") or []))
    if "items" in schema:
        out += nodes(schema["items"], path + (0,), False)
    if isinstance(schema.get("additionalProperties"), dict):
        out += nodes(schema["additionalProperties"], path + ("key1",), False)
    return out


NODES = {kind: nodes(schema) for kind, schema in SCHEMAS.items()}


# ---- values the schema allows -------------------------------------------------------------------------------------
def fill(pattern: str | None, n: int) -> str | None:
    """A string of exactly n characters that matches `pattern` (None if no simple filler does)."""
    candidates = ["a" * n, "s3://" + "a" * (n - 5), "A" * n, "1" * n, "org/" + "m" * (n - 4)]
    for c in candidates:
        if len(c) == n and (pattern is None or re.fullmatch(pattern.strip("^$"), c)):
            return c
    return None


def bounded_text(max_len: int) -> st.SearchStrategy[str]:
    free = st.text(max_size=min(max_len, 40))
    samples = st.sampled_from([s for s in UNICODE_SAMPLES if len(s) <= max_len] or [""])
    return st.one_of(free, samples)


def valid(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """A value the schema accepts (CEL rules aside): boundaries, unicode and odd-but-legal values included."""
    t = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        lo = schema.get("minimum", -(2**31))
        hi = schema.get("maximum")
        edges = [lo, lo + 1] + ([hi, hi - 1] if hi is not None else [2**31 - 1, 2**31, 2**53, 2**63 - 1])
        return st.one_of(st.sampled_from(edges), st.integers(lo, hi if hi is not None else 10**6))
    if t == "number":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        floats = st.floats(min_value=lo, max_value=hi, exclude_min=bool(schema.get("exclusiveMinimum")),
                           exclude_max=bool(schema.get("exclusiveMaximum")), allow_nan=False, allow_infinity=False)
        edges = [v for v in (lo, hi) if v is not None and not (
            (v == lo and schema.get("exclusiveMinimum")) or (v == hi and schema.get("exclusiveMaximum")))]
        return st.one_of(floats, st.sampled_from(edges)) if edges else floats
    if t == "string":
        max_len = schema.get("maxLength", 4096)
        pattern = schema.get("pattern")
        at_limit = fill(pattern, max_len)
        if pattern:
            regex = st.from_regex(pattern, fullmatch=True).filter(lambda s: len(s) <= max_len)
            return st.one_of(regex, st.just(at_limit)) if at_limit else regex
        limit = st.builds(lambda c: (c * max_len)[:max_len], st.sampled_from(["x", "é", "🙂", "名"]))
        return st.one_of(bounded_text(max_len), limit)
    if t == "array":
        lo = schema.get("minItems", 0)
        hi = min(schema.get("maxItems", 3), 3)
        return st.lists(valid(schema["items"], depth + 1), min_size=lo, max_size=max(lo, hi))
    if t == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return st.dictionaries(st.text(min_size=1, max_size=20), json_values(), max_size=4)
        if isinstance(schema.get("additionalProperties"), dict):
            return st.dictionaries(st.text(min_size=1, max_size=30), valid(schema["additionalProperties"], depth + 1),
                                   max_size=min(schema.get("maxProperties", 4), 4))
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        if depth > 3:
            return st.fixed_dictionaries({k: valid(props[k], depth + 1) for k in required})
        return st.fixed_dictionaries({k: valid(props[k], depth + 1) for k in required},
                                     optional={k: valid(v, depth + 1) for k, v in props.items() if k not in required})
    return json_values()


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=30),
                        st.floats(allow_nan=False, allow_infinity=False))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                        max_leaves=8)


# ---- mutations ----------------------------------------------------------------------------------------------------
WRONG_TYPES = {
    "integer": ["7", True, [1], {"a": 1}, 1.5],
    "number": ["0.5", False, [0.5], {"a": 1}],
    "string": [7, True, ["x"], {"a": "b"}, 1.5],
    "boolean": ["true", 1, [True], {"a": True}],
    "object": ["x", 3, [1], True],
    "array": ["x", {"a": 1}, 3],
}


@dataclass(frozen=True)
class Mutation:
    name: str
    path: tuple
    value: Any
    must_reject: bool  # certainly invalid by the schema


def mutations(node: Node) -> dict[str, st.SearchStrategy[Mutation]]:
    """The mutations that make sense at this node, by name."""
    s, t, path = node.schema, node.schema.get("type"), node.path
    out: dict[str, st.SearchStrategy[Mutation]] = {}

    def m(name: str, values: st.SearchStrategy[Any], reject: bool) -> None:
        out[name] = values.map(lambda v: Mutation(name, path, v, reject))

    if t in WRONG_TYPES and not s.get("x-kubernetes-int-or-string"):
        m("wrong-type", st.sampled_from(WRONG_TYPES[t]), True)
    if t in ("integer", "number"):
        lo, hi = s.get("minimum"), s.get("maximum")
        step = 1 if t == "integer" else 0.001
        if lo is not None:
            m("below-minimum", st.just(lo if s.get("exclusiveMinimum") else lo - step), True)
        if hi is not None:
            m("above-maximum", st.sampled_from([hi if s.get("exclusiveMaximum") else hi + step, hi * 1000 + 1]), True)
        if t == "integer":
            m("fraction-for-integer", st.sampled_from([0.5, 1.5, 2.25]), True)
            m("past-int64", st.just(2**63), True)
    if "enum" in s:
        m("unknown-enum", st.one_of(st.sampled_from(["", "unknown", "LORA", "ü"]), st.text(max_size=12))
          .filter(lambda v: v not in s["enum"]), True)
    if t == "string" and "enum" not in s:
        max_len = s.get("maxLength")
        pattern = s.get("pattern")
        if max_len:
            over = fill(pattern, max_len + 1) or "a" * (max_len + 1)
            m("one-past-maxLength", st.just(over), True)
            at = fill(pattern, max_len)
            if at:
                m("exactly-maxLength", st.just(at), False)
        if pattern:
            m("pattern-violation", valid(s).filter(lambda v: len(v) >= 2).map(lambda v: v[:1] + " " + v[1:]), True)
            m("unicode-whitespace", valid(s).filter(lambda v: len(v) >= 2 and len(v) < (max_len or 10**6))
              .map(lambda v: v[:-1] + "\u00a0" + v[-1:]), False)
        else:
            m("unicode-text", bounded_text(max_len or 4096), False)
    if t == "array" and s.get("maxItems") is not None:
        m("one-past-maxItems", st.lists(valid(s["items"], 3), min_size=s["maxItems"] + 1,
                                       max_size=s["maxItems"] + 1), True)
    if t == "object" and isinstance(s.get("additionalProperties"), dict) and s.get("maxProperties") is not None:
        n = s["maxProperties"] + 1
        m("one-past-maxProperties", st.just({f"k{i}": "v" for i in range(n)}), True)
    if t == "object" and s.get("properties"):
        out["unknown-field"] = st.sampled_from(["zzUnknown", "learningRate", "Spec", "value"]).filter(
            lambda k: k not in s["properties"]).map(lambda k: Mutation("unknown-field", path + (k,), 1, True))
    if node.required:
        m("missing-required", st.just(DROP), True)
    else:
        m("null", st.just(None), False)
    if path and path[-1] == "name" and len(path) >= 2 and path[-2] in ("fineTuneRef", "batchInferenceRef",
                                                                     "huggingFaceToken", "storage"):
        m("missing-reference", st.from_regex(r"\Amissing-[a-z0-9]{1,8}\Z"), False)
    return out


# ---- manifests ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    kind: str
    doc: dict[str, Any]
    edits: list[str] = field(default_factory=list)
    mutation: Mutation | None = None
    load_guard: bool = False  # suspended because it asked for many pods

    @property
    def label(self) -> str:
        m = self.mutation
        return f"{self.kind} {m.name} at {dotted(m.path)}" if m else f"{self.kind} (edits only)"


def get(doc: dict[str, Any], path: tuple) -> Any:
    node: Any = doc["spec"]
    for p in path:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and isinstance(p, int) and p < len(node):
            node = node[p]
        else:
            return DROP
    return node


def put(doc: dict[str, Any], path: tuple, value: Any) -> None:
    """Set (or with DROP remove) the value at path, creating missing objects and lists on the way."""
    node: Any = doc["spec"]
    for here, nxt in zip(path, path[1:]):
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(node, list):
            while len(node) <= here:
                node.append(copy.deepcopy(empty))
            if not isinstance(node[here], type(empty)):
                node[here] = empty
            node = node[here]
        else:
            if not isinstance(node.get(here), type(empty)):
                node[here] = empty
            node = node[here]
    leaf = path[-1]
    if isinstance(node, list):
        while len(node) <= leaf:
            node.append({})
        if value is DROP:
            del node[leaf]
        else:
            node[leaf] = value
    elif value is DROP:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def base(kind: str, draw) -> dict[str, Any]:
    if kind == "FineTune":
        doc = finetune("x")
    elif kind == "BatchInference":
        ref = draw(st.sampled_from([None, PRESENT["FineTune"], "missing-ft"]))
        doc = batchinference("x", fine_tune=ref)
    else:
        adapters = draw(st.sampled_from([None, "uri", "finetune", "gated", "missing"]))
        choice = {
            None: None,
            "uri": [{"name": "a1", "uri": "s3://bucket/adapters/a1"}],
            "finetune": [{"name": PRESENT["FineTune"], "fineTuneRef": {"name": PRESENT["FineTune"]}}],
            "gated": [{"name": "a1", "uri": "s3://bucket/adapters/a1",
                       "gate": {"batchInferenceRef": {"name": PRESENT["BatchInference"]}, "minimum": 0.5}}],
            "missing": [{"name": "gone", "fineTuneRef": {"name": "missing-ft"}}],
        }[adapters]
        doc = llmservice("x", choice)
    # Most manifests are suspended: they go through admission and the operator's whole reconcile (a suspended
    # RayJob still gets applied) without starting Ray clusters; the rest start real (simulated) clusters.
    doc["spec"]["suspend"] = draw(st.sampled_from([True, True, False]))
    return doc


NO_MUTATION = "none"


@st.composite
def cases(draw, mutation: str, kinds=tuple(PLURAL_FILES)) -> Case:
    """A manifest with a few schema-valid edits and one mutation of kind `mutation` (or none: NO_MUTATION).
    The caller picks the mutation kind, so that every kind gets its share of examples."""
    kind = draw(st.sampled_from([k for k in kinds if mutation == NO_MUTATION or mutation in MUTATION_TABLE[k]]))
    doc = base(kind, draw)
    case = Case(kind, doc)
    for _ in range(draw(st.integers(0, 3))):
        node = draw(st.sampled_from(NODES[kind]))
        if isinstance(node.path[-1], int) or node.path[-1] == "key1" or not _parents_optional(kind, doc, node.path):
            continue
        put(doc, node.path, draw(valid(node.schema)))
        case.edits.append(dotted(node.path))
    if mutation != NO_MUTATION:
        pool = [n for n in MUTATION_TABLE[kind][mutation]
                if mutation != "missing-required" or get(doc, n.path) is not DROP]
        if pool:
            case.mutation = draw(mutations(draw(st.sampled_from(pool)))[mutation])
            put(doc, case.mutation.path, case.mutation.value)
    guard(case)
    return case


def _mutation_table(kind: str) -> dict[str, list[Node]]:
    table: dict[str, list[Node]] = {}
    for node in NODES[kind]:
        for name in mutations(node):
            table.setdefault(name, []).append(node)
    return table


MUTATION_TABLE = {kind: _mutation_table(kind) for kind in PLURAL_FILES}
MUTATION_KINDS = sorted({name for table in MUTATION_TABLE.values() for name in table}) + [NO_MUTATION]


def _parents_optional(kind: str, doc: dict[str, Any], path: tuple) -> bool:
    """True when creating the missing parents of `path` adds no object with required fields."""
    schema = SCHEMAS[kind]
    node: Any = doc["spec"]
    for p in path[:-1]:
        schema = schema["items"] if isinstance(p, int) else (schema.get("properties") or {}).get(p) or {}
        exists = isinstance(node, dict) and p in node or isinstance(node, list) and isinstance(p, int) \
            and p < len(node)
        if not exists:
            if schema.get("required") or schema.get("type") == "array":
                return False
            node = {}
        else:
            node = node[p]
    return True


def guard(case: Case) -> None:
    """Suspend an unsuspended manifest that asks for many pods (POD_COUNT_CAPS)."""
    spec = case.doc["spec"]
    if spec.get("suspend") is not False:
        return
    for path, cap in POD_COUNT_CAPS.items():
        value = get(case.doc, path)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            spec["suspend"] = True
            case.load_guard = True
            return


def names_field(message: str, path: tuple) -> str | None:
    """The longest `spec.` prefix of `path` that the message names (None: it names none)."""
    best = None
    for i in range(1, len(path) + 1):
        prefix = dotted(path[:i])
        if prefix in message:
            best = prefix
    return best

