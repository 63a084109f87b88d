#!/usr/bin/env python3
"""LoRA SFT throughput of the operator's rendered LLaMA-Factory 0.9.4 config, trained by LLaMA-Factory itself.

bench/training_recipe.py reproduces the recipes with transformers + peft; this runs the real code path: the
`train.yaml` that `llmops.builders.finetune.build` renders for examples/viggo/finetune.yaml on an H100 (stock image,
no flash-attn), fed to `llamafactory-cli train` on one GPU without Ray, as one Ray Train worker runs it. On the
device machine (no network; LLaMA-Factory and the versions it pins come as 19 MiB of wheels in .whl/lf/, fetched
here once and carried there):

    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl/lf -r bench/llamafactory_wheels.txt        # here
    python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/lf .whl/lf/*.whl  # there, then:
    PYTHONPATH=/tmp/lf:operator PYTHONUNBUFFERED=1 python3 bench/llamafactory_run.py --out "$OUT"

and end to end on a CPU in a few minutes: `--tiny --cpu` (a two-layer model; bf16 and Liger off).

Set up here, as nothing can be downloaded:

* the Qwen2.5-7B architecture (training_bench/model.py's config) with random bf16 weights, made on the GPU and
  saved to --model-dir (reused by the next run while its config matches), with a byte-level BPE tokenizer trained
  on the samples (every word of them one token) carrying Qwen's chat tokens and chat template;
* ViGGO-shaped samples in alpaca format: a fixed instruction, a short sentence, a function-call answer with
  values from tests/payload_data/viggo_test.jsonl, sized to ViGGO's counts under Qwen's tokenizer (~194 tokens a
  sample, ~150 of them a prefix all samples share, ~26 label tokens). The counts are measured with
  LLaMA-Factory's own template and processor and recorded.

Recipes (--recipes), each rendered by the operator (but `reference`) and trained in a process of its own:

* reference: the reference tutorial's config (its lora_sft_ray.yaml): one sample per micro-batch, 8 accumulation
  steps, gradient checkpointing, SDPA, no packing, no Liger;
* default: the FineTune as it is (shared prefix, decoder layers compiled `auto`: a run of these 80 steps is too
  short, so the worker logs why it does not compile and trains eagerly);
* compile-layers: with `training.compile: true`, the default compiled whatever the job's length;
* packed-liger: with `training.sharedPrefix: false`, the earlier default (neat packing's mask, Liger, eager);
* shared-compile (not run unless named): the shared prefix with `spec.extraArgs: {torch_compile: true,
  enable_liger_kernel: false}`, the HF Trainer compiling the whole model (about 250 s before the first step).

What Ray would do in each worker is done here: the runtime environment that the config's `ray_init_kwargs` names
(its variables, then its `worker_process_setup_hook`, e.g. payloads.shared_prefix.install) is applied in the
training process before LLaMA-Factory starts. Recipes with the shared prefix must log "shared-prefix packing:".
Only what must differ here is changed in the config: model and dataset paths, output dir, the Ray keys, the eval
keys (evaluation at step 500 never comes, and `do_eval` would evaluate the whole validation set after training),
`logging_steps: 1`, no checkpoints, `max_steps`, at most --preprocess-workers preprocessing processes. Each
recipe's final config is in the results.

Measured per optimizer step inside the training process (a TrainerCallback, and a wrapper around
Trainer.training_step that keeps each micro-batch's ids and labels): wall time after a CUDA synchronize, samples
(runs of label tokens: one per sample, packed or not), real tokens (not padding) and token slots. Steady state is
the steps after --warmup; the first step's time includes compile time. samples/s compares recipes (a shared-prefix
row computes fewer tokens for the same samples); tokens/s counts the tokens computed; model TFLOP/s is
4 x parameters x tokens/s (frozen base: forward and input gradients; no recompute, no attention), as
training_recipe.py counts it. Packed recipes train on the same rows in the same order, so their per-step losses
are compared with the default's. Peak memory: torch's counters at the end of training, and nvidia-smi polled
from here. Writes <out>/llamafactory_run.json after every recipe (one that fails or runs out of time is recorded
with its log tail, and the others still run), each recipe's log to <out>/llamafactory_run.<recipe>.log, and
prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from compact_json import compact
from llamafactory_bench.configs import (DEFAULT_RECIPES, DEFAULT_STEPS, RECIPES, REFERENCE_CONFIG, local_config,
                                        rendered_config, worker_runtime_env)
from llamafactory_bench.data import measure_samples, train_tokenizer, viggo_like_samples, write_dataset
from llamafactory_bench.model import build_model, build_model_here, model_config
from llamafactory_bench.report import environment, print_table
from llamafactory_bench.train import child_env, run_recipe, train_here
from llmops.builders.recipe import SHARED_PREFIX_ENV  # importable once llamafactory_bench put operator/ on the path


def steps_option(text: str) -> dict[str, int]:
    if "=" not in text:
        return dict.fromkeys(RECIPES, int(text))
    return {**DEFAULT_STEPS, **{k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help=f"comma list of {', '.join(RECIPES)} (default: all but shared-compile)")
    parser.add_argument("--max-steps", type=steps_option, default=dict(DEFAULT_STEPS),
                        help="optimizer steps: one number for all, or recipe=N,... (default "
                             + ",".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady state")
    parser.add_argument("--samples", type=int, default=5000, help="samples written (ViGGO's train set: 5,103)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="override the rendered max_samples (1000, the reference's) for every recipe")
    parser.add_argument("--preprocess-workers", type=int, default=8,
                        help="cap on preprocessing_num_workers (the operator renders 8, the reference has 16)")
    parser.add_argument("--recipe-timeout", type=float, default=300, help="seconds per recipe before it is killed")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for the whole run: later recipes get what is left, or are skipped")
    parser.add_argument("--model-dir", default=None, help="default /tmp/qwen7b, or /tmp/qwen-tiny with --tiny")
    parser.add_argument("--work", default="/tmp/llamafactory_run", help="dataset, configs, outputs, logs")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model instead of Qwen2.5-7B's 28")
    parser.add_argument("--cpu", action="store_true", help="run on CPU: bf16 and Liger off (device keys only)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    out, work = Path(args.out), Path(args.work)
    model_dir = Path(args.model_dir or ("/tmp/qwen-tiny" if args.tiny else "/tmp/qwen7b"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"what": __doc__.split("\n")[0], "env": environment(), "warmup_steps": args.warmup,
                     "max_steps": {r: args.max_steps[r] for r in recipes}, "tiny": args.tiny, "cpu": args.cpu}
    print(json.dumps(results["env"]), flush=True)

    default_config, dataset_info = rendered_config({}, None)
    rendered, render_errors = {}, {}
    for name in recipes:
        try:
            if RECIPES[name] is not None:
                rendered[name] = rendered_config(*RECIPES[name])[0]
        except Exception as exc:  # noqa: BLE001 - e.g. a training field this operator's API does not have yet
            render_errors[name] = repr(exc)
    samples = viggo_like_samples(args.samples, args.seed)
    tokenizer = train_tokenizer(samples)
    tokenizer.save_pretrained(str(work / "tokenizer"))  # measured as loaded: LLaMA-Factory's template edits it
    data = measure_samples(str(work / "tokenizer"), samples, default_config["cutoff_len"])
    used = args.max_samples or default_config.get("max_samples") or len(samples)  # LLaMA-Factory takes the first
    data["mean_tokens_of_used_samples"] = round(statistics.fmean(data.pop("lengths")[:used]), 1)
    results["data"] = data
    print("data:", json.dumps(data), flush=True)
    write_dataset(samples, dataset_info, work / "data")

    config = model_config(args.tiny, args.cpu)
    if len(tokenizer) > config["vocab_size"]:
        raise RuntimeError(f"tokenizer of {len(tokenizer)} tokens for a vocabulary of {config['vocab_size']}")
    try:
        results["model"] = build_model(model_dir, config)
    except RuntimeError as exc:  # nothing can train without it: say why in the results too
        results["model"] = {"error": str(exc)[-8000:]}
        (out / "llamafactory_run.json").write_text(compact(results))
        raise
    tokenizer.save_pretrained(str(model_dir))
    print("model:", json.dumps({k: v for k, v in results["model"].items() if k != "config"}), flush=True)

    results["recipes"] = {}
    for name in recipes:
        if name in render_errors:
            results["recipes"][name] = {"status": "render-failed", "error": render_errors[name]}
            continue
        run_dir = work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        base = REFERENCE_CONFIG if name == "reference" else rendered[name]
        worker = worker_runtime_env(base)
        shared = worker["env_vars"].get(SHARED_PREFIX_ENV) == "1"
        config = local_config(base, model_dir=model_dir, data_dir=work / "data", output_dir=run_dir / "output",
                              max_steps=args.max_steps[name], args=args)
        recorded = {"config_yaml": yaml.safe_dump(config, sort_keys=False), "worker_runtime_env": worker,
                    "removed_from_base": sorted(set(base) - set(config)),
                    "changed_from_base": {k: v for k, v in config.items() if base.get(k, object()) != v}}
        left = deadline - time.monotonic()
        if left < 30:
            results["recipes"][name] = {"status": "skipped", "reason": "time budget spent", **recorded}
            continue
        env = child_env(work, run_dir / "steps.jsonl", worker, tokenizer.pad_token_id, args.cpu)
        try:
            result = {**run_recipe(name, config, run_dir, env, min(args.recipe_timeout, left), args.warmup,
                                   shared), **recorded}
        except Exception as exc:  # noqa: BLE001 - one recipe's failure must not stop the others
            result = {"status": "error", "error": repr(exc), **recorded}
        if (run_dir / "train.log").exists():  # the last MiB: tqdm bars make long logs
            text = (run_dir / "train.log").read_text(errors="replace")
            (out / f"llamafactory_run.{name}.log").write_text(text[-2**20:])
        results["recipes"][name] = result
        default_losses = [s["loss"] for s in results["recipes"].get("default", {}).get("steps", [])]
        if (name not in ("default", "reference") and default_losses and result.get("steps")
                and args.max_steps[name] == args.max_steps.get("default")):
            # The same packed rows in the same order (shared prefix or not) and the same learning-rate schedule
            # (it follows max_steps): the default's loss at every step.
            pairs = [(s["loss"], d) for s, d in zip(result["steps"], default_losses) if None not in (s["loss"], d)]
            result["loss_vs_default_max_rel_diff"] = max((abs(a - b) / abs(b) for a, b in pairs), default=None)
        if result.get("steady"):  # the samples' own tokens: comparable between shared and unshared rows
            result["steady"]["sample_tokens_per_s"] = round(
                result["steady"]["samples_per_s"] * data["mean_tokens_of_used_samples"], 1)
        print(f"[{name}] {result['status']}: {json.dumps(result.get('steady'))}", flush=True)
        for line in result.get("shared_prefix_lines", [])[:1]:
            print(f"[{name}] {line}", flush=True)
        (out / "llamafactory_run.json").write_text(compact(results))
    (out / "llamafactory_run.json").write_text(compact(results))
    print_table(results)
    return 0 if all(r["status"] == "ok" for r in results["recipes"].values()) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        train_here(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_build":
        build_model_here(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
