"""payloads.finetune end to end on CPU: a fake `llamafactory-cli` (fake_llamafactory_cli.py) stands in for
LLaMA-Factory 0.9.4; everything else is real: the config the operator's builder renders, staging from pvc://
(a temporary mount root), the Ray storage layout, peft's check of adapter_config.json, publishing and the reports
sent to a local ConfigMap endpoint."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import re
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import yaml

from payload_testkit import OPERATOR_DIR, PAYLOAD_DATA, make_tiny_qwen

from llmops.api.finetune import FineTuneSpec
from llmops.builders import llamafactory
from llmops.builders.common import Owner
from llmops.builders.finetune import job_description
from payloads import finetune, finetune_log, finetune_model, finetune_nodes

HERE = Path(__file__).resolve().parent
FAKE_CLI = HERE / "fake_llamafactory_cli.py"
OUTPUT_URI = "pvc://models/adapters/viggo"
SPEC: Dict[str, Any] = {
    "baseModel": {"source": "Qwen/Qwen2.5-7B-Instruct"},
    "template": "qwen",
    "method": {"type": "lora", "rank": 8, "target": "all"},
    "dataset": {"train": {"uri": "pvc://data/viggo/train.jsonl"}, "validation": {"uri": "pvc://data/viggo/val"},
                "format": "alpaca", "columns": {"prompt": "instruction", "query": "input", "response": "output"},
                "maxSamples": 1000},
    "training": {"epochs": 2, "loggingSteps": 1, "saveSteps": 2},
    "resources": {"workers": 1, "gpusPerWorker": 1, "accelerator": "L4"},
    "output": {"uri": OUTPUT_URI},
}


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def has_llamafactory_094() -> bool:
    try:
        return importlib.metadata.version("llamafactory") == "0.9.4"
    except importlib.metadata.PackageNotFoundError:
        return False


def needs_peft(test):
    """The adapter check is real peft: without it these tests fail (tools/setup.sh installs it in .venv-ray)."""
    return test


@pytest.fixture(scope="session")
def adapter_template(tmp_path_factory) -> Optional[Path]:
    """A real adapter_config.json, written once by peft, that the fake CLI fills in."""
    if not has_peft():
        return None
    from peft import LoraConfig

    folder = tmp_path_factory.mktemp("peft")
    LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(str(folder))
    return folder / "adapter_config.json"


class Run:
    """One driver run in a temporary world: pvc root, node-local staging dir, job ConfigMap files."""

    def __init__(self, root: Path, api, adapter_template: Optional[Path]):
        self.root, self.api = root, api
        self.uid = "0b9f6d7e-0000-4000-8000-000000000001"
        self.pvc = root / "pvc"
        self.staging = root / "scratch"
        self.job_dir = root / "job"
        self.bin = root / "bin"
        self.site = root / "site"
        self.calls = root / "calls.txt"
        for folder in (self.job_dir, self.bin, self.site):
            folder.mkdir(parents=True)
        data = self.pvc / "data" / "viggo"
        (data / "val").mkdir(parents=True)
        lines = (PAYLOAD_DATA / "viggo_test.jsonl").read_text().splitlines()
        (data / "train.jsonl").write_text("\n".join(lines[:12]) + "\n")
        (data / "val" / "part-0.jsonl").write_text("\n".join(lines[12:]) + "\n")
        (data / "val" / "_SUCCESS").write_text("")
        self.installed("0.9.4")
        cli = self.bin / "llamafactory-cli"
        cli.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{FAKE_CLI}' \"$@\"\n")
        cli.chmod(0o755)
        # RAY_AUTH_MODE: the test's Ray head and the driver are separate processes that share no Ray token.
        self.env = {"PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "LLMOPS_PVC_ROOT": str(self.pvc),
                    "LLMOPS_PROGRESS_INTERVAL_S": "0", "FAKE_LF_CALLS": str(self.calls), "RAY_AUTH_MODE": "disabled",
                    "FAKE_LF_ADAPTER_TEMPLATE": str(adapter_template or ""),
                    "PYTHONPATH": os.pathsep.join([str(self.site), str(OPERATOR_DIR), os.environ.get("PYTHONPATH", "")])}
        self.render(SPEC)

    def installed(self, version: str) -> None:
        """What importlib.metadata sees as the installed LLaMA-Factory."""
        for old in self.site.glob("llamafactory-*.dist-info"):
            shutil.rmtree(old)
        dist = self.site / f"llamafactory-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llamafactory\nVersion: {version}\n")

    def render(self, wire: Dict[str, Any], recipe: Optional[Dict[str, Any]] = None) -> None:
        """The three ConfigMap files, as the operator renders them."""
        spec = FineTuneSpec.model_validate(wire)
        recipe = {"per_device_train_batch_size": 1} if recipe is None else recipe
        config = llamafactory.train_config(spec, name="viggo", recipe=recipe,
                                           accelerator_type="L4", staging_dir=str(self.staging))
        job = job_description(Owner("llmops.dev/v1alpha1", "FineTune", "viggo", "ml", self.uid), spec)
        (self.job_dir / "job.json").write_text(json.dumps(job))
        (self.job_dir / "train.yaml").write_text(yaml.safe_dump(config))
        (self.job_dir / "dataset_info.json").write_text(json.dumps(llamafactory.dataset_info(spec,
                                                                                           str(self.staging))))

    def __call__(self, **env: str) -> subprocess.CompletedProcess:
        # Generous: torch.compile on a loaded 2-core CI machine took over 300 s once; a hang still ends the test.
        return subprocess.run([sys.executable, "-m", "payloads.finetune", "--config", str(self.job_dir / "job.json")],
                              env={**os.environ, **self.env, **env}, capture_output=True, text=True, timeout=900)

    @property
    def output(self) -> Path:
        return self.pvc / "models" / "adapters" / "viggo"

    @property
    def final(self) -> Dict[str, str]:
        return self.api.patches[-1]

    def trained(self) -> bool:
        return self.calls.exists()


@pytest.fixture
def run(tmp_path, reporter_env, adapter_template) -> Run:
    return Run(tmp_path, reporter_env, adapter_template)


@needs_peft
def test_trains_checks_and_publishes_the_adapter(run):
    done = run()
    assert done.returncode == 0, done.stdout + done.stderr
    patches = run.api.patches
    assert patches[0]["state"] == "Running" and "environment" in patches[0]["message"]
    final = run.final
    assert final["state"] == "Succeeded", final
    assert json.loads(final["adapter"]) == {"uri": OUTPUT_URI, "baseModel": "Qwen/Qwen2.5-7B-Instruct", "rank": 8}
    assert json.loads(final["metrics"]) == {"trainLoss": 0.2079, "evalLoss": 0.1362,
                                            "trainRuntimeSeconds": 437.2951, "trainSamplesPerSecond": 11.434}
    assert final["outputURI"] == OUTPUT_URI
    assert "published to pvc://models/adapters/viggo" in final["message"]
    # progress came from the trainer's log lines while training ran
    progress = [json.loads(p["progress"]) for p in patches if p.get("progress") and p["state"] == "Running"]
    assert {"epoch": 0.5, "loss": 1.5, "learningRate": 7.5e-05, "totalSteps": 4, "step": 1} in progress
    assert json.loads(final["progress"])["evalLoss"] == 0.1362
    # the published folder: adapter from the newest checkpoint (step 4), results, no optimizer state
    published = sorted(p.name for p in run.output.iterdir())
    assert published == ["README.md", "adapter_config.json", "adapter_model.safetensors", "all_results.json",
                         "special_tokens_map.json", "tokenizer_config.json", "trainer_state.json"]
    assert json.loads((run.output / "trainer_state.json").read_text())["global_step"] == 4
    adapter_config = json.loads((run.output / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["base_model_name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
    assert json.loads((run.output / "all_results.json").read_text())["train_loss"] == 0.2079
    # the inputs were staged where the rendered config and dataset_info.json point
    data = run.staging / "data"
    assert sorted(p.name for p in (data / "validation").iterdir()) == ["part-0.jsonl"]  # no _SUCCESS marker
    assert (data / "train" / "train.jsonl").read_text() == (run.pvc / "data/viggo/train.jsonl").read_text()
    assert json.loads((data / "dataset_info.json").read_text()) == json.loads(
        (run.job_dir / "dataset_info.json").read_text())
    # LLaMA-Factory got a JSON config with the checkpoint storage re-rooted under the test's pvc root
    assert "Loaded 12 examples of train" in done.stdout
    assert (run.pvc / "models/llmops-checkpoints/adapters/viggo/viggo").is_dir()


@needs_peft
def test_a_rank_other_than_the_spec_fails_and_publishes_nothing(run):
    done = run(FAKE_LF_RANK="16")
    assert done.returncode == 1
    assert run.final["state"] == "Failed"
    assert "does not match the spec: r is 16, the spec asks for 8" in run.final["message"]
    assert "adapter" not in run.final and not run.output.exists()


@needs_peft
def test_explicit_target_modules_and_alpha_are_checked(run):
    spec = json.loads(json.dumps(SPEC))
    spec["method"] = {"type": "lora", "rank": 4, "alpha": 32, "target": "q_proj, v_proj"}
    run.render(spec)
    done = run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(run.final["adapter"])["rank"] == 4
    adapter_config = json.loads((run.output / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"] and adapter_config["lora_alpha"] == 32


@needs_peft
def test_without_ray_checkpoints_the_final_output_dir_is_published(run):
    done = run(FAKE_LF_NO_CHECKPOINT="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert run.final["state"] == "Succeeded"
    assert (run.output / "adapter_model.safetensors").stat().st_size > 0


@needs_peft
def test_empty_adapter_weights_are_never_reported_done(run):
    done = run(FAKE_LF_EMPTY_WEIGHTS="1")
    assert done.returncode == 1
    assert run.final["state"] == "Failed" and "adapter is incomplete" in run.final["message"]
    assert not run.output.exists()


def test_training_failure_names_the_cause_and_the_remedy(run):
    done = run(FAKE_LF_FAIL="oom")
    assert done.returncode == 1
    message = run.final["message"]
    assert run.final["state"] == "Failed"
    assert message.startswith("LLaMA-Factory training exited with code 1: ")
    assert "OutOfMemoryError" in message and "training.perDeviceBatchSize" in message
    # progress up to the failure was reported
    assert any(json.loads(p.get("progress") or "{}").get("loss") == 1.5 for p in run.api.patches)


@pytest.mark.parametrize("version", ["0.9.5", "0.9.3"])
def test_another_llamafactory_version_fails_before_training(run, version):
    run.installed(version)
    done = run()
    assert done.returncode == 1
    assert run.final["state"] == "Failed"
    assert f"LLaMA-Factory {version} is installed but FineTune renders configs for 0.9.4" in run.final["message"]
    assert not run.trained()


def test_packing_that_needs_flash_attention_fails_without_it(run):
    if has_module("flash_attn"):
        pytest.skip("flash-attn is installed here")
    run.render(SPEC, recipe={"packing": True, "neat_packing": False, "flash_attn": "fa2"})
    done = run()
    assert done.returncode == 1
    assert "flash-attn is not installed in the Ray image" in run.final["message"]
    assert not run.trained()


def test_a_missing_dataset_fails_with_its_uri(run):
    (run.pvc / "data/viggo/train.jsonl").unlink()
    done = run()
    assert done.returncode == 1
    assert "pvc://data/viggo/train.jsonl does not exist" in run.final["message"]
    assert not run.trained()


def test_without_peft_the_check_fails_clearly(run):
    stub = run.root / "nopeft" / "peft"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('peft is missing in this image')\n")
    run.env["PYTHONPATH"] = f"{stub.parent}{os.pathsep}{run.env['PYTHONPATH']}"
    done = run()
    assert done.returncode == 1
    assert "cannot check the adapter: peft is not importable" in run.final["message"]
    assert not run.output.exists()


# ---------------------------------------------------------------- the Ray path, on a one-node local cluster

RAY_HEAD = textwrap.dedent("""
    import sys, ray
    ray.init(num_cpus=1, num_gpus=1, resources={"accelerator_type:L4": 1}, include_dashboard=False,
             object_store_memory=100 * 1024 * 1024)
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # until the test closes stdin
    ray.shutdown()
""")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """(address, pvc root) of a one-node Ray cluster with one (logical) L4 GPU, in a process of its own like a
    RayJob's head. Its pvc root is a symbolic link that each test points at its own claims (ray_run)."""
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("ray-head")
    link = root / "pvc"
    link.symlink_to(root / "unset")
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled", "LLMOPS_PVC_ROOT": str(link)})
    try:
        address = head.stdout.readline().strip()
        assert address, "the local Ray head did not start"
        yield address, link
    finally:
        head.stdin.close()
        head.wait(timeout=60)


@pytest.fixture
def ray_run(tmp_path, reporter_env, adapter_template, ray_head) -> Run:
    """A Run whose claims the Ray head's tasks see, with RAY_ADDRESS set as in a RayJob."""
    address, link = ray_head
    run = Run(tmp_path, reporter_env, adapter_template)
    link.unlink()
    link.symlink_to(run.pvc)
    run.env.update({"LLMOPS_PVC_ROOT": str(link), "RAY_ADDRESS": address})
    return run


@needs_peft
def test_staging_and_collection_run_as_ray_tasks_on_the_gpu_nodes(ray_run):
    run = ray_run
    done = run(LLMOPS_GPU_WAIT_S="60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "staged by Ray tasks on 1 node(s)" in done.stderr
    assert run.final["state"] == "Succeeded"
    assert json.loads(run.final["metrics"])["trainLoss"] == 0.2079  # all_results.json came back from the node
    assert (run.staging / "data" / "train" / "train.jsonl").exists()


def test_a_cluster_without_room_for_the_workers_fails_after_the_wait(ray_run):
    run = ray_run
    spec = json.loads(json.dumps(SPEC))
    spec["resources"]["workers"] = 2
    run.render(spec)
    done = run(LLMOPS_GPU_WAIT_S="1")
    assert done.returncode == 1
    assert "room for 1 of 2 training workers" in run.final["message"]
    assert "check that the GPU worker pods are scheduled" in run.final["message"]
    assert not run.trained()


# ---------------------------------------------------------------- the trainer's log lines

def test_progress_reads_the_trainer_log_lines_as_ray_forwards_them():
    progress = finetune_log.Progress()
    prefix = "\x1b[36m(RayTrainWorker pid=7, ip=10.1.2.3)\x1b[0m "  # as Ray 2.60 colours a worker's lines
    assert progress.feed(prefix + "[INFO|trainer.py:2527] 2026-11-25 21:33:41,439 >>   Total optimization steps = "
                                  "1,550\n")
    assert not progress.feed(prefix + "Running tokenizer on dataset (num_proc=16): 100%|##| 1000/1000 [00:01<00:00]")
    assert progress.feed(prefix + " 10%|#         | 155/1550 [07:12<00:00,  2.85s/it]")
    assert progress.feed(prefix + "{'loss': 0.3, 'grad_norm': 0.14, 'learning_rate': 9.5e-05, 'epoch': 1.2}")
    progress.feed(prefix + "{'eval_viggo-val_loss': 0.136, 'eval_viggo-val_runtime': 20.3, 'epoch': 1.2}")
    progress.feed("{'loss': nan, 'epoch': 1.3}")  # unparsable values are skipped
    assert progress.state == {"totalSteps": 1550, "step": 155, "loss": 0.3, "epoch": 1.2, "learningRate": 9.5e-05,
                              "evalLoss": 0.136}
    assert progress.message() == "Training: step 155/1550, epoch 1.20, loss 0.3000"
    progress.feed(prefix + "{'train_runtime': 437.3, 'train_samples_per_second': 11.434, 'train_loss': 0.2079, "
                           "'epoch': 4.86}")
    assert finetune_model.metrics_from({**progress.train_summary, **progress.eval_summary}) == {
        "trainLoss": 0.2079, "evalLoss": 0.136, "trainRuntimeSeconds": 437.3, "trainSamplesPerSecond": 11.434}


def test_checkpoint_storage_is_read_where_llamafactory_hands_it_to_ray(tmp_path):
    fs, path = finetune_model.checkpoint_experiment({"ray_storage_path": str(tmp_path / "ckpt"), "ray_run_name": "viggo"})
    assert path == f"{tmp_path}/ckpt/viggo"
    # Ray Train V1 layout (the reference run) and V2 layout both resolve to their newest checkpoint
    for rel in ("TorchTrainer_95d16_00000_0_2025-04-11/checkpoint_000000/checkpoint/adapter_config.json",
                "TorchTrainer_95d16_00000_0_2025-04-11/checkpoint_000001/checkpoint/adapter_config.json"):
        (tmp_path / "ckpt/viggo" / rel).parent.mkdir(parents=True)
        (tmp_path / "ckpt/viggo" / rel).write_text("{}")
    _, folder, names = finetune_model.latest_checkpoint({"ray_storage_path": str(tmp_path / "ckpt"),
                                                   "ray_run_name": "viggo"})
    assert folder.endswith("TorchTrainer_95d16_00000_0_2025-04-11/checkpoint_000001/checkpoint")
    assert names == ["adapter_config.json"]
    assert finetune_model.latest_checkpoint({"ray_storage_path": str(tmp_path / "none"), "ray_run_name": "x"}) is None


def write_checkpoint(run_dir: Path, name: str, step: int, files=("adapter_model.safetensors", "optimizer.pt",
                                                                   "scheduler.pt", "trainer_state.json")) -> None:
    folder = run_dir / name / "checkpoint"
    folder.mkdir(parents=True)
    for file in files:
        (folder / file).write_text(json.dumps({"global_step": step}) if file == "trainer_state.json" else "x")


def resume_job(tmp_path: Path, uid: str = "uid-1", resume: str = "auto") -> finetune.Job:
    config = {"ray_storage_path": str(tmp_path / "ckpt"), "ray_run_name": "viggo"}
    return finetune.Job(name="viggo", output_uri=OUTPUT_URI, base_model={}, method={}, train_uri="", config=config,
                        validation_uri=None, dataset_info={}, uid=uid, resume=resume)


def test_a_rerun_resumes_from_the_newest_checkpoint_that_ray_train_registered_complete(tmp_path):
    run_dir = tmp_path / "ckpt" / "viggo"
    assert finetune.start_point(resume_job(tmp_path)) is None  # the first run marks the folder as its own
    write_checkpoint(run_dir, "checkpoint_2026-12-04_10-00-00.000000", 2)
    write_checkpoint(run_dir, "checkpoint_2026-12-04_10-01-00.000000", 4)
    write_checkpoint(run_dir, "checkpoint_2026-12-04_10-02-00.000000", 6, files=("trainer_state.json",))
    write_checkpoint(run_dir, "checkpoint_2026-12-04_10-03-00.000000", 8)  # uploaded, never registered
    (run_dir / finetune_model.RAY_SNAPSHOT).write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": f"checkpoint_2026-12-04_10-0{i}-00.000000"} for i in (0, 1, 2)],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-12-04_10-02-00.000000"}}))
    point = finetune.start_point(resume_job(tmp_path))
    assert point.step == 4 and point.folder.endswith("checkpoint_2026-12-04_10-01-00.000000/checkpoint")
    assert finetune_model.storage_uri({}, point.folder, {"LLMOPS_PVC_ROOT": str(tmp_path)}) == \
        "pvc://ckpt/viggo/checkpoint_2026-12-04_10-01-00.000000/checkpoint"
    assert finetune_model.storage_uri({"ray_storage_filesystem": "gs"}, "bucket/llmops-checkpoints/x") == \
        "gs://bucket/llmops-checkpoints/x"
    without_snapshot = resume_job(tmp_path)
    (run_dir / finetune_model.RAY_SNAPSHOT).unlink()  # Ray Train V1 keeps none: judged by the files alone
    assert finetune.start_point(without_snapshot).step == 8


@pytest.mark.parametrize("uid, resume", [("uid-2", "auto"), ("uid-1", "never")], ids=["recreated", "never"])
def test_checkpoints_of_another_resource_or_with_resume_never_are_deleted(tmp_path, uid, resume):
    assert finetune.start_point(resume_job(tmp_path)) is None
    write_checkpoint(tmp_path / "ckpt" / "viggo", "checkpoint_2026-12-04_10-00-00.000000", 2)
    assert finetune.start_point(resume_job(tmp_path, uid=uid, resume=resume)) is None
    assert sorted(p.name for p in (tmp_path / "ckpt" / "viggo").iterdir()) == [finetune_model.RUN_MARKER]
    assert finetune.start_point(resume_job(tmp_path, uid=uid)) is None  # nothing left to resume


def test_failure_names_the_workers_exception_rather_than_rays_wrapper():
    progress = finetune_log.Progress()
    for line in ("\x1b[36m(RayTrainWorker pid=5251)\x1b[0m Error in training function:",
                 "\x1b[36m(RayTrainWorker pid=5251)\x1b[0m ValueError: Template qwen3x does not exist.",
                 "\x1b[36m(TrainController pid=5103)\x1b[0m ray.train.WorkerGroupError: Training failed due to "
                 "worker errors:",
                 "ray.train.WorkerGroupError: Training failed due to worker errors:"):
        progress.feed(line)
    assert progress.failure(1) == ("LLaMA-Factory training exited with code 1: ValueError: Template qwen3x does not "
                                   "exist.; spec.template is not a LLaMA-Factory 0.9.4 template; the RayJob driver "
                                   "log has the full trace")


# ---------------------------------------------------------------- the real LLaMA-Factory 0.9.4 (when installed)

@pytest.mark.llamafactory
def test_llamafactory_094_parses_the_config_and_loads_the_staged_datasets(tmp_path, monkeypatch):
    from llmops.builders.recipe import training_recipe
    from transformers import HfArgumentParser

    from llamafactory.data.loader import _get_merged_dataset
    from llamafactory.hparams.parser import _TRAIN_ARGS, get_ray_args

    monkeypatch.setenv("USE_RAY", "1")
    monkeypatch.setenv("LLMOPS_PVC_ROOT", str(tmp_path / "pvc"))
    world = Run.__new__(Run)  # only the data layout of a Run
    world.pvc, world.staging = tmp_path / "pvc", tmp_path / "scratch"
    spec_wire = json.loads(json.dumps(SPEC))
    spec_wire["output"] = {"uri": "s3://artifacts/adapters/viggo"}
    spec = FineTuneSpec.model_validate(spec_wire)
    recipe = training_recipe(gpu_memory_gib=24, base_model_params_b=7, cutoff_len=2048, lora_rank=8,
                             overrides={"attention": "sdpa", "packing": False})
    config = llamafactory.train_config(spec, name="viggo", recipe=recipe, accelerator_type="L4",
                                       staging_dir=str(world.staging))
    config = json.loads(json.dumps(yaml.safe_load(yaml.safe_dump(config))))  # as the driver hands it over
    config["bf16"] = False  # this CPU cannot; the key itself is what is checked

    model_args, data_args, training_args, finetuning_args, _ = HfArgumentParser(_TRAIN_ARGS).parse_dict(
        config, allow_extra_keys=False)  # an unknown key raises here
    assert (finetuning_args.finetuning_type, finetuning_args.lora_rank, finetuning_args.lora_alpha) == ("lora", 8, 16)
    assert finetuning_args.lora_target == ["all"] and training_args.report_to == []
    ray_args = get_ray_args(config)
    assert ray_args.use_ray and ray_args.ray_num_workers == 1 and ray_args.ray_run_name == "viggo"
    assert type(ray_args.ray_storage_filesystem).__name__ == "S3FileSystem"
    assert ray_args.ray_storage_path == "artifacts/llmops-checkpoints/adapters/viggo"
    assert ray_args.resources_per_worker == {"GPU": 1, "accelerator_type:L4": 0.001}

    data = world.pvc / "data" / "viggo"
    (data / "val").mkdir(parents=True)
    lines = (PAYLOAD_DATA / "viggo_test.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:12]) + "\n")
    (data / "val" / "part-0.jsonl").write_text("\n".join(lines[12:]) + "\n")
    job = finetune.Job(name="viggo", output_uri=spec.output.uri, base_model=spec.base_model.wire(),
                       method=spec.method.wire(), train_uri=spec.dataset.train.uri,
                       validation_uri=spec.dataset.validation.uri, config=config,
                       dataset_info=llamafactory.dataset_info(spec, str(world.staging)))
    staged = finetune_nodes.prepare_node(finetune_nodes.staging_plan(job), os.path.join(config["dataset_dir"],
                                   "dataset_info.json"), json.dumps(job.dataset_info), config["output_dir"])
    assert "error" not in staged, staged
    train = _get_merged_dataset(data_args.dataset, model_args, data_args, training_args, "sft")
    validation = _get_merged_dataset(data_args.eval_dataset, model_args, data_args, training_args, "sft")
    assert (len(train), len(validation)) == (12, len(lines) - 12)
    first = json.loads(lines[0])
    assert train[0]["_prompt"][0]["content"] == first["instruction"] + "\n" + first["input"]
    assert train[0]["_response"][0]["content"] == first["output"]


def real_llamafactory_spec(run: Run, cutoff_len: int, **training: Any) -> Dict[str, Any]:
    """A tiny random Qwen2 on the run's claim, the real CLI (workers on CPU) on PATH, and a FineTune spec for both."""
    make_tiny_qwen(run.pvc / "models" / "tiny-qwen")
    (run.bin / "llamafactory-cli").write_text(
        f"#!/bin/sh\nexec '{sys.executable}' '{HERE / 'cpu_llamafactory_cli.py'}' \"$@\"\n")
    spec = json.loads(json.dumps(SPEC))
    spec.update({"baseModel": {"source": "pvc://models/tiny-qwen"}, "method": {"rank": 4, "target": "all"},
                 "training": {"epochs": 2, "precision": "fp32", "loggingSteps": 1, **training}})
    spec["dataset"]["cutoffLen"] = cutoff_len
    return spec


@pytest.mark.llamafactory
def test_real_llamafactory_094_trains_through_the_driver_on_cpu(ray_run):
    """The driver with the real `USE_RAY=1 llamafactory-cli train` (workers on CPU, tiny random model from a pvc):
    staging by Ray tasks, Ray Train V2 checkpoints beside the output, all_results.json from the worker's
    output_dir, peft's check of the adapter LLaMA-Factory wrote, publishing and every report."""
    run = ray_run
    spec = real_llamafactory_spec(run, cutoff_len=256, saveSteps=3, evalSteps=2)
    run.render(spec, recipe={"per_device_train_batch_size": 2, "packing": False})
    done = run(LLMOPS_GPU_WAIT_S="60", FAKE_LF_ADAPTER_TEMPLATE="")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    final = run.final
    assert final["state"] == "Succeeded", final
    assert json.loads(final["adapter"]) == {"uri": OUTPUT_URI, "baseModel": "pvc://models/tiny-qwen", "rank": 4}
    assert set(json.loads(final["metrics"])) == {"trainLoss", "evalLoss", "trainRuntimeSeconds",
                                                 "trainSamplesPerSecond"}
    assert json.loads(final["progress"])["step"] == json.loads(final["progress"])["totalSteps"]
    published = {p.name for p in run.output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "all_results.json"} <= published
    assert not {"optimizer.pt", "scheduler.pt", "training_args.bin"} & published
    steps = json.loads((run.output / "trainer_state.json").read_text())["global_step"]
    assert steps == json.loads(final["progress"])["totalSteps"]  # the newest checkpoint, not an earlier one
    checkpoints = run.pvc / "models" / "llmops-checkpoints" / "adapters" / "viggo" / "viggo"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint_"))


@pytest.mark.llamafactory
@pytest.mark.parametrize("compile_choice", [None, True], ids=["default", "compile"])
def test_real_llamafactory_094_trains_with_the_worker_setup_hook_on_cpu(ray_run, compile_choice):
    """The default recipe on a GPU that needs no checkpointing: the rendered `ray_init_kwargs` name
    payloads.worker_setup.install as the worker setup hook, with the variables for the shared prefix and the
    compile. LLaMA-Factory hands them to ray.init, and its Ray Train worker packs the rows around the prompt the
    samples share (its log line says so) and trains them with neat packing's 4-D mask (SDPA). Left to itself
    (`auto`) the worker does not compile so short a job and says why; with `training.compile: true` it compiles
    the decoder layers and trains them through LLaMA-Factory 0.9.4's own Trainer, rows of varying length and all."""
    from llmops.builders.recipe import training_recipe

    run = ray_run
    spec = real_llamafactory_spec(run, cutoff_len=1024, saveSteps=50)
    overrides = {"attention": "sdpa", "compile": compile_choice}
    recipe = training_recipe(gpu_memory_gib=80, base_model_params_b=0.5, cutoff_len=1024, lora_rank=4,
                             overrides={k: v for k, v in overrides.items() if v is not None})
    assert recipe["neat_packing"] and not recipe["enable_liger_kernel"]
    inductor = run.pvc.parent / "inductor-cache"  # where the worker's compiled kernels land, if any
    recipe["ray_init_kwargs"]["runtime_env"]["env_vars"]["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    run.render(spec, recipe=recipe)
    done = run(LLMOPS_GPU_WAIT_S="60", FAKE_LF_ADAPTER_TEMPLATE="")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert run.final["state"] == "Succeeded", run.final
    log = done.stdout + done.stderr
    # One line per preprocessing batch (LLaMA-Factory maps the samples in shards, one process each).
    assert re.search(r"shared-prefix packing: \d+ samples in \d+ rows, their first \d+ tokens carried once", log), \
        log[-4000:]
    if compile_choice:
        assert re.search(r"compiling \d+ decoder layers \(regional torch.compile", log), log[-4000:]
    else:
        assert re.search(r"decoder layers not compiled: \d+ optimizer steps per worker, fewer than 1000", log), \
            log[-4000:]
    metrics = json.loads(run.final["metrics"])
    assert math.isfinite(metrics["trainLoss"]) and math.isfinite(metrics["evalLoss"]), metrics
    assert any(inductor.rglob("*.py")) is bool(compile_choice)  # inductor generated code only when compiling


def registered_step(checkpoints: Path) -> Optional[int]:
    """The global step of the newest checkpoint Ray Train V2 has registered (every worker's upload done)."""
    snapshot = checkpoints / finetune_model.RAY_SNAPSHOT
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    if not latest:
        return None
    state = checkpoints / latest["checkpoint_dir_name"] / "checkpoint" / "trainer_state.json"
    return json.loads(state.read_text())["global_step"]


def trained_steps(log: str) -> list:
    """The trainer's per-step log dicts (loggingSteps: 1): one per step the run trained."""
    return re.findall(r"\{'loss': [^}]*\}", log)


@pytest.mark.llamafactory
def test_real_llamafactory_094_resumes_a_killed_run_from_its_last_checkpoint(ray_run):
    """A run killed after a checkpoint (as a lost node or a RayJob retry ends it) and the driver started again:
    the second run stages the newest checkpoint Ray Train registered, LLaMA-Factory resumes there (Hugging Face's
    trainer restores weights, optimizer, schedule and data position), trains only the steps that were left and
    publishes a complete adapter whose trainer state ends at the same total as an uninterrupted run."""
    import signal
    import time

    run = ray_run
    spec = real_llamafactory_spec(run, cutoff_len=256, saveSteps=2)
    recipe = {"per_device_train_batch_size": 2, "packing": False,
              "ray_init_kwargs": {"runtime_env": {"worker_process_setup_hook": "slow_steps.install",
                                                  "env_vars": {"LLMOPS_TEST_STEP_S": "1.5"}}}}
    run.render(spec, recipe=recipe)
    checkpoints = run.pvc / "models" / "llmops-checkpoints" / "adapters" / "viggo" / "viggo"
    first_log = run.root / "first-run.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "payloads.finetune", "--config", str(run.job_dir / "job.json")],
                                 env={**os.environ, **run.env, "LLMOPS_GPU_WAIT_S": "60"}, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while registered_step(checkpoints) is None:
            assert first.poll() is None, first_log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint was registered: " + first_log.read_text()[-4000:]
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and LLaMA-Factory's CLI: no chance to clean up
        first.wait()
    killed_at = registered_step(checkpoints)
    total = int(re.search(r"Total optimization steps = (\d+)", first_log.read_text())[1])
    assert 0 < killed_at < total, (killed_at, total)
    assert not run.output.exists()  # nothing is published before training ends

    done = run(LLMOPS_GPU_WAIT_S="60", FAKE_LF_ADAPTER_TEMPLATE="")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert f"Continuing training from global step {killed_at}" in log, log[-6000:]
    assert len(trained_steps(log)) == total - killed_at, log[-6000:]  # only the steps that were left
    final = run.final
    assert final["state"] == "Succeeded", final
    progress = json.loads(final["progress"])
    assert progress["resumedFromStep"] == killed_at and progress["step"] == progress["totalSteps"] == total
    assert any("resuming at step" in p.get("message", "") for p in run.api.patches)
    assert json.loads(final["adapter"]) == {"uri": OUTPUT_URI, "baseModel": "pvc://models/tiny-qwen", "rank": 4}
    published = {p.name for p in run.output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "all_results.json"} <= published
    state = json.loads((run.output / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == total
    # The trainer state carries the first run's history: one loss per step, before and after the kill.
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, total + 1))
