"""The model: Qwen2.5-7B's architecture (or a two-layer one) with random weights, built and saved once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import REPO, SCRIPT


def model_config(tiny: bool, cpu: bool) -> dict:
    # bench/ is on the path already (this package lives there); imported here as it imports torch.
    from training_bench.model import QWEN25_7B, ROPE_THETA

    config = dict(QWEN25_7B, rope_theta=ROPE_THETA, torch_dtype="float32" if cpu else "bfloat16")
    if tiny:
        config.update(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return config


def build_model(folder: Path, config: dict) -> dict:
    """Made in a child process, so that this one never holds GPU memory while the recipes run."""
    marker = folder / "bench-model.json"
    if marker.exists() and json.loads(marker.read_text()).get("config") == config:
        return {**json.loads(marker.read_text()), "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(SCRIPT), "_build", str(folder), json.dumps(config)],
                          capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode:
        raise RuntimeError(f"building the model failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    info = {**json.loads(done.stdout.strip().splitlines()[-1]), "config": config,
            "build_and_save_s": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(info))
    return {**info, "reused": False}


def build_model_here(folder: str, config_json: str) -> None:
    """`_build`: random weights (transformers' own init, seeded) on the GPU if there is one, saved."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**json.loads(config_json))
    dtype = getattr(torch, config.torch_dtype) if isinstance(config.torch_dtype, str) else config.torch_dtype
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    model.save_pretrained(folder, max_shard_size="5GB")
    print(json.dumps({"params": params, "save_s": round(time.perf_counter() - t0, 1)}))
