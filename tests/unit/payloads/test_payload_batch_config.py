"""The job JSON -> spec -> ray.data.llm processor config, checked against Ray 2.60's own config model."""

from __future__ import annotations

import copy
import json

import pytest
from payload_testkit import PAYLOAD_DATA

from payloads import batch_inference as bi

EXAMPLE = json.loads((PAYLOAD_DATA / "viggo_job.json").read_text())


def job(**changes):
    doc = copy.deepcopy(EXAMPLE)
    for path, value in changes.items():
        node = doc
        *parents, leaf = path.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return doc


def test_example_job_parses_into_the_spec():
    spec = bi.parse_spec(EXAMPLE)
    assert spec.model_source == "Qwen/Qwen2.5-7B-Instruct"
    assert spec.adapter == bi.Adapter(name="viggo-lora", uri="s3://bucket/adapters/viggo-lora")
    assert (spec.input_uri, spec.input_format) == ("s3://bucket/viggo/test.jsonl", "jsonl")
    assert (spec.user_field, spec.system_field) == ("input", None)
    assert spec.system_prompt.startswith("Given a target sentence")
    assert spec.sampling == {"temperature": 0.0, "max_tokens": 256, "top_p": 1.0}
    assert (spec.accelerator_type, spec.concurrency, spec.batch_size) == ("L4", 1, 16)
    assert (spec.reference_field, spec.metrics) == ("output", ("exactMatch", "functionNameAccuracy", "attributeF1"))


def test_example_job_renders_exact_processor_config_kwargs():
    assert bi.processor_config_kwargs(bi.parse_spec(EXAMPLE)) == {
        "model_source": "Qwen/Qwen2.5-7B-Instruct",
        "engine_kwargs": {
            "max_model_len": 4096,
            "enable_prefix_caching": True,
            "enable_chunked_prefill": True,
            "tensor_parallel_size": 1,
            "enable_lora": True,
            "max_lora_rank": 64,
            "max_loras": 1,
            "max_num_seqs": 256,
            "max_num_batched_tokens": 8192,
        },
        "batch_size": 16,
        "max_concurrent_batches": 32,   # twice the engine's sequence slots in flight, in batches of 16
        "concurrency": 1,
        "accelerator_type": "L4",
        "chat_template_stage": True,
        "tokenize_stage": True,
        "detokenize_stage": False,
        "dynamic_lora_loading_path": "s3://bucket/adapters",
    }


def test_object_storage_adapter_is_selected_per_row_by_its_id():
    spec = bi.parse_spec(EXAMPLE)
    assert bi.lora_routing(spec) == ("viggo-lora", "s3://bucket/adapters")
    assert bi.BuildRequest(spec, ["instruction", "input", "output"]).model == "viggo-lora"
    gcs = bi.parse_spec(job(model__adapter={"name": "a", "uri": "gs://models/loras/a/"}))
    assert bi.lora_routing(gcs) == ("a", "gs://models/loras")


def test_pvc_adapter_is_selected_per_row_by_its_local_path():
    spec = bi.parse_spec(job(model__adapter={"name": "viggo-lora", "uri": "pvc://checkpoints/viggo/lora"}))
    assert bi.lora_routing(spec) == ("/mnt/llmops/pvc/checkpoints/viggo/lora", None)
    kwargs = bi.processor_config_kwargs(spec)
    assert "dynamic_lora_loading_path" not in kwargs
    assert kwargs["engine_kwargs"]["enable_lora"] is True
    assert bi.BuildRequest(spec, ["input"]).model == "/mnt/llmops/pvc/checkpoints/viggo/lora"


def test_base_model_only_has_no_lora_and_rows_name_the_base_model():
    spec = bi.parse_spec(job(model__adapter=None))
    kwargs = bi.processor_config_kwargs(spec)
    assert "dynamic_lora_loading_path" not in kwargs
    assert not {"enable_lora", "max_lora_rank", "max_loras"} & set(kwargs["engine_kwargs"])
    # The engine stage reads `model == model_source` as "no LoRA"; an input column called `model` cannot leak in.
    assert bi.BuildRequest(spec, ["model", "input"]).model == "Qwen/Qwen2.5-7B-Instruct"


def test_max_lora_rank_from_engine_kwargs_wins():
    spec = bi.parse_spec(job(engineKwargs={"max_lora_rank": 8}))
    assert bi.engine_kwargs(spec) == {"max_lora_rank": 8, "enable_lora": True, "max_loras": 1}


def test_pvc_model_source_becomes_a_local_path():
    spec = bi.parse_spec(job(model__source="pvc://models/qwen2.5-7b"))
    assert bi.processor_config_kwargs(spec)["model_source"] == "/mnt/llmops/pvc/models/qwen2.5-7b"


@pytest.mark.parametrize("seqs, batch_size, batches", [(256, 16, 32), (1024, 64, 32), (0, 16, 8), (128, 64, 8),
                                                       (1000, 48, 42)])
def test_engine_actor_keeps_twice_its_sequence_slots_in_flight(seqs, batch_size, batches):
    assert bi.max_concurrent_batches({"max_num_seqs": seqs} if seqs else {}, batch_size) == batches


def test_ray_accepts_the_rendered_config_on_cpu():
    pytest.importorskip("ray.data.llm", reason="the payload tests run in the Ray venv (.venv-ray)")
    from pydantic import ValidationError
    from ray.data.llm import vLLMEngineProcessorConfig

    config = bi.build_processor_config(bi.parse_spec(EXAMPLE))
    assert isinstance(config, vLLMEngineProcessorConfig)
    assert config.dynamic_lora_loading_path == "s3://bucket/adapters"
    assert (config.chat_template_stage, config.tokenize_stage, config.detokenize_stage) == (True, True, False)
    assert config.engine_kwargs["enable_prefix_caching"] is True
    assert config.accelerator_type == "L4" and config.batch_size == 16 and config.max_concurrent_batches == 32
    # The check above means something only because Ray rejects fields it does not know (e.g. the deprecated
    # `apply_chat_template` switch).
    with pytest.raises(ValidationError):
        vLLMEngineProcessorConfig(**bi.processor_config_kwargs(bi.parse_spec(EXAMPLE)), apply_chat_template=True)


def test_preprocess_builds_messages_sampling_and_model():
    spec = bi.parse_spec(EXAMPLE)
    columns = ["instruction", "input", "output"]
    row = {bi.carried(c, columns): f"value of {c}" for c in columns}
    out = bi.BuildRequest(spec, columns)(row)
    assert out == {
        "messages": [
            {"role": "system", "content": spec.system_prompt},
            {"role": "user", "content": "value of input"},
        ],
        "sampling_params": {"temperature": 0.0, "max_tokens": 256, "top_p": 1.0},
        "model": "viggo-lora",
    }


def test_preprocess_takes_the_system_message_from_a_field():
    spec = bi.parse_spec(job(prompt={"systemPrompt": None, "systemField": "instruction", "userField": "input"}))
    columns = ["instruction", "input"]
    out = bi.BuildRequest(spec, columns)({bi.carried("instruction", columns): "sys", bi.carried("input", columns): 7})
    assert out["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "7"}]


def test_preprocess_rejects_a_row_without_the_user_field():
    spec = bi.parse_spec(EXAMPLE)
    with pytest.raises(bi.PayloadError, match="no value for field 'input' named by spec.prompt.userField"):
        bi.BuildRequest(spec, ["input"])({bi.carried("input", ["input"]): None})


def test_postprocess_restores_original_column_names():
    columns = ["prompt", "model", "output"]  # names that ray.data.llm's stages also write
    row = {bi.carried(c, columns): f"original {c}" for c in columns}
    row.update(prompt="<templated>", model="viggo-lora", generated_text="inform(name[X])", num_input_tokens=12,
               num_generated_tokens=5, messages=[], sampling_params={})
    assert bi.CollectOutput(columns)(row) == {
        "prompt": "original prompt",
        "model": "original model",
        "output": "original output",
        "generated_text": "inform(name[X])",
        "num_input_tokens": 12,
        "num_generated_tokens": 5,
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prompt__systemField": "instruction"}, "systemPrompt and spec.prompt.systemField are mutually exclusive"),
        ({"prompt__userField": None}, "job config has no spec.prompt.userField"),
        ({"input__format": "xlsx"}, "spec.input.format is 'xlsx'"),
        ({"output__format": None}, "job config has no spec.output.format"),
        ({"sampling__bestOf": 2}, "spec.sampling has unknown fields ['bestOf']"),
        ({"evaluation__metrics": ["bleu"]}, "spec.evaluation.metrics has unknown metrics ['bleu']"),
        ({"evaluation__referenceField": ""}, "job config has no spec.evaluation.referenceField"),
        ({"model__adapter": {"name": "x"}}, "job config has no spec.model.adapter.uri"),
    ],
)
def test_invalid_jobs_are_rejected_with_the_field_named(changes, message):
    with pytest.raises(bi.PayloadError) as error:
        bi.processor_config_kwargs(bi.parse_spec(job(**changes)))
    assert message in str(error.value)


def test_evaluation_may_be_null():
    spec = bi.parse_spec(job(evaluation=None))
    assert (spec.reference_field, spec.metrics) == (None, ())


@pytest.mark.parametrize(
    "input_uri, output_uri, message",
    [
        ("pvc://data/viggo", "pvc://data/viggo/out", "overlap"),
        ("pvc://data/viggo/out/test.jsonl", "pvc://data/viggo/out", "overlap"),
        ("s3://b/viggo/test.jsonl", "s3://b", "must name a directory below the bucket or claim root"),
        ("ftp://b/test.jsonl", "s3://b/out", "spec.input.uri: 'ftp://b/test.jsonl' has unsupported scheme"),
        ("s3://b/test.jsonl", "pvc://Bad_Claim/out", "spec.output.uri: 'pvc://Bad_Claim/out'"),
    ],
)
def test_unsafe_or_invalid_locations_are_rejected(input_uri, output_uri, message):
    spec = bi.parse_spec(job(input__uri=input_uri, output__uri=output_uri))
    with pytest.raises(bi.PayloadError, match=message):
        bi.check_locations(spec)


def test_sibling_prefixes_do_not_overlap():
    spec = bi.parse_spec(job(input__uri="s3://b/viggo/test", output__uri="s3://b/viggo/test-out"))
    source, target = bi.check_locations(spec)
    assert (source.uri, target.uri) == ("s3://b/viggo/test", "s3://b/viggo/test-out")


def test_missing_columns_are_named_with_the_fields_present():
    spec = bi.parse_spec(job(prompt__userField="text"))
    with pytest.raises(bi.PayloadError) as error:
        bi.check_columns(spec, ["instruction", "input", "output"])
    assert str(error.value) == (
        "input row has no field 'text' named by spec.prompt.userField; fields present: instruction, input, output"
    )
    with pytest.raises(bi.PayloadError, match="input has column.*'generated_text'.*rename"):
        bi.check_columns(bi.parse_spec(EXAMPLE), ["input", "output", "generated_text"])


def test_failure_message_finds_a_payload_error_raised_in_a_ray_worker():
    # What the driver gets from Ray Data when a UDF raises: only text, the exception chain stays in the worker.
    worker_text = (
        "ray::MapWorker(Map(_preprocess)).submit() (pid=1, ip=10.0.0.1)\n"
        '  File "/opt/llmops/payloads/batch_inference.py", line 239, in _value\n'
        "payloads.batch_inference.PayloadError: an input row has no value for field 'input' named by "
        "spec.prompt.userField\n\nThe above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    assert bi.failure_message(RuntimeError(worker_text)) == (
        "an input row has no value for field 'input' named by spec.prompt.userField"
    )
    engine_text = worker_text.replace(
        "payloads.batch_inference.PayloadError: an input row", "torch.OutOfMemoryError: CUDA out of memory. row"
    )
    assert bi.failure_message(RuntimeError(engine_text)).startswith(
        "batch inference failed: torch.OutOfMemoryError: CUDA out of memory."
    )
    assert bi.failure_message(bi.PayloadError("plain")) == "plain"
    assert bi.failure_message(KeyError("x")) == "batch inference failed: KeyError: 'x'"
