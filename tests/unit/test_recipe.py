"""The fast LoRA SFT recipe: choices per accelerator, user overrides, LLaMA-Factory 0.9.4 keys (pure; no GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmops.builders import finetune as finetune_builder
from llmops.builders import recipe as recipe_module
from llmops.builders.common import BuildContext
from llmops.builders.recipe import (COMPILE_LAYERS_ENV, SHARED_PREFIX_ENV, WORKER_SETUP_HOOK, memory_budget_gib,
                                    peak_memory_gib, training_recipe)
from llmops.settings import Settings
from manifests import example

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "training_recipe.json"
# The memory model's calibration run: then `default` was neat packing's mask with Liger (now `packed-liger`).
MEMORY_RESULTS = RESULTS.with_name("training_recipe.previous-default.json")

# Field names of LLaMA-Factory 0.9.4's argument dataclasses that the recipe may emit, with the values they take
# (hparams/data_args.py: cutoff_len, packing, neat_packing; hparams/model_args.py: flash_attn (AttentionFunction),
# enable_liger_kernel, disable_gradient_checkpointing; transformers' TrainingArguments: the two batch keys).
LLAMAFACTORY_KEYS = {
    "cutoff_len": int,
    "packing": bool,
    "neat_packing": bool,
    "flash_attn": {"auto", "disabled", "sdpa", "fa2", "fa3"},
    "enable_liger_kernel": bool,
    "per_device_train_batch_size": int,
    "gradient_accumulation_steps": int,
    "disable_gradient_checkpointing": bool,
    "ray_init_kwargs": dict,  # hparams/training_args.py (RayArguments): handed to ray.init
}

GIB = {"L4": 24, "A10G": 24, "L40S": 48, "A100": 80, "H100": 80}


def recipe(gpu: str = "H100", params_b: float = 7.0, cutoff_len: int = 2048, lora_rank: int = 8, **overrides):
    return training_recipe(gpu_memory_gib=GIB[gpu], base_model_params_b=params_b, cutoff_len=cutoff_len,
                           lora_rank=lora_rank, overrides=overrides)


def worker_env(r: dict) -> dict:
    """The worker setup hook's variables the recipe renders ({} without the hook)."""
    runtime_env = r.get("ray_init_kwargs", {}).get("runtime_env", {})
    if runtime_env:
        assert runtime_env["worker_process_setup_hook"] == WORKER_SETUP_HOOK == "payloads.worker_setup.install"
    return runtime_env.get("env_vars", {})


def test_h100_stock_image_recipe_shares_the_prefix_and_compiles_without_liger():
    assert recipe("H100", attention="sdpa") == {
        "cutoff_len": 2048,
        "packing": True,
        "neat_packing": True,
        "flash_attn": "sdpa",
        "enable_liger_kernel": False,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "disable_gradient_checkpointing": True,
        "ray_init_kwargs": {"runtime_env": {
            "worker_process_setup_hook": "payloads.worker_setup.install",
            "env_vars": {"LLMOPS_SHARED_PREFIX": "1", "LLMOPS_COMPILE_LAYERS": "auto"}}},
    }


def test_the_worker_hook_reads_the_variables_the_recipe_writes():
    from payloads import worker_setup  # the operator never imports payloads; the names must still agree

    assert (SHARED_PREFIX_ENV, COMPILE_LAYERS_ENV) == (worker_setup.SHARED_PREFIX_ENV, worker_setup.COMPILE_LAYERS_ENV)
    assert WORKER_SETUP_HOOK == f"{worker_setup.__name__}.{worker_setup.install.__name__}"


@pytest.mark.parametrize("gpu", ["L4", "A10G"])
def test_checkpointing_profiles_share_the_prefix_with_liger_and_do_not_compile(gpu):
    r = recipe(gpu, attention="sdpa")
    assert r["disable_gradient_checkpointing"] is False and r["enable_liger_kernel"] is True
    assert worker_env(r) == {SHARED_PREFIX_ENV: "1"}


@pytest.mark.parametrize("gpu", ["L40S", "A100", "H100"])
def test_profiles_without_checkpointing_compile_on_their_own_terms(gpu):
    r = recipe(gpu, attention="sdpa")
    assert worker_env(r) == {SHARED_PREFIX_ENV: "1", COMPILE_LAYERS_ENV: "auto"}
    assert r["enable_liger_kernel"] is False and r["disable_gradient_checkpointing"] is True


def test_h100_fa2_recipe_packs_without_the_mask():
    assert recipe("H100") == {**recipe("H100", attention="sdpa", sharedPrefix=False), "neat_packing": False,
                              "flash_attn": "fa2"}


def _rendered_train_config(settings: Settings, **training) -> dict:
    doc = example("viggo/finetune.yaml")
    doc["metadata"]["uid"] = "u"
    doc["spec"]["resources"]["accelerator"] = "H100"
    doc["spec"]["training"] = {**doc["spec"].get("training", {}), **training}
    children = finetune_builder.build_manifest(doc, BuildContext(settings=settings, payloads={}))
    config_map = next(o for o in children if o["metadata"]["name"].endswith("-config"))
    return yaml.safe_load(config_map["data"]["train.yaml"])


@pytest.mark.parametrize(("bench_row", "flash_attention_image"), [("default", False), ("default-fa2", True)])
def test_the_measured_defaults_are_what_the_operator_renders(bench_row, flash_attention_image):
    """bench/training_recipe.py derives its defaults from training_recipe(); its recorded keys must still be what
    the operator renders for the ViGGO FineTune on an H100 (re-run the bench when the recipe changes)."""
    measured = {v["name"]: v for v in json.loads(RESULTS.read_text())["variants"]}[bench_row]
    rendered = _rendered_train_config(Settings(finetune_flash_attention=flash_attention_image))
    assert measured["rendered"] == {k: rendered[k] for k in measured["rendered"]}
    assert not rendered.get("pure_bf16") and measured["lora_dtype"] == "fp32"
    assert (measured["micro_batch"], measured["accumulation"], measured["checkpointing"], measured["liger"]) == (
        rendered["per_device_train_batch_size"], rendered["gradient_accumulation_steps"],
        not rendered["disable_gradient_checkpointing"], rendered["enable_liger_kernel"])
    assert measured["attention"] == ("varlen" if flash_attention_image else "shared-prefix")
    compiled = COMPILE_LAYERS_ENV in worker_env(rendered)
    assert compiled is (not flash_attention_image)
    assert (measured["compile_mode"], measured["compile_scope"]) == (("default", "layers") if compiled else
                                                                      (None, "model"))


def test_l4_checkpoints_where_h100_does_not():
    l4, h100 = recipe("L4"), recipe("H100")
    assert l4["disable_gradient_checkpointing"] is False
    assert h100["disable_gradient_checkpointing"] is True
    # Same effective batch on both: one packed row per device per optimizer step.
    for r in (l4, h100):
        assert r["per_device_train_batch_size"] * r["gradient_accumulation_steps"] == 1
        assert r["packing"] is True and r["flash_attn"] == "fa2"


@pytest.mark.parametrize(("gpu", "checkpointing"), [("L4", True), ("A10G", True), ("L40S", False), ("A100", False),
                                                    ("H100", False)])
def test_checkpointing_per_accelerator_profile(gpu, checkpointing):
    assert recipe(gpu)["disable_gradient_checkpointing"] is (not checkpointing)


def test_large_model_on_h100_checkpoints():
    assert recipe("H100", params_b=32)["disable_gradient_checkpointing"] is False


def test_short_cutoff_packs_several_rows_per_step():
    r = recipe("H100", cutoff_len=512)
    assert (r["per_device_train_batch_size"], r["gradient_accumulation_steps"]) == (4, 1)


def test_micro_batch_shrinks_and_accumulation_grows_when_memory_is_short():
    # 4 rows of 512 per step; one row fits on an L4 without checkpointing, two do not: 1 x 4, no checkpointing.
    r = recipe("L4", cutoff_len=512, params_b=7.0, ligerKernel=False)
    assert r["disable_gradient_checkpointing"] is True
    assert (r["per_device_train_batch_size"], r["gradient_accumulation_steps"]) == (1, 4)
    assert peak_memory_gib(7.0, 8, 512, False, False, fa2=True) <= memory_budget_gib(24) < peak_memory_gib(
        7.0, 8, 1024, False, False, fa2=True)


def test_without_packing_keeps_the_reference_eight_samples_per_step():
    for gpu in ("L4", "H100"):
        r = recipe(gpu, packing=False)
        assert r["packing"] is False and r["neat_packing"] is False
        assert r["per_device_train_batch_size"] * r["gradient_accumulation_steps"] == 8
    assert recipe("H100", packing=False)["per_device_train_batch_size"] == 4


def test_packing_without_fa2_keeps_samples_apart_with_the_mask():
    for attention in ("sdpa", "auto", "eager"):
        r = recipe(attention=attention)
        assert r["packing"] is True and r["neat_packing"] is True
    assert recipe(attention="eager")["flash_attn"] == "disabled"
    assert recipe(attention="sdpa")["flash_attn"] == "sdpa"


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"packing": False}, {"packing": False, "neat_packing": False}),
    ({"perDeviceBatchSize": 3}, {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 1}),
    ({"gradientAccumulationSteps": 4}, {"gradient_accumulation_steps": 4, "per_device_train_batch_size": 1}),
    ({"gradientCheckpointing": True}, {"disable_gradient_checkpointing": False}),
    ({"attention": "sdpa"}, {"flash_attn": "sdpa"}),
    ({"ligerKernel": False}, {"enable_liger_kernel": False}),
])
def test_user_choice_wins_on_h100(overrides, expected):
    r = recipe("H100", **overrides)
    assert {k: r[k] for k in expected} == expected


def test_user_choice_wins_even_against_the_memory_model():
    r = recipe("L4", gradientCheckpointing=False, perDeviceBatchSize=8, gradientAccumulationSteps=2)
    assert r["disable_gradient_checkpointing"] is True
    assert (r["per_device_train_batch_size"], r["gradient_accumulation_steps"]) == (8, 2)


def test_user_micro_batch_decides_checkpointing_when_unset():
    assert recipe("H100", perDeviceBatchSize=16)["disable_gradient_checkpointing"] is False
    assert recipe("H100", perDeviceBatchSize=2)["disable_gradient_checkpointing"] is True


def test_none_means_choose_for_me():
    unset = dict.fromkeys(("packing", "perDeviceBatchSize", "gradientAccumulationSteps", "gradientCheckpointing",
                           "attention", "ligerKernel", "sharedPrefix", "compile"))
    for gpu in GIB:
        assert recipe(gpu, **unset) == recipe(gpu)


def test_rejects_unknown_overrides_and_attention():
    with pytest.raises(ValueError, match="unknown recipe overrides: microBatch"):
        recipe(microBatch=2)
    with pytest.raises(ValueError, match="unknown attention"):
        recipe(attention="fa9")


def test_packed_cutoff_is_a_multiple_of_eight():
    assert recipe(cutoff_len=1001)["cutoff_len"] == 1008
    assert recipe(cutoff_len=1001, packing=False)["cutoff_len"] == 1001


def test_pure_and_leaves_overrides_alone():
    overrides = {"packing": None, "attention": "sdpa"}
    before = dict(overrides)
    first = training_recipe(gpu_memory_gib=24, base_model_params_b=7, cutoff_len=2048, lora_rank=8,
                            overrides=overrides)
    second = training_recipe(gpu_memory_gib=24, base_model_params_b=7, cutoff_len=2048, lora_rank=8,
                             overrides=overrides)
    assert overrides == before and first == second


@pytest.mark.parametrize("gpu", sorted(GIB))
@pytest.mark.parametrize("overrides", [{}, {"packing": False}, {"attention": "eager"}, {"ligerKernel": False},
                                       {"perDeviceBatchSize": 2, "gradientCheckpointing": True},
                                       {"attention": "sdpa", "sharedPrefix": True},
                                       {"attention": "sdpa", "compile": True}, {"compile": False}])
def test_every_key_is_a_llamafactory_key_with_a_valid_value(gpu, overrides):
    r = recipe(gpu, **overrides)
    assert set(r) <= set(LLAMAFACTORY_KEYS)
    for key, value in r.items():
        allowed = LLAMAFACTORY_KEYS[key]
        if isinstance(allowed, set):
            assert value in allowed, key
        else:
            assert type(value) is allowed, key
    assert r["per_device_train_batch_size"] >= 1 and r["gradient_accumulation_steps"] >= 1
    assert r["cutoff_len"] % 8 == 0 or not r["packing"]


# Peaks the memory model is checked on: (results file, row) -> (checkpointing, liger, fa2). The model's six free
# constants are fitted on FIT_ROWS alone; HELD_OUT_ROWS are other micro-batch sizes, attention and the reference
# recipe, which the fit never sees. The no-Liger checkpointing slope comes from the preliminary run.
PRELIMINARY_RESULTS = RESULTS.with_name("training_recipe.preliminary.json")
FIT_ROWS = {
    (MEMORY_RESULTS, "packed-fa2"): (False, False, True), (MEMORY_RESULTS, "packed-fa2-x2"): (False, False, True),
    (MEMORY_RESULTS, "packed-sdpa-mask"): (False, False, False), (MEMORY_RESULTS, "default-fa2"): (False, True, True),
    (MEMORY_RESULTS, "default-ckpt"): (True, True, False), (PRELIMINARY_RESULTS, "packed-ckpt"): (True, False, True),
}
HELD_OUT_ROWS = {
    (MEMORY_RESULTS, "default"): (False, True, False), (MEMORY_RESULTS, "default-x2"): (False, True, False),
    (MEMORY_RESULTS, "default-fa2-x2"): (False, True, True), (MEMORY_RESULTS, "default-x4-ckpt"): (True, True, False),
    (MEMORY_RESULTS, "reference"): (True, False, False), (PRELIMINARY_RESULTS, "packed-x4-ckpt"): (True, False, True),
}
HELD_OUT_TOLERANCE_GIB = 0.15  # under 1% of the smallest held-out peak
PAIRS = [(False, True), (False, False), (True, True), (True, False)]  # (checkpointing, liger): one slope each


def _measured(rows: dict) -> list[tuple[tuple[bool, bool, bool], int, float, float]]:
    """((checkpointing, liger, fa2), tokens per micro-batch, measured peak GiB, params in billions) per row."""
    out = []
    for path, name in rows:
        results = json.loads(path.read_text())
        row = {v["name"]: v for v in results["variants"]}[name]
        assert row["lora_dtype"] == "fp32", (path.name, name)
        out.append((rows[path, name], row["tokens_per_microbatch"], row["peak_alloc_gib"],
                    results["model"]["params"] / 1e9))
    return out


def _features(shape: tuple[bool, bool, bool], tokens: int) -> list[float]:
    """The model's linear form in its free constants: the fixed overhead (GiB), then MiB per token for each
    (checkpointing, liger) pair, then the extra MiB per token of non-FA2 attention without checkpointing."""
    checkpointing, liger, fa2 = shape
    gib = tokens / 1024
    return [1.0, *(gib if (checkpointing, liger) == pair else 0.0 for pair in PAIRS),
            gib if not (fa2 or checkpointing) else 0.0]


def _least_squares(a: list[list[float]], b: list[float]) -> list[float]:
    """x minimising |a x - b| (normal equations, Gaussian elimination with partial pivoting)."""
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(n)] + [sum(r[i] * y for r, y in zip(a, b))] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        assert abs(m[pivot][col]) > 1e-9, "the fitting rows do not determine every constant"
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _fit(rows: dict) -> list[float]:
    measured = _measured(rows)
    # weights and adapter state are counted, not fitted: what the model predicts with no overhead and no tokens
    return _least_squares([_features(shape, tokens) for shape, tokens, _, _ in measured],
                          [peak - _counted_gib(params_b) for _, _, peak, params_b in measured])


def _counted_gib(params_b: float) -> float:
    return peak_memory_gib(params_b, 8, 0, False, False, fa2=True) - recipe_module.FIXED_OVERHEAD_GIB


def test_memory_model_fitted_on_some_peaks_predicts_the_others():
    """Fit the model's constants on FIT_ROWS, then predict the peaks it never saw: other micro-batch sizes (2 and 4
    rows), SDPA with the mask under Liger, and the unpacked reference recipe."""
    constants = _fit(FIT_ROWS)
    misses = {}
    for (path, name), (shape, tokens, peak, params_b) in zip(HELD_OUT_ROWS, _measured(HELD_OUT_ROWS)):
        predicted = _counted_gib(params_b) + sum(c * f for c, f in zip(constants, _features(shape, tokens)))
        if abs(predicted - peak) > HELD_OUT_TOLERANCE_GIB:
            misses[f"{path.name}:{name}"] = (round(predicted, 2), peak)
    assert not misses, f"held-out peaks (predicted, measured) off by more than {HELD_OUT_TOLERANCE_GIB} GiB: {misses}"


def test_the_operators_constants_are_that_fit():
    """recipe.py's constants are the held-out-checked fit (to 2%: rounded, and its no-Liger checkpointing slope
    was taken over both preliminary sizes), so the operator sizes jobs with what the held-out peaks validate."""
    fixed, *slopes, non_fa2 = _fit(FIT_ROWS)
    shipped = [recipe_module.FIXED_OVERHEAD_GIB, *(recipe_module.ACTIVATION_MIB_PER_TOKEN[p] for p in PAIRS),
               recipe_module.NON_FA2_ATTENTION_MIB_PER_TOKEN]
    assert shipped == pytest.approx([fixed, *slopes, non_fa2], rel=0.02, abs=0.01)


def test_the_shared_prefix_and_the_compile_are_each_the_users_to_turn_off():
    assert "ray_init_kwargs" not in recipe("H100", attention="sdpa", sharedPrefix=False)  # compile goes with it
    assert recipe("H100", attention="sdpa", sharedPrefix=False)["enable_liger_kernel"] is True
    no_compile = recipe("H100", attention="sdpa", compile=False)
    assert worker_env(no_compile) == {SHARED_PREFIX_ENV: "1"} and no_compile["enable_liger_kernel"] is True
    assert worker_env(recipe("H100", attention="sdpa", ligerKernel=True)) == {SHARED_PREFIX_ENV: "1"}
    assert worker_env(recipe("H100", attention="sdpa", gradientCheckpointing=True)) == {SHARED_PREFIX_ENV: "1"}


def test_asking_for_the_compile_compiles_any_job_anywhere():
    assert worker_env(recipe("L4", attention="sdpa", compile=True)) == {SHARED_PREFIX_ENV: "1",
                                                                       COMPILE_LAYERS_ENV: "always"}
    fa2 = recipe("H100", compile=True)  # no shared prefix with FA2: the compile alone
    assert worker_env(fa2) == {COMPILE_LAYERS_ENV: "always"} and fa2["enable_liger_kernel"] is False
    assert "ray_init_kwargs" not in recipe("H100")  # FA2 image default: neither


def test_the_compile_with_liger_is_refused_naming_both():
    with pytest.raises(ValueError, match="training.compile cannot trace Liger kernels.*compile and ligerKernel"):
        recipe("H100", compile=True, ligerKernel=True)


@pytest.mark.parametrize("overrides", [{"attention": "fa2"}, {"attention": "auto"},
                                       {"attention": "sdpa", "packing": False}])
def test_shared_prefix_without_the_mask_is_refused(overrides):
    with pytest.raises(ValueError, match="training.sharedPrefix needs packing with a mask"):
        recipe("H100", sharedPrefix=True, **overrides)


def test_asking_for_a_shared_prefix_picks_sdpa_on_a_flash_attention_image():
    config = _rendered_train_config(Settings(finetune_flash_attention=True), sharedPrefix=True)
    assert (config["flash_attn"], config["neat_packing"]) == ("sdpa", True)
    assert worker_env(config)[SHARED_PREFIX_ENV] == "1"
