"""The fine-tuning job as the driver reads it, and the errors every part of it raises (payloads/finetune.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

LLAMAFACTORY_VERSION = "0.9.4"
# Trainer state that resumes training but is no part of the published model.
TRAINING_STATE = re.compile(r"^(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|training_args\.bin|trainer_log\.jsonl)$")
CONFIG_FILES = ("adapter_config.json", "config.json")  # published last: a reader never sees a config without weights
ALL_RESULTS = "all_results.json"


class FineTuneError(Exception):
    """A failure whose message says what failed and what to do; it becomes the Failed report."""


class Terminated(Exception):
    """The driver was asked to stop (RayJob deleted or suspended): not a training failure."""


@dataclass
class Job:
    name: str
    output_uri: str
    base_model: Dict[str, Any]
    method: Dict[str, Any]
    train_uri: str
    validation_uri: Optional[str]
    config: Dict[str, Any]
    dataset_info: Dict[str, Any]
    uid: str = ""
    resume: str = "auto"  # spec.training.resume: auto | never

    @property
    def method_type(self) -> str:
        return self.method.get("type", "lora")
