"""What the results record about the machine, and the table printed last."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata


def environment() -> dict:
    env = {"python": sys.version.split()[0], "host_cpus": os.cpu_count()}
    for name in ("torch", "transformers", "llamafactory", "peft", "trl", "accelerate", "datasets", "liger-kernel",
                 "tokenizers", "huggingface_hub", "triton"):
        try:
            env[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name.replace("-", "_")] = "absent"
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader",
                              "-i", "0"], capture_output=True, text=True, check=False).stdout.strip()
        env["gpu"] = gpu
    return env


def print_table(results: dict) -> None:
    params = results["model"]["params"]
    reference = results["recipes"].get("reference", {}).get("steady", {}).get("samples_per_s")
    print(f"\n{'recipe':<15} {'status':<13} {'steps':>5} {'smp/step':>8} {'step s':>7} {'samples/s':>9} "
          f"{'x ref':>6} {'tokens/s':>9} {'TFLOP/s':>7} {'1st step s':>10} {'start s':>7} {'loss':>7} "
          f"{'peak GiB':>8} {'smi GiB':>7}")
    for name, r in results["recipes"].items():
        s = r.get("steady", {})
        sps = s.get("samples_per_s")
        cells = [f"{name:<15}", f"{r['status']:<13}", f"{len(r.get('steps', [])):>5}",
                 f"{s.get('samples_per_step', '-'):>8}", f"{s.get('step_s_median', '-'):>7}", f"{sps or '-':>9}",
                 f"{round(sps / reference, 1) if sps and reference else '-':>6}", f"{s.get('tokens_per_s', '-'):>9}",
                 f"{round(4 * params * s['tokens_per_s'] / 1e12, 1) if s else '-':>7}",
                 f"{r.get('first_step_s', '-'):>10}", f"{r.get('start_to_train_s', '-'):>7}",
                 f"{round(r['final_loss'], 3) if r.get('final_loss') is not None else '-':>7}",
                 f"{r.get('peak_allocated_gib', '-'):>8}",
                 f"{round(r['nvidia_smi_peak_mib'] / 1024, 1) if r.get('nvidia_smi_peak_mib') else '-':>7}"]
        print(" ".join(cells))
    print("(step s: median of the steady steps; samples/s and tokens/s: their totals over their time; TFLOP/s: "
          "4 x params x tokens/s; start s: process start to the training loop; peak GiB: torch's max allocated)")
