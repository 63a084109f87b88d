"""Fine-tuning payload: ``python -m payloads.finetune --config /etc/llmops/job/job.json``.

The RayJob driver of a FineTune. Beside ``job.json`` the operator renders ``train.yaml`` (the LLaMA-Factory 0.9.4
config, ``llmops/builders/llamafactory.py``) and ``dataset_info.json``. The driver

1. checks that LLaMA-Factory 0.9.4 is installed (the config uses 0.9.4's Ray keys), and flash-attn when the config
   packs samples relying on it;
2. stages the inputs on every node that can host a training worker: each dataset URI into its folder under
   ``dataset_dir`` (with ``dataset_info.json``), an s3:// or gs:// base model into ``model_name_or_path``;
   LLaMA-Factory's workers read local files only;
3. clears ``<ray_storage_path>/<ray_run_name>`` and runs ``USE_RAY=1 llamafactory-cli train``, streaming its
   output and reporting ``progress`` (epoch, loss, step) at most every 30 s;
4. takes the latest Ray Train checkpoint (or, without one, the rank-0 worker's ``output_dir``), checks that it is
   complete and, for LoRA, that peft reads the rank, alpha, target modules and base model the spec asked for;
5. publishes the adapter files and ``all_results.json`` to ``spec.output`` (the config file last) and reports
   ``Succeeded`` with ``adapter`` and ``metrics``. Any failure reports ``Failed`` with what to do; exit 1.

Outside a Ray cluster (no ``RAY_ADDRESS``) this machine is the only node: staging and collection are local.
``LLMOPS_PVC_ROOT`` (see storage.py) also re-roots the pvc paths inside the rendered config, for tests.
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib.metadata
import json
import logging
import math
import os
import posixpath
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from payloads import storage
from payloads.report import ReportError, ResultReporter

logger = logging.getLogger("llmops.payloads.finetune")

LLAMAFACTORY_VERSION = "0.9.4"
_SUPPORTED_VERSION = re.compile(r"^0\.9\.4(\.post\d+)?(\+.*)?$")
PROGRESS_INTERVAL_ENV, DEFAULT_PROGRESS_INTERVAL_S = "LLMOPS_PROGRESS_INTERVAL_S", 30.0
GPU_WAIT_ENV, DEFAULT_GPU_WAIT_S = "LLMOPS_GPU_WAIT_S", 900.0
# LLaMA-Factory 0.9.4's FILEEXT2TYPE: a dataset folder may hold only these (and of one type).
DATA_EXTENSIONS = ("json", "jsonl", "parquet", "csv", "arrow", "txt")
# Trainer state that resumes training but is no part of the published model.
TRAINING_STATE = re.compile(r"^(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|training_args\.bin|trainer_log\.jsonl)$")
CONFIG_FILES = ("adapter_config.json", "config.json")  # published last: a reader never sees a config without weights
ALL_RESULTS = "all_results.json"
MAX_COLLECTED_BYTES = 4 << 30
_CHECKPOINT_FILE = re.compile(r"^(?:(?P<trial>[^/]+)/)?(?P<ckpt>checkpoint_[^/]+)/checkpoint/(?P<file>[^/]+)$")
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

    @property
    def method_type(self) -> str:
        return self.method.get("type", "lora")


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise FineTuneError(f"cannot read the {what} at {path} ({exc}): the operator renders it into the job "
                            "ConfigMap; check that the ConfigMap is mounted")


def load_job(job_path: str, train_path: str, dataset_info_path: str) -> Job:
    import yaml  # a dependency of Ray itself

    spec = _read_json(job_path, "job description")
    try:
        with open(train_path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise FineTuneError(f"cannot read the training config at {train_path} ({exc})")
    if not isinstance(config, dict):
        raise FineTuneError(f"the training config at {train_path} is not a mapping: re-render the job")
    dataset = spec.get("dataset") or {}
    validation = dataset.get("validation") or {}
    job = Job(name=spec["name"], output_uri=spec["output"]["uri"], base_model=spec.get("baseModel") or {},
              method=spec.get("method") or {}, train_uri=dataset["train"]["uri"],
              validation_uri=validation.get("uri"), config=config,
              dataset_info=_read_json(dataset_info_path, "dataset_info.json"))
    missing = [k for k in ("ray_run_name", "ray_storage_path", "ray_num_workers", "dataset", "dataset_dir",
                           "output_dir", "model_name_or_path") if not config.get(k)]
    if missing:
        raise FineTuneError(f"the training config lacks {', '.join(missing)}: re-render it with this operator")
    return job


def check_llamafactory_version() -> str:
    try:
        installed = importlib.metadata.version("llamafactory")
    except importlib.metadata.PackageNotFoundError:
        raise FineTuneError(f"LLaMA-Factory is not installed in the Ray image: FineTune needs "
                            f"llamafactory=={LLAMAFACTORY_VERSION} (operator setting finetune_pip or "
                            f"spec.runtimeEnv.pip)")
    if not _SUPPORTED_VERSION.match(installed):
        raise FineTuneError(f"LLaMA-Factory {installed} is installed but FineTune renders configs for "
                            f"{LLAMAFACTORY_VERSION} (later versions dropped its Ray keys such as ray_storage_path "
                            f"and resources_per_worker): pin llamafactory=={LLAMAFACTORY_VERSION} in the image or "
                            f"spec.runtimeEnv.pip")
    return installed


def check_packing_attention(config: Mapping[str, Any]) -> None:
    """Plain packing keeps samples apart only through FlashAttention-2; without flash-attn LLaMA-Factory 0.9.4 logs
    a warning and trains with SDPA, where packed samples attend to each other. Refuse that silent quality loss."""
    import importlib.util

    if config.get("packing") and not config.get("neat_packing") and config.get("flash_attn") == "fa2" \
            and importlib.util.find_spec("flash_attn") is None:
        raise FineTuneError("the config packs samples and relies on FlashAttention-2 to keep them apart, but "
                            "flash-attn is not installed in the Ray image: add flash-attn to the FineTune image "
                            "or spec.runtimeEnv.pip, or set spec.training.packing: false")


def localize_pvc_paths(value: Any, env: Optional[Mapping[str, str]] = None) -> Any:
    """Re-root config paths under the pvc mount when LLMOPS_PVC_ROOT moves it (tests); else unchanged."""
    root = storage.pvc_mount_root(env)
    if root == storage.PVC_MOUNT_ROOT:
        return value
    if isinstance(value, dict):
        return {k: localize_pvc_paths(v, env) for k, v in value.items()}
    if isinstance(value, str) and (value + "/").startswith(storage.PVC_MOUNT_ROOT + "/"):
        return root + value[len(storage.PVC_MOUNT_ROOT):]
    return value


# ---------------------------------------------------------------- staging (runs on every training node)

@dataclass(frozen=True)
class StageItem:
    uri: str
    dest: str
    data_files_only: bool  # a dataset: the file, or a folder's data files; else a whole model folder


def staging_plan(job: Job) -> List[StageItem]:
    config, info = job.config, job.dataset_info
    items = []
    for key, uri in (("dataset", job.train_uri), ("eval_dataset", job.validation_uri)):
        if config.get(key) and uri:
            entry = info.get(config[key]) or {}
            if "file_name" not in entry:
                raise FineTuneError(f"dataset_info.json has no file_name for {config[key]!r}: re-render the job")
            items.append(StageItem(uri, os.path.join(config["dataset_dir"], entry["file_name"]), True))
    if job.base_model.get("source", "").startswith(("s3://", "gs://")):
        items.append(StageItem(job.base_model["source"], config["model_name_or_path"], False))
    return items


def _copy_to_local(item: StageItem) -> Tuple[int, int]:
    import pyarrow.fs as pafs

    filesystem, path = storage.resolve(item.uri)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise FineTuneError(f"{item.uri} does not exist (or these credentials cannot read it)")
    shutil.rmtree(item.dest, ignore_errors=True)
    os.makedirs(item.dest)
    if not item.data_files_only and kind == pafs.FileType.Directory:
        pafs.copy_files(path, item.dest, source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
        files = [os.path.join(d, f) for d, _, names in os.walk(item.dest) for f in names]
        return len(files), sum(os.path.getsize(f) for f in files)
    if kind == pafs.FileType.File:
        sources = [path]
    else:
        listing = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
        sources = sorted(i.path for i in listing if i.type == pafs.FileType.File
                         and not posixpath.basename(i.path).startswith((".", "_"))
                         and posixpath.basename(i.path).rsplit(".", 1)[-1].lower() in DATA_EXTENSIONS)
    if not sources:
        raise FineTuneError(f"{item.uri} holds no data files ({', '.join(DATA_EXTENSIONS)})")
    total = 0
    for source in sources:
        target = os.path.join(item.dest, posixpath.basename(source))
        with filesystem.open_input_stream(source) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        total += os.path.getsize(target)
    return len(sources), total


def prepare_node(items: Sequence[StageItem], dataset_info_path: str, dataset_info_text: str,
                 output_dir: str) -> Dict[str, Any]:
    """Stage every input on this node; returns a summary, or {"error": ...} (kept picklable for Ray)."""
    import socket

    try:
        shutil.rmtree(output_dir, ignore_errors=True)  # collection must never find an earlier run's results
        files = size = 0
        for item in items:
            n, b = _copy_to_local(item)
            files, size = files + n, size + b
        os.makedirs(os.path.dirname(dataset_info_path), exist_ok=True)
        with open(dataset_info_path, "w", encoding="utf-8") as handle:
            handle.write(dataset_info_text)
        return {"node": socket.gethostname(), "files": files, "bytes": size}
    except Exception as exc:  # noqa: BLE001 - reported to the driver as data
        return {"node": socket.gethostname(), "error": str(exc) if isinstance(exc, FineTuneError)
                else f"{type(exc).__name__}: {exc}"}


def collect_node_outputs(output_dir: str, with_model: bool) -> Dict[str, Any]:
    """all_results.json and, when asked, the final model files that the rank-0 worker left in output_dir."""
    found: Dict[str, Any] = {"all_results": None, "files": {}}
    results = os.path.join(output_dir, ALL_RESULTS)
    if os.path.isfile(results):
        with open(results, encoding="utf-8") as handle:
            found["all_results"] = handle.read()
    if with_model and any(os.path.isfile(os.path.join(output_dir, c)) for c in CONFIG_FILES):
        names = [n for n in sorted(os.listdir(output_dir)) if os.path.isfile(os.path.join(output_dir, n))
                 and not TRAINING_STATE.match(n)]
        if sum(os.path.getsize(os.path.join(output_dir, n)) for n in names) > MAX_COLLECTED_BYTES:
            return {**found, "error": "the final model in output_dir is too large to collect without a Ray "
                                      "Train checkpoint"}
        for name in names:
            with open(os.path.join(output_dir, name), "rb") as handle:
                found["files"][name] = handle.read()
    return found


class Nodes:
    """Runs a function on every node that can host a training worker: Ray tasks pinned to each such node, or a
    plain call outside a Ray cluster."""

    def __init__(self, config: Mapping[str, Any], env: Optional[Mapping[str, str]] = None):
        env = os.environ if env is None else env
        self.address = env.get("RAY_ADDRESS")
        self.num_workers = int(config.get("ray_num_workers") or 1)
        self.per_worker = {k: float(v) for k, v in (config.get("resources_per_worker") or {"GPU": 1}).items()}
        self.wait_s = float(env.get(GPU_WAIT_ENV) or DEFAULT_GPU_WAIT_S)
        self._ray: Any = None

    def _slots(self, resources: Mapping[str, float]) -> int:
        return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in self.per_worker.items() if v > 0)

    def _training_nodes(self) -> List[Dict[str, Any]]:
        import ray
        from ray.autoscaler.sdk import request_resources

        if self._ray is None:
            ray.init(address=self.address, logging_level=logging.WARNING)
            self._ray = ray
            request_resources(bundles=[dict(self.per_worker)] * self.num_workers)  # scale up an autoscaler
        deadline = time.monotonic() + self.wait_s
        while True:
            nodes = [n for n in ray.nodes() if n.get("Alive") and self._slots(n.get("Resources", {})) > 0]
            capacity = sum(self._slots(n["Resources"]) for n in nodes)
            if capacity >= self.num_workers:
                return nodes
            if time.monotonic() > deadline:
                raise FineTuneError(
                    f"after {self.wait_s:.0f}s the Ray cluster has room for {capacity} of {self.num_workers} "
                    f"training workers ({self.per_worker} each): check that the GPU worker pods are scheduled "
                    "(kubectl describe pod) and that spec.resources.accelerator matches the nodes")
            time.sleep(5)

    def run(self, function: Any, *args: Any) -> List[Dict[str, Any]]:
        if not self.address:
            return [function(*args)]
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = self._training_nodes()
        ray = self._ray
        task = ray.remote(num_cpus=0, max_retries=0)(function)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(*args) for n in nodes]
        return ray.get(refs)

    def close(self) -> None:
        if self._ray is not None:
            from ray.autoscaler.sdk import request_resources

            try:
                request_resources(bundles=[])
            finally:
                self._ray.shutdown()
                self._ray = None


# ---------------------------------------------------------------- training subprocess and progress

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
            eval_loss = _eval_loss(logs)
            if eval_loss is not None:
                self.eval_summary.update(logs)
                self.state["evalLoss"] = eval_loss
        return self.state != before

    def message(self) -> str:
        state = self.state
        parts = [f"step {state['step']}/{state['totalSteps']}" if "step" in state and "totalSteps" in state else "",
                 f"epoch {state['epoch']:.2f}" if isinstance(state.get("epoch"), (int, float)) else "",
                 f"loss {state['loss']:.4f}" if isinstance(state.get("loss"), (int, float)) else ""]
        return "Training: " + ", ".join(p for p in parts if p) if any(parts) else "Training"

    def failure(self, returncode: int) -> str:
        errors = [m.group(1) for m in map(_ERROR_LINE.match, self.tail) if m]
        errors = [e for e in errors if not e.startswith("ray.")] or errors  # the cause, not Ray's wrapper of it
        cause = errors[-1] if errors else (next((t for t in reversed(self.tail) if t.strip()), "no output"))
        hint = next((h for pattern, h in HINTS if any(pattern.search(t) for t in self.tail)), None)
        message = f"LLaMA-Factory training exited with code {returncode}: {cause[:600]}"
        return message + (f"; {hint}" if hint else "") + "; the RayJob driver log has the full trace"


def _eval_loss(logs: Mapping[str, Any]) -> Optional[float]:
    if "eval_loss" in logs:
        return logs["eval_loss"]
    return next((v for k, v in logs.items() if re.fullmatch(r"eval_.+_loss", k)), None)


def run_training(config_path: str, reporter: ResultReporter, progress: Progress, interval_s: float) -> None:
    executable = shutil.which("llamafactory-cli")
    if not executable:
        raise FineTuneError(f"llamafactory-cli is not on PATH: the Ray image must provide "
                            f"llamafactory=={LLAMAFACTORY_VERSION}")
    env = {**os.environ, "USE_RAY": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([executable, "train", config_path], stdout=subprocess.PIPE,
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
                _report_running(reporter, progress.message(), progress.state)
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


def _report_running(reporter: ResultReporter, message: str, progress: Optional[Mapping[str, Any]]) -> None:
    try:
        reporter.running(message, dict(progress) if progress else None)
    except ReportError as exc:  # progress is best effort; the final report is not
        logger.warning("progress report failed: %s", exc)


# ---------------------------------------------------------------- the trained model

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
    """Ray Train V2 restores a run from what it finds there; every FineTune run starts afresh."""
    fs, path = checkpoint_experiment(config)
    if storage.file_exists(fs, path):
        fs.delete_dir(path)


def latest_checkpoint(config: Mapping[str, Any]) -> Optional[Tuple[Any, str, List[str]]]:
    """(filesystem, folder, file names) of the newest Ray Train checkpoint's Hugging Face folder.

    Ray 2.x V1 writes <run>/<trial>/checkpoint_000NNN/checkpoint, V2 <run>/checkpoint_<timestamp>/checkpoint;
    both sort by name, and the run folder holds only this run (clear_experiment).
    """
    import pyarrow.fs as pafs

    fs, root = checkpoint_experiment(config)
    found: Dict[Tuple[str, str], List[str]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        match = _CHECKPOINT_FILE.match(info.path[len(root) + 1:]) if info.type == pafs.FileType.File else None
        if match:
            found.setdefault((match["trial"] or "", match["ckpt"]), []).append(match["file"])
    if not found:
        return None
    trial, ckpt = max(found)
    folder = posixpath.join(root, *([trial] if trial else []), ckpt, "checkpoint")
    return fs, folder, found[(trial, ckpt)]


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
    values = {"trainLoss": all_results.get("train_loss"), "evalLoss": _eval_loss(all_results),
              "trainRuntimeSeconds": all_results.get("train_runtime"),
              "trainSamplesPerSecond": all_results.get("train_samples_per_second")}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------- the run

def stage_inputs(job: Job, nodes: Nodes) -> None:
    config = job.config
    staged = nodes.run(prepare_node, staging_plan(job), os.path.join(config["dataset_dir"], "dataset_info.json"),
                       json.dumps(job.dataset_info, indent=2), config["output_dir"])
    errors = sorted({s["error"] for s in staged if "error" in s})
    if errors:
        raise FineTuneError("staging the inputs failed: " + "; ".join(errors))
    logger.info("staged %s: %s", f"by Ray tasks on {len(staged)} node(s)" if nodes.address else "locally",
                ", ".join(f"{s['node']} ({s['files']} files, {s['bytes']} bytes)" for s in staged))


def gather_model(job: Job, nodes: Nodes, model_dir: str) -> Optional[str]:
    """Copy the final model into model_dir: the newest Ray Train checkpoint, else the rank-0 worker's output_dir.
    Returns all_results.json's text (None when no node has it)."""
    config = job.config
    checkpoint = latest_checkpoint(config)
    if checkpoint:
        download(*checkpoint, model_dir)
        logger.info("final checkpoint: %s", checkpoint[1])
    collected = nodes.run(collect_node_outputs, config["output_dir"], checkpoint is None)
    if checkpoint is None:
        source = next((c for c in collected if c.get("files") or c.get("error")), None)
        if source is None or source.get("error"):
            raise FineTuneError("training finished but left no model: no Ray Train checkpoint under "
                                f"{config['ray_storage_path']} and no final model in output_dir"
                                + (f" ({source['error']})" if source else "")
                                + "; keep checkpointing on (do not set save_strategy: no in extraArgs)")
        for name, data in source["files"].items():
            with open(os.path.join(model_dir, name), "wb") as handle:
                handle.write(data)
    return next((c["all_results"] for c in collected if c.get("all_results")), None)


def run(job: Job, reporter: ResultReporter, workdir: str, env: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    env = os.environ if env is None else env
    interval = float(env.get(PROGRESS_INTERVAL_ENV) or DEFAULT_PROGRESS_INTERVAL_S)
    _report_running(reporter, "Checking the training environment", None)
    version = check_llamafactory_version()
    check_packing_attention(job.config)
    job.config = config = localize_pvc_paths(job.config, env)
    nodes = Nodes(config, env)
    try:
        _report_running(reporter, "Staging the dataset on the training nodes", None)
        stage_inputs(job, nodes)
        clear_experiment(config)
        config_path = os.path.join(workdir, "train.json")  # JSON: exact numbers, read by LLaMA-Factory's driver
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        _report_running(reporter, f"Training with LLaMA-Factory {version} on {config['ray_num_workers']} GPU "
                                  "worker(s)", None)
        progress = Progress()
        run_training(config_path, reporter, progress, interval)

        model_dir = os.path.join(workdir, "model")
        os.makedirs(model_dir)
        results_text = gather_model(job, nodes, model_dir)
        check_complete(model_dir, job.method_type)
        adapter: Dict[str, Any] = {"uri": job.output_uri, "baseModel": job.base_model.get("source")}
        if job.method_type != "full":
            adapter.update(check_adapter(model_dir, job))
        if results_text:
            with open(os.path.join(model_dir, ALL_RESULTS), "w", encoding="utf-8") as handle:
                handle.write(results_text)
            metrics = metrics_from(json.loads(results_text))
        else:
            logger.warning("no %s on the training nodes; metrics come from the trainer's log", ALL_RESULTS)
            metrics = metrics_from({**progress.train_summary, **progress.eval_summary})
        _report_running(reporter, f"Publishing the trained model to {job.output_uri}", progress.state)
        published = publish(model_dir, job.output_uri)
        logger.info("published %s to %s", ", ".join(published), job.output_uri)
        return {"adapter": adapter, "metrics": metrics, "progress": progress.state}
    finally:
        nodes.close()


def main(argv: Optional[Sequence[str]] = None, *, reporter: Optional[ResultReporter] = None) -> int:
    """Exit status: 0 succeeded, 1 failed (a Failed report was attempted), 3 succeeded but unreported,
    143 stopped by SIGTERM (nothing reported: the RayJob's own status tells)."""
    parser = argparse.ArgumentParser(prog="python -m payloads.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job.json rendered by the operator")
    parser.add_argument("--train-config", help="LLaMA-Factory config (default: train.yaml beside --config)")
    parser.add_argument("--dataset-info", help="dataset_info.json (default: beside --config)")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.config))
    reporter = reporter or ResultReporter.from_env()
    workdir = tempfile.mkdtemp(prefix="llmops-finetune-")
    try:
        job = load_job(args.config, args.train_config or os.path.join(folder, "train.yaml"),
                       args.dataset_info or os.path.join(folder, "dataset_info.json"))
        result = run(job, reporter, workdir)
    except Terminated as exc:
        logger.warning("stopped by %s; the RayJob status tells the operator", exc)
        return 143
    except Exception as exc:  # every failure must reach the operator as a Failed report
        message = str(exc) if isinstance(exc, FineTuneError) else f"fine-tuning failed: {type(exc).__name__}: {exc}"
        logger.exception("fine-tuning failed: %s", message)
        try:
            reporter.failed(message)
        except ReportError as report_exc:
            logger.error("could not report the failure: %s", report_exc)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    metrics = result["metrics"]
    summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    try:
        reporter.succeeded(f"Trained {job.method_type} model published to {job.output_uri}"
                           + (f" ({summary})." if summary else "."),
                           progress=result["progress"] or None, metrics=metrics, adapter=result["adapter"],
                           outputURI=job.output_uri)
    except ReportError as exc:
        logger.error("the model is published but the result could not be reported: %s", exc)
        return 3
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
