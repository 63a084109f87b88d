"""Regional ``torch.compile``: each decoder layer of the model compiled, not the whole model.

A LoRA step on short packed rows waits on the host: eager PyTorch, peft's per-layer Python and autograd launch
~4,000 kernels per step, and on an H100-class GPU the kernels themselves take a third of the step. Compiling the
decoder layers fuses their element-wise work and replaces most of the per-layer Python with one generated call.
Compiling the whole model (the HF Trainer's ``torch_compile: true``) does the same but traces everything and took
~250 s before the first step; the layers all run the same code, so dynamo compiles one (two: the first layer's
input needs no gradient) and reuses it for the others: 43 to 95 s on the H100 machines measured. Dynamic shapes:
packed rows (shared-prefix rows most of all) vary in length, and a recompile per length would cost more than it
saves. Only training runs compiled: evaluation runs the layers eagerly rather than wait for a second compile.

``install`` is called in every Ray Train worker by the worker setup hook (``payloads.worker_setup``). It adds a
trainer callback to LLaMA-Factory 0.9.4's SFT trainer that compiles the layers when training begins, once the
number of optimizer steps is known: compiling costs about a minute and saves 0.05 to 0.1 s per step on an H100
(docs/training-recipe.md), so ``auto`` compiles only jobs of at least ``MIN_STEPS`` steps per worker; ``always``
compiles any job. It never compiles a model the HF Trainer compiles itself (``torch_compile``) or one patched by
Liger kernels (their autograd functions do not trace in these versions: wrong losses, illegal memory accesses).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Tuple

logger = logging.getLogger("llmops.payloads.compile_layers")

MODES = ("auto", "always")
# Break-even on H100s (docs/training-recipe.md): compiling took 43 to 95 s and saved 0.05 to 0.13 s per one-row
# step, repaid after 430 to 980 steps (through LLaMA-Factory itself: 49 s, 0.153 -> 0.10 s, 920 steps).
MIN_STEPS = 1000


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}: one of {', '.join(MODES)}")


def decide(mode: str, max_steps: int, *, trainer_compiles: bool, liger: bool) -> Tuple[bool, str]:
    """Whether to compile the layers, and the reason said in the log either way."""
    check_mode(mode)
    if trainer_compiles:
        return False, "the trainer compiles the whole model (torch_compile: true)"
    if liger:
        return False, ("the model has Liger kernels, which torch.compile cannot trace here: "
                       "turn enable_liger_kernel off to compile")
    if mode == "auto" and max_steps < MIN_STEPS:
        return False, (f"{max_steps} optimizer steps per worker, fewer than {MIN_STEPS}: compiling (about a minute) "
                       "would cost more than it saves (training.compile: true compiles anyway)")
    return True, f"{max_steps} optimizer steps per worker"


def repeated_layers(model: Any) -> Optional[Any]:
    """The model's decoder layers: its longest ``nn.ModuleList`` whose modules are all of one class."""
    import torch

    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def compile_layers(model: Any) -> int:
    """Compiles each decoder layer in place (``training_call``); how many."""
    layers = repeated_layers(model)
    if layers is None:
        return 0
    for layer in layers:
        layer._compiled_call_impl = training_call(layer)
    return len(layers)


def training_call(layer: Any, **compile_options: Any) -> Callable[..., Any]:
    """The layer's call compiled as ``nn.Module.compile`` compiles it (parameters stay where they are; dynamic
    shapes unless ``compile_options`` say otherwise), for training only: evaluation runs the layer eagerly rather
    than wait for a second compile. Set as the layer's ``_compiled_call_impl``; bench/training_bench uses it too."""
    import torch

    compiled = torch.compile(layer._call_impl, **{"dynamic": True, **compile_options})

    def call(*args: Any, **kwargs: Any) -> Any:
        return compiled(*args, **kwargs) if layer.training else layer._call_impl(*args, **kwargs)

    return call


def has_liger(model: Any) -> bool:
    return any(type(m).__name__.startswith("Liger") for m in model.modules())


def callback(mode: str) -> Any:
    """A transformers TrainerCallback compiling the layers at the start of training, if `decide` says so."""
    from transformers import TrainerCallback

    class CompileLayers(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if model is None:
                return
            compile_it, why = decide(mode, state.max_steps, trainer_compiles=bool(getattr(args, "torch_compile", False)),
                                     liger=has_liger(model))
            if not compile_it:
                logger.warning("decoder layers not compiled: %s", why)
                return
            n = compile_layers(model)
            logger.warning("compiling %d decoder layers (regional torch.compile, dynamic shapes): %s; the first "
                           "steps wait for the compiler, about a minute", n, why)

    return CompileLayers()


def install(mode: str = "auto") -> None:
    """Adds the callback to every LLaMA-Factory 0.9.4 SFT trainer built in this process."""
    check_mode(mode)  # refuse an unknown mode here, not at training
    try:
        from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
    except ImportError as exc:  # a worker without LLaMA-Factory trains nothing: leave it as it is
        logger.warning("regional compile not installed: %s", exc)
        return
    stock_init = getattr(CustomSeq2SeqTrainer.__init__, "stock_init", CustomSeq2SeqTrainer.__init__)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        stock_init(self, *args, **kwargs)
        self.add_callback(callback(mode))

    __init__.stock_init = stock_init  # type: ignore[attr-defined]
    CustomSeq2SeqTrainer.__init__ = __init__
