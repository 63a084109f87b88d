"""The GitOps contract: how kstatus and Argo CD read our resources, as docs/gitops.md's table says, checked with
the clients' own code (`tools/gitops-health`: kstatus' `status.Compute` and gopher-lua running the shipped health
script the way Argo CD runs it)."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llmops.dev.plane import bin_dir

REPO = Path(__file__).resolve().parents[1]
GITOPS_DOC = REPO / "docs" / "gitops.md"
HEALTH_LUA = REPO / "charts" / "llmops-operator" / "argocd" / "health.lua"
TABLE_HEADER = "| Argo CD | kstatus | conditions | phase | reasons |"
UNOBSERVED, DELETING = "unobserved", "deleting"
STATES = {"Reconciling": "progressing", "Stalled": "stalled", "Ready": "ready", "Suspended": "suspended"}


def gitops_health() -> Path:
    binary = bin_dir() / "gitops-health"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: run tools/setup.sh (python tools/controlplane/build.py builds it)")
    return binary


def read(objects: list[dict[str, Any]]) -> list[dict[str, dict[str, str]]]:
    """Each object as kstatus and Argo CD read it: [{"kstatus": {status, message}, "argocd": {...}}, ...]."""
    if not objects:
        return []
    result = subprocess.run([str(gitops_health()), "eval", "--lua", str(HEALTH_LUA)], text=True,
                            input="".join(json.dumps(o) + "\n" for o in objects), capture_output=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"gitops-health failed ({result.returncode}): {result.stderr}")
    readings = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(readings) == len(objects), result.stdout
    return readings


# ---- the documented table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    line: int
    argocd: str
    kstatus: str
    state: str              # progressing | stalled | ready | suspended | unobserved | deleting
    phase: str              # a phase, or "any"
    reasons: frozenset[str]   # empty: any

    def covers(self, state: str, phase: str, reason: str) -> bool:
        return self.state == state and self.phase in ("any", phase) and (not self.reasons or reason in self.reasons)

    def __str__(self) -> str:
        return f"docs/gitops.md:{self.line} ({self.argocd} / {self.kstatus}: {self.state} {self.phase})"


def documented_rows(path: Path = GITOPS_DOC) -> list[Row]:
    lines = path.read_text().splitlines()
    start = lines.index(TABLE_HEADER)
    rows = []
    for number, line in enumerate(lines[start + 2:], start=start + 3):
        if not line.startswith("|"):
            break
        argocd, kstatus, conditions, phase, reasons = (cell.strip() for cell in line.strip("|").split("|"))
        if "not written yet" in conditions:
            state = UNOBSERVED
        elif "being deleted" in conditions:
            state = DELETING
        else:
            named = re.findall(r"`(\w+)=True`", conditions)
            assert len(named) == 1 and named[0] in STATES, f"line {number}: which condition is True? {conditions}"
            state = STATES[named[0]]
        names = frozenset(n for n in re.findall(r"`([^`]+)`", reasons) if re.fullmatch(r"[A-Z][A-Za-z]+", n))
        assert names or reasons == "any", f"line {number}: no reasons in {reasons!r}"
        rows.append(Row(number, argocd, kstatus, state, phase, names))
    return rows


# ---- what an object says ----------------------------------------------------------------------------------------
def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def classify(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(state, phase, reason) as the table knows them."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return DELETING, "any", ""
    generation = meta.get("generation", 1)
    conditions = status.get("conditions") or []
    if status.get("observedGeneration", 0) < generation:
        return UNOBSERVED, "any", ""
    if not conditions or any(c.get("observedGeneration") != generation for c in conditions):
        return "conditions-not-current", status.get("phase", ""), ""   # the operator writes them together

    true = [c for c in conditions if c.get("status") == "True" and c.get("type") in STATES]
    if len(true) != 1:   # not a status the operator writes: no row can match it
        return f"{'+'.join(c['type'] for c in true) or 'none'}=True", status.get("phase", ""), ""
    return STATES[true[0]["type"]], status.get("phase", ""), true[0].get("reason", "")


def rows_for(rows: list[Row], obj: dict[str, Any]) -> list[Row]:
    return [r for r in rows if r.covers(*classify(obj))]


def mismatches(rows: list[Row], objects: list[dict[str, Any]]) -> list[str]:
    """Where the real clients read an object otherwise than its documented row says (empty: none)."""
    found = []
    for obj, reading in zip(objects, read(objects)):
        matching = rows_for(rows, obj)
        if len(matching) != 1:
            found.append(f"{obj['kind']} {obj['metadata'].get('name')} ({' '.join(classify(obj))}): "
                         f"docs/gitops.md has {len(matching)} rows for it {[str(r) for r in matching]}")
            continue
        row = matching[0]
        got = (reading["argocd"]["status"], reading["kstatus"]["status"])
        if got != (row.argocd, row.kstatus):
            found.append(f"{obj['kind']} {obj['metadata'].get('name')} ({' '.join(classify(obj))}): Argo CD "
                         f"{got[0]} ({reading['argocd']['message']}), kstatus {got[1]} "
                         f"({reading['kstatus']['message']}); {row} says {row.argocd} / {row.kstatus}")
        if row.state not in (UNOBSERVED, DELETING):
            status = obj["status"]
            reason = classify(obj)[2]
            message = next(c for c in status["conditions"] if c.get("reason") == reason).get("message", "")
            wanted = f"{status.get('phase')} ({reason})" + (f": {message}" if message else "")
            if reading["argocd"]["message"] != wanted:
                found.append(f"{obj['kind']} {obj['metadata'].get('name')}: Argo CD's message is "
                             f"{reading['argocd']['message']!r}, not {wanted!r}")
    return found


class SnapshotContract:
    """Checks each distinct status seen on the plane against the table once (the first time it is seen)."""

    def __init__(self) -> None:
        self.rows = documented_rows()
        self.seen: dict[tuple, str] = {}

    @staticmethod
    def signature(obj: dict[str, Any]) -> tuple:
        conditions = tuple(sorted((c.get("type"), c.get("status"), c.get("reason"))
                                  for c in (obj.get("status") or {}).get("conditions") or []))
        return (obj.get("kind"), *classify(obj), conditions)

    def check(self, objects: Iterable[dict[str, Any]]) -> None:
        new = {}
        for obj in objects:
            if obj and obj.get("kind"):
                new.setdefault(self.signature(obj), obj)
        new = {k: v for k, v in new.items() if k not in self.seen}
        if not new:
            return
        problems = mismatches(self.rows, list(new.values()))
        for key, obj in new.items():
            self.seen[key] = obj["metadata"].get("name", "")
        assert not problems, "a status read from the plane is not what docs/gitops.md says:\n" + "\n".join(problems)
