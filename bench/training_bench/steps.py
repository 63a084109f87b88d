"""Recipes (from the operator's renderer), optimizer steps over micro-batches, and what is measured of them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import traceback

import torch

from llmops.builders.recipe import COMPILE_LAYERS_ENV, SHARED_PREFIX_ENV, training_recipe
from payloads import shared_prefix

from .data import (GIB, MicroBatch, Sample, microbatch_for, packed_microbatch, padded_microbatch,
                   shared_microbatch)
from .model import (Adapter, Compiled, CompiledLayers, Fp8, LEARNING_RATE, Liger, Varlen, forward_loss, set_attention,
                    set_checkpointing)


@dataclasses.dataclass
class Recipe:
    name: str
    description: str
    packed: bool
    attention: str  # varlen | sdpa-mask | shared-prefix | sdpa (unpacked)
    micro_batch: int  # rows (packed) or samples (unpacked)
    accumulation: int
    checkpointing: bool
    lora_dtype: str = "fp32"  # fp32 under bf16 autocast (LLaMA-Factory default) or bf16 (pure_bf16)
    liger: bool = False  # Liger kernels (enable_liger_kernel): RoPE, RMSNorm, SwiGLU, fused linear cross-entropy
    rendered: dict | None = None  # the LLaMA-Factory keys this recipe stands for, as training_recipe() returns them
    compile_mode: str | None = None  # torch.compile mode, None: eager
    compile_scope: str = "model"  # model: the whole model (Compiled); layers: each decoder layer (CompiledLayers)
    fp8: bool = False  # frozen base layers' products in fp8 (Fp8FrozenLinear)
    pad_multiple: int = shared_prefix.ROW_MULTIPLE  # shared-prefix rows are padded to a multiple of this


# What the operator renders for a FineTune of Qwen2.5-7B (the renderer reads 7 B from the name) with rank 8 on the
# H100 profile (settings.DEFAULT_PROFILES: 80 GiB). builders/finetune.recipe_for asks for `attention: sdpa` unless
# settings.finetune_flash_attention says the image has flash-attn; tests/unit/test_recipe.py checks that the
# recorded rows match what the renderer produces now.
RENDER_ARGS = {"gpu_memory_gib": 80, "base_model_params_b": 7.0, "lora_rank": 8}
IMAGE_OVERRIDES = {"stock": {"attention": "sdpa"}, "flash-attn": {}}


def rendered_recipe(name: str, description: str, image: str, cutoff_len: int, **overrides) -> Recipe:
    """A bench recipe from the keys the operator renders (`overrides` are FineTune spec.training choices)."""
    keys = training_recipe(**RENDER_ARGS, cutoff_len=cutoff_len, overrides={**IMAGE_OVERRIDES[image], **overrides})
    if keys["cutoff_len"] != cutoff_len:
        raise ValueError(f"rendered cutoff_len {keys['cutoff_len']} differs from the bench's {cutoff_len}")
    worker_env = keys.get("ray_init_kwargs", {}).get("runtime_env", {}).get("env_vars", {})
    if not keys["packing"]:
        attention = "sdpa"
    elif keys["flash_attn"] == "fa2":
        attention = "varlen"  # with or without neat_packing: FA2 on the sample bounds
    elif keys["neat_packing"] and keys["flash_attn"] == "sdpa":
        attention = "shared-prefix" if worker_env.get(SHARED_PREFIX_ENV) == "1" else "sdpa-mask"
    else:
        raise ValueError(f"no bench attention for {keys}")
    # The worker compiles `auto` jobs of enough steps only; the bench measures the steady state, compiled.
    compiled = {"compile_mode": "default", "compile_scope": "layers"} if worker_env.get(COMPILE_LAYERS_ENV) else {}
    return Recipe(name, description, keys["packing"], attention, keys["per_device_train_batch_size"],
                  keys["gradient_accumulation_steps"], not keys["disable_gradient_checkpointing"], "fp32",
                  keys["enable_liger_kernel"], keys, **compiled)


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """The HF Trainer's cosine schedule with linear warmup."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def runner_for(model, recipe: Recipe):
    """The model as the recipe runs it: fp8 base layers or not, compiled or eager."""
    Fp8.set(model, recipe.fp8)
    # Shared-prefix rows vary in length by construction: one graph with dynamic shapes rather than a recompile each.
    dynamic = True if recipe.attention == "shared-prefix" else None
    layers = recipe.compile_mode if recipe.compile_scope == "layers" else None
    CompiledLayers.set(model, layers, dynamic)
    if not recipe.compile_mode or layers:
        return model
    return Compiled.of(model, recipe.compile_mode, dynamic=dynamic)


def step_items(recipe: Recipe, n_labels: int):
    """The label tokens of an optimizer step as the loss divides by them. A compiled model gets a tensor, as the HF
    Trainer passes it: a Python int is a constant to dynamo, and every new count would recompile."""
    return torch.tensor(n_labels, device="cuda") if recipe.compile_mode else n_labels


def train(model, adapter: Adapter, recipe: Recipe, steps: list[list[MicroBatch]], schedule: bool = False,
          lr: float = LEARNING_RATE):
    """Optimizer steps over prepared micro-batches; returns per-step loss tensors (no host syncs)."""
    if recipe.liger != Liger.applied:
        raise RuntimeError(f"{recipe.name} needs liger={recipe.liger}, model has liger={Liger.applied}")
    runner = runner_for(model, recipe)
    lora_dtype = torch.bfloat16 if recipe.lora_dtype == "bf16" else torch.float32
    params = adapter.reset(lora_dtype)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if recipe.lora_dtype == "fp32"
                else contextlib.nullcontext())
    mode = recipe.attention
    warmup = max(1, math.ceil(0.1 * len(steps)))
    losses = []
    for i, step in enumerate(steps):
        num_items = step_items(recipe, sum(mb.n_labels for mb in step))
        total = torch.zeros((), device="cuda")
        for mb in step:
            if recipe.compile_mode == "reduce-overhead":  # CUDA graph trees: a new pass, earlier outputs are done
                torch.compiler.cudagraph_mark_step_begin()
            with autocast:
                loss = forward_loss(runner, mb, num_items, mode)
            loss.backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if schedule:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(i, len(steps), warmup, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    CompiledLayers.set(model, None)  # what runs the model next (evaluation, other recipes) runs it eagerly
    return losses


# ------------------------------------------------------------------------------------- measuring


def make_steps(recipe: Recipe, samples: list[Sample], rows: list[list[Sample]], n_steps: int, row_len: int):
    steps = []
    if recipe.packed:
        per_step = recipe.micro_batch * recipe.accumulation
        for s in range(n_steps):
            chunk = rows[s * per_step:(s + 1) * per_step]
            if len(chunk) < per_step:
                raise ValueError("not enough packed rows")
            steps.append([microbatch_for(recipe, chunk[m * recipe.micro_batch:(m + 1) * recipe.micro_batch], row_len)
                          for m in range(recipe.accumulation)])
    else:
        if recipe.micro_batch != 1:
            raise ValueError("unpacked recipes here use one sample per micro-batch")
        for s in range(n_steps):
            chunk = samples[s * recipe.accumulation:(s + 1) * recipe.accumulation]
            steps.append([padded_microbatch(x) for x in chunk])
    return steps


def measure(model, adapter, recipe: Recipe, steps, warmup: int, n_params: int) -> dict:
    set_checkpointing(model, recipe.checkpointing)
    set_attention(model, "llmops_varlen" if recipe.attention == "varlen" else "sdpa")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(model, adapter, recipe, steps[:warmup])
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    timed = steps[warmup:]
    t0 = time.perf_counter()
    losses = train(model, adapter, recipe, timed)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    samples = sum(mb.n_samples for st in timed for mb in st)
    tokens = sum(mb.n_tokens for st in timed for mb in st)
    slots = sum(mb.n_slots for st in timed for mb in st)
    return {
        **dataclasses.asdict(recipe),
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 2),  # a compiled recipe's compile happens here
        "timed_steps": len(timed),
        "timed_samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "model_tflops": round(4 * n_params * tokens / seconds / 1e12, 1),
        "mfu_vs_790": round(4 * n_params * tokens / seconds / 790e12, 3),
        "pad_fraction": round(1 - tokens / slots, 4),
        "tokens_per_microbatch": round(slots / sum(len(st) for st in timed)),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "first_loss": round(float(losses[0]), 4) if losses else None,
        "last_loss": round(float(losses[-1]), 4) if losses else None,
    }


def profile_recipe(model, adapter, recipe: Recipe, steps) -> dict:
    from torch.profiler import ProfilerActivity, profile

    set_checkpointing(model, recipe.checkpointing)
    set_attention(model, "llmops_varlen" if recipe.attention == "varlen" else "sdpa")
    train(model, adapter, recipe, steps[:1])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        train(model, adapter, recipe, steps[1:])
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = []
    for evt in prof.key_averages():
        if str(getattr(evt, "device_type", "")).endswith("CUDA") and "#" not in evt.key:
            t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
            kernels.append((evt.key, t / 1e6, evt.count))
    kernels.sort(key=lambda x: -x[1])
    total = sum(k[1] for k in kernels)

    def category(name: str) -> str:
        low = name.lower()
        if "flash" in low or "fmha" in low or "attention" in low or "efficient_attention" in low:
            return "attention"
        if any(s in low for s in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "matmul")):
            return "matmul"
        if "memcpy" in low or "memset" in low:
            return "copy"
        if any(s in low for s in ("softmax", "cross_entropy", "nll_loss", "log_softmax")):
            return "loss"
        if "reduce" in low:
            return "reduction"
        return "elementwise/other"

    categories: dict[str, float] = {}
    for name, t, _ in kernels:
        categories[category(name)] = categories.get(category(name), 0.0) + t
    n_steps = len(steps) - 1
    return {
        "recipe": recipe.name,
        "profiled_steps": n_steps,
        "wall_s_per_step": round(wall / n_steps, 4),
        "gpu_kernel_s_per_step": round(total / n_steps, 4),
        "host_gap_s_per_step": round((wall - total) / n_steps, 4),  # the GPU idle: launches, Python, autograd
        "gpu_busy_fraction": round(total / wall, 3),
        "kernel_launches_per_step": int(sum(k[2] for k in kernels) / n_steps),
        "categories_s_per_step": {k: round(v / n_steps, 4) for k, v in sorted(categories.items(), key=lambda x: -x[1])},
        "top_kernels": [{"name": n[:120], "s_per_step": round(t / n_steps, 4), "calls_per_step": c // n_steps}
                        for n, t, c in kernels[:20]],
    }


def profile_timed(model, adapter, recipe: Recipe, pool, rows, row_len: int, by_name: dict) -> dict:
    """profile_recipe over 4 steps, next to the step time the recipe's unprofiled timing measured."""
    try:
        profile = profile_recipe(model, adapter, recipe, make_steps(recipe, pool, rows, 4, row_len))
        timed = by_name.get(recipe.name, {})
        if timed:
            step_s = timed["seconds"] / timed["timed_steps"]
            profile["unprofiled_s_per_step"] = round(step_s, 4)
            profile["gpu_busy_fraction_unprofiled"] = round(profile["gpu_kernel_s_per_step"] / step_s, 3)
    except Exception as exc:  # noqa: BLE001
        profile = {"recipe": recipe.name, "error": repr(exc)[:500]}
        traceback.print_exc()
    print("profile:", json.dumps(profile), flush=True)
    return profile


def loss_and_gradients(model, adapter, recipe: Recipe, mb: MicroBatch) -> tuple[float, torch.Tensor, float]:
    """One forward and backward of `mb` as the recipe runs it: the loss, every adapter gradient, and the seconds
    it took (a compiled recipe's first call holds its compile). lora_B starts small instead of zero so that the
    lora_A gradients depend on the backward through the base layers."""
    set_checkpointing(model, recipe.checkpointing)
    set_attention(model, "llmops_varlen" if recipe.attention == "varlen" else "sdpa")
    runner = runner_for(model, recipe)
    params = adapter.reset()
    gen = torch.Generator(device="cuda").manual_seed(5)
    with torch.no_grad():
        for name, p in adapter.params:
            if "lora_B" in name:
                p.normal_(0.0, 0.01, generator=gen)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = forward_loss(runner, mb, step_items(recipe, mb.n_labels), recipe.attention)
    loss.backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    grads = torch.cat([p.grad.float().flatten() for p in params])
    CompiledLayers.set(model, None)
    adapter.reset()
    return float(loss.detach()), grads, seconds


@torch.no_grad()
def eval_loss(model, rows: list[list[Sample]], row_len: int, mode: str) -> float:
    """Mean loss per label token over packed rows (sample bounds respected)."""
    set_attention(model, "llmops_varlen" if mode == "varlen" else "sdpa")
    total, count = 0.0, 0
    for row in rows:
        mb = packed_microbatch([row], row_len)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward_loss(model, mb, 1, mode)  # num_items=1: the summed loss
        total += float(loss)
        count += mb.n_labels
    return total / count


@torch.no_grad()
def equivalence(model, samples: list[Sample]) -> dict:
    """The same 8 samples: one at a time (reference path) against one packed row (each attention mode)."""
    n_items = sum(padded_microbatch(s).n_labels for s in samples)
    set_checkpointing(model, False)
    set_attention(model, "sdpa")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        unpacked = sum(float(forward_loss(model, padded_microbatch(s), n_items, "sdpa")) for s in samples)
    row_len = -(-sum(len(s.input_ids) for s in samples) // 8) * 8
    mb = packed_microbatch([samples], row_len)
    out = {"n_items": n_items, "unpacked_loss": unpacked}
    for mode in ("varlen", "sdpa-mask", "sdpa-leaky"):
        if mode == "varlen" and not Varlen.available:
            continue
        set_attention(model, "llmops_varlen" if mode == "varlen" else "sdpa")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = float(forward_loss(model, mb, n_items, mode))
        out[f"packed_{mode}_loss"] = loss
        out[f"packed_{mode}_rel_diff"] = abs(loss - unpacked) / abs(unpacked)
    set_attention(model, "sdpa")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = float(forward_loss(model, shared_microbatch([samples]), n_items,
                                  "shared-prefix"))
    out["shared_prefix_loss"] = loss
    out["shared_prefix_rel_diff"] = abs(loss - unpacked) / abs(unpacked)
    return out
