"""The fast LoRA SFT recipe: LLaMA-Factory 0.9.4 speed keys chosen from the accelerator's memory.

Pure: numbers in, a dict of LLaMA-Factory config keys out. docs/training-recipe.md explains the choices and holds
the measurements behind every constant here (bench/training_recipe.py, one H100, Qwen2.5-7B architecture).

What it decides, each unless the user chose (`overrides` wins, always):

* packing: on. Short samples share `cutoff_len` rows with position ids restarting per sample. Samples stay apart
  in attention: with `flash_attn: fa2` through the position ids (plain `packing`; the image needs flash-attn),
  otherwise through `neat_packing`'s block-diagonal mask (LLaMA-Factory 0.9.4 allows that only with
  transformers < 4.53, and refuses to start otherwise: a loud failure rather than samples attending each other).
* attention: fa2 unless the caller asks otherwise (the FineTune builder asks for sdpa when the image has no
  flash-attn, which is the stock image's case: SDPA with neat packing is the operator's default).
* shared prefix: on wherever packing uses neat packing's 4-D mask (SDPA or eager attention: FA2 varlen cannot
  express it), so with the stock image. The prompt tokens every sample of a preprocessing batch starts with
  (ViGGO: template, system prompt and instruction, ~150 of ~194 tokens) are carried once per packed row instead of
  once per sample, each sample's positions and attention as if it were alone: the same rows, loss and gradients
  from fewer tokens (``payloads/shared_prefix.py``; without such a prefix the rows are LLaMA-Factory's own).
* compile: regional torch.compile of the decoder layers (``payloads/compile_layers.py``) with the shared prefix
  where no gradient checkpointing is needed (an H100-class GPU, where a one-row step waits on the host's kernel
  launches): 1.5 to 2 times the samples/s. The worker compiles only jobs long enough to repay the minute it
  takes. Checkpointing profiles (L4, A10G) are bound by the GPU, and were not measured compiled: off there.
* Liger kernels: on unless compiling (their autograd functions do not trace; the image needs liger-kernel).
* The shared prefix and the compile are changes inside each Ray Train worker: this recipe puts the worker setup
  hook (``payloads/worker_setup.py``) and the variables that select them in ``ray_init_kwargs.runtime_env``.
* effective batch: about one 2048-token packed row per device per optimizer step, the closest row count to the
  reference's 8 samples per device per step (ViGGO: ~10 samples a row).
* micro-batch and gradient checkpointing: from the memory model below; checkpointing only when one micro-batch
  would not fit without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

OVERRIDE_KEYS = frozenset({"packing", "perDeviceBatchSize", "gradientAccumulationSteps", "gradientCheckpointing",
                           "attention", "ligerKernel", "sharedPrefix", "compile"})
WORKER_SETUP_HOOK = "payloads.worker_setup.install"  # importable on every Ray pod (PYTHONPATH, payload ConfigMap)
# The variables payloads/worker_setup.py reads (the operator never imports payloads; a unit test ties the two).
SHARED_PREFIX_ENV, COMPILE_LAYERS_ENV = "LLMOPS_SHARED_PREFIX", "LLMOPS_COMPILE_LAYERS"

# API attention names -> LLaMA-Factory `flash_attn` values (AttentionFunction in 0.9.4).
FLASH_ATTN = {"auto": "auto", "sdpa": "sdpa", "fa2": "fa2", "eager": "disabled", "disabled": "disabled"}

# Effective batch: tokens per device per optimizer step. The reference takes 8 samples per device per step
# (micro-batch 1 x accumulation 8); one 2048-token row holds ~10 ViGGO samples, the closest whole row count.
TOKENS_PER_DEVICE_STEP = 2048
# Without packing: the reference's samples per device per step.
SAMPLES_PER_DEVICE_STEP = 8

# Memory model, measured on one H100 (Qwen2.5-7B architecture, 7.62 B parameters, LoRA r=8 on all linear layers,
# bf16 weights, fp32 adapter under autocast): peak allocated = fixed + tokens per micro-batch x per-token.
CALIBRATION_PARAMS_B = 7.62
ACTIVATION_MIB_PER_TOKEN = {  # (gradient checkpointing, liger) -> MiB per token in the micro-batch, FA2 attention
    (False, True): 5.16,
    (False, False): 8.17,  # includes ~2 MiB of fp32 logits and their gradient (vocab 152k)
    (True, True): 0.51,
    (True, False): 1.95,
}
# Any attention but FA2 (SDPA with neat packing's mask, or padding) keeps more per token when no layer is recomputed:
# 0.87-0.88 GiB more per 2048-token row than FA2 varlen, with and without Liger. Checkpointing hides it.
NON_FA2_ATTENTION_MIB_PER_TOKEN = 0.44
# Activations grow with layers x width, slower than the parameter count (Qwen2.5 0.5B..72B); never scaled down,
# so small models are sized as if they were 7B (they fit regardless).
ACTIVATION_SCALING_EXPONENT = 0.8
WEIGHT_BYTES_PER_PARAM = 2  # bf16
LORA_PARAMS_PER_RANK_PER_BASE_PARAM = 3.31e-4  # all linear layers: 20.2 M adapter parameters at r=8 on 7.62 B
LORA_BYTES_PER_PARAM = 16  # fp32 weight, gradient, two AdamW moments
FIXED_OVERHEAD_GIB = 0.15  # measured intercept less weights and adapter state
# Not in the allocator's peak: CUDA context, NCCL buffers, allocator slack (reserved ran 1-2 GiB over allocated).
USABLE_FRACTION = 0.9
RESERVED_GIB = 1.5


def training_recipe(*, gpu_memory_gib: float, base_model_params_b: float, cutoff_len: int, lora_rank: int,
                    overrides: Mapping[str, Any]) -> dict[str, Any]:
    """LLaMA-Factory config keys for a fast LoRA SFT recipe on this accelerator.

    `overrides` holds the user's choices (packing, perDeviceBatchSize, gradientAccumulationSteps,
    gradientCheckpointing, attention, ligerKernel, sharedPrefix, compile); an absent or None value means "choose
    for me".
    """
    chosen = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(chosen) - OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f"unknown recipe overrides: {', '.join(unknown)}")
    attention = chosen.get("attention", "fa2")
    if attention not in FLASH_ATTN:
        raise ValueError(f"unknown attention {attention!r}: one of {', '.join(sorted(FLASH_ATTN))}")
    flash_attn = FLASH_ATTN[attention]
    packing = bool(chosen.get("packing", True))
    neat_packing = packing and flash_attn != "fa2"  # FA2 keeps packed samples apart through the position ids
    mask = neat_packing and flash_attn in ("sdpa", "disabled")
    shared_prefix = bool(chosen.get("sharedPrefix", mask))
    if shared_prefix and not mask:
        raise ValueError("training.sharedPrefix needs packing with a mask: leave training.packing on and set "
                         "training.attention to sdpa or eager (FA2, or auto that may pick it, cannot share a prefix), "
                         "or turn sharedPrefix off")
    if chosen.get("compile") and chosen.get("ligerKernel"):
        raise ValueError("training.compile cannot trace Liger kernels: turn one of compile and ligerKernel off")
    if packing:
        cutoff_len = -(-cutoff_len // 8) * 8  # packed rows are cutoff_len long; the collator pads to a multiple of 8
        unit_tokens = cutoff_len  # one packed row
        units_per_step = max(1, round(TOKENS_PER_DEVICE_STEP / cutoff_len))
    else:
        unit_tokens = cutoff_len  # one sample, padded at worst to cutoff_len
        units_per_step = SAMPLES_PER_DEVICE_STEP

    def fits(micro_batch: int, checkpointing: bool, liger: bool) -> bool:
        return peak_memory_gib(base_model_params_b, lora_rank, micro_batch * unit_tokens, checkpointing, liger,
                               fa2=flash_attn == "fa2") <= memory_budget_gib(gpu_memory_gib)

    user_batch = chosen.get("perDeviceBatchSize")
    if "compile" in chosen:
        compiled = bool(chosen["compile"])
    else:  # measured with the shared prefix, without checkpointing (and so without Liger)
        compiled = (shared_prefix and not chosen.get("ligerKernel") and not chosen.get("gradientCheckpointing")
                    and fits(user_batch or 1, False, False))
    liger = bool(chosen.get("ligerKernel", not compiled))
    if "gradientCheckpointing" in chosen:
        checkpointing = bool(chosen["gradientCheckpointing"])
    else:
        checkpointing = not fits(user_batch or 1, False, liger)

    if user_batch is not None:
        micro_batch = int(user_batch)
    else:
        accumulation_hint = chosen.get("gradientAccumulationSteps")
        ceiling = units_per_step if accumulation_hint is None else max(1, -(-units_per_step // accumulation_hint))
        micro_batch = max([m for m in _divisors(units_per_step) if m <= ceiling and fits(m, checkpointing, liger)],
                          default=1)
    accumulation = int(chosen.get("gradientAccumulationSteps", max(1, math.ceil(units_per_step / micro_batch))))

    keys = {
        "cutoff_len": cutoff_len,
        "packing": packing,
        "neat_packing": neat_packing,
        "flash_attn": flash_attn,
        "enable_liger_kernel": liger,
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "disable_gradient_checkpointing": not checkpointing,
    }
    worker_env = {}
    if shared_prefix:
        worker_env[SHARED_PREFIX_ENV] = "1"
    if compiled:  # asked for: any job; chosen here: the worker compiles jobs long enough to repay it
        worker_env[COMPILE_LAYERS_ENV] = "always" if chosen.get("compile") else "auto"
    if worker_env:
        keys["ray_init_kwargs"] = {"runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK,
                                                   "env_vars": worker_env}}
    return keys


def peak_memory_gib(params_b: float, lora_rank: int, tokens: int, checkpointing: bool, liger: bool, *,
                    fa2: bool) -> float:
    """Predicted peak GPU memory of one LoRA training step (see the calibration constants above)."""
    weights = params_b * 1e9 * WEIGHT_BYTES_PER_PARAM / 2**30
    adapter = lora_rank * LORA_PARAMS_PER_RANK_PER_BASE_PARAM * params_b * 1e9 * LORA_BYTES_PER_PARAM / 2**30
    scale = max(1.0, params_b / CALIBRATION_PARAMS_B) ** ACTIVATION_SCALING_EXPONENT
    per_token = ACTIVATION_MIB_PER_TOKEN[(checkpointing, liger)]
    if not (fa2 or checkpointing):
        per_token += NON_FA2_ATTENTION_MIB_PER_TOKEN
    activations = tokens * per_token * scale / 1024
    return weights + adapter + FIXED_OVERHEAD_GIB + activations


def memory_budget_gib(gpu_memory_gib: float) -> float:
    return gpu_memory_gib * USABLE_FRACTION - RESERVED_GIB


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
