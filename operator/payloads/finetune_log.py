"""LLaMA-Factory's training run as the driver sees it (payloads/finetune.py): the `llamafactory-cli train`
subprocess, its output read for progress (epoch, loss, step) and, when it fails, for the cause and a remedy."""

from __future__ import annotations

import ast
import collections
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from payloads.finetune_job import LLAMAFACTORY_VERSION, FineTuneError, Terminated
from payloads.report import ReportError, ResultReporter

logger = logging.getLogger("llmops.payloads.finetune")

_LOG_DICT = re.compile(r"\{'[^{}]*\}")
_TOTAL_STEPS = re.compile(r"Total optimization steps = ([\d,]+)")
_BAR = re.compile(r"\|\s*(\d+)/(\d+) \[")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\s*\([\w.]+ pid=\d+[^)]*\)\s*")  # "(RayTrainWorker pid=7, ip=10.0.0.7) "
_RAY_DEDUP = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")
HINTS = (
    (re.compile(r"CUDA out of memory|OutOfMemoryError"), "the GPUs ran out of memory: lower "
     "training.perDeviceBatchSize or dataset.cutoffLen, turn training.gradientCheckpointing on, or use qlora"),
    (re.compile(r"GatedRepoError|401 Client Error|RepositoryNotFoundError|Repository Not Found"),
     "the base model could not be downloaded: check baseModel.source, and set secrets.huggingFaceToken for a "
     "gated model"),
    (re.compile(r"Template \S+ does not exist"), "spec.template is not a LLaMA-Factory 0.9.4 template"),
    (re.compile(r"not used by the HfArgumentParser"), "a spec.extraArgs key is not a LLaMA-Factory 0.9.4 argument"),
    (re.compile(r"PyTorch and TorchAudio were compiled with different CUDA versions"), "the image's torch and "
     "torchaudio builds do not match (LLaMA-Factory imports torchaudio): pin torch, torchvision and torchaudio of "
     "one release next to llamafactory==0.9.4"),
    (re.compile(r"Unable to set up cluster storage"), "the Ray pods cannot write the checkpoint storage next to "
     "spec.output: check the storage credentials (secrets.storage) or that the claim is mounted read-write"),
)


@dataclass
class Progress:
    """What the trainer's log lines say: the latest step values and the final summaries."""

    state: Dict[str, Any] = field(default_factory=dict)
    train_summary: Dict[str, Any] = field(default_factory=dict)
    eval_summary: Dict[str, Any] = field(default_factory=dict)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))

    def feed(self, raw: str) -> bool:
        """Read one output line; True when the progress changed."""
        line = _RAY_DEDUP.sub("", _RAY_PREFIX.sub("", _ANSI.sub("", raw.rstrip("\n"))))
        self.tail.append(line)
        before = dict(self.state)
        total = _TOTAL_STEPS.search(line)
        if total:
            self.state["totalSteps"] = int(total.group(1).replace(",", ""))
        bar = _BAR.search(line)
        if bar and self.state.get("totalSteps") == int(bar.group(2)):
            self.state["step"] = int(bar.group(1))
        for text in _LOG_DICT.findall(line):
            try:
                logs = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                continue
            if not isinstance(logs, dict):
                continue
            if "train_runtime" in logs:
                self.train_summary.update(logs)
            elif "loss" in logs:
                self.state.update({k: logs[v] for k, v in (("loss", "loss"), ("epoch", "epoch"),
                                                            ("learningRate", "learning_rate")) if v in logs})
            loss = eval_loss(logs)
            if loss is not None:
                self.eval_summary.update(logs)
                self.state["evalLoss"] = loss
        return self.state != before

    def message(self) -> str:
        state = self.state
        parts = [f"step {state['step']}/{state['totalSteps']}" if "step" in state and "totalSteps" in state else "",
                 f"epoch {state['epoch']:.2f}" if isinstance(state.get("epoch"), (int, float)) else "",
                 f"loss {state['loss']:.4f}" if isinstance(state.get("loss"), (int, float)) else "",
                 f"resumed at step {state['resumedFromStep']}" if "resumedFromStep" in state else ""]
        return "Training: " + ", ".join(p for p in parts if p) if any(parts) else "Training"

    def failure(self, returncode: int) -> str:
        errors = [m.group(1) for m in map(_ERROR_LINE.match, self.tail) if m]
        errors = [e for e in errors if not e.startswith("ray.")] or errors  # the cause, not Ray's wrapper of it
        cause = errors[-1] if errors else (next((t for t in reversed(self.tail) if t.strip()), "no output"))
        hint = next((h for pattern, h in HINTS if any(pattern.search(t) for t in self.tail)), None)
        message = f"LLaMA-Factory training exited with code {returncode}: {cause[:600]}"
        return message + (f"; {hint}" if hint else "") + "; the RayJob driver log has the full trace"


def eval_loss(logs: Mapping[str, Any]) -> Optional[float]:
    if "eval_loss" in logs:
        return logs["eval_loss"]
    return next((v for k, v in logs.items() if re.fullmatch(r"eval_.+_loss", k)), None)


def run_training(config_path: str, reporter: ResultReporter, progress: Progress, interval_s: float) -> None:
    executable = shutil.which("llamafactory-cli")
    if not executable:
        raise FineTuneError(f"llamafactory-cli is not on PATH: the Ray image must provide "
                            f"llamafactory=={LLAMAFACTORY_VERSION}")
    env = {**os.environ, "USE_RAY": "1", "PYTHONUNBUFFERED": "1"}
    # Through payloads.llamafactory_launch, which points LLaMA-Factory's S3 filesystem at AWS_ENDPOINT_URL.
    launch = [sys.executable, "-m", "payloads.llamafactory_launch", executable, "train", config_path]
    process = subprocess.Popen(launch, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=env, text=True, errors="replace")

    def stop(signum: int, _frame: Any) -> None:
        process.terminate()
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    last_report = time.monotonic()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            if progress.feed(line) and time.monotonic() - last_report >= interval_s:
                last_report = time.monotonic()
                report_running(reporter, progress.message(), progress.state)
        returncode = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.flush()
    if returncode != 0:
        raise FineTuneError(progress.failure(returncode))


def report_running(reporter: ResultReporter, message: str, progress: Optional[Mapping[str, Any]]) -> None:
    try:
        reporter.running(message, dict(progress) if progress else None)
    except ReportError as exc:  # progress is best effort; the final report is not
        logger.warning("progress report failed: %s", exc)
