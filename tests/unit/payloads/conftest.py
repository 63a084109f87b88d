"""Fixtures for the payload tests: a local Ray (CPU, once per session) and a fake ConfigMap endpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_OPERATOR_DIR = _HERE.parents[2] / "operator"

# The payload package, the fake engine stage and the helpers must be importable here and in Ray's worker
# processes, which inherit the environment of the process that starts Ray.
sys.path[:0] = [str(_OPERATOR_DIR), str(_HERE)]
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(_OPERATOR_DIR), str(_HERE), os.environ.get("PYTHONPATH", "")) if p
)

from payload_testkit import TOKEN, FakeConfigMapAPI  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=300 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "sa" / "token"
    path.parent.mkdir()
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def configmap_api():
    api = FakeConfigMapAPI("ml", "viggo-eval-result", TOKEN).start()
    yield api
    api.stop()


@pytest.fixture
def reporter_env(monkeypatch, configmap_api, token_file):
    """The environment the operator gives the driver pod, pointed at the fake API server."""
    monkeypatch.setenv("LLMOPS_RESULT_CONFIGMAP", "viggo-eval-result")
    monkeypatch.setenv("LLMOPS_NAMESPACE", "ml")
    monkeypatch.setenv("LLMOPS_KUBE_API_URL", configmap_api.url)
    monkeypatch.setenv("LLMOPS_SA_TOKEN_PATH", str(token_file))
    return configmap_api
