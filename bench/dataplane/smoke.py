"""A first look at the carried stack on the GPU machine, before the long phases: imports, moto, vLLM generating.

`python -m dataplane.smoke <out.json>` with the serve set on PYTHONPATH. vLLM runs a random model made here with
the machine's transformers (LoRA on, the run's attention backend), so a broken bundle shows in a minute.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

MODULES = ["ray", "ray.data.llm", "ray.serve", "ray.job_submission", "ray.dashboard.modules.serve.serve_head",
           "vllm", "vllm.entrypoints.openai.api_server", "moto.server", "boto3", "openai", "pydantic", "yaml"]


def main(out: Path) -> None:
    result: dict = {"imports": {}}
    for name in MODULES:
        try:
            importlib.import_module(name)
            result["imports"][name] = "ok"
        except Exception as exc:  # every failure is listed, not only the first
            result["imports"][name] = f"{type(exc).__name__}: {exc}"[:300]
    out.write_text(json.dumps(result, indent=1))
    from . import task
    from .manifests import ENGINE_ARGS
    from .s3 import S3Server

    server = S3Server(out.parent / "smoke-moto.log").start()
    server.client().put_object(Bucket="llmops-bench", Key="x", Body=b"y")
    result["moto"] = server.keys() == ["x"]
    server.stop()
    # The model is made in another process: torch and the tokenizer trainer start thread pools here, and a vLLM
    # engine forked from a process that has them deadlocks in its first parallel torch op.
    data, model = Path("/tmp/dp/smoke-data"), Path("/tmp/dp/smoke-model")
    data.mkdir(parents=True, exist_ok=True)
    rows = task.rows(200, seed=9)
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, "-m", "dataplane.task", str(data), str(model)], check=True)
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), max_model_len=512, enable_lora=True, max_lora_rank=16, **ENGINE_ARGS)
    result["vllm_start_s"] = round(time.perf_counter() - t0, 1)
    messages = [[{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}]
                for r in rows[:8]]
    outputs = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    result["vllm_generated"] = [o.outputs[0].text for o in outputs][:2]
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
