"""The vLLM engine arguments `llmops render` shows in a BatchInference's job.json are exactly those the payload hands
vLLM: the operator renders the LoRA arguments (at the FineTune's own rank), and the payload adds nothing to them."""

from __future__ import annotations

import json

import pytest
import yaml
from payload_testkit import PAYLOAD_DATA

from llmops.builders.common import BuildContext
from llmops.render import render_manifests
from llmops.settings import Settings
from payloads import batch_inference as bi

EXAMPLES = PAYLOAD_DATA.parents[1] / "examples" / "viggo"


def rendered_job(rank: int) -> dict:
    ft = yaml.safe_load((EXAMPLES / "finetune.yaml").read_text())
    ft["spec"]["method"]["rank"] = rank
    docs = [ft, yaml.safe_load((EXAMPLES / "batchinference.yaml").read_text())]
    objects, errors = render_manifests(docs, BuildContext(settings=Settings(), payloads={"x.py": ""}))
    assert not errors, errors
    config = next(o for o in objects if o["metadata"]["name"] == "viggo-eval-bi-config")
    return json.loads(config["data"]["job.json"])


@pytest.mark.parametrize("rank, max_lora_rank", [(8, 8), (32, 32), (12, 16)])
def test_the_engine_gets_exactly_the_rendered_engine_args(rank, max_lora_rank):
    job = rendered_job(rank)
    spec = bi.parse_spec(job)
    assert bi.engine_kwargs(spec) == job["engineKwargs"]
    assert bi.processor_config_kwargs(spec)["engine_kwargs"]["max_lora_rank"] == max_lora_rank
