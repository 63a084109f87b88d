"""Fine-tuning payload: ``python -m payloads.finetune --config /etc/llmops/job/job.json``.

The RayJob driver of a FineTune. Beside ``job.json`` the operator renders ``train.yaml`` (the LLaMA-Factory 0.9.4
config, ``llmops/builders/llamafactory.py``) and ``dataset_info.json``. The driver

1. checks that LLaMA-Factory 0.9.4 is installed (the config uses 0.9.4's Ray keys), and flash-attn when the config
   packs samples relying on it;
2. stages the inputs on every node that can host a training worker: each dataset URI into its folder under
   ``dataset_dir`` (with ``dataset_info.json``), an s3:// or gs:// base model into ``model_name_or_path``;
   LLaMA-Factory's workers read local files only;
3. with ``resume: auto`` (``spec.training.resume``), looks in ``<ray_storage_path>/<ray_run_name>`` for the
   latest complete checkpoint an earlier run of this resource left (a RayJob retry, a lost node) and stages it on
   every node for LLaMA-Factory's ``resume_from_checkpoint``; otherwise (or with ``never``) clears that folder;
4. runs ``USE_RAY=1 llamafactory-cli train``, streaming its output and reporting ``progress`` (epoch, loss, step,
   ``resumedFromStep``) at most every 30 s;
5. takes the latest Ray Train checkpoint (or, without one, the rank-0 worker's ``output_dir``), checks that it is
   complete and, for LoRA, that peft reads the rank, alpha, target modules and base model the spec asked for;
6. publishes the adapter files and ``all_results.json`` to ``spec.output`` (the config file last) and reports
   ``Succeeded`` with ``adapter`` and ``metrics``. Any failure reports ``Failed`` with what to do; exit 1.

Outside a Ray cluster (no ``RAY_ADDRESS``) this machine is the only node: staging and collection are local.
``LLMOPS_PVC_ROOT`` (see storage.py) also re-roots the pvc paths inside the rendered config, for tests.
"""


from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence

from payloads import storage
from payloads.finetune_job import ALL_RESULTS, LLAMAFACTORY_VERSION, FineTuneError, Job, Terminated
from payloads.finetune_log import Progress, report_running, run_training
from payloads.finetune_model import (ResumePoint, check_adapter, check_complete, download, latest_checkpoint,
                                     metrics_from, owns_experiment, publish, resume_point, start_experiment,
                                     storage_uri)
from payloads.finetune_nodes import Nodes, StageItem, collect_node_outputs, stage_inputs
from payloads.report import ReportError, ResultReporter, interval_from

logger = logging.getLogger("llmops.payloads.finetune")

_SUPPORTED_VERSION = re.compile(r"^0\.9\.4(\.post\d+)?(\+.*)?$")


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
              dataset_info=_read_json(dataset_info_path, "dataset_info.json"), uid=spec.get("uid") or "",
              resume=spec.get("resume") or "auto")
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


def start_point(job: Job) -> Optional[ResumePoint]:
    """Where training starts: the latest complete checkpoint of an earlier run of this resource when resuming
    is allowed, else None after emptying the checkpoint storage (Ray Train V2 would restore what it finds)."""
    config = job.config
    point = resume_point(config) if job.resume == "auto" and owns_experiment(config, job.uid) else None
    if point is None:
        start_experiment(config, job.uid)
    return point


def resume_dir(config: Mapping[str, Any]) -> str:
    """Node-local folder (beside output_dir, on the same scratch on every node) for the staged checkpoint."""
    return posixpath.join(posixpath.dirname(str(config["output_dir"]).rstrip("/")), "resume")


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
    interval = interval_from(env)
    report_running(reporter, "Checking the training environment", None)
    version = check_llamafactory_version()
    check_packing_attention(job.config)
    job.config = config = localize_pvc_paths(job.config, env)
    nodes = Nodes(config, env)
    try:
        progress = Progress()
        point = start_point(job)
        extra = []
        if point is not None:
            config["resume_from_checkpoint"] = resume_dir(config)
            extra.append(StageItem(storage_uri(config, point.folder, env), config["resume_from_checkpoint"], False))
            progress.state["resumedFromStep"] = point.step
            logger.info("resuming from the step-%d checkpoint %s", point.step, point.folder)
        report_running(reporter, "Staging the dataset" + (f" and the step-{point.step} checkpoint" if point else "")
                       + " on the training nodes", progress.state or None)
        stage_inputs(job, nodes, extra)
        config_path = os.path.join(workdir, "train.json")  # JSON: exact numbers, read by LLaMA-Factory's driver
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
        report_running(reporter, f"Training with LLaMA-Factory {version} on {config['ray_num_workers']} GPU "
                                  "worker(s)" + (f", resuming at step {point.step}" if point else ""),
                       progress.state or None)
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
        report_running(reporter, f"Publishing the trained model to {job.output_uri}", progress.state)
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
