"""Session fixtures: the real local control plane (built from source) and the operator process."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from llmops.dev.install import install_crds
from llmops.dev.nodes import Pool
from llmops.dev.plane import LocalPlane

from gitops import SnapshotContract
from integration.harness import Cluster, OperatorProcess


@pytest.fixture(scope="session")
def plane():
    """etcd + kube-apiserver + controller-manager + scheduler + kwok + KubeRay, for the whole session."""
    root = Path(tempfile.mkdtemp(prefix="llmops-plane-"))
    # A larger simulated L4 pool than the demo's: many tests run jobs side by side in one session.
    plane = LocalPlane(root, pools=(Pool("cpu", 1, cpu="64", memory="256Gi"),
                                    Pool("l4", 8, cpu="48", memory="192Gi", gpus=4, gpu_product="NVIDIA-L4")))
    plane.start()  # raises with the build command when binaries are missing
    install_crds(plane)
    yield plane
    plane.stop()
    # etcd's data and the logs are worth keeping only when asked for: CI machines run many sessions.
    if not os.environ.get("LLMOPS_KEEP_PLANE"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(plane) -> Cluster:
    """Every status a test reads through it is also checked against docs/gitops.md with kstatus and Argo CD."""
    return Cluster(plane.kubeconfig, SnapshotContract())


@pytest.fixture(scope="session")
def operator(plane, tmp_path_factory):
    """One operator process shared by the tests that do not restart it."""
    proc = OperatorProcess(plane, tmp_path_factory.mktemp("operator") / "operator.log").start()
    yield proc
    proc.stop()
    if os.environ.get("LLMOPS_SHOW_OPERATOR_LOG"):
        print(proc.log())


@pytest.fixture()
def alone(operator):
    """The shared operator watches every namespace: paused for a test whose own operators must act alone."""
    operator.stop()
    yield
    operator.start()


@pytest.fixture()
def ns(cluster):
    """A fresh namespace; deleted afterwards so the simulated GPU pool is free for the next test."""
    name = cluster.namespace()
    yield name
    cluster.core.delete_namespace(name)
