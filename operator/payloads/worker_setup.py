"""The Ray worker setup hook of a FineTune: what the recipe asks of each Ray Train worker before it trains.

Ray runs one ``worker_process_setup_hook`` per worker process; a FineTune may need two changes to LLaMA-Factory
0.9.4 in it. The recipe (``llmops/builders/recipe.py``) names this hook in ``ray_init_kwargs.runtime_env`` and says
which changes through the same runtime environment's variables, which Ray sets in every worker it starts:

* ``LLMOPS_SHARED_PREFIX=1``: shared-prefix packing (``payloads.shared_prefix``);
* ``LLMOPS_COMPILE_LAYERS=auto|always``: regional torch.compile of the decoder layers (``payloads.compile_layers``).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from payloads import compile_layers, shared_prefix

SHARED_PREFIX_ENV = "LLMOPS_SHARED_PREFIX"
COMPILE_LAYERS_ENV = "LLMOPS_COMPILE_LAYERS"


def install(env: Optional[Mapping[str, str]] = None) -> None:
    env = os.environ if env is None else env
    if env.get(SHARED_PREFIX_ENV) == "1":
        shared_prefix.install()
    mode = env.get(COMPILE_LAYERS_ENV)
    if mode:
        compile_layers.install(mode)
