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
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

from training_bench.data import GIB, IGNORE, ViggoLikeTask, pack_rows, packed_microbatch, shared_microbatch
from training_bench.model import (Adapter, FAST_VARIANTS, Liger, NO_LIGER, Varlen, build_model, forward_loss,
                                  setup_varlen)
from training_bench.steps import Recipe, equivalence, eval_loss, profile_timed, rendered_recipe
from training_bench.report import environment, print_fast_summary, print_table, slope, targets, timed_by_name, write
from training_bench.runs import LearningCheck, learning_runs, run_fast_variants, run_variants
from payloads import shared_prefix  # importable once training_bench has put operator/ on the path


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
        shared_steps = [[shared_microbatch([r])] for r in learn_rows]
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
