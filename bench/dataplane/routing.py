"""Prefix-aware routing against Ray Serve's default router, on the machine's one GPU.

Where it pays: many long prompts (system prompts, documents, adapters' instructions) and a KV cache per replica too
small to hold them all. The default router spreads every prompt over every replica, so each replica's cache churns
through all of them and prefills them again; `routing: prefixAffinity` (Ray Serve LLM's PrefixCacheAffinityRouter)
sends a prompt to the replica that served its prefix, so each replica holds about half of them.

The workload: 8 long system prompts (about 1,500 tokens each) with short questions, in random order, at 16
streams, 16 output tokens each. The model: Qwen2.5-0.5B's shape with random weights (the task's tokenizer), so a
prefill costs what it costs on a real small model. Two replicas share the GPU: Ray is told of two GPUs on the one
device (`ray start --num-gpus=2` with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES, so both see it), each vLLM
takes a share of its memory and a KV cache capped at ROUTE_KV_BLOCKS (`num_gpu_blocks_override`): room for about
five of the eight prompts. The two LLMServices differ only in spec.routing and are rendered by the operator.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from . import load, manifests as m, raycluster as rc

SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2}   # Qwen2.5-0.5B's
PROMPTS, PROMPT_WORDS, QUESTIONS_PER_PROMPT = 8, 1500, 48
CONCURRENCY, MAX_TOKENS = 16, 16
URL = "http://127.0.0.1:8000/v1"
SHARED_GPU_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


def workload(rows: list[dict], seed: int = 0) -> list[list[dict]]:
    """The chat requests, shuffled: each of PROMPTS long system prompts with QUESTIONS_PER_PROMPT short questions."""
    rng = random.Random(seed)
    words = sorted({w for r in rows for w in r["input"].rstrip(".?!").split()})
    prompts = [" ".join(rng.choice(words) for _ in range(PROMPT_WORDS)) for _ in range(PROMPTS)]
    requests = [[{"role": "system", "content": prompt}, {"role": "user", "content": rows[i * PROMPTS + p]["input"]}]
                for p, prompt in enumerate(prompts) for i in range(QUESTIONS_PER_PROMPT)]
    rng.shuffle(requests)
    return requests


def build_model(run: Any) -> dict[str, Any]:
    """The random model of SHAPE with the task's tokenizer, in the bucket beside the small one."""
    prefix = m.ROUTE_MODEL_URI.split(f"{m.BUCKET}/", 1)[1]
    if run.s3.keys(prefix + "/"):
        return run.results.get("routing", {}).get("model") or {}
    tokenizer_dir = run.download(m.MODEL_URI.split(f"{m.BUCKET}/", 1)[1] + "/", run.work / "model-from-s3")
    target = run.work / "route-model"
    done = run.python(["finetune"], "-m", "dataplane.routing", str(tokenizer_dir), str(target), timeout=300)
    if done.returncode:
        raise RuntimeError(f"building the routing model failed:\n{done.stderr[-4000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    info["files"] = run.s3.upload_tree(target, prefix)
    return info


def serve_once(run: Any, routing: str, requests: list[list[dict]]) -> dict[str, Any]:
    service = rc.find(run.rendered, "RayService", f"route-{routing.lower()}-llm")
    cluster = run.cluster(service, ["serve"], run.work / "route-result.json")
    cluster.num_gpus = 2
    cluster.env.update(SHARED_GPU_ENV)
    cluster.start(service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"])
    section: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        cluster.deploy_serve(service["spec"]["serveConfigV2"])
        running, status = cluster.wait_serve_running(timeout=420)
        section.update(running=running, deploy_s=round(time.perf_counter() - t0, 1))
        if running:
            # Compiles and warms each replica on short prompts only: the long ones start cold for both routers.
            load.measure(URL, m.ROUTE_MODEL_ID, [[{"role": "user", "content": "warm up"}]] * 32, 8, MAX_TOKENS)
            section["load"] = load.measure(URL, m.ROUTE_MODEL_ID, requests, CONCURRENCY, MAX_TOKENS)
        else:
            section["serve_status"] = status
    finally:
        run._copy_ray_logs(f"route-{routing}")
        cluster.stop()
    return section


def measure(run: Any) -> dict[str, Any]:
    """The routing phase of bench/dataplane/run.py's Run: both routers on the same requests, one after the other."""
    run.prepare_data()
    section: dict[str, Any] = {"prompts": PROMPTS, "prompt_words": PROMPT_WORDS, "concurrency": CONCURRENCY,
                               "max_tokens": MAX_TOKENS, "kv_blocks_per_replica": m.ROUTE_KV_BLOCKS}
    section["model"] = build_model(run)
    run.save("routing", section)
    requests = workload(run.test_rows())
    for routing in ("default", "prefixAffinity"):
        section[routing] = serve_once(run, routing, requests)
        run.save("routing", section)
    rates = [(section[r].get("load") or {}).get("output_tokens_per_s") for r in ("default", "prefixAffinity")]
    if all(rates):
        section["ratio_prefix_affinity_vs_default"] = round(rates[1] / rates[0], 3)
    run.save("routing", section)
    return section


if __name__ == "__main__":
    # python -m dataplane.routing <tokenizer dir> <model dir>: the random model of SHAPE (FineTune site's
    # transformers, as the small model is made); prints its size.
    import sys

    from transformers import AutoTokenizer

    from .task import build_model as build

    print(json.dumps(build(Path(sys.argv[2]), AutoTokenizer.from_pretrained(sys.argv[1]), shape=SHAPE)))
