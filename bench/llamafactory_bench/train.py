"""One recipe's training process and its measurements.

The parent (run_recipe) starts `bench/llamafactory_run.py _train <yaml>` in a process and session of its own, so
that a recipe's crash, hang or GPU memory never reaches the others; the child (train_here) is what a Ray Train
worker runs, with the step clock added, and the parent reads back what the clock wrote (step_stats).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from payloads.shared_prefix import IGNORE_INDEX

from . import OPERATOR, REPO, SCRIPT

GIB = 2**30


def train_here(config_path: str) -> None:
    """`_train <yaml>`: what `llamafactory-cli train <yaml>` runs in a Ray Train worker: the rendered setup hook
    first (Ray's worker_process_setup_hook; its variables are in the environment already), the step clock added."""
    hook = os.environ.get("LLMOPS_BENCH_SETUP_HOOK")
    if hook:
        module, _, function = hook.rpartition(".")
        getattr(importlib.import_module(module), function)()
    import torch
    import transformers
    from llamafactory.train import tuner

    clock = step_clock(os.environ["LLMOPS_BENCH_STEPS"], int(os.environ["LLMOPS_BENCH_PAD_ID"]))
    stock_step, stock_run_exp = transformers.Trainer.training_step, tuner.run_exp

    def training_step(self, model, inputs, *args, **kwargs):
        clock.batches.append((inputs["input_ids"], inputs["labels"]))  # counted after the step's synchronize
        return stock_step(self, model, inputs, *args, **kwargs)

    def run_exp(args=None, callbacks=None):
        return stock_run_exp(args, [*(callbacks or []), clock])

    transformers.Trainer.training_step, tuner.run_exp = training_step, run_exp
    clock.versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    from llamafactory.cli import main

    sys.argv = ["llamafactory-cli", "train", config_path]
    main()


def step_clock(path: str, pad_id: int):
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Appends one JSON line per event to `path`: begin, each optimizer step (its micro-batches), logs, end."""

        def __init__(self):
            self.batches, self.versions, self.last = [], {}, 0.0
            self.file = open(path, "a", buffering=1)

        def write(self, **record):
            self.file.write(json.dumps(record) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            import llamafactory
            import peft

            self.versions.update(llamafactory=llamafactory.__version__, peft=peft.__version__)
            self.write(type="begin", t=time.time(), max_steps=state.max_steps, versions=self.versions)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            samples = tokens = slots = 0
            for ids, labels in self.batches:
                answer = labels.detach().cpu().ne(IGNORE_INDEX).int()
                # a sample = a run of label tokens (its answer); a row of several samples has several
                samples += int(answer[:, :1].sum() + (answer[:, 1:] > answer[:, :-1]).sum())
                tokens += int(ids.detach().cpu().ne(pad_id).sum())
                slots += ids.numel()
            self.write(type="step", step=state.global_step, dt=now - self.last, micro_batches=len(self.batches),
                       samples=samples, tokens=tokens, slots=slots)
            self.batches.clear()
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            self.write(type="log", step=state.global_step, **numbers)

        def on_train_end(self, args, state, control, **kwargs):
            memory = {}
            if torch.cuda.is_available():
                memory = {"max_allocated": torch.cuda.max_memory_allocated(),
                          "max_reserved": torch.cuda.max_memory_reserved()}
            self.write(type="end", t=time.time(), **memory)

    return StepClock()


class GpuMemoryPoller:
    """Peak `memory.used` of GPU 0 from nvidia-smi every 0.5 s (the training process is another process)."""

    def __init__(self):
        self.peak_mib, self._proc = None, None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                           "-i", "0", "-lms", "500"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.peak_mib = max(self.peak_mib or 0, int(line))

    def __exit__(self, *exc):
        if self._proc:
            self._proc.terminate()
            self._proc.wait()


def child_env(work: Path, steps_path: Path, worker: dict, pad_id: int, cpu: bool) -> dict:
    env = dict(os.environ)
    for key in ("USE_RAY", "FORCE_TORCHRUN", "RAY_ADDRESS"):  # one process on one GPU, as a Ray Train worker
        env.pop(key, None)
    env.update(worker["env_vars"])
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(OPERATOR)])),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(work / "hf"),
               LLMOPS_BENCH_STEPS=str(steps_path), LLMOPS_BENCH_SETUP_HOOK=worker["setup_hook"] or "",
               LLMOPS_BENCH_PAD_ID=str(pad_id), PYTHONUNBUFFERED="1")
    if not cpu:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    return env


def run_recipe(name: str, config: dict, run_dir: Path, env: dict, limit_s: float, warmup: int,
               shared_prefix: bool) -> dict:
    (run_dir / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log_path, steps_path = run_dir / "train.log", Path(env["LLMOPS_BENCH_STEPS"])
    cmd = [sys.executable, str(SCRIPT), "_train", str(run_dir / "train.yaml")]
    print(f"[{name}] {' '.join(cmd)} (limit {limit_s:.0f} s)", flush=True)
    started, status = time.time(), "ok"
    with open(log_path, "w") as log, GpuMemoryPoller() as gpu:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                with contextlib.suppress(ProcessLookupError):  # its own session: the trainer and its workers
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    wall_s = time.time() - started
    log_text = log_path.read_text(errors="replace")
    if status == "ok" and rc != 0:
        status = "failed"
    result = {"status": status, "rc": rc, "wall_s": round(wall_s, 1), "nvidia_smi_peak_mib": gpu.peak_mib,
              "shared_prefix_lines": sorted(set(re.findall(r"shared-prefix packing: [^\n]*", log_text))),
              "compile_layers_lines": sorted(set(re.findall(r"(?:compiling \d+ )?decoder layers[^\n]*", log_text))),
              "liger_applied": "Liger kernel has been applied" in log_text}
    result.update(step_stats(steps_path, started, warmup))
    if status != "ok" or not result.get("steps"):
        result["log_tail"] = log_text[-6000:]
    if shared_prefix and not result["shared_prefix_lines"] and status == "ok":
        result["status"] = "no-shared-prefix"  # trained, but not on shared-prefix rows: not this recipe
    return result


def step_stats(steps_path: Path, started: float, warmup: int) -> dict:
    """What the training process's step clock recorded, and the steady state after the warm-up steps."""
    if not steps_path.exists():
        return {}
    records = [json.loads(line) for line in steps_path.read_text().splitlines() if line.strip()]
    begin = next((r for r in records if r["type"] == "begin"), None)
    end = next((r for r in records if r["type"] == "end"), {})
    steps = [r for r in records if r["type"] == "step"]
    logs = {r["step"]: r for r in records if r["type"] == "log" and "loss" in r}
    out: dict = {"steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "type"}
                           | {"loss": logs.get(r["step"], {}).get("loss")} for r in steps]}
    if begin:
        out["start_to_train_s"] = round(begin["t"] - started, 1)  # imports, preprocessing, model load
        out["versions_in_training"] = begin.get("versions")
    if steps:
        out["first_step_s"] = round(steps[0]["dt"], 2)  # includes compile time for the compile variant
    steady = steps[warmup:]
    if steady:
        seconds = sum(s["dt"] for s in steady)
        samples, tokens = sum(s["samples"] for s in steady), sum(s["tokens"] for s in steady)
        out["steady"] = {
            "steps": len(steady), "seconds": round(seconds, 2),
            "samples_per_step": round(samples / len(steady), 2),
            "micro_batches_per_step": round(statistics.fmean(s["micro_batches"] for s in steady), 2),
            "tokens_per_step": round(tokens / len(steady), 1),
            "slot_fill": round(tokens / max(1, sum(s["slots"] for s in steady)), 3),
            "step_s_mean": round(seconds / len(steady), 4),
            "step_s_median": round(statistics.median(s["dt"] for s in steady), 4),
            "samples_per_s": round(samples / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
        }
    losses = [logs[s]["loss"] for s in sorted(logs)]
    if losses:
        out["first_loss"], out["final_loss"] = losses[0], losses[-1]
    for key in ("max_allocated", "max_reserved"):
        if end.get(key) is not None:
            out[f"peak_{key.removeprefix('max_')}_gib"] = round(end[key] / GIB, 2)
    return out
