"""What the bench writes (results JSON) and prints (tables, targets)."""

from __future__ import annotations

import contextlib
import json
import os
import platform

import torch

from compact_json import compact  # bench/ is on the path: the scripts run from it

from .data import GIB


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
        f.write(compact(results))



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
