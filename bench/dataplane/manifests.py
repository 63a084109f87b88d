"""The resources the GPU data-plane run applies, as a user would write them, pointed at the run's S3 bucket.

They differ from examples/viggo/ only where the machine differs: the small model and the task's files in the
run's bucket, the machine's one GPU (H100 or H200) instead of L4s, and the attention backend vLLM gets (the carried vLLM has no FlashAttention
library, too large to carry; FACTS.md) through the engine's `extraEngineArgs`.
"""

from __future__ import annotations

from typing import Any

BUCKET = "llmops-bench"
MODEL_URI = f"s3://{BUCKET}/models/tiny-qwen"
TRAIN_URI, VALIDATION_URI, TEST_URI = (f"s3://{BUCKET}/viggo/{name}.jsonl" for name in ("train", "val", "test"))
ADAPTERS = f"s3://{BUCKET}/adapters"
ADAPTER_NAME = "viggo"
MODEL_ID = "tiny-qwen"
SERVICE = "viggo-serve"
ZERO_SERVICE = "viggo-zero"   # the LLMService that scales to zero (bench/dataplane/coldstart.py)
ZERO_DELAY_S = 60   # its scaleToZeroDelaySeconds: short, so that the run waits little for the replica to stop
ACCELERATORS = ("H100", "H200")   # rendered for each: the GPU machine is either; the run picks its own
ACCELERATOR = "H200"
STORAGE_SECRET = "s3-credentials"
# vLLM engine arguments the run adds to every engine (batch, serve and bare vLLM alike).
ENGINE_ARGS = {"attention_config": {"backend": "TRITON_ATTN"}}
MAX_MODEL_LEN = 1024
MAX_TOKENS = 64
API = "llmops.dev/v1alpha1"


def _resource(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def _resources() -> dict[str, Any]:
    return {"workers": 1, "gpusPerWorker": 1, "accelerator": ACCELERATOR}


def finetune(epochs: float, learning_rate: float, rank: int) -> dict[str, Any]:
    return _resource("FineTune", ADAPTER_NAME, {
        "baseModel": {"source": MODEL_URI},
        "template": "qwen",
        "method": {"type": "lora", "rank": rank, "target": "all"},
        # The instruction is each row's system message, as the evaluation and the service send it.
        "dataset": {"train": {"uri": TRAIN_URI}, "validation": {"uri": VALIDATION_URI},
                    "columns": {"system": "instruction", "prompt": "input", "response": "output"},
                    "cutoffLen": 512},
        "training": {"epochs": epochs, "learningRate": learning_rate, "loggingSteps": 5, "saveSteps": 100},
        "resources": _resources(),
        "output": {"uri": f"{ADAPTERS}/{ADAPTER_NAME}"},
        "secrets": {"storage": {"name": STORAGE_SECRET}},
    })


def batch_inference(name: str, with_adapter: bool) -> dict[str, Any]:
    model = {"fineTuneRef": {"name": ADAPTER_NAME}} if with_adapter else {"source": MODEL_URI}
    return _resource("BatchInference", name, {
        "model": model,
        "input": {"uri": TEST_URI, "format": "jsonl"},
        "prompt": {"systemField": "instruction", "userField": "input"},
        "sampling": {"temperature": 0.0, "maxTokens": MAX_TOKENS},
        "engine": {"maxModelLen": MAX_MODEL_LEN, "extraEngineArgs": ENGINE_ARGS},
        "concurrency": 1,
        "batchSize": 64,
        "resources": _resources(),
        "output": {"uri": f"s3://{BUCKET}/outputs/{name}", "format": "jsonl"},
        "evaluation": {"referenceField": "output", "metrics": ["exactMatch", "functionNameAccuracy", "attributeF1"]},
        "secrets": {"storage": {"name": STORAGE_SECRET}},
    })


def llm_service(rank: int) -> dict[str, Any]:
    return _resource("LLMService", SERVICE, {
        "modelId": MODEL_ID,
        "model": {"source": MODEL_URI},
        "adapters": [{"name": ADAPTER_NAME, "fineTuneRef": {"name": ADAPTER_NAME}}],
        "lora": {"maxAdaptersPerReplica": 2, "maxRank": rank},
        "engine": {"maxModelLen": MAX_MODEL_LEN, "extraEngineArgs": ENGINE_ARGS},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 1, "targetOngoingRequests": 64},
        "resources": _resources(),
        "secrets": {"storage": {"name": STORAGE_SECRET}},
    })


def llm_service_zero() -> dict[str, Any]:
    """The base model alone, with minReplicas 0: Serve starts no replica until a request comes."""
    return _resource("LLMService", ZERO_SERVICE, {
        "modelId": MODEL_ID,
        "model": {"source": MODEL_URI},
        "engine": {"maxModelLen": MAX_MODEL_LEN, "extraEngineArgs": ENGINE_ARGS},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroDelaySeconds": ZERO_DELAY_S},
        "resources": _resources(),
        "secrets": {"storage": {"name": STORAGE_SECRET}},
    })


# ---- routing (bench/dataplane/routing.py) -----------------------------------------------------------------------
ROUTE_MODEL_ID = "route-qwen"
ROUTE_MODEL_URI = f"s3://{BUCKET}/models/{ROUTE_MODEL_ID}"
ROUTE_MAX_MODEL_LEN = 2048
ROUTE_KV_BLOCKS = 450   # per replica: room for about 5 of the workload's 8 long prompts (16 tokens a block)
ROUTE_GPU_MEMORY = 0.35   # two replicas share the machine's one GPU


def llm_service_routing(routing: str) -> dict[str, Any]:
    """Two replicas of a larger random model, each with a KV cache too small for every long prompt at once."""
    return _resource("LLMService", f"route-{routing.lower()}", {
        "modelId": ROUTE_MODEL_ID,
        "model": {"source": ROUTE_MODEL_URI},
        "engine": {"maxModelLen": ROUTE_MAX_MODEL_LEN, "gpuMemoryUtilization": ROUTE_GPU_MEMORY,
                   "extraEngineArgs": {**ENGINE_ARGS, "num_gpu_blocks_override": ROUTE_KV_BLOCKS}},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 2, "targetOngoingRequests": 16},
        "routing": routing,
        "resources": _resources(),
        "secrets": {"storage": {"name": STORAGE_SECRET}},
    })
