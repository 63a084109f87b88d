"""The references: bare vLLM on the same GPU, with the engine arguments and prompts the operator's payloads used.

* `generate`: `vllm.LLM(**engine_kwargs).generate(...)` over the rows, once for the base model and once with the
  adapter through a `LoRARequest`; run as its own process (`python -m dataplane.bare generate <json>`), because a
  vLLM process must start before anything touches CUDA.
* `serve_command`: the `vllm serve` command line with the same engine arguments.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def cli_flags(engine_kwargs: dict[str, Any]) -> list[str]:
    """engine kwargs -> `vllm serve` flags (booleans as --x / --no-x, mappings as JSON)."""
    flags: list[str] = []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def serve_command(model_dir: str, model_id: str, engine_kwargs: dict[str, Any], port: int,
                  adapters: dict[str, str]) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir, "--served-model-name", model_id,
               "--host", "127.0.0.1", "--port", str(port), *cli_flags(engine_kwargs)]
    if adapters:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return command


def generate(request: dict[str, Any]) -> dict[str, Any]:
    """request: model_dir, adapter_dir, engine_kwargs, messages (list of chat message lists), max_tokens."""
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=request["model_dir"], **request["engine_kwargs"])
    ready = time.perf_counter()
    sampling = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"])
    result: dict[str, Any] = {"engine_start_s": round(ready - t0, 1)}
    for label, lora in (("base", None), ("adapter", LoRARequest("viggo", 1, request["adapter_dir"]))):
        start = time.perf_counter()
        outputs = llm.chat(request["messages"], sampling, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - start
        texts = [o.outputs[0].text for o in outputs]
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        result[label] = {"texts": texts, "generate_s": round(seconds, 3), "rows_per_s": round(len(texts) / seconds, 1),
                         "output_tokens": tokens}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    return result


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        with open(sys.argv[2]) as handle:
            answer = generate(json.load(handle))
        with open(sys.argv[3], "w") as handle:
            json.dump(answer, handle)
