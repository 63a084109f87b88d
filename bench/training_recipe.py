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
  imported from operator/): for an H100 FineTune of Qwen2.5-7B with the stock image (no flash-attn), packed rows
  with the shared prefix, decoder layers compiled, no Liger. `default-ckpt` is what a profile that needs gradient
  checkpointing gets (L4, A10G: shared prefix and Liger, not compiled), `default-fa2` what an image with flash-attn
  gets, `packed-liger` the earlier default (neat packing's mask and Liger, nothing shared, eager).
* shared-prefix: the rows of neat packing with the prompt tokens all samples start with carried once per row,
  built, masked and padded by the operator's own `payloads/shared_prefix.py` (what its hook makes LLaMA-Factory
  0.9.4 do in each Ray Train worker): the same samples per row and per optimizer step as without sharing.
* compiled layers: each decoder layer under torch.compile (inductor, dynamic shapes), the embedding, final norm
  and loss eager, as `payloads/compile_layers.py` does in each worker (`CompiledLayers`). Its compile is in the
  recipe's warm-up steps (`warmup_s`) and in `first_call_s` of the numerics.
* liger: liger-kernel's own Qwen2 patch, the call LLaMA-Factory makes for `enable_liger_kernel: true` in SFT
  (RoPE, RMSNorm, SwiGLU and fused linear cross-entropy). It cannot be removed once applied, so every recipe
  without it is measured first.

The synthetic samples follow ViGGO's shape (a fixed ~127-token instruction, a short input, a short structured
answer; ~194 tokens) and the answers are learnable from random weights: a function token, then a chain of
attribute tokens where each token fixes the next (a seeded permutation), then <|im_end|>.

Faster variants, opt-in (`--variants fp8,compile,compile-no-liger`): only the reference, the earlier default
(packed-liger, or shared-liger with `--shared`) and the named variants are measured, in one process, each with its
numerics against its base on one packed row (loss and adapter gradients), its throughput on the same rows as its
base and a kernel profile. A name with the suffix `-no-liger` is a variant of that base without Liger
(packed-sdpa-mask, or shared-eager), measured before Liger is applied.

* compile: the whole PeftModel under torch.compile (inductor, mode "default"), as the HF Trainer's accelerator
  wraps it for `torch_compile: true`; `compile-max-autotune` and `compile-reduce-overhead` use the modes
  "max-autotune-no-cudagraphs" and "reduce-overhead" (`torch_compile_mode`). `compile-layers`: each decoder
  layer instead (what the default does).
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
from training_bench.model import (Adapter, CompiledLayers, FAST_VARIANTS, Liger, NO_LIGER, Varlen, build_model,
                                  forward_loss, setup_varlen)
from training_bench.steps import equivalence, eval_loss, profile_timed, rendered_recipe
from training_bench.report import environment, print_fast_summary, print_table, slope, targets, timed_by_name, write
from training_bench.runs import WARM_ON_TIMED, LearningCheck, learning_runs, run_fast_variants, run_variants
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

    # The reference is the LLaMA-Factory config with the reference's keys given as user choices.
    reference = rendered("reference", "1 sample/micro-batch, accum 8, gradient checkpointing, SDPA", "stock",
                         packing=False, perDeviceBatchSize=1, gradientAccumulationSteps=8,
                         gradientCheckpointing=True, ligerKernel=False)
    default = rendered("default", "what the operator renders with the stock image on an H100: packed 2048-token "
                       "rows, their shared prompt once per row (SDPA, 4-D mask), decoder layers compiled, no Liger, "
                       "no checkpointing", "stock")
    if (default.attention, default.compile_scope, default.liger) != ("shared-prefix", "layers", False):
        raise RuntimeError(f"the rendered default is not the measured one: {default.rendered}")
    shared = functools.partial(rendered, image="stock", compile=False)
    shared_eager = shared("shared-eager", "as default, not compiled (compile: false; Liger off)", ligerKernel=False)
    shared_liger = shared("shared-liger", "as default, not compiled, with Liger (compile: false)")
    # Where one row needs checkpointing (the L4 and A10G profiles): the recipe keeps the shared prefix, turns Liger
    # on and does not compile; here on the H100 by asking for the checkpointing.
    default_ckpt = rendered("default-ckpt", "what the operator renders where checkpointing is needed (L4, A10G): "
                            "shared prefix, Liger, gradient checkpointing, not compiled", "stock",
                            gradientCheckpointing=True)
    unshared = functools.partial(rendered, image="stock", sharedPrefix=False)
    packed_liger = unshared("packed-liger", "the earlier default: packed rows, neat packing (SDPA, block-diagonal "
                            "mask), Liger, no checkpointing")
    packed_sdpa_mask = unshared("packed-sdpa-mask", "as packed-liger without Liger", ligerKernel=False)
    default_fa2 = rendered("default-fa2", "what the operator renders for an image with flash-attn "
                           "(finetune_flash_attention): packed rows, FA2 varlen, Liger, no mask", "flash-attn")
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
        bases = (packed_liger, packed_sdpa_mask) if not args.shared else (shared_liger, shared_eager)
        run_fast_variants(model, adapter, reference, *bases, args.variants, learning, pool, rows, row_len, n_params,
                          results, args.out, t_start)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        write(args.out, results)
        print_table(results, n_params)
        print_fast_summary(results)
        return 0
    # 1. without Liger: the reference, the default and their learning first (the most telling numbers)
    run_variants(model, adapter, [
        # Rows of varying length: every length is seen once before timing (a new one costs the attention kernel's
        # set-up and, compiled, a guard check), as it is in a job of many epochs.
        (reference, WARM_ON_TIMED, 8),
        (default, WARM_ON_TIMED, 20),  # its warm-up holds the compile
        (shared_eager, WARM_ON_TIMED, 20),
        (packed_sdpa_mask, 2, 10),
        (packed_fa2, 2, 10),
        (rendered("packed-fa2-x2", "as packed-fa2, rows x2", "flash-attn", ligerKernel=False,
                  perDeviceBatchSize=2), 1, 5),
        (dataclasses.replace(default, name="default-again"), WARM_ON_TIMED, 20),
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
    learn_rows = pack_rows(learn, row_len, seed=19)
    row_steps = [[packed_microbatch([r], row_len)] for r in learn_rows]
    shared_steps = [[shared_microbatch([r])] for r in learn_rows]
    if args.learning:
        # The reference's schedule (8 samples per optimizer step, no Liger), run as one packed row per step with
        # attention kept inside each sample: the same gradient as 8 one-sample micro-batches under token-sum
        # normalization (`equivalence` checks the forward part), at a fraction of the device time.
        ref_schedule = dataclasses.replace(packed_fa2 if Varlen.available else packed_sdpa_mask, rendered=None,
                                           name="reference-schedule", description="8 samples per optimizer step")
        ref_steps = []
        for i in range(0, len(learn), 8):
            group = learn[i:i + 8]
            ref_steps.append([packed_microbatch([group], -(-sum(len(s.input_ids) for s in group) // 8) * 8)])
        learning_runs(model, adapter, ref_schedule, "reference (8/step)", ref_steps, args.loss_lrs, eval_rows,
                      row_len, len(learn), results, args.out)
        learning_runs(model, adapter, default, "default (1 row/step)", shared_steps, args.loss_lrs, eval_rows,
                      row_len, len(learn), results, args.out)
    results["profiles"] = [profile_timed(model, adapter, default, pool, rows, row_len, timed_by_name(results))]
    write(args.out, results)

    # 2. with Liger (cannot be taken off again: everything after this point runs with it). The compiled layers are
    # done with: their graphs and what they hold go, so the peaks below are the recipes' own.
    CompiledLayers.forget()
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
        # Pairs measured twice, interleaved: their spread is the run's timing noise.
        run_variants(model, adapter, [
            (packed_liger, 2, 20),
            (shared_liger, WARM_ON_TIMED, 20),
            (shared("shared-liger-x3", "as shared-liger, 3 rows per micro-batch (3x the effective batch)",
                    perDeviceBatchSize=3), WARM_ON_TIMED, 10),
            (default_fa2, 2, 20),
            (unshared("packed-liger-x2", "as packed-liger, packed rows x2 (twice the effective batch)",
                      perDeviceBatchSize=2), 1, 10),
            (rendered("default-fa2-x2", "as default-fa2, rows x2", "flash-attn", perDeviceBatchSize=2), 1, 10),
            (unshared("packed-liger-ckpt", "as packed-liger, gradient checkpointing", gradientCheckpointing=True),
             1, 6),
            (unshared("packed-liger-x4-ckpt", "as packed-liger, rows x4, gradient checkpointing",
                      perDeviceBatchSize=4, gradientCheckpointing=True), 1, 3),
            (default_ckpt, WARM_ON_TIMED, 6),
            (dataclasses.replace(packed_liger, name="packed-liger-again"), 1, 20),
            (dataclasses.replace(shared_liger, name="shared-liger-again"), WARM_ON_TIMED, 20),
            (dataclasses.replace(default_fa2, name="default-fa2-again"), 1, 20),
        ], pool, rows, row_len, n_params, results, args.out, t_start)

    by_name = timed_by_name(results)
    results["targets"] = targets(by_name, ("default", "default-again", "shared-eager", "packed-liger",
                                           "packed-liger-again", "shared-liger", "shared-liger-x3", "default-fa2",
                                           "default-fa2-again", "default-ckpt", "packed-sdpa-mask", "packed-fa2"))
    results["memory_calibration"] = {
        "weights_gib": round(n_params * 2 / GIB, 2),
        "no_ckpt": slope(by_name, "packed-fa2", "packed-fa2-x2"),
        "no_ckpt_liger": slope(by_name, "packed-liger", "packed-liger-x2"),
        "no_ckpt_liger_fa2": slope(by_name, "default-fa2", "default-fa2-x2"),
        "ckpt_liger": slope(by_name, "packed-liger-ckpt", "packed-liger-x4-ckpt"),
    }
    print("memory calibration:", json.dumps(results["memory_calibration"]), flush=True)
    write(args.out, results)

    if Liger.applied:
        for profiled in (packed_liger, default_fa2):
            results["profiles"].append(profile_timed(model, adapter, profiled, pool, rows, row_len, by_name))
            write(args.out, results)
    if Liger.applied and args.learning:  # (rows x2 and FA2 learned as packed-liger did: earlier results files)
        learning_runs(model, adapter, packed_liger, "packed-liger (1 row/step)", row_steps, args.loss_lrs,
                      eval_rows, row_len, len(learn), results, args.out)

    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    write(args.out, results)
    print_table(results, n_params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
