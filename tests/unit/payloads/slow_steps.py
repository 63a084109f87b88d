"""Ray worker setup hook of the resume test: each training step of Hugging Face's Trainer first sleeps
``LLMOPS_TEST_STEP_S`` seconds, so that the test can stop a run between two checkpoints on any machine."""

import os
import time


def install() -> None:
    from transformers import Trainer

    delay = float(os.environ.get("LLMOPS_TEST_STEP_S") or 0)
    original = Trainer.training_step

    def slow_training_step(self, *args, **kwargs):
        time.sleep(delay)
        return original(self, *args, **kwargs)

    Trainer.training_step = slow_training_step
