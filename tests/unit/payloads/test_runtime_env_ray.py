"""Ray-venv test: the runtime environment a FineTune on the stock Ray image renders (LLaMA-Factory through pip, the
setup timeout raised) is one Ray's own RuntimeEnv accepts, with the timeout where Ray reads it."""

from __future__ import annotations

import pytest
import yaml

ray = pytest.importorskip("ray")

from ray.runtime_env import RuntimeEnv  # noqa: E402

from llmops.builders.common import BuildContext  # noqa: E402
from llmops.render import render_manifests  # noqa: E402
from llmops.settings import FINETUNE_PIP_FALLBACK, STOCK_RAY_IMAGE, Settings  # noqa: E402

FINETUNE = {"apiVersion": "llmops.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "ft", "namespace": "ns"},
            "spec": {"baseModel": {"source": "Qwen/Qwen2.5-7B-Instruct"}, "template": "qwen",
                     "dataset": {"train": {"uri": "s3://b/train.jsonl"}}, "output": {"uri": "s3://b/adapters/ft"}}}


def test_the_stock_image_fallback_renders_a_runtime_env_ray_accepts():
    settings = Settings(finetune_image=STOCK_RAY_IMAGE, finetune_pip=FINETUNE_PIP_FALLBACK)
    objects, errors = render_manifests([FINETUNE], BuildContext(settings=settings, payloads={"x.py": ""}))
    assert not errors, errors
    job = next(o for o in objects if o["kind"] == "RayJob")
    env = RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    config = env.get("config")   # Ray fills in RuntimeEnvConfig around what we set
    assert config["setup_timeout_seconds"] == settings.runtime_env_setup_timeout_seconds > 600
    assert list(env.pip_config()["packages"]) == FINETUNE_PIP_FALLBACK
