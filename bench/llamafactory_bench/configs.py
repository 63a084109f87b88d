"""The recipes: the FineTune variants the operator renders, the reference tutorial's config, and each made local.

Only what must differ on one GPU without Ray is changed (see local_config); what Ray would apply in each worker is
read from the rendered config (worker_runtime_env) and applied by the training process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from . import REPO

FINETUNE = REPO / "examples" / "viggo" / "finetune.yaml"

RECIPES = {  # name: (spec.training fields, spec.extraArgs) of the FineTune; `reference` is the tutorial's config
    "reference": None,
    "default": ({}, None),
    "compile-layers": ({"compile": True}, None),
    "packed-liger": ({"sharedPrefix": False}, None),
    "shared-compile": ({"sharedPrefix": True, "compile": False},
                       {"torch_compile": True, "enable_liger_kernel": False}),
}
DEFAULT_RECIPES = ("reference", "default", "compile-layers", "packed-liger")
# Packed recipes take the same steps: the same rows and learning-rate schedule, so their losses compare step by step.
DEFAULT_STEPS = {"reference": 30, "default": 80, "compile-layers": 80, "packed-liger": 80, "shared-compile": 60}

# The reference tutorial's config (lora_sft_ray.yaml of the reference workflow), without its Ray and eval keys.
# It leaves flash_attn at `auto`, which is SDPA on an image without flash-attn: pinned here so it stays SDPA.
REFERENCE_CONFIG = {
    "model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "trust_remote_code": True,
    "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
    "dataset": "train", "template": "qwen", "cutoff_len": 2048, "max_samples": 1000, "overwrite_cache": True,
    "preprocessing_num_workers": 16, "dataloader_num_workers": 4,
    "output_dir": "outputs", "logging_steps": 10, "save_steps": 500, "plot_loss": True,
    "overwrite_output_dir": True, "save_only_model": False,
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 1.0e-4,
    "num_train_epochs": 5.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True,
    "ddp_timeout": 180000000, "resume_from_checkpoint": None,
    "flash_attn": "sdpa",
}
RAY_KEYS = ("ray_run_name", "ray_storage_path", "ray_storage_filesystem", "ray_num_workers", "resources_per_worker",
            "placement_strategy", "ray_init_kwargs")
EVAL_KEYS = ("eval_dataset", "eval_strategy", "eval_steps", "per_device_eval_batch_size", "val_size")


def rendered_config(training: dict, extra_args: dict | None) -> tuple[dict, dict]:
    """train.yaml and dataset_info.json of the operator's `-config` ConfigMap for the ViGGO FineTune on an H100
    with the stock image (Settings() defaults: no flash-attn), as tests/unit/test_recipe.py renders it."""
    from llmops.builders import finetune
    from llmops.builders.common import BuildContext
    from llmops.settings import Settings

    doc = yaml.safe_load(FINETUNE.read_text())
    doc["metadata"]["uid"] = "bench"
    doc["spec"]["resources"]["accelerator"] = "H100"
    doc["spec"]["training"].update(training)
    if extra_args:
        doc["spec"]["extraArgs"] = extra_args
    children = finetune.build_manifest(doc, BuildContext(settings=Settings(), payloads={}))
    files = next(o for o in children if o["metadata"]["name"].endswith("-config"))["data"]
    return yaml.safe_load(files["train.yaml"]), json.loads(files["dataset_info.json"])


def local_config(config: dict, *, model_dir: Path, data_dir: Path, output_dir: Path, max_steps: int,
                 args: argparse.Namespace) -> dict:
    """The rendered config with only what must differ on one local GPU without Ray changed."""
    config = {k: v for k, v in config.items() if k not in RAY_KEYS + EVAL_KEYS and k != "save_steps"}
    config.update(model_name_or_path=str(model_dir), dataset="train", dataset_dir=str(data_dir),
                  output_dir=str(output_dir), logging_steps=1, save_strategy="no", max_steps=max_steps,
                  report_to="none",
                  preprocessing_num_workers=min(config.get("preprocessing_num_workers") or 1, args.preprocess_workers))
    if args.max_samples:
        config["max_samples"] = args.max_samples
    if args.cpu:  # device-specific keys only: no bf16 kernels worth timing, no Triton for Liger on a CPU
        config.update(bf16=False, fp16=False, enable_liger_kernel=False)
    return config


def worker_runtime_env(rendered: dict) -> dict:
    """What Ray would do in each Ray Train worker for this config: the runtime environment's variables and setup
    hook from `ray_init_kwargs` (the shared prefix, in the operator, is installed by such a hook)."""
    runtime_env = (rendered.get("ray_init_kwargs") or {}).get("runtime_env") or {}
    return {"setup_hook": runtime_env.get("worker_process_setup_hook"), "env_vars": runtime_env.get("env_vars") or {}}
