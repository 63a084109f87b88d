"""docs/gitops.md's table, row by row, against the real clients: kstatus' own code and Argo CD's Lua runtime
(tools/gitops-health), fed every status the operator writes (status.WRITTEN, through its own condition code)."""

from __future__ import annotations

import copy
import subprocess
import tempfile
from typing import Any

import pytest

from gitops import DELETING, UNOBSERVED, classify, documented_rows, gitops_health, mismatches, read
from llmops.api import API_VERSION
from llmops.status import WRITTEN, Verdict, conditions_for

NOW = "2026-11-25T12:00:00Z"
ROWS = documented_rows()


def written(kind: str, phase: str, state: str, reason: str, generation: int = 1) -> dict[str, Any]:
    """A resource with the status the operator writes for this verdict (as engine._write_status builds it)."""
    verdict = Verdict(phase, state, reason, f"what {reason} means and what to do")
    return {"apiVersion": API_VERSION, "kind": kind,
            "metadata": {"name": f"{kind.lower()}-{reason.lower()}", "namespace": "ns", "generation": generation},
            "spec": {},
            "status": {"phase": phase, "observedGeneration": generation, "message": verdict.message,
                       "conditions": conditions_for(verdict, generation, None, NOW)}}


EVERY_WRITTEN = [(kind, w) for w in WRITTEN for kind in w.kinds]


def test_every_written_status_reads_as_its_row_says():
    objects = [written(kind, w.phase, w.state, w.reason) for kind, w in EVERY_WRITTEN]
    problems = mismatches(ROWS, objects)
    assert not problems, "\n".join(problems)


def test_every_row_is_written_and_names_only_written_reasons():
    """No row the operator cannot produce, no reason in a row that the operator never writes there."""
    for row in ROWS:
        if row.state in (UNOBSERVED, DELETING):
            continue
        produced = {w.reason for _, w in EVERY_WRITTEN if row.covers(w.state, w.phase, w.reason)}
        assert produced, f"{row}: no status in WRITTEN"
        assert row.reasons <= produced, f"{row} names reasons the operator does not write there: " \
                                        f"{sorted(row.reasons - produced)}"


@pytest.mark.parametrize("kind", ["FineTune", "BatchInference", "LLMService"])
def test_not_yet_seen_stale_and_deleting_read_as_documented(kind):
    # As the API server returns a new resource: the CRD defaults status.observedGeneration to 0.
    fresh = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "new", "generation": 1}, "spec": {},
             "status": {"observedGeneration": 0}}
    # A Succeeded (or Ready) status for generation 1 says nothing about generation 2's spec.
    done = written(kind, "Ready" if kind == "LLMService" else "Succeeded", "ready",
                   "Serving" if kind == "LLMService" else "Succeeded")
    stale = copy.deepcopy(done)
    stale["metadata"]["generation"] = 2
    deleting = copy.deepcopy(done)
    deleting["metadata"]["deletionTimestamp"] = NOW
    objects = [fresh, stale, deleting]
    assert [classify(o)[0] for o in objects] == [UNOBSERVED, UNOBSERVED, DELETING]
    problems = mismatches(ROWS, objects)
    assert not problems, "\n".join(problems)


def test_the_clients_disagree_where_a_status_is_wrong():
    """The contract can fail: the old Suspended status (Ready=False) reads InProgress to kstatus, and a status
    without the CRD's default would read Current before the operator saw it. Conditions older than the status
    (which the operator never writes: one apply writes them all) match no row."""
    suspended = written("FineTune", "Suspended", "suspended", "Suspended")
    old = copy.deepcopy(suspended)
    old["status"]["conditions"][0]["type"] = "Ready"
    old["status"]["conditions"][0]["status"] = "False"
    bare = {"apiVersion": API_VERSION, "kind": "FineTune", "metadata": {"name": "bare", "generation": 1}, "spec": {}}
    readings = read([suspended, old, bare])
    assert [r["kstatus"]["status"] for r in readings] == ["Current", "InProgress", "Current"]
    assert [r["argocd"]["status"] for r in readings] == ["Suspended", "Suspended", "Progressing"]
    assert mismatches(ROWS, [old]), "an InProgress Suspended resource must break the contract"
    lagging = written("FineTune", "Failed", "stalled", "InvalidSpec", generation=3)
    for condition in lagging["status"]["conditions"]:
        condition["observedGeneration"] = 2
    assert read([lagging])[0]["kstatus"]["status"] == "Failed"   # kstatus reads only status.observedGeneration
    assert mismatches(ROWS, [lagging])


def test_argo_cd_runtime_has_no_string_library():
    """The real runtime opens only base, table, package and a safe os: a script calling string.* fails there
    (the Python Lua runtime of test_argocd_health.py has every library)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write('return {status = "Healthy", message = string.format("%d", 1)}')
        script.flush()
        out = subprocess.run([str(gitops_health()), "eval", "--lua", script.name], text=True, capture_output=True,
                             input='{"apiVersion": "v1", "kind": "X", "metadata": {"name": "x"}}', check=True)
    assert '"status":"Unknown"' in out.stdout and "string" in out.stdout, out.stdout

