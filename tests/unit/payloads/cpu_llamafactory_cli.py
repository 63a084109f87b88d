"""`llamafactory-cli` for a machine without GPUs: the real LLaMA-Factory 0.9.4 CLI, with its Ray Train workers on
CPU (gloo) because 0.9.4 hard-codes `ScalingConfig(use_gpu=True)`. The payload test that drives the real
LLaMA-Factory uses it; everything else (config parsing, data loading, LoRA, Ray Train checkpoints) is 0.9.4's own.
"""

import sys

import llamafactory.train.trainer_utils as trainer_utils
from ray.train import ScalingConfig


def cpu_scaling_config(**kwargs):
    return ScalingConfig(**{**kwargs, "use_gpu": False, "resources_per_worker": {"CPU": 1}})


trainer_utils.ScalingConfig = cpu_scaling_config

from llamafactory.cli import main  # noqa: E402

sys.exit(main())
