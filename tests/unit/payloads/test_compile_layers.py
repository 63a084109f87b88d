"""Regional torch.compile of the decoder layers (payloads/compile_layers.py) and the worker setup hook that installs
it (payloads/worker_setup.py): when it compiles, that it compiles one layer's code for all of them, and that the
compiled layers train exactly like the eager ones (fp32, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from payloads import compile_layers
from payloads.compile_layers import MIN_STEPS, decide

OPERATOR = Path(__file__).resolve().parents[3] / "operator"


@pytest.mark.parametrize(("mode", "steps", "trainer_compiles", "liger", "compiled", "why"), [
    ("auto", MIN_STEPS, False, False, True, f"{MIN_STEPS} optimizer steps per worker"),
    ("auto", MIN_STEPS - 1, False, False, False, f"fewer than {MIN_STEPS}: compiling"),
    ("always", 3, False, False, True, "3 optimizer steps per worker"),
    ("always", 5000, True, False, False, "the trainer compiles the whole model"),
    ("always", 5000, False, True, False, "Liger kernels"),
])
def test_it_compiles_jobs_long_enough_to_repay_it_and_says_why_not(mode, steps, trainer_compiles, liger, compiled,
                                                                     why):
    decision, reason = decide(mode, steps, trainer_compiles=trainer_compiles, liger=liger)
    assert decision is compiled and why in reason


def test_an_unknown_mode_is_refused_at_install_not_at_training():
    with pytest.raises(ValueError, match="unknown compile mode 'sometimes': one of auto, always"):
        compile_layers.install("sometimes")


def tiny_lora_qwen(layers: int = 4):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation="sdpa")
    model = get_peft_model(Qwen2ForCausalLM(config).float().requires_grad_(False),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                      task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0.0, 0.02)  # not zero: the gradients then flow through every layer
    return model


def loss_and_grads(model, length: int):
    import torch

    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 256, (1, length), generator=gen)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_the_callback_compiles_every_layer_from_one_layers_code_and_trains_the_same():
    import torch

    model = tiny_lora_qwen()
    eager = {n: loss_and_grads(model, n) for n in (24, 40, 56)}
    state, args = types.SimpleNamespace(max_steps=10), types.SimpleNamespace(torch_compile=False)

    compile_layers.callback("auto").on_train_begin(args, state, None, model=model)  # 10 steps: too short
    layers = compile_layers.repeated_layers(model)
    assert len(layers) == 4 and all(layer._compiled_call_impl is None for layer in layers)

    compile_layers.callback("always").on_train_begin(args, state, None, model=model)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n, (loss0, grads0) in eager.items():  # rows of three lengths: dynamic shapes, no compile per length
        loss, grads = loss_and_grads(model, n)
        assert loss == pytest.approx(loss0, rel=1e-5)
        assert float((grads - grads0).norm() / grads0.norm()) < 1e-5
    # The first layer's input needs no gradient, the others' does: two graphs for four layers and three lengths.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    model.eval()  # evaluation runs eagerly: no inference graphs to compile
    with torch.no_grad():
        model(input_ids=torch.ones((1, 24), dtype=torch.long))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2


def test_a_model_with_liger_kernels_is_left_eager():
    import torch

    model = tiny_lora_qwen(layers=2)
    liger_norm = type("LigerRMSNorm", (torch.nn.Module,), {})
    model.base_model.model.model.norm = liger_norm()
    assert compile_layers.has_liger(model)
    compile_layers.callback("always").on_train_begin(types.SimpleNamespace(torch_compile=False),
                                                     types.SimpleNamespace(max_steps=5000), None, model=model)
    assert all(layer._compiled_call_impl is None for layer in compile_layers.repeated_layers(model))


@pytest.mark.llamafactory
@pytest.mark.parametrize(("env", "shared", "compiled"), [
    ({}, False, False),
    ({"LLMOPS_SHARED_PREFIX": "1"}, True, False),
    ({"LLMOPS_COMPILE_LAYERS": "auto"}, False, True),
    ({"LLMOPS_SHARED_PREFIX": "1", "LLMOPS_COMPILE_LAYERS": "always"}, True, True),
])
def test_the_worker_setup_hook_changes_llamafactory_as_its_variables_say(env, shared, compiled):
    """In a fresh process, as Ray runs the hook in a new worker: LLaMA-Factory 0.9.4's packed SFT processor and its
    SFT trainer are swapped exactly where the recipe's variables ask for it."""
    probe = (
        "from payloads import worker_setup\n"
        "worker_setup.install()\n"
        "from llamafactory.data.processor.supervised import PackedSupervisedDatasetProcessor as P\n"
        "from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer as T\n"
        "import json\n"
        "print(json.dumps([getattr(P.preprocess_dataset, 'shared_prefix', False),"
        " hasattr(T.__init__, 'stock_init')]))\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPS_")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**clean, **env, "PYTHONPATH": str(OPERATOR)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [shared, compiled]
