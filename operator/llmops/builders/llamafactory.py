"""FineTune -> LLaMA-Factory 0.9.4 training config (`train.yaml`) and `dataset_info.json`. Pure: no I/O, no env.

Where things live (see docs/finetune.md):

- ``staging_dir`` is node-local scratch that exists at the same path on every Ray pod (an emptyDir). The driver
  (``payloads/finetune.py``) fills it on every GPU node before training: ``<staging>/data`` holds
  ``dataset_info.json`` and one folder per dataset, ``<staging>/model`` an s3:// or gs:// base model.
  Every Ray Train worker then reads local files, as LLaMA-Factory expects.
- A pvc:// base model is read in place from the claim's mount; a Hugging Face id is downloaded by each worker
  (with HF_TOKEN from the pod environment, never from this config).
- ``output_dir`` is node-local too: Hugging Face checkpoints land there first and Ray Train copies each one to
  ``ray_storage_path``, shared storage in the output's bucket or claim (``<root>/llmops-checkpoints/<output path>``),
  so the driver finds the final adapter wherever the rank-0 worker ran.
"""

from __future__ import annotations

import posixpath
from typing import Any

from ..api.finetune import FineTuneSpec
from .common import PVC_ROOT as PVC_MOUNT_ROOT  # claim C is mounted on every Ray pod at <root>/C

TRAIN_DATASET = "train"
VALIDATION_DATASET = "validation"
# Ray Train checkpoint storage: a folder at the root of the output's bucket or claim, mirroring the output's path.
CHECKPOINTS_DIR = "llmops-checkpoints"
# NCCL timeout: the local main process tokenizes the dataset while the other ranks wait at a barrier, and the
# first collective waits for the slowest model download. Generous, but a dead peer still fails the job.
DDP_TIMEOUT_S = 3 * 3600
PRECISION_KEYS = {"bf16": {"bf16": True, "fp16": False}, "fp16": {"bf16": False, "fp16": True},
                  "fp32": {"bf16": False, "fp16": False}}


def staging_paths(staging_dir: str) -> dict[str, str]:
    """The node-local paths under ``staging_dir`` that the config names."""
    root = staging_dir.rstrip("/") or "/"
    return {
        "data": posixpath.join(root, "data"),
        "model": posixpath.join(root, "model"),
        "output": posixpath.join(root, "output"),
    }


def _split(uri: str) -> tuple[str, str, str]:
    scheme, _, rest = uri.partition("://")
    root, _, key = rest.partition("/")
    return scheme, root, key.strip("/")


def pvc_path(uri: str) -> str:
    """The mount path of a pvc://<claim>/<path> URI on a Ray pod."""
    _, claim, key = _split(uri)
    return posixpath.join(PVC_MOUNT_ROOT, claim, key).rstrip("/")


def checkpoint_storage(output_uri: str) -> dict[str, Any]:
    """``ray_storage_path`` / ``ray_storage_filesystem`` for an output location: ``<root>/llmops-checkpoints/<path>``.

    Neither inside the output (that folder is the adapter serving loads, and must not carry optimizer states)
    nor beside it: Ray Serve lists every folder under the adapters' parent (``dynamic_lora_loading_path``) as a
    model, so a sibling ``<output>-checkpoints`` would be advertised on /v1/models and fail when requested.
    For s3:// and gs:// LLaMA-Factory builds the pyarrow filesystem itself from ``ray_storage_filesystem`` and
    hands Ray the path without the scheme.
    """
    scheme, root, key = _split(output_uri)
    path = posixpath.join(CHECKPOINTS_DIR, key) if key else CHECKPOINTS_DIR
    if scheme == "pvc":
        return {"ray_storage_path": posixpath.join(PVC_MOUNT_ROOT, root, path)}
    return {"ray_storage_path": f"{root}/{path}", "ray_storage_filesystem": scheme}


def model_location(spec: FineTuneSpec, staging_dir: str) -> dict[str, Any]:
    source = spec.base_model.source
    scheme = source.partition("://")[0] if "://" in source else ""
    if scheme == "pvc":
        return {"model_name_or_path": pvc_path(source)}
    if scheme in ("s3", "gs"):
        return {"model_name_or_path": staging_paths(staging_dir)["model"]}
    location: dict[str, Any] = {"model_name_or_path": source}
    if spec.base_model.revision:
        location["model_revision"] = spec.base_model.revision
    return location


def method_keys(spec: FineTuneSpec) -> dict[str, Any]:
    method = spec.method
    if method.type == "full":
        return {"finetuning_type": "full"}
    keys: dict[str, Any] = {
        "finetuning_type": "lora",
        "lora_rank": method.rank,
        "lora_dropout": method.dropout,
        "lora_target": ",".join(t.strip() for t in method.target.split(",") if t.strip()),
    }
    if method.alpha is not None:
        keys["lora_alpha"] = method.alpha
    if method.type == "qlora":
        keys["quantization_bit"] = 4  # bitsandbytes NF4, LLaMA-Factory's default quantization_method
    return keys


def resource_keys(spec: FineTuneSpec, accelerator_type: str) -> dict[str, Any]:
    """One Ray Train worker (one training process) per GPU; every pod's GPUs are used."""
    resources = spec.resources
    per_worker: dict[str, float] = {"GPU": 1}
    if accelerator_type:
        # Ray puts `accelerator_type:<type>: 1` on each node with that GPU; a tiny share only pins placement.
        per_worker[f"accelerator_type:{accelerator_type}"] = 0.001
    return {
        "ray_num_workers": resources.workers * resources.gpus_per_worker,
        "resources_per_worker": per_worker,
        "placement_strategy": resources.placement_strategy,
    }


def train_config(spec: FineTuneSpec, *, name: str, recipe: dict[str, Any], accelerator_type: str,
                 staging_dir: str) -> dict[str, Any]:
    """The LLaMA-Factory 0.9.4 config: spec-derived keys, then ``recipe`` (speed knobs, user overrides applied),
    then ``spec.extraArgs``."""
    paths = staging_paths(staging_dir)
    dataset, training, resources = spec.dataset, spec.training, spec.resources
    cpus_per_process = max(1, resources.cpus_per_worker // resources.gpus_per_worker)
    config: dict[str, Any] = {
        **model_location(spec, staging_dir),
        "trust_remote_code": spec.base_model.trust_remote_code,
        "stage": "sft",
        "do_train": True,
        **method_keys(spec),
        "dataset": TRAIN_DATASET,
        "dataset_dir": paths["data"],
        "template": spec.template,
        "cutoff_len": dataset.cutoff_len,
        "overwrite_cache": True,
        "preprocessing_num_workers": min(16, resources.cpus_per_worker),
        "dataloader_num_workers": min(4, cpus_per_process - 1),
        "output_dir": paths["output"],
        "overwrite_output_dir": True,
        "logging_steps": training.logging_steps,
        "save_steps": training.save_steps,
        "report_to": "none",
        "num_train_epochs": training.epochs,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler,
        "warmup_ratio": training.warmup_ratio,
        **PRECISION_KEYS[training.precision],
        "ddp_timeout": DDP_TIMEOUT_S,
        "ray_run_name": name,
        **checkpoint_storage(spec.output.uri),
        **resource_keys(spec, accelerator_type),
    }
    if dataset.max_samples is not None:
        config["max_samples"] = dataset.max_samples
    if dataset.validation is not None:
        config.update({
            "eval_dataset": VALIDATION_DATASET,
            "eval_strategy": "steps",
            "eval_steps": training.eval_steps or training.save_steps,
            # Evaluation holds full-vocabulary logits per sample: keep its batch at the training micro-batch.
            "per_device_eval_batch_size": recipe.get("per_device_train_batch_size", 1),
        })
    config.update(recipe)
    config.update(spec.extra_args or {})
    return config


def _dataset_entry(spec: FineTuneSpec, folder: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"file_name": folder, "formatting": spec.dataset.format}
    if spec.dataset.columns is not None:
        columns = spec.dataset.columns.model_dump(exclude_none=True)
        if columns:
            entry["columns"] = columns
    return entry


def dataset_info(spec: FineTuneSpec, staging_dir: str) -> dict[str, Any]:
    """``dataset_info.json``: each dataset is a node-local folder that the driver fills from its URI (a file or
    a folder of JSON/JSONL files; LLaMA-Factory reads every file in the folder)."""
    data = staging_paths(staging_dir)["data"]
    info = {TRAIN_DATASET: _dataset_entry(spec, posixpath.join(data, TRAIN_DATASET))}
    if spec.dataset.validation is not None:
        info[VALIDATION_DATASET] = _dataset_entry(spec, posixpath.join(data, VALIDATION_DATASET))
    return info
