"""Placeholder until the measured recipe lands (kept to the agreed signature)."""

from __future__ import annotations


def training_recipe(*, gpu_memory_gib: float, base_model_params_b: float, cutoff_len: int, lora_rank: int,
                    overrides: dict) -> dict:
    packing = overrides.get("packing", True)
    recipe = {"cutoff_len": cutoff_len, "packing": packing, "neat_packing": packing,
              "per_device_train_batch_size": overrides.get("perDeviceBatchSize", 1),
              "gradient_accumulation_steps": overrides.get("gradientAccumulationSteps", 4),
              "disable_gradient_checkpointing": not overrides.get("gradientCheckpointing", gpu_memory_gib < 40),
              "flash_attn": overrides.get("attention", "auto")}
    return recipe
