"""The Qwen2.5-7B architecture with LoRA, its attention modes, Liger, and the faster variants (fp8, compile)."""

from __future__ import annotations

import contextlib
import inspect
import time
import types
from typing import ClassVar

import torch
from payloads import compile_layers

from .data import MicroBatch



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


CPP_WRAPPER = "cpp-wrapper"  # not a torch.compile mode: inductor's C++ wrapper (kernels launched without Python)


class CompiledLayers:
    """torch.compile of each decoder layer instead of the whole model (regional compilation): the 28 layers run
    the same code, so dynamo compiles one and reuses it for the others (parameters are graph inputs), which cuts
    the compile time to about one layer's; the embedding, the final norm and the loss stay eager. Each layer's call
    is `payloads.compile_layers.training_call`, what the LLaMA-Factory worker sets. `set` swaps the layers' compiled
    calls in and out, so the eager recipes of the same run keep running eagerly."""

    compiled: ClassVar[dict] = {}  # (layer index, mode, dynamic) -> compiled call

    @classmethod
    def set(cls, model, mode: str | None, dynamic: bool | None = None) -> None:
        for i, layer in enumerate(compile_layers.repeated_layers(model)):
            if mode is None:
                layer._compiled_call_impl = None
                continue
            key = (i, mode, dynamic)
            if key not in cls.compiled:
                how = {"options": {"cpp_wrapper": True}} if mode == CPP_WRAPPER else {"mode": mode}
                cls.compiled[key] = compile_layers.training_call(layer, backend="inductor", dynamic=dynamic, **how)
            layer._compiled_call_impl = cls.compiled[key]

    @classmethod
    def forget(cls) -> None:
        cls.compiled.clear()
        torch._dynamo.reset()


FAST_VARIANTS = {
    "compile": ({"compile_mode": "default"}, "torch.compile of the whole model (torch_compile: true)"),
    "compile-layers": ({"compile_mode": "default", "compile_scope": "layers"},
                       "torch.compile of each decoder layer (regional compilation; training.compile)"),
    "compile-layers-pad8": ({"compile_mode": "default", "compile_scope": "layers", "pad_multiple": 8},
                            "compiled layers, shared rows padded to a multiple of 8 only (more shapes)"),
    "compile-layers-cpp": ({"compile_mode": CPP_WRAPPER, "compile_scope": "layers"},
                           "compiled layers with inductor's C++ wrapper (cpp_wrapper)"),
    "compile-layers-cudagraphs": ({"compile_mode": "reduce-overhead", "compile_scope": "layers"},
                                  "compiled layers as CUDA graphs (mode reduce-overhead)"),
    "compile-max-autotune": ({"compile_mode": "max-autotune-no-cudagraphs"},
                             "torch.compile mode max-autotune-no-cudagraphs"),
    "compile-reduce-overhead": ({"compile_mode": "reduce-overhead"},
                                "torch.compile mode reduce-overhead (CUDA graphs)"),
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
