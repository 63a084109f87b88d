"""The trained model (payloads/finetune.py): found in the newest Ray Train checkpoint, checked against the spec,
published to spec.output."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from payloads import storage
from payloads.finetune_job import CONFIG_FILES, TRAINING_STATE, FineTuneError, Job
from payloads.finetune_log import eval_loss

logger = logging.getLogger("llmops.payloads.finetune")

RUN_MARKER = "llmops-run.json"  # which resource's run the folder holds
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of the checkpoints it registered
# What Hugging Face's Trainer reads to resume: besides these, the weights (and rng_state*.pth, optional).
RESUME_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
_WEIGHTS = re.compile(r"^(adapter_model|model|pytorch_model)([.-].*)?\.(safetensors|bin|json)$")
_CHECKPOINT_FILE = re.compile(r"^(?:(?P<trial>[^/]+)/)?(?P<ckpt>checkpoint_[^/]+)/checkpoint/(?P<file>[^/]+)$")


@dataclass(frozen=True)
class ResumePoint:
    fs: Any
    folder: str  # the Hugging Face checkpoint folder inside the Ray Train checkpoint
    step: int  # trainer_state.json's global_step


def checkpoint_experiment(config: Mapping[str, Any]) -> Tuple[Any, str]:
    """(pyarrow filesystem, path) of <ray_storage_path>/<ray_run_name>, as LLaMA-Factory 0.9.4 hands it to Ray."""
    import pyarrow.fs as pafs

    path, filesystem = str(config["ray_storage_path"]), config.get("ray_storage_filesystem")
    if filesystem:
        scheme = "s3" if filesystem == "s3" else "gs"
        fs, resolved = pafs.FileSystem.from_uri(f"{scheme}://{path.strip('/')}")
    else:
        fs, resolved = pafs.LocalFileSystem(), os.path.abspath(path)
    return fs, posixpath.join(resolved.rstrip("/"), str(config["ray_run_name"]))


def clear_experiment(config: Mapping[str, Any]) -> None:
    """Delete the run folder: Ray Train V2 restores a run from what it finds there."""
    fs, path = checkpoint_experiment(config)
    if storage.file_exists(fs, path):
        fs.delete_dir(path)


def owns_experiment(config: Mapping[str, Any], uid: str) -> bool:
    """True when the run folder holds an earlier run of this very resource (its marker names the uid).

    A FineTune deleted and created again under the same name has a new uid: the old run's checkpoints trained
    another spec, so they are never resumed.
    """
    fs, path = checkpoint_experiment(config)
    marker = posixpath.join(path, RUN_MARKER)
    if not storage.file_exists(fs, marker):
        return False
    try:
        with fs.open_input_stream(marker) as stream:
            return json.loads(stream.read().decode("utf-8")).get("uid") == uid
    except (OSError, ValueError, AttributeError):
        return False


def start_experiment(config: Mapping[str, Any], uid: str) -> None:
    """An empty run folder marked as this resource's."""
    clear_experiment(config)
    fs, path = checkpoint_experiment(config)
    storage.write_bytes(fs, posixpath.join(path, RUN_MARKER), json.dumps({"uid": uid}).encode("utf-8"))


def _checkpoints(config: Mapping[str, Any]) -> Tuple[Any, str, Dict[Tuple[str, str], List[str]]]:
    """(filesystem, run folder, {(trial, checkpoint dir): file names}) of the Ray Train checkpoints there.

    Ray 2.x V1 writes <run>/<trial>/checkpoint_000NNN/checkpoint, V2 <run>/checkpoint_<timestamp>/checkpoint.
    """
    import pyarrow.fs as pafs

    fs, root = checkpoint_experiment(config)
    found: Dict[Tuple[str, str], List[str]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        match = _CHECKPOINT_FILE.match(info.path[len(root) + 1:]) if info.type == pafs.FileType.File else None
        if match:
            found.setdefault((match["trial"] or "", match["ckpt"]), []).append(match["file"])
    return fs, root, found


def _folder(root: str, trial: str, ckpt: str) -> str:
    return posixpath.join(root, *([trial] if trial else []), ckpt, "checkpoint")


def latest_checkpoint(config: Mapping[str, Any]) -> Optional[Tuple[Any, str, List[str]]]:
    """(filesystem, folder, file names) of the newest Ray Train checkpoint's Hugging Face folder.

    Names sort by time (V1 by number within a trial, V2 by timestamp): a resumed run's checkpoints come after
    those of the run it resumed.
    """
    fs, root, found = _checkpoints(config)
    if not found:
        return None
    trial, ckpt = max(found)
    return fs, _folder(root, trial, ckpt), found[(trial, ckpt)]


def _registered(fs: Any, root: str) -> Optional[set]:
    """The checkpoint dirs Ray Train V2's snapshot lists: it registers a checkpoint once every worker has
    uploaded its part. None without a readable snapshot."""
    path = posixpath.join(root, RAY_SNAPSHOT)
    if not storage.file_exists(fs, path):
        return None
    try:
        with fs.open_input_stream(path) as stream:
            snapshot = json.loads(stream.read().decode("utf-8"))
        results = list(snapshot.get("checkpoint_results") or []) + [snapshot.get("latest_checkpoint_result") or {}]
        return {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        logger.warning("cannot read Ray Train's checkpoint snapshot %s (%s); judging checkpoints by their files",
                       path, exc)
        return None


def resume_point(config: Mapping[str, Any]) -> Optional[ResumePoint]:
    """The latest complete checkpoint of an earlier run of this job: registered by Ray Train (when it keeps a
    snapshot), holding the trainer state, optimizer, scheduler and weights; the highest global step wins."""
    fs, root, found = _checkpoints(config)
    registered = _registered(fs, root)
    best: Optional[ResumePoint] = None
    for (trial, ckpt), names in found.items():
        if registered is not None and ckpt not in registered:
            continue
        if not set(RESUME_FILES) <= set(names) or not any(_WEIGHTS.match(n) for n in names):
            continue
        folder = _folder(root, trial, ckpt)
        try:
            with fs.open_input_stream(posixpath.join(folder, "trainer_state.json")) as stream:
                step = int(json.loads(stream.read().decode("utf-8"))["global_step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("skipping checkpoint %s: unreadable trainer_state.json (%s)", folder, exc)
            continue
        if best is None or (step, folder) > (best.step, best.folder):
            best = ResumePoint(fs, folder, step)
    return best


def storage_uri(config: Mapping[str, Any], path: str, env: Optional[Mapping[str, str]] = None) -> str:
    """The storage URI of a path inside the checkpoint storage, as the nodes' staging reads it."""
    if config.get("ray_storage_filesystem"):
        return f"{'s3' if config['ray_storage_filesystem'] == 's3' else 'gs'}://{path.lstrip('/')}"
    root = storage.pvc_mount_root(env).rstrip("/") + "/"
    if not path.startswith(root):
        raise FineTuneError(f"the checkpoint storage {path} lies outside the claims' mount {root}: re-render the "
                            "job with this operator")
    return "pvc://" + path[len(root):]


def download(fs: Any, folder: str, names: Sequence[str], local_dir: str) -> None:
    for name in names:
        if TRAINING_STATE.match(name):
            continue
        with fs.open_input_stream(posixpath.join(folder, name)) as src, \
                open(os.path.join(local_dir, name), "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def check_complete(local_dir: str, method_type: str) -> None:
    def present(name: str) -> bool:
        path = os.path.join(local_dir, name)
        return os.path.isfile(path) and os.path.getsize(path) > 0

    if method_type == "full":
        index = os.path.join(local_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                shards = set(json.load(handle).get("weight_map", {}).values())
            weights = bool(shards) and all(present(s) for s in shards)
        else:
            weights = present("model.safetensors") or present("pytorch_model.bin")
        if not (present("config.json") and weights):
            raise FineTuneError("the trained model is incomplete (config.json or weight files missing or empty); "
                                "rerun the FineTune")
    elif not (present("adapter_config.json")
              and (present("adapter_model.safetensors") or present("adapter_model.bin"))):
        raise FineTuneError("the trained adapter is incomplete (adapter_config.json or adapter_model.safetensors "
                            "missing or empty); rerun the FineTune")


def check_adapter(local_dir: str, job: Job) -> Dict[str, Any]:
    """Read adapter_config.json with peft and compare it with the spec; returns {"rank": r}."""
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise FineTuneError(f"cannot check the adapter: peft is not importable in the Ray image ({exc}); "
                            "use an image with LLaMA-Factory 0.9.4's dependencies")
    try:
        adapter = LoraConfig.from_pretrained(local_dir)
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unusable adapter
        raise FineTuneError(f"peft cannot read the adapter's adapter_config.json ({exc}); rerun the FineTune")
    rank = int(job.method.get("rank", 8))
    alpha = job.method.get("alpha") or 2 * rank  # LLaMA-Factory's default
    target = [t.strip() for t in str(job.method.get("target", "all")).split(",") if t.strip()]
    modules = adapter.target_modules
    names = {modules} if isinstance(modules, str) else {m.rsplit(".", 1)[-1] for m in (modules or [])}
    problems = []
    if str(getattr(adapter, "peft_type", "LORA")).rsplit(".", 1)[-1].upper() != "LORA":
        problems.append(f"peft_type is {adapter.peft_type}, not LORA")
    if adapter.r != rank:
        problems.append(f"r is {adapter.r}, the spec asks for {rank}")
    if adapter.lora_alpha != alpha:
        problems.append(f"lora_alpha is {adapter.lora_alpha}, the spec asks for {alpha}")
    if target == ["all"]:
        if not names or "lm_head" in names:
            problems.append(f"target modules {sorted(names)} are not the model's linear layers")
    elif isinstance(modules, str):
        if not all(t in modules for t in target):
            problems.append(f"target modules {modules!r} do not cover {','.join(target)}")
    elif names != set(target):
        problems.append(f"target modules are {','.join(sorted(names))}, the spec asks for {','.join(target)}")
    base = job.config["model_name_or_path"]
    if adapter.base_model_name_or_path != base:
        problems.append(f"base model is {adapter.base_model_name_or_path!r}, training used {base!r}")
    if problems:
        raise FineTuneError("the trained adapter does not match the spec: " + "; ".join(problems)
                            + ". It was not published; rerun the FineTune")
    return {"rank": adapter.r}


def publish(local_dir: str, output_uri: str) -> List[str]:
    """Copy the folder's files to the output, the model config last."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(output_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(root, recursive=True)
    names = sorted(os.listdir(local_dir), key=lambda n: (n in CONFIG_FILES, n))
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    return names


def metrics_from(all_results: Mapping[str, Any]) -> Dict[str, float]:
    values = {"trainLoss": all_results.get("train_loss"), "evalLoss": eval_loss(all_results),
              "trainRuntimeSeconds": all_results.get("train_runtime"),
              "trainSamplesPerSecond": all_results.get("train_samples_per_second")}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
