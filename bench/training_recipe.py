#!/usr/bin/env python3
"""LoRA SFT throughput and learning on one GPU: the reference recipe against the packed recipe, in one run.

Runs on the device machine (PyTorch, transformers and peft; liger-kernel carried as a wheel; no LLaMA-Factory,
no network):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/liger_kernel-*.whl
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/training_recipe.py --out "$OUT"

LLaMA-Factory itself is not run here. Version 0.9.4 pins transformers <= 4.57.1 (the device has 5.x), refuses
`neat_packing` on transformers >= 4.53, and its boundary-respecting packing on those versions needs the
flash-attn package (not on the device, no wheel for its torch). The script reproduces what the rendered config
does with transformers + peft, step for step:

* Qwen2.5-7B architecture from a hand-written config, random bf16 weights made on the GPU (no download).
* LoRA r=8, alpha=16, dropout 0 on every linear layer of the decoder (LLaMA-Factory's `lora_target: all`);
  adapter weights in fp32 under bf16 autocast, as LLaMA-Factory leaves them unless `pure_bf16` is set.
* Loss summed over label tokens and divided by the label tokens of the whole optimizer step (the HF Trainer
  under gradient accumulation), AdamW, gradient clipping at 1.0, cosine schedule with 10% warmup.
* reference: one sample per micro-batch padded to a multiple of 8, 8 accumulation steps, reentrant gradient
  checkpointing, SDPA attention (LLaMA-Factory's defaults with the reference's batch keys).
* packed: samples packed into `cutoff_len` rows by LLaMA-Factory's greedy rule (capacity cutoff_len - 1,
  padded to cutoff_len), position ids restarting at every sample. `varlen` keeps attention inside each sample
  with PyTorch's FlashAttention-2 variable-length kernel on the sample bounds (what `flash_attn: fa2` does
  from the position ids with transformers 4.57); `sdpa-mask` lets transformers build a block-diagonal mask
  (what `neat_packing` does with `flash_attn: sdpa`).
* default: the keys the operator renders, from `llmops.builders.recipe.training_recipe()` itself (stdlib only,
  imported from operator/): for an H100 FineTune of Qwen2.5-7B with the stock image (no flash-attn), SDPA with
  neat packing and Liger; `default-fa2` is what an image with flash-attn gets; `default-shared` is the default
  with `sharedPrefix: true` (FA2 varlen cannot share a prefix).
* shared-prefix: the rows of neat packing with the prompt tokens all samples start with carried once per row,
  built, masked and padded by the operator's own `payloads/shared_prefix.py` (what its hook makes LLaMA-Factory
  0.9.4 do in each Ray Train worker): the same samples per row and per optimizer step as without sharing.
* liger: liger-kernel's own Qwen2 patch, the call LLaMA-Factory makes for `enable_liger_kernel: true` in SFT
  (RoPE, RMSNorm, SwiGLU and fused linear cross-entropy). It cannot be removed once applied, so every recipe
  without it is measured first.

The synthetic samples follow ViGGO's shape (a fixed ~127-token instruction, a short input, a short structured
answer; ~194 tokens) and the answers are learnable from random weights: a function token, then a chain of
attribute tokens where each token fixes the next (a seeded permutation), then <|im_end|>.

Faster variants of the default, opt-in (`--variants fp8,compile,compile-no-liger`): only the reference, the default
and the named variants are measured, in one process, each with its numerics against its base on one packed row
(loss and adapter gradients), its throughput on the same rows as its base and a kernel profile. A name with the
suffix `-no-liger` is a variant of the default without Liger (packed-sdpa-mask), measured before Liger is applied.

* compile: the whole PeftModel under torch.compile (inductor, mode "default"), as the HF Trainer's accelerator
  wraps it for `torch_compile: true`; `compile-max-autotune` and `compile-reduce-overhead` use the modes
  "max-autotune-no-cudagraphs" and "reduce-overhead" (`torch_compile_mode`).
* fp8: every LoRA layer's frozen base product in fp8 through torch._scaled_mm (Fp8FrozenLinear): weights quantised
  once per row and per column, activations and incoming gradients per row on every call, no weight gradient.
  LLaMA-Factory's own `fp8: true` is a different implementation (torchao through Accelerate).

Prints a table last and writes everything to <out>/training_recipe.json.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback
import types
from typing import ClassVar

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "operator"))
from llmops.builders.recipe import SHARED_PREFIX_HOOK, training_recipe  # noqa: E402  (pure, stdlib only)
from payloads import shared_prefix  # noqa: E402  (stdlib; torch only in its mask function)

GIB = 2**30
IGNORE = -100
PAD_ID = 151643  # <|endoftext|>
IM_START, IM_END, NEWLINE = 151644, 151645, 198
ROLE = {"system": 8948, "user": 872, "assistant": 77091}

QWEN25_7B = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": False,
    "use_sliding_window": False,
}
ROPE_THETA = 1_000_000.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 1e-4  # the reference's


# --------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


class ViggoLikeTask:
    """ViGGO-shaped samples whose answers a LoRA adapter can learn from random base weights."""

    SYSTEM_LEN = 127
    PREFIX_LEN = 3 + SYSTEM_LEN + 2 + 3  # what every sample starts with: the system turn and the user turn's header
    N_ATTRIBUTES = 256

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.system = rng.integers(1000, 100_000, size=self.SYSTEM_LEN).tolist()
        self.words = rng.choice(np.arange(1000, 100_000), size=4000, replace=False)
        self.functions = rng.choice(np.arange(100_000, 101_000), size=9, replace=False).tolist()
        self.attributes = rng.choice(np.arange(101_000, 140_000), size=self.N_ATTRIBUTES, replace=False).tolist()
        self.successor = rng.permutation(self.N_ATTRIBUTES).tolist()

    def sample(self, rng: np.random.Generator) -> Sample:
        n_input = int(np.clip(round(rng.normal(28, 9)), 6, 70))
        n_answer = int(np.clip(round(rng.normal(26, 8)), 6, 64))
        prompt = (
            [IM_START, ROLE["system"], NEWLINE] + self.system + [IM_END, NEWLINE]
            + [IM_START, ROLE["user"], NEWLINE] + rng.choice(self.words, size=n_input).tolist() + [IM_END, NEWLINE]
            + [IM_START, ROLE["assistant"], NEWLINE]
        )
        answer = [self.functions[int(rng.integers(len(self.functions)))]]
        index = int(rng.integers(self.N_ATTRIBUTES))
        for _ in range(n_answer - 2):
            answer.append(self.attributes[index])
            index = self.successor[index]
        answer.append(IM_END)
        return Sample(prompt + answer, [IGNORE] * len(prompt) + answer)

    def stream(self, seed: int, n: int) -> list[Sample]:
        rng = np.random.default_rng(seed)
        return [self.sample(rng) for _ in range(n)]


def greedy_pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per row: each row repeatedly takes the longest remaining sample that still fits."""
    pool = sorted(range(len(lengths)), key=lambda i: lengths[i])
    pool_lengths = [lengths[i] for i in pool]
    rows = []
    while pool:
        row, room = [], capacity
        while pool:
            pos = bisect.bisect_right(pool_lengths, room) - 1
            if pos < 0:
                break
            room -= pool_lengths.pop(pos)
            row.append(pool.pop(pos))
        if not row:
            raise ValueError(f"a sample is longer than the row capacity {capacity}")
        rows.append(row)
    return rows


@dataclasses.dataclass
class MicroBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    n_samples: int
    n_tokens: int  # real (non-pad) tokens
    n_labels: int  # label tokens after the one-token shift

    @property
    def n_slots(self) -> int:
        return self.input_ids.numel()


def _segments_from_positions(position_ids: np.ndarray) -> tuple[torch.Tensor, int]:
    flat = position_ids.reshape(-1)
    starts = np.flatnonzero(flat == 0).tolist() + [flat.size]
    lengths = np.diff(starts)
    return torch.tensor(starts, dtype=torch.int32, device="cuda"), int(lengths.max())


def packed_microbatch(rows: list[list[Sample]], row_len: int) -> MicroBatch:
    ids = np.full((len(rows), row_len), PAD_ID, dtype=np.int64)
    labels = np.full((len(rows), row_len), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), row_len), dtype=np.int64)  # padding keeps position 0, as LLaMA-Factory's
    n_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.input_ids)
            ids[r, at:at + n] = s.input_ids
            labels[r, at:at + n] = s.labels
            positions[r, at:at + n] = np.arange(n)
            at += n
        if at > row_len:
            raise ValueError("row overflow")
        n_tokens += at
    cu, max_len = _segments_from_positions(positions)
    return MicroBatch(
        input_ids=torch.from_numpy(ids).cuda(), labels=torch.from_numpy(labels).cuda(),
        position_ids=torch.from_numpy(positions).cuda(), attention_mask=None, cu_seqlens=cu, max_seqlen=max_len,
        n_samples=sum(len(r) for r in rows), n_tokens=n_tokens, n_labels=int((labels[:, 1:] != IGNORE).sum()),
    )


def shared_microbatch(rows: list[list[Sample]], prefix_len: int) -> MicroBatch:
    """Rows as the shared-prefix hook hands them to the model: `prefix_len` tokens once, then each sample's rest at
    its own positions, the micro-batch padded to its longest row (a multiple of 8), the 4-D mask in bf16 (what
    LLaMA-Factory's collator builds with compute dtype bf16)."""
    features = []
    for row in rows:
        packed = shared_prefix.pack([(s.input_ids, s.labels) for s in row], prefix_len, 10**9,
                                    lambda lengths, capacity: [lengths])  # the row as it is: one knapsack
        features.append({k: v[0] for k, v in packed.items()})
    features = shared_prefix.pad_rows(features, PAD_ID, 8)
    ids = torch.tensor([f["input_ids"] for f in features], device="cuda")
    labels = torch.tensor([f["labels"] for f in features], device="cuda")
    indices = torch.tensor([f["attention_mask"] for f in features], device="cuda")
    return MicroBatch(
        input_ids=ids, labels=labels, position_ids=torch.tensor([f["position_ids"] for f in features], device="cuda"),
        attention_mask=shared_prefix.attention_mask_4d(indices, torch.bfloat16), cu_seqlens=None, max_seqlen=0,
        n_samples=sum(len(r) for r in rows), n_tokens=int((indices != 0).sum()),
        n_labels=int((labels[:, 1:] != IGNORE).sum()))


def microbatch_for(recipe, rows: list[list[Sample]], row_len: int, prefix_len: int) -> MicroBatch:
    return shared_microbatch(rows, prefix_len) if recipe.attention == "shared-prefix" else \
        packed_microbatch(rows, row_len)


def padded_microbatch(sample: Sample, multiple: int = 8) -> MicroBatch:
    """One sample, right-padded to a multiple of 8 with a 0/1 attention mask (LLaMA-Factory's SFT collator)."""
    n = len(sample.input_ids)
    length = -(-n // multiple) * multiple
    ids = sample.input_ids + [PAD_ID] * (length - n)
    labels = sample.labels + [IGNORE] * (length - n)
    mask = [1] * n + [0] * (length - n)
    return MicroBatch(
        input_ids=torch.tensor([ids], device="cuda"), labels=torch.tensor([labels], device="cuda"),
        position_ids=None, attention_mask=torch.tensor([mask], device="cuda"), cu_seqlens=None, max_seqlen=n,
        n_samples=1, n_tokens=n, n_labels=sum(1 for x in labels[1:] if x != IGNORE),
    )


def pack_rows(samples: list[Sample], row_len: int, seed: int) -> list[list[Sample]]:
    """LLaMA-Factory's packing: capacity cutoff_len - 1, then the trainer's sampler shuffles the rows."""
    rows = greedy_pack([len(s.input_ids) for s in samples], row_len - 1)
    order = np.random.default_rng(seed).permutation(len(rows))
    return [[samples[i] for i in rows[j]] for j in order]


# ------------------------------------------------------------------------------------- attention


class Varlen:
    """Variable-length FlashAttention through torch.nn.attention.varlen, boundaries from cu_seqlens."""

    available = False
    native_gqa = False
    detail = ""
    cu: torch.Tensor | None = None
    max_len = 0
    _fn = None
    _kwargs: dict = {}

    @classmethod
    def call(cls, q, k, v, cu, max_len):
        return cls._fn(q, k, v, cu, cu, max_len, max_len, **cls._kwargs)


def _reference_varlen(q, k, v, cu):
    """fp32 per-segment causal attention with repeated kv heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1).double() for t in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    return torch.cat(outs)


def setup_varlen() -> dict:
    report = {}
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:  # noqa: BLE001
        Varlen.detail = f"torch.nn.attention.varlen unavailable: {exc!r}"
        return {"available": False, "detail": Varlen.detail}
    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    report["signature"] = str(inspect.signature(varlen_attn))
    gen = torch.Generator(device="cuda").manual_seed(1)
    cu = torch.tensor([0, 180, 390, 391, 700], dtype=torch.int32, device="cuda")
    heads, kv_heads, dim, total = 28, 4, 128, 700
    for native_gqa in (True, False):
        try:
            q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            k = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            v = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            extra = dict(kwargs)
            if native_gqa and "enable_gqa" in params:
                extra["enable_gqa"] = True
            kk, vv = (k, v) if native_gqa else (k.repeat_interleave(heads // kv_heads, 1),
                                                  v.repeat_interleave(heads // kv_heads, 1))
            out = varlen_attn(q, kk, vv, cu, cu, 310, 310, **extra)
            grad = torch.randn_like(out)
            gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = _reference_varlen(q64, k64, v64, cu)
            rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
            errs = {name: float((a.double() - b).norm() / b.norm())
                    for name, a, b in (("out", out, ref), ("dq", gq, rq), ("dk", gk, rk), ("dv", gv, rv))}
            report["gqa_native" if native_gqa else "gqa_repeated"] = errs
            if max(errs.values()) < 2e-2:
                Varlen.available, Varlen.native_gqa, Varlen._fn, Varlen._kwargs = True, native_gqa, varlen_attn, extra
                break
        except Exception as exc:  # noqa: BLE001
            report["gqa_native" if native_gqa else "gqa_repeated"] = f"error: {exc!r}"[:400]
    report["available"] = Varlen.available
    report["native_gqa"] = Varlen.native_gqa
    return report


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: (b, h, l, d) in, (b, l, h, d) out; sample bounds from Varlen.cu."""
    b, h, length, d = query.shape
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * length, h, d)
    k = key.transpose(1, 2).reshape(b * length, hk, d)
    v = value.transpose(1, 2).reshape(b * length, hk, d)
    if hk != h and not Varlen.native_gqa:
        k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    out = Varlen.call(q, k, v, Varlen.cu, Varlen.max_len)
    return out.view(b, length, h, d), None


# ----------------------------------------------------------------------------------------- model


def build_model():
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    try:
        from transformers import AttentionInterface
    except ImportError:
        from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register("llmops_varlen", varlen_attention)
    config_kwargs = dict(QWEN25_7B)
    if "rope_parameters" in inspect.signature(Qwen2Config.__init__).parameters:
        config_kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA}
    else:
        config_kwargs["rope_theta"] = ROPE_THETA
    config = Qwen2Config(attn_implementation="sdpa", **config_kwargs)
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():  # our own seeded init: normal(0, 0.02) weights, zero biases, unit norms
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None)}
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    torch.cuda.synchronize()
    info = {
        "params": n_params,
        "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "build_s": round(time.perf_counter() - t0, 1),
        "rope_theta": rope.get("rope_theta"),
        "transformers": transformers.__version__,
        "dtype": str(next(model.get_base_model().parameters()).dtype),
        "config": dict(QWEN25_7B, rope_theta=ROPE_THETA),
    }
    return model, info


def set_attention(model, name: str) -> str:
    base = model.get_base_model()
    try:
        base.set_attn_implementation(name)
    except Exception:  # noqa: BLE001
        base.config._attn_implementation = name
    return base.config._attn_implementation


def set_checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        base.enable_input_require_grads()
    else:
        base.gradient_checkpointing_disable()
        with contextlib.suppress(Exception):
            base.disable_input_require_grads()
    base.config.use_cache = False


class Adapter:
    """Holds the adapter's initial weights so every run starts from the same point."""

    def __init__(self, model):
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.initial = {n: p.detach().clone() for n, p in self.params}

    def reset(self, dtype=torch.float32) -> list[torch.nn.Parameter]:
        for n, p in self.params:
            p.data = self.initial[n].to(dtype).clone()
            p.grad = None
        return [p for _, p in self.params]


class Liger:
    """`enable_liger_kernel: true` as LLaMA-Factory 0.9.4 applies it for SFT (apply_liger_kernel_to_qwen2())."""

    applied = False
    detail = ""

    @classmethod
    def apply(cls, model, smoke: MicroBatch) -> str:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        base = model.get_base_model()
        apply_liger_kernel_to_qwen2(model=base)
        cls.applied = True
        try:
            _smoke(model, smoke)
            cls.detail = "liger's own qwen2 patch (rope, rms_norm, swiglu, fused_linear_cross_entropy)"
        except Exception as exc:  # noqa: BLE001
            # liger's causal-LM forward reads config fields newer transformers may lack: same loss op, own wrapper
            from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

            def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
                hidden = self.model(input_ids=input_ids, **kwargs)[0]
                loss = LigerForCausalLMLoss(hidden_states=hidden, lm_head_weight=self.lm_head.weight, labels=labels,
                                            hidden_size=self.config.hidden_size,
                                            num_items_in_batch=num_items_in_batch)
                return types.SimpleNamespace(loss=loss)

            base.forward = types.MethodType(forward, base)
            _smoke(model, smoke)
            cls.detail = (f"liger rope/rms_norm/swiglu patch + LigerForCausalLMLoss through a local forward "
                          f"(liger's lce_forward failed: {exc!r})")[:400]
        return cls.detail


def _smoke(model, mb: MicroBatch) -> None:
    set_attention(model, "llmops_varlen" if Varlen.available else "sdpa")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = forward_loss(model, mb, mb.n_labels, "varlen" if Varlen.available else "sdpa-mask")
    loss.backward()
    model.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite loss")


def forward_loss(model, mb: MicroBatch, num_items: int, mode: str):
    kwargs = {"input_ids": mb.input_ids, "labels": mb.labels, "num_items_in_batch": num_items}
    if mode in ("varlen", "sdpa-mask", "sdpa-leaky", "shared-prefix"):
        kwargs["position_ids"] = mb.position_ids
    if mode == "sdpa-leaky":  # all-ones mask: transformers then ignores the sample bounds
        kwargs["attention_mask"] = torch.ones_like(mb.input_ids)
    elif mb.attention_mask is not None:
        kwargs["attention_mask"] = mb.attention_mask
    if mode == "varlen":
        Varlen.cu, Varlen.max_len = mb.cu_seqlens, mb.max_seqlen
    return model(**kwargs).loss


# ------------------------------------------------------------------ faster variants (opt-in: --variants)

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> float8 e4m3 (M, K) row-major and one fp32 scale per row (M, 1): x ~ x8 * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(torch.float8_e4m3fn), scale


class Fp8FrozenMatmul(torch.autograd.Function):
    """y = x @ W.T with W frozen: fp8 forward and input-gradient products, no weight gradient.

    W comes quantised twice, once per output row (the forward's right operand) and once per input column, stored
    transposed (the backward's): cuBLASLt's fp8 products take the right operand column-major only, and a frozen
    weight is quantised once. x and the incoming gradient are quantised per row on every call (e4m3 for both, as
    torchao's rowwise recipe; the per-row scale carries the range that e5m2 would).
    """

    @staticmethod
    def forward(ctx, x, w_rows, w_row_scale, wt_cols, w_col_scale):
        ctx.save_for_backward(wt_cols, w_col_scale)
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous())
        # fast accumulation in the forward product only, as torchao's default configuration
        y = torch._scaled_mm(x8, w_rows.t(), scale_a=x_scale, scale_b=w_row_scale, out_dtype=torch.bfloat16,
                             use_fast_accum=True)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        wt_cols, w_col_scale = ctx.saved_tensors
        g8, g_scale = quantize_rows(grad_y.reshape(-1, grad_y.shape[-1]).to(torch.bfloat16).contiguous())
        grad_x = torch._scaled_mm(g8, wt_cols.t(), scale_a=g_scale, scale_b=w_col_scale, out_dtype=torch.bfloat16)
        return grad_x.view(ctx.input_shape).to(ctx.input_dtype), None, None, None, None


class Fp8FrozenLinear(torch.nn.Module):
    """A LoRA layer's frozen base nn.Linear with fp8 products (bias, if any, added in bf16)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        with torch.no_grad():
            w = linear.weight.float()
            row_scale = w.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
            col_scale = w.abs().amax(dim=0).clamp(min=1e-12) / E4M3_MAX
            self.register_buffer("w_rows", (w / row_scale[:, None]).to(torch.float8_e4m3fn))
            self.register_buffer("w_row_scale", row_scale[None, :].contiguous())
            self.register_buffer("wt_cols", (w / col_scale[None, :]).t().contiguous().to(torch.float8_e4m3fn))
            self.register_buffer("w_col_scale", col_scale[None, :].contiguous())
        self.bias = linear.bias

    def forward(self, x):
        y = Fp8FrozenMatmul.apply(x, self.w_rows, self.w_row_scale, self.wt_cols, self.w_col_scale)
        return y if self.bias is None else y + self.bias


class Fp8:
    """Swaps every LoRA layer's base nn.Linear for Fp8FrozenLinear and back (the fp8 copies are freed on the way
    back, so later rows' peak memory does not carry them)."""

    applied = False
    originals: ClassVar[list] = []  # (LoRA layer, its bf16 base nn.Linear)
    quantize_s = 0.0

    @classmethod
    def set(cls, model, on: bool) -> None:
        if on == cls.applied:
            return
        if on:
            from peft.tuners.lora import Linear as LoraLinear

            t0 = time.perf_counter()
            cls.originals = [(m, m.base_layer) for m in model.modules() if isinstance(m, LoraLinear)]
            for module, linear in cls.originals:
                module.base_layer = Fp8FrozenLinear(linear)
            torch.cuda.synchronize()
            cls.quantize_s = time.perf_counter() - t0
        else:
            for module, linear in cls.originals:
                module.base_layer = linear
            cls.originals = []
        cls.applied = on


class Compiled:
    """torch.compile of the whole PeftModel, what the HF Trainer's accelerator does for `torch_compile: true`
    (backend inductor; `torch_compile_mode` picks the mode). One wrapper per mode, sharing the model's weights."""

    models: ClassVar[dict] = {}

    @classmethod
    def of(cls, model, mode: str, dynamic: bool | None = None):
        if (mode, dynamic) not in cls.models:
            cls.models[mode, dynamic] = torch.compile(model, backend="inductor", mode=mode, dynamic=dynamic)
        return cls.models[mode, dynamic]


FAST_VARIANTS = {
    "compile": ({"compile_mode": "default"}, "torch.compile of the whole model (torch_compile: true)"),
    "compile-max-autotune": ({"compile_mode": "max-autotune-no-cudagraphs"},
                             "torch.compile mode max-autotune-no-cudagraphs"),
    "compile-reduce-overhead": ({"compile_mode": "reduce-overhead"}, "torch.compile mode reduce-overhead (CUDA graphs)"),
    "fp8": ({"fp8": True}, "frozen base products in fp8 (torch._scaled_mm, row-wise scales)"),
    "compile+fp8": ({"compile_mode": "default", "fp8": True}, "torch.compile and fp8 base products"),
}
NO_LIGER = "-no-liger"  # a variant name with this suffix applies to the default without Liger (packed-sdpa-mask)


def fp8_selftest() -> dict:
    """Fp8FrozenLinear's output and input gradient against fp64 on the 7B's MLP shapes (random normal data, no
    outliers), next to the same products in bf16: the scale of the error the fp8 variants add per layer."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    report = {}
    for k, n in ((3584, 18944), (18944, 3584)):
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        linear.weight.normal_(0.0, 0.02, generator=gen)
        x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        y = Fp8FrozenLinear(linear)(x)
        grad_y = torch.randn(y.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        (grad_x,) = torch.autograd.grad(y, x, grad_y)
        w64, x64, g64 = linear.weight.double(), x.detach().double(), grad_y.double()
        y64, grad_x64 = x64 @ w64.t(), g64 @ w64

        def rel(a, b):
            return round(float((a.double() - b).norm() / b.norm()), 5)

        report[f"{k}->{n}"] = {"fp8_out": rel(y, y64), "fp8_grad_in": rel(grad_x, grad_x64),
                               "bf16_out": rel(x.detach() @ linear.weight.t(), y64),
                               "bf16_grad_in": rel(grad_y @ linear.weight, grad_x64)}
    return report


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
    compile_mode: str | None = None  # torch.compile mode of the whole model (Compiled), None: eager
    fp8: bool = False  # frozen base layers' products in fp8 (Fp8FrozenLinear)


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
    if not keys["packing"]:
        attention = "sdpa"
    elif keys["flash_attn"] == "fa2":
        attention = "varlen"  # with or without neat_packing: FA2 on the sample bounds
    elif keys["neat_packing"] and keys["flash_attn"] == "sdpa":
        hook = keys.get("ray_init_kwargs", {}).get("runtime_env", {}).get("worker_process_setup_hook")
        attention = "shared-prefix" if hook == SHARED_PREFIX_HOOK else "sdpa-mask"
    else:
        raise ValueError(f"no bench attention for {keys}")
    return Recipe(name, description, keys["packing"], attention, keys["per_device_train_batch_size"],
                  keys["gradient_accumulation_steps"], not keys["disable_gradient_checkpointing"], "fp32",
                  keys["enable_liger_kernel"], keys)


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """The HF Trainer's cosine schedule with linear warmup."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def runner_for(model, recipe: Recipe):
    """The model as the recipe runs it: fp8 base layers or not, compiled or eager."""
    Fp8.set(model, recipe.fp8)
    if not recipe.compile_mode:
        return model
    # Shared-prefix rows vary in length by construction: one graph with dynamic shapes rather than a recompile each.
    return Compiled.of(model, recipe.compile_mode, dynamic=True if recipe.attention == "shared-prefix" else None)


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
            steps.append([microbatch_for(recipe, chunk[m * recipe.micro_batch:(m + 1) * recipe.micro_batch], row_len,
                                         ViggoLikeTask.PREFIX_LEN) for m in range(recipe.accumulation)])
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
        loss = float(forward_loss(model, shared_microbatch([samples], ViggoLikeTask.PREFIX_LEN), n_items,
                                  "shared-prefix"))
    out["shared_prefix_loss"] = loss
    out["shared_prefix_rel_diff"] = abs(loss - unpacked) / abs(unpacked)
    return out


# ------------------------------------------------------------------------------------------ main


def environment() -> dict:
    import peft
    import transformers

    env = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            env["host_cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    from importlib import metadata

    for name in ("flash-attn", "liger-kernel", "llamafactory"):
        try:
            env[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name.replace("-", "_")] = "absent"
    return env


def write(out_dir: str, results: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "training_recipe.json"), "w") as f:
        json.dump(results, f, indent=1)


def run_variants(model, adapter, plan, pool, rows, row_len, n_params, results, out_dir, t_start) -> None:
    cursor = 0
    for recipe, warmup, timed in plan:
        try:
            n_steps = warmup + timed
            need = n_steps * recipe.micro_batch * recipe.accumulation
            if recipe.packed and cursor + need > len(rows):
                cursor = 0
            steps = make_steps(recipe, pool, rows[cursor:], n_steps, row_len)
            if recipe.packed:
                cursor += need
            row = measure(model, adapter, recipe, steps, warmup, n_params)
        except Exception as exc:  # noqa: BLE001
            row = {**dataclasses.asdict(recipe), "error": f"{exc!r}"[:500]}
            traceback.print_exc()
        results["variants"].append(row)
        print(f"[{time.perf_counter() - t_start:6.1f}s] {json.dumps(row)}", flush=True)
        write(out_dir, results)  # first: after a CUDA error the next call fails too
        torch.cuda.empty_cache()


def learning_runs(model, adapter, recipe: Recipe, label: str, steps, lrs, eval_rows, row_len, n_samples,
                  results, out_dir) -> None:
    """Train from the same initial adapter over the same samples; record train and held-out loss."""
    attention = recipe.attention
    for lr in lrs:
        try:
            set_checkpointing(model, recipe.checkpointing)
            set_attention(model, "llmops_varlen" if attention == "varlen" else "sdpa")
            t0 = time.perf_counter()
            losses = [float(x) for x in train(model, adapter, recipe, steps, schedule=True, lr=lr)]
            seconds = time.perf_counter() - t0
            tail = losses[-max(1, len(losses) // 10):]
            run = {
                "run": label,
                "recipe": recipe.name,
                "learning_rate": lr,
                "optimizer_steps": len(steps),
                "samples_per_step": round(n_samples / len(steps), 2),
                "first_step_loss": round(losses[0], 4),
                "last_10pct_mean_loss": round(sum(tail) / len(tail), 4),
                "eval_loss": round(eval_loss(model, eval_rows, row_len, "varlen" if Varlen.available
                                             else "sdpa-mask"), 4),
                "curve_every_10pct": [round(losses[min(len(losses) - 1, int(f * len(losses)))], 3)
                                      for f in np.linspace(0, 1, 11)],
                "seconds": round(seconds, 1),
            }
        except Exception as exc:  # noqa: BLE001
            run = {"run": label, "learning_rate": lr, "error": f"{exc!r}"[:500]}
            traceback.print_exc()
        results["loss"]["runs"].append(run)
        print("loss:", json.dumps(run), flush=True)
        write(out_dir, results)


@dataclasses.dataclass
class LearningCheck:
    """What learning_runs needs: the learning samples' packed rows (one per optimizer step), the held-out rows."""

    rows: list[list[Sample]]
    row_len: int
    eval_rows: list[list[Sample]]
    lrs: list[float]
    n_samples: int

    def steps(self, recipe: Recipe) -> list[list[MicroBatch]]:
        return [[microbatch_for(recipe, [row], self.row_len, ViggoLikeTask.PREFIX_LEN)] for row in self.rows]


def run_fast_variants(model, adapter, reference: Recipe, default: Recipe, no_liger: Recipe, names: list[str],
                      learning: LearningCheck | None, pool, rows, row_len: int, n_params: int, results: dict,
                      out_dir: str, t_start: float) -> None:
    """--variants: the reference; the variants of the default without Liger (if any are named) after their base;
    the default and its variants; last the default again (the run's noise). Each variant gets its numerics against
    its base on one packed row, its throughput on the same rows as its base, a profile and, with `learning`, the
    held-out loss after training on the learning samples next to its base's."""
    run_variants(model, adapter, [(reference, 3, 8)], pool, rows, row_len, n_params, results, out_dir, t_start)
    results["fp8_selftest"] = fp8_selftest()
    print("fp8 self-test:", json.dumps(results["fp8_selftest"]), flush=True)
    if learning:
        adapter.reset()
        results["loss"]["initial_eval_loss"] = round(eval_loss(model, learning.eval_rows, row_len,
                                                               "varlen" if Varlen.available else "sdpa-mask"), 4)
    results["profiles"], results["numerics"] = [], []
    plain = [name for name in names if name.endswith(NO_LIGER)]
    if plain:  # Liger cannot be taken off again: these go first
        variants_of(model, adapter, no_liger, plain, learning, pool, rows, row_len, n_params, results,
                    out_dir, t_start)
    results["liger"] = Liger.apply(model, packed_microbatch([pool[:8]], row_len))
    variants_of(model, adapter, default, [name for name in names if name not in plain], learning, pool,
                rows, row_len, n_params, results, out_dir, t_start)
    again = dataclasses.replace(default, name=f"{default.name}-again")
    run_variants(model, adapter, [(again, 1, 20)], pool, rows, row_len, n_params, results, out_dir, t_start)
    results["targets"] = targets(timed_by_name(results), [default.name, *names, again.name])


def variants_of(model, adapter, base: Recipe, names: list[str], learning: LearningCheck | None, pool, rows,
                row_len: int, n_params: int, results: dict, out_dir: str, t_start: float) -> None:
    """The base recipe, then each named variant of it: numerics against the base, throughput, profile; then the
    learning runs of the base and of each variant that trained."""
    run_variants(model, adapter, [(base, 2, 20)], pool, rows, row_len, n_params, results, out_dir, t_start)
    trained = [base]
    results["profiles"].append(profile_timed(model, adapter, base, pool, rows, row_len, timed_by_name(results)))
    check_row = microbatch_for(base, [rows[-1]], row_len, ViggoLikeTask.PREFIX_LEN)
    loss0, grads0, seconds0 = loss_and_gradients(model, adapter, base, check_row)
    dynamo = torch._dynamo.utils.counters
    for name in names:
        overrides, description = FAST_VARIANTS[name.removesuffix(NO_LIGER)]
        variant = dataclasses.replace(base, name=name, description=f"as {base.name}: {description}", rendered=None,
                                      **overrides)
        try:
            breaks, graphs = sum(dynamo["graph_break"].values()), dynamo["stats"]["unique_graphs"]
            loss, grads, seconds = loss_and_gradients(model, adapter, variant, check_row)
            check = {
                "variant": name,
                "against": base.name,
                "row_samples": check_row.n_samples,
                "loss": round(loss, 5),
                "base_loss": round(loss0, 5),
                "loss_rel_diff": abs(loss - loss0) / abs(loss0),
                "grad_rel_err": float((grads - grads0).norm() / grads0.norm()),
                "first_call_s": round(seconds, 2),  # compiled: dynamo + inductor for forward and backward
                "base_first_call_s": round(seconds0, 2),
                "new_graph_breaks": sum(dynamo["graph_break"].values()) - breaks,
                "new_compiled_graphs": dynamo["stats"]["unique_graphs"] - graphs,
                "graph_break_reasons_so_far": [reason.split("\n")[0] for reason in sorted(dynamo["graph_break"])],
            }
            if variant.fp8:
                check["fp8_quantize_s"] = round(Fp8.quantize_s, 2)
        except Exception as exc:  # noqa: BLE001
            check = {"variant": name, "error": f"{exc!r}"[:500]}
            traceback.print_exc()
        results["numerics"].append(check)
        print("numerics:", json.dumps(check), flush=True)
        run_variants(model, adapter, [(variant, 2, 20)], pool, rows, row_len, n_params, results, out_dir, t_start)
        if name in timed_by_name(results):
            trained.append(variant)
        results["profiles"].append(profile_timed(model, adapter, variant, pool, rows, row_len,
                                                 timed_by_name(results)))
        write(out_dir, results)
    if learning:
        for recipe in trained:
            learning_runs(model, adapter, recipe, f"{recipe.name} (1 row/step)", learning.steps(recipe), learning.lrs,
                          learning.eval_rows, row_len, learning.n_samples, results, out_dir)


def print_fast_summary(results: dict) -> None:
    by_name = timed_by_name(results)
    profiles = {p["recipe"]: p for p in results.get("profiles", []) if "error" not in p}
    numerics = {c["variant"]: c for c in results.get("numerics", [])}
    reference = by_name.get("reference", {}).get("samples_per_s")
    print(f"{'recipe':<22} {'samples/s':>9} {'x ref':>6} {'TFLOP/s':>8} {'peak GiB':>8} {'warm-up s':>9} | "
          f"{'matmul':>7} {'other':>8} {'attn':>6} {'host gap':>8} (s/step) | {'loss rel':>8} {'grad rel':>8}")
    for name, row in by_name.items():
        prof = profiles.get(name, {})
        cat = prof.get("categories_s_per_step", {})
        other = sum(v for k, v in cat.items() if k not in ("matmul", "attention"))  # element-wise, loss, copies
        check = numerics.get(name, {})
        print(f"{name:<22} {row['samples_per_s']:>9.2f} {row['samples_per_s'] / reference if reference else 0:>6.1f} "
              f"{row['model_tflops']:>8.1f} {row['peak_alloc_gib']:>8.2f} {row['warmup_s']:>9.1f} | "
              f"{cat.get('matmul', 0):>7.4f} {other:>8.4f} {cat.get('attention', 0):>6.4f} "
              f"{prof.get('host_gap_s_per_step', 0):>8.4f}          | {check.get('loss_rel_diff', 0):>8.1e} "
              f"{check.get('grad_rel_err', 0):>8.1e}")


def timed_by_name(results: dict) -> dict:
    return {v["name"]: v for v in results["variants"] if "samples_per_s" in v}


def targets(by_name: dict, names) -> list[dict]:
    """The issue's targets: >= 20x the reference's samples/s in the same run, and >= 50 samples/s."""
    out = []
    for name in names:
        if "reference" in by_name and name in by_name:
            speedup = by_name[name]["samples_per_s"] / by_name["reference"]["samples_per_s"]
            out.append({
                "recipe": name,
                "speedup_vs_reference": round(speedup, 1),
                "samples_per_s": by_name[name]["samples_per_s"],
                "met_20x": bool(speedup >= 20),
                "met_50_per_s": bool(by_name[name]["samples_per_s"] >= 50),
            })
    return out


def slope(by_name: dict, small: str, large: str) -> dict | None:
    a, b = by_name.get(small), by_name.get(large)
    if not (a and b):
        return None
    per_token = (b["peak_alloc_gib"] - a["peak_alloc_gib"]) / (b["tokens_per_microbatch"] - a["tokens_per_microbatch"])
    return {"from": [small, large], "per_token_mib": round(per_token * 1024, 3),
            "intercept_gib": round(a["peak_alloc_gib"] - per_token * a["tokens_per_microbatch"], 2)}


def print_table(results: dict, n_params: int) -> None:
    env = results["env"]
    print()
    print(f"GPU: {env['gpu']}  torch {env['torch']}  transformers {env['transformers']}  peft {env['peft']}  "
          f"liger {env.get('liger_kernel')}  (Qwen2.5-7B architecture, N = {n_params / 1e9:.2f} B, LoRA r=8 all "
          f"linear, bf16)")
    print(f"{'recipe':<22} {'mb x acc':>8} {'ckpt':>5} {'attn':>9} {'liger':>5} {'lora':>5} {'samples/s':>10} "
          f"{'tokens/s':>9} {'TFLOP/s':>8} {'peak GiB':>9}")
    for v in results["variants"]:
        if "error" in v:
            print(f"{v['name']:<22} ERROR {v['error'][:90]}")
            continue
        print(f"{v['name']:<22} {str(v['micro_batch']) + 'x' + str(v['accumulation']):>8} "
              f"{'yes' if v['checkpointing'] else 'no':>5} {v['attention']:>9} {'yes' if v['liger'] else 'no':>5} "
              f"{v['lora_dtype']:>5} {v['samples_per_s']:>10.2f} {v['tokens_per_s']:>9.0f} {v['model_tflops']:>8.1f} "
              f"{v['peak_alloc_gib']:>9.2f}")
    for target in results.get("targets", []):
        print("targets (>= 20x reference and >= 50 samples/s):", json.dumps(target))
    report = results.get("loss", {})
    if report.get("runs"):
        print(f"held-out loss after {report['samples']} samples (initial {report.get('initial_eval_loss')}):")
        for run in report["runs"]:
            if "error" in run:
                print(f"  {run['run']}: ERROR {run['error'][:80]}")
                continue
            print(f"  lr {run['learning_rate']:<6g} {run['run']:<22} {run['samples_per_step']:5.2f} samples/step "
                  f"{run['optimizer_steps']:4d} steps: eval {run['eval_loss']:.4f}  train tail "
                  f"{run['last_10pct_mean_loss']:.4f}")
    print(f"wall {results.get('wall_s')} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--cutoff-len", type=int, default=2048)
    parser.add_argument("--loss-samples", type=int, default=1024)
    parser.add_argument("--loss-lrs", type=lambda x: [float(v) for v in x.split(",")], default=[1e-4, 1e-3],
                        help="learning rates of the learning comparison (1e-4 is the reference's)")
    parser.add_argument("--no-learning", dest="learning", action="store_false",
                        help="throughput rows and profiles only (about 2 minutes instead of 5)")
    parser.add_argument("--shared", action="store_true",
                        help="with --variants: the bases are the default and its no-Liger form with sharedPrefix")
    parser.add_argument("--variants", type=lambda x: x.split(","), default=[],
                        help=f"measure only the reference, the default and these faster variants of it "
                             f"(comma-separated: {', '.join(FAST_VARIANTS)}; with the suffix {NO_LIGER}: of the "
                             f"default without Liger)")
    args = parser.parse_args()
    unknown = sorted(name for name in args.variants if name.removesuffix(NO_LIGER) not in FAST_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(FAST_VARIANTS)}")
    row_len = args.cutoff_len
    t_start = time.perf_counter()

    results: dict = {
        "what": "LoRA SFT throughput and learning, reference vs packed recipe: a transformers+peft(+liger) "
                "reproduction of the LLaMA-Factory 0.9.4 configs (LLaMA-Factory itself is not run on the device)",
        "env": environment(),
    }
    print(json.dumps(results["env"]), flush=True)
    results["attention_selftest"] = setup_varlen()
    print("varlen self-test:", json.dumps(results["attention_selftest"]), flush=True)
    packed_attention = "varlen" if Varlen.available else "sdpa-mask"

    task = ViggoLikeTask(seed=7)
    pool = task.stream(seed=11, n=3000)  # throughput samples
    lengths = np.array([len(s.input_ids) for s in pool])
    n_labels = np.array([sum(1 for x in s.labels if x != IGNORE) for s in pool])
    rows = pack_rows(pool, row_len, seed=3)
    if shared_prefix.shared_prefix_length([(s.input_ids, s.labels) for s in pool]) != ViggoLikeTask.PREFIX_LEN:
        raise RuntimeError("the samples do not share the prefix the shared-prefix rows assume")
    shared_tokens = sum(ViggoLikeTask.PREFIX_LEN + sum(len(s.input_ids) - ViggoLikeTask.PREFIX_LEN for s in r)
                        for r in rows)
    results["data"] = {
        "shared_prefix_tokens": ViggoLikeTask.PREFIX_LEN,
        "shared_row_tokens_mean": round(shared_tokens / len(rows), 1),
        "mean_tokens": round(float(lengths.mean()), 1),
        "p5_p50_p95_tokens": [int(np.percentile(lengths, q)) for q in (5, 50, 95)],
        "mean_label_tokens": round(float(n_labels.mean()), 1),
        "rows": len(rows),
        "samples_per_row": round(len(pool) / len(rows), 2),
        "row_fill": round(float(lengths.sum()) / (len(rows) * row_len), 4),
    }
    print("data:", json.dumps(results["data"]), flush=True)

    model, info = build_model()
    results["model"] = info
    n_params = info["params"]
    print("model:", json.dumps({k: v for k, v in info.items() if k != "config"}), flush=True)
    adapter = Adapter(model)
    results["variants"] = []
    write(args.out, results)

    def rendered(name, description, image, **overrides):
        return rendered_recipe(name, description, image, row_len, **overrides)

    def bf16_adapter(base: Recipe, name: str) -> Recipe:  # `pure_bf16` goes through extraArgs, not the recipe
        return dataclasses.replace(base, name=name, description=f"as {base.name}, adapter in bf16 without autocast "
                                   "(pure_bf16)", lora_dtype="bf16")

    # The reference is the LLaMA-Factory config with the reference's keys given as user choices.
    reference = rendered("reference", "1 sample/micro-batch, accum 8, gradient checkpointing, SDPA", "stock",
                         packing=False, perDeviceBatchSize=1, gradientAccumulationSteps=8,
                         gradientCheckpointing=True, ligerKernel=False)
    default = rendered("default", "what the operator renders with the stock image: packed 2048-token row x1, "
                       "neat packing (SDPA, block-diagonal mask), liger, no checkpointing", "stock")
    shared = functools.partial(rendered, image="stock", sharedPrefix=True)
    default_shared = shared("default-shared", "as default with sharedPrefix: the same samples per row, their common "
                            "prompt once per row (4-D mask)")
    if default_shared.attention != "shared-prefix":
        raise RuntimeError(f"sharedPrefix did not render the shared-prefix hook: {default_shared.rendered}")
    default_fa2 = rendered("default-fa2", "what the operator renders for an image with flash-attn "
                           "(finetune_flash_attention): as default with FA2 varlen, no mask", "flash-attn")
    default_x2 = rendered("default-x2", "as default, packed rows x2 (twice the effective batch)", "stock",
                          perDeviceBatchSize=2)
    packed_sdpa_mask = rendered("packed-sdpa-mask", "as default without liger", "stock", ligerKernel=False)
    packed_fa2 = rendered("packed-fa2", "as default-fa2 without liger", "flash-attn", ligerKernel=False)
    held_out = task.stream(seed=13, n=96)
    eval_rows = pack_rows(held_out, row_len, seed=5)
    learn = task.stream(seed=17, n=args.loss_samples)
    results["loss"] = {"samples": len(learn), "schedule": "cosine, 10% warmup, AdamW, clip 1.0",
                       "eval_samples": len(held_out), "runs": []}
    if args.variants:
        learning = None
        if args.learning:
            learning = LearningCheck(pack_rows(learn, row_len, seed=19), row_len, eval_rows, args.loss_lrs, len(learn))
        bases = (default, packed_sdpa_mask) if not args.shared else (
            default_shared, shared("shared-sdpa-mask", "as default-shared without liger", ligerKernel=False))
        run_fast_variants(model, adapter, reference, *bases, args.variants, learning, pool, rows, row_len, n_params,
                          results, args.out, t_start)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        write(args.out, results)
        print_table(results, n_params)
        print_fast_summary(results)
        return 0
    # 1. without Liger
    run_variants(model, adapter, [
        (reference, 3, 8),  # 3 warm-up steps see most padded lengths (new shapes cost kernel set-up)
        (packed_sdpa_mask, 2, 10),
        (packed_fa2, 2, 10),
        (rendered("packed-fa2-x2", "as packed-fa2, rows x2", "flash-attn", ligerKernel=False,
                  perDeviceBatchSize=2), 1, 5),
        (bf16_adapter(packed_fa2, "packed-fa2-pure-bf16"), 2, 8),
    ], pool, rows, row_len, n_params, results, args.out, t_start)

    try:
        adapter.reset()
        results["equivalence"] = equivalence(model, learn[:8])
        print("equivalence:", json.dumps(results["equivalence"]), flush=True)
        adapter.reset()
        results["loss"]["initial_eval_loss"] = round(eval_loss(model, eval_rows, row_len, packed_attention), 4)
    except Exception as exc:  # noqa: BLE001
        results["equivalence"] = {"error": repr(exc)[:500]}
        traceback.print_exc()
    # The reference's schedule (8 samples per optimizer step, no Liger), run as one packed row per step with
    # attention kept inside each sample: the same gradient as 8 one-sample micro-batches under token-sum
    # normalization (`equivalence` checks the forward part), at a fraction of the device time.
    ref_schedule = dataclasses.replace(packed_fa2 if Varlen.available else packed_sdpa_mask, rendered=None,
                                       name="reference-schedule", description="8 samples per optimizer step")
    ref_steps = []
    for i in range(0, len(learn), 8):
        group = learn[i:i + 8]
        ref_steps.append([packed_microbatch([group], -(-sum(len(s.input_ids) for s in group) // 8) * 8)])
    if args.learning:
        learning_runs(model, adapter, ref_schedule, "reference (8/step)", ref_steps, args.loss_lrs, eval_rows,
                      row_len, len(learn), results, args.out)

    # 2. with Liger (cannot be taken off again: everything after this point runs with it)
    try:
        results["liger"] = Liger.apply(model, packed_microbatch([learn[:8]], 2048))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            mb = packed_microbatch([learn[:8]], -(-sum(len(s.input_ids) for s in learn[:8]) // 8) * 8)
            adapter.reset()
            liger_loss = float(forward_loss(model, mb, mb.n_labels, packed_attention))
        results["equivalence"]["packed_liger_loss"] = liger_loss
        results["equivalence"]["packed_liger_rel_diff"] = abs(liger_loss - results["equivalence"]["unpacked_loss"]) / \
            abs(results["equivalence"]["unpacked_loss"])
        print("liger:", results["liger"], json.dumps(results["equivalence"]), flush=True)
    except Exception as exc:  # noqa: BLE001
        results["liger"] = f"unavailable: {exc!r}"[:500]
        traceback.print_exc()
    if Liger.applied:
        # The two defaults twice, interleaved: their spread is the run's timing noise.
        run_variants(model, adapter, [
            (default, 2, 20),
            (default_shared, 3, 20),  # new row lengths cost SDPA plan set-up: more warm-up
            (shared("default-shared-x3", "as default-shared, 3 rows per micro-batch (3x the effective batch)",
                    perDeviceBatchSize=3), 3, 10),
            (default_fa2, 2, 20),
            (default_x2, 1, 10),
            (rendered("default-fa2-x2", "as default-fa2, rows x2", "flash-attn", perDeviceBatchSize=2), 1, 10),
            (rendered("default-ckpt", "as default, gradient checkpointing", "stock", gradientCheckpointing=True),
             1, 6),
            (rendered("default-x4-ckpt", "as default, rows x4, gradient checkpointing", "stock",
                      perDeviceBatchSize=4, gradientCheckpointing=True), 1, 3),
            (shared("default-shared-ckpt", "as default-shared, gradient checkpointing", gradientCheckpointing=True),
             2, 6),
            (bf16_adapter(default, "default-pure-bf16"), 2, 8),
            (dataclasses.replace(default, name="default-again"), 1, 20),
            (dataclasses.replace(default_shared, name="default-shared-again"), 1, 20),
            (dataclasses.replace(default_fa2, name="default-fa2-again"), 1, 20),
        ], pool, rows, row_len, n_params, results, args.out, t_start)

    by_name = timed_by_name(results)
    results["targets"] = targets(by_name, ("default", "default-again", "default-shared", "default-shared-again",
                                           "default-shared-x3", "default-fa2", "default-fa2-again", "packed-sdpa-mask",
                                           "packed-fa2"))
    results["memory_calibration"] = {
        "weights_gib": round(n_params * 2 / GIB, 2),
        "no_ckpt": slope(by_name, "packed-fa2", "packed-fa2-x2"),
        "no_ckpt_liger": slope(by_name, "default", "default-x2"),
        "no_ckpt_liger_fa2": slope(by_name, "default-fa2", "default-fa2-x2"),
        "ckpt_liger": slope(by_name, "default-ckpt", "default-x4-ckpt"),
    }
    print("memory calibration:", json.dumps(results["memory_calibration"]), flush=True)
    write(args.out, results)

    results["profiles"] = []
    for profiled in ((default, default_shared, default_fa2) if Liger.applied else (packed_sdpa_mask, packed_fa2)):
        results["profiles"].append(profile_timed(model, adapter, profiled, pool, rows, row_len, by_name))
        write(args.out, results)

    if Liger.applied and args.learning:  # most telling first: the device time may run out before the last
        learn_rows = pack_rows(learn, row_len, seed=19)
        row_steps = [[packed_microbatch([r], row_len)] for r in learn_rows]
        shared_steps = [[shared_microbatch([r], ViggoLikeTask.PREFIX_LEN)] for r in learn_rows]
        learning_runs(model, adapter, default, "default (1 row/step)", row_steps, args.loss_lrs, eval_rows,
                      row_len, len(learn), results, args.out)
        learning_runs(model, adapter, default_shared, "default-shared (1 row/step)", shared_steps, args.loss_lrs,
                      eval_rows, row_len, len(learn), results, args.out)
        x2_steps = [[packed_microbatch(learn_rows[i:i + 2], row_len)] for i in range(0, len(learn_rows), 2)]
        learning_runs(model, adapter, default_x2, "default-x2 (2 rows/step)", x2_steps, args.loss_lrs, eval_rows,
                      row_len, len(learn), results, args.out)
        learning_runs(model, adapter, default_fa2, "default-fa2 (1 row/step)", row_steps, args.loss_lrs, eval_rows,
                      row_len, len(learn), results, args.out)
        learning_runs(model, adapter, bf16_adapter(default, "default-pure-bf16"), "default, pure_bf16", row_steps,
                      args.loss_lrs, eval_rows, row_len, len(learn), results, args.out)

    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    write(args.out, results)
    print_table(results, n_params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
