"""Reliability and security tests on the real local plane.

The plane and the Kubernetes client are the integration fixtures. Operators are NOT the shared session operator:
every test starts (and kills, and restarts) its own `llmops run` processes, each watching only the test's
namespace (`-n NS`), so a test owns everything that reconciles its resources and kills cannot leak into other
tests. Counts (kills survived, manifests tried, duplicates, leaks) are printed at the end of the run and written
to a JSON file (LLMOPS_RELIABILITY_JSON, default <tmp>/llmops-reliability/counts.json).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from integration.conftest import cluster, plane  # noqa: F401  (session fixtures, reused as they are)
from llmops.dev import nodes
from reliability.control import Operators

COUNTS: dict[str, dict[str, Any]] = {}


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="reliability: run the long variants (also: LLMOPS_LONG=1)")


def is_long(config) -> bool:
    return os.environ.get("LLMOPS_LONG") == "1" or bool(config.getoption("--long", default=False))


@pytest.fixture(scope="session")
def long_run(request) -> bool:
    return is_long(request.config)


# ---- counts the lead can quote --------------------------------------------------------------------------------
def counts_path() -> Path:
    return Path(os.environ.get("LLMOPS_RELIABILITY_JSON",
                               Path(tempfile.gettempdir()) / "llmops-reliability" / "counts.json"))


@pytest.fixture()
def record(request):
    """record(key=value, ...): counts for this test, printed and written to the JSON report."""
    entry = COUNTS.setdefault(request.node.name, {})

    def add(**values: Any) -> None:
        entry.update(values)
        print(f"[reliability] {request.node.name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)
        path = counts_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(COUNTS, indent=2, sort_keys=True, default=str))
    return add


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.section("reliability counts")
    for test, values in COUNTS.items():
        terminalreporter.write_line(f"{test}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    terminalreporter.write_line(f"(written to {counts_path()})")


# ---- namespaces and capacity ------------------------------------------------------------------------------------
@pytest.fixture()
def ns(cluster):  # noqa: F811
    """A fresh namespace, deleted (in the background) once the test's operators are gone."""
    name = cluster.namespace("rel")
    yield name
    try:
        cluster.core.delete_namespace(name)
    except ApiException:
        pass


@pytest.fixture(scope="session")
def capacity(plane):  # noqa: F811
    """Room for dozens of Ray clusters at once: 4 CPU nodes for the heads (2 CPUs each) and 8 x 4 L4 GPUs for the
    workers (more than the demo's pools; a no-op for the nodes the session's plane already has)."""
    nodes.register_pools(plane, (nodes.Pool("cpu", 4, cpu="64", memory="256Gi"),
                                 nodes.Pool("l4", 8, cpu="48", memory="192Gi", gpus=4, gpu_product="NVIDIA-L4")))
    return {"cpu_nodes": 4, "l4_gpus": 32}


# ---- operators ----------------------------------------------------------------------------------------------
@pytest.fixture()
def operators(plane, ns, tmp_path):  # noqa: F811  (ns: the operators stop before it goes)
    ops = Operators(plane, tmp_path)
    yield ops
    ops.stop_all()
    if os.environ.get("LLMOPS_SHOW_OPERATOR_LOG"):
        print(ops.logs())
