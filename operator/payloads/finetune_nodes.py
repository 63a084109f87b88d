"""Staging and collection on every node that can host a training worker (Ray tasks pinned to each), for the
fine-tuning driver (payloads/finetune.py). LLaMA-Factory's workers read local files only: the inputs are copied
to each such node before training, and the final model is collected from the rank-0 worker's node after it."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from payloads import storage
from payloads.finetune_job import ALL_RESULTS, CONFIG_FILES, TRAINING_STATE, FineTuneError, Job

logger = logging.getLogger("llmops.payloads.finetune")

GPU_WAIT_ENV, DEFAULT_GPU_WAIT_S = "LLMOPS_GPU_WAIT_S", 900.0
# LLaMA-Factory 0.9.4's FILEEXT2TYPE: a dataset folder may hold only these (and of one type).
DATA_EXTENSIONS = ("json", "jsonl", "parquet", "csv", "arrow", "txt")
MAX_COLLECTED_BYTES = 4 << 30


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


def stage_inputs(job: Job, nodes: Nodes, extra: Sequence[StageItem] = ()) -> None:
    config = job.config
    staged = nodes.run(prepare_node, [*staging_plan(job), *extra], os.path.join(config["dataset_dir"], "dataset_info.json"),
                       json.dumps(job.dataset_info, indent=2), config["output_dir"])
    errors = sorted({s["error"] for s in staged if "error" in s})
    if errors:
        raise FineTuneError("staging the inputs failed: " + "; ".join(errors))
    logger.info("staged %s: %s", f"by Ray tasks on {len(staged)} node(s)" if nodes.address else "locally",
                ", ".join(f"{s['node']} ({s['files']} files, {s['bytes']} bytes)" for s in staged))
