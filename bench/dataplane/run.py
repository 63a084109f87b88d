"""The phases of the GPU data-plane run; each reads the objects the operator rendered and runs them for real.

State lives in one work folder (the model, the data, a mirror of the bucket, the results so far), so the phases
can run in separate device calls while the machine stays warm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import bare, coldstart, load, manifests as m, raycluster as rc, routing as route_bench, task
from .s3 import S3Server

# What every process gets on this machine: no network for model hubs, no NVLink multicast (the machine's rule),
# vLLM's sampler without FlashInfer (not carried).
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_USE_FLASHINFER_SAMPLER": "0", "RAY_USAGE_STATS_ENABLED": "0", "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}
ROWS = {"train": 2000, "val": 200, "test": 5000}   # test: enough for a steady generation rate
SERVE_URL = "http://127.0.0.1:8000/v1"
LOAD_REQUESTS, LOAD_CONCURRENCY = 512, 32
REPLY_CHECKS = 64


class Run:
    def __init__(self, work: Path, out: Path, sites: dict[str, Path], declare: str | None = None):
        self.work, self.out, self.sites, self.declare = work, out, sites, declare
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results_path = work / "dataplane.json"
        self.results: dict[str, Any] = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.rendered = json.loads((work / "rendered.json").read_text())
        self.s3 = S3Server(self.logs / "moto.log").start()
        self.s3.restore_from(work / "bucket")
        self.bin = self._entry_points()

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def _entry_points(self) -> Path:
        """`ray` and `llamafactory-cli` as the images install them, for this machine's Python."""
        folder = self.work / "bin"
        folder.mkdir(exist_ok=True)
        for name, module in (("ray", "ray.scripts.scripts"), ("llamafactory-cli", "llamafactory.cli")):
            path = folder / name
            path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import main\n"
                            "if __name__ == '__main__':\n    sys.exit(main())\n")
            path.chmod(0o755)
        # The entrypoints say `python`: this interpreter (a script, not a link: a link would lose its venv).
        python = folder / "python"
        python.unlink(missing_ok=True)
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
        return folder

    def save(self, section: str, value: Any) -> None:
        self.results[section] = value
        self.results_path.write_text(json.dumps(self.results, indent=1))
        (self.out / "dataplane.json").write_text(json.dumps(self.results, indent=1))

    def close(self) -> None:
        shutil.rmtree(self.work / "bucket", ignore_errors=True)
        self.s3.mirror_to(self.work / "bucket")
        self.s3.stop()

    def cluster(self, ray_object: dict, site_names: list[str], result_file: Path) -> rc.RayCluster:
        rc.materialize_pod(self.rendered, ray_object)
        pod_env = rc.pod_environment(ray_object, {m.STORAGE_SECRET: self.s3.env})
        env = rc.environment_for(pod_env, [str(self.sites[s]) for s in site_names], result_file, BASE_ENV)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        result_file.unlink(missing_ok=True)
        return rc.RayCluster(env, self.logs, resources=self.declare)

    def python(self, site_names: list[str], *args: str, timeout: float) -> subprocess.CompletedProcess:
        env = {**os.environ, **BASE_ENV, **self.s3.env,
               "PYTHONPATH": os.pathsep.join([*(str(self.sites[s]) for s in site_names), str(Path(__file__).parents[1]),
                                              str(Path(__file__).parents[2] / "operator")])}
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)

    # ---- data --------------------------------------------------------------------------------------------------
    def prepare_data(self) -> dict[str, Any]:
        """Rows, tokenizer and random model, made with the FineTune image's transformers, uploaded to the bucket."""
        if "data" in self.results and self.s3.keys("models/"):
            return self.results["data"]
        data_dir, model_dir = self.work / "data", self.work / "model"
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        for seed, (split, n) in enumerate(ROWS.items(), start=1):
            rows = task.rows(n, seed=seed)
            (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = self.python(["finetune"], "-m", "dataplane.task", str(data_dir), str(model_dir),
                           timeout=300)
        if done.returncode:
            raise RuntimeError(f"building the model failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        for split in ROWS:
            self.s3.client().upload_file(str(data_dir / f"{split}.jsonl"), m.BUCKET, f"viggo/{split}.jsonl")
        info["model_files"] = self.s3.upload_tree(model_dir, m.MODEL_URI.split(f"{m.BUCKET}/", 1)[1])
        info["rows"] = ROWS
        self.save("data", info)
        return info

    def test_rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.work / "data" / "test.jsonl").read_text().splitlines()]

    # ---- FineTune ----------------------------------------------------------------------------------------------
    def finetune(self) -> dict[str, Any]:
        self.prepare_data()
        job = rc.find(self.rendered, "RayJob", "viggo-ft")
        result_file = self.work / "finetune-result.json"
        cluster = self.cluster(job, ["finetune", "serve"], result_file)
        runtime_env, dropped = rc.runtime_env(job)
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
        section: dict[str, Any] = {"ray_start_s": round(cluster.start(head), 1), "pip_dropped": dropped}
        try:
            section.update(cluster.submit("finetune", job["spec"]["entrypoint"], runtime_env, timeout=400))
        finally:
            self._copy_ray_logs("finetune")
            cluster.stop()
        report = json.loads(result_file.read_text()) if result_file.exists() else {}
        metrics = json.loads(report.get("metrics") or "{}")
        section.update({
            "phase": report.get("state"), "message": report.get("message"), "via_ray": True,
            "adapter": json.loads(report.get("adapter") or "null"), "metrics": metrics,
            "train_samples_per_s": metrics.get("trainSamplesPerSecond"),
            "checkpoints": self._checkpoints(),
            "adapter_files": sorted(k.rsplit("/", 1)[1] for k in self.s3.keys("adapters/viggo/")),
        })
        section["adapter_checked"] = self._check_adapter() if report.get("state") == "Succeeded" else False
        self.save("finetune", section)
        return section

    def _checkpoints(self) -> dict[str, Any]:
        """Where Ray Train put the checkpoints (the rendered ray_storage_path), and how many it left."""
        import yaml

        config = yaml.safe_load(rc.find(self.rendered, "ConfigMap", "viggo-ft-config")["data"]["train.yaml"])
        prefix = config["ray_storage_path"].split("/", 1)[1] + "/"
        keys = self.s3.keys(prefix)
        return {"storage_path": config["ray_storage_path"], "objects": len(keys),
                "checkpoints": len({k.split("/checkpoint_")[1].split("/")[0] for k in keys if "/checkpoint_" in k})}

    def _check_adapter(self) -> bool:
        """peft (this machine's) loads the published adapter on the base and it changes the logits."""
        adapter_dir = self.download("adapters/viggo/", self.work / "adapter")
        self.download(m.MODEL_URI.split(f"{m.BUCKET}/", 1)[1] + "/", self.work / "model-from-s3")
        code = ("import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
                "base = AutoModelForCausalLM.from_pretrained(sys.argv[1]); ids = torch.tensor([[1, 2, 3, 4]])\n"
                "before = base(ids).logits; model = PeftModel.from_pretrained(base, sys.argv[2])\n"
                "print(float((model(ids).logits - before).abs().max()))\n")
        done = self.python([], "-c", code, str(self.work / "model-from-s3"), str(adapter_dir), timeout=300)
        (self.logs / "adapter-check.log").write_text(done.stdout + done.stderr)
        return done.returncode == 0 and float(done.stdout.strip().splitlines()[-1]) > 0

    def download(self, prefix: str, folder: Path) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        for key in self.s3.keys(prefix):
            target = folder / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.s3.get(key))
        return folder

    # ---- BatchInference ----------------------------------------------------------------------------------------
    def batch_base(self) -> dict[str, Any]:
        """The base model's job alone: a call of its own, so the next call holds the adapter job and bare vLLM."""
        return self.batch(labels=("base",))

    def batch_adapter(self) -> dict[str, Any]:
        """The adapter job and bare vLLM alone: the ratio, where the machine's time has no room for the base job."""
        return self.batch(labels=("adapter",))

    def batch(self, labels: tuple[str, ...] = ("base", "adapter")) -> dict[str, Any]:
        self.prepare_data()
        section: dict[str, Any] = dict(self.results.get("batch") or {})
        for label, name in (("base", "viggo-base"), ("adapter", "viggo-eval")):
            if label not in labels:
                continue
            if label == "base" and len(labels) > 1 and (section.get(label) or {}).get("state") == "Succeeded":
                continue  # done in an earlier call; the adapter job runs again beside bare vLLM, for the ratio
            job = rc.find(self.rendered, "RayJob", f"{name}-bi")
            result_file = self.work / f"{name}-result.json"
            cluster = self.cluster(job, ["serve"], result_file)
            head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
            cluster.start(head)
            try:
                run = cluster.submit(name, job["spec"]["entrypoint"], rc.runtime_env(job)[0], timeout=270)
            finally:
                self._copy_ray_logs(name)
                cluster.stop()
            report = json.loads(result_file.read_text()) if result_file.exists() else {}
            metrics = json.loads(report.get("metrics") or "{}")
            rows = metrics.get("rows") or 0
            progress = json.loads(report.get("progress") or "{}")
            section[label] = {**run, "state": report.get("state"), "message": report.get("message"),
                              "metrics": metrics, "rows_per_s": round(rows / run["wall_s"], 1) if rows else None,
                              "generation_rows_per_s": progress.get("rowsPerSecond")}
            self.save("batch", section)
        if "adapter" not in labels:
            return section
        base, adapter = section.get("base") or {"metrics": {}}, section["adapter"]
        section.update({
            "rows": adapter["metrics"].get("rows"),
            "exact_match_base": base["metrics"].get("exactMatch"),
            "exact_match_adapter": adapter["metrics"].get("exactMatch"),
            # The generation's rate as the payload reports it (rows after the engine's first block over the time
            # since), against bare vLLM's generate over the same rows; the end-to-end figures are kept beside.
            "rows_per_s": adapter["generation_rows_per_s"],
            "end_to_end_rows_per_s": adapter["rows_per_s"],
        })
        self.save("batch", section)
        section.update(self._bare_batch())
        if section.get("bare_vllm_rows_per_s") and section["rows_per_s"]:
            section["ratio_vs_bare_vllm"] = round(section["rows_per_s"] / section["bare_vllm_rows_per_s"], 3)
        if section.get("bare_vllm_end_to_end_rows_per_s") and section["end_to_end_rows_per_s"]:
            section["end_to_end_ratio_vs_bare_vllm"] = round(
                section["end_to_end_rows_per_s"] / section["bare_vllm_end_to_end_rows_per_s"], 3)
        self.save("batch", section)
        return section

    def _engine_kwargs(self, job_name: str) -> dict[str, Any]:
        """The engine arguments the batch payload gives vLLM for this job (its own function, on its config)."""
        from payloads import batch_inference

        config = json.loads(rc.find(self.rendered, "ConfigMap", f"{job_name}-config")["data"]["job.json"])
        return batch_inference.engine_kwargs(batch_inference.parse_spec(config))

    def _messages(self, rows: list[dict]) -> list[list[dict]]:
        return [[{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}]
                for r in rows]

    def _bare_batch(self) -> dict[str, Any]:
        """The same rows through bare vLLM (a fresh process: engine start included in its end-to-end time)."""
        from payloads import metrics

        rows = self.test_rows()
        request = {"model_dir": str(self.download(m.MODEL_URI.split(f"{m.BUCKET}/", 1)[1] + "/",
                                                  self.work / "model-from-s3")),
                   "adapter_dir": str(self.download("adapters/viggo/", self.work / "adapter")),
                   "engine_kwargs": self._engine_kwargs("viggo-eval-bi"), "messages": self._messages(rows),
                   "max_tokens": m.MAX_TOKENS}
        (self.work / "bare-request.json").write_text(json.dumps(request))
        t0 = time.perf_counter()
        done = self.python(["serve"], "-m", "dataplane.bare", "generate", str(self.work / "bare-request.json"),
                           str(self.work / "bare-answer.json"), timeout=400)
        wall = time.perf_counter() - t0
        (self.logs / "bare-vllm.log").write_text(done.stdout[-20000:] + done.stderr[-50000:])
        if done.returncode:
            return {"bare_vllm_error": done.stderr[-3000:]}
        answer = json.loads((self.work / "bare-answer.json").read_text())
        scored = {}
        for label in ("base", "adapter"):
            acc = metrics.MetricAccumulator()
            acc.add_all(zip(answer[label]["texts"], (r["output"] for r in rows), strict=True))
            scored[label] = dict(acc.result(metrics.METRIC_NAMES))
        return {"bare_vllm": {"process_wall_s": round(wall, 1), "engine_start_s": answer["engine_start_s"],
                              **{label: {k: v for k, v in answer[label].items() if k != "texts"}
                                 for label in ("base", "adapter")}, "metrics": scored},
                "bare_vllm_rows_per_s": answer["adapter"]["rows_per_s"],
                # Like the job's wall time, engine start included: start (imports, LLM()) + the adapter's generate.
                "bare_vllm_end_to_end_rows_per_s": round(len(rows) / (answer["engine_start_s"]
                                                                      + answer["adapter"]["generate_s"]), 1)}

    # ---- LLMService --------------------------------------------------------------------------------------------
    def serve_replies(self) -> dict[str, Any]:
        """The service alone, without the `vllm serve` comparison (for a call too short for both)."""
        return self.serve(compare=False)

    def serve(self, compare: bool = True) -> dict[str, Any]:
        service = rc.find(self.rendered, "RayService", f"{m.SERVICE}-llm")
        cluster = self.cluster(service, ["serve"], self.work / "serve-result.json")
        head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
        cluster.start(head)
        section: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            cluster.deploy_serve(service["spec"]["serveConfigV2"])
            running, status = cluster.wait_serve_running(timeout=300)
            section["deploy_s"] = round(time.perf_counter() - t0, 1)
            (self.logs / "serve-status.json").write_text(json.dumps(status, indent=1))
            section["running"] = running
            if running:
                section.update(self._query_service())
        finally:
            self._copy_ray_logs("serve")
            cluster.stop()
        self.save("serve", section)
        if not compare:
            return section
        section.update(self._bare_serve())
        if section.get("output_tokens_per_s") and section.get("bare_vllm_output_tokens_per_s"):
            section["ratio_vs_bare_vllm"] = round(section["output_tokens_per_s"]
                                                  / section["bare_vllm_output_tokens_per_s"], 3)
        self.save("serve", section)
        return section

    def serve_cold_start(self) -> dict[str, Any]:
        return coldstart.measure(self)

    def routing(self) -> dict[str, Any]:
        return route_bench.measure(self)

    def _query_service(self) -> dict[str, Any]:
        rows = self.test_rows()[:REPLY_CHECKS]
        adapter_model = f"{m.MODEL_ID}:{m.ADAPTER_NAME}"
        listed = load.models(SERVE_URL)
        expected = sorted([m.MODEL_ID, adapter_model])
        batch_outputs = self._batch_outputs("viggo-eval")
        replies, same, differing = [], 0, []
        for row, messages in zip(rows, self._messages(rows)):
            text = load.chat(SERVE_URL, adapter_model, messages, m.MAX_TOKENS)
            replies.append(text)
            batch_text = (batch_outputs.get(row["input"]) or "").strip()
            if text.strip() == batch_text:
                same += 1
            else:  # kept whole, to tell a numerics flip (same prefix, then apart) from a wrong adapter
                differing.append({"input": row["input"], "expected": row["output"], "serve": text,
                                  "batch": batch_text})
        base_reply = load.chat(SERVE_URL, m.MODEL_ID, self._messages(rows[:1])[0], m.MAX_TOKENS)
        prompts = (self._messages(self.test_rows()) * 2)[:LOAD_REQUESTS]
        throughput = load.measure(SERVE_URL, m.MODEL_ID, prompts, LOAD_CONCURRENCY, m.MAX_TOKENS)
        return {"models": listed, "models_expected": expected, "models_ok": listed == expected,
                "adapter_replies_equal_to_batch": same, "adapter_replies_checked": len(rows),
                "adapter_reply_ok": same == len(rows), "adapter_replies_differing": differing,
                "adapter_reply_example": replies[0],
                "base_reply_example": base_reply, "concurrency": LOAD_CONCURRENCY, "load": throughput,
                "output_tokens_per_s": throughput["output_tokens_per_s"]}

    def _batch_outputs(self, name: str) -> dict[str, str]:
        outputs = {}
        for key in self.s3.keys(f"outputs/{name}/"):
            if key.endswith(".json") or key.endswith(".jsonl"):
                for line in self.s3.get(key).decode().splitlines():
                    if line.strip():
                        row = json.loads(line)
                        outputs[row["input"]] = row["generated_text"]
        return outputs

    def _bare_serve(self) -> dict[str, Any]:
        service = rc.find(self.rendered, "RayService", f"{m.SERVICE}-llm")
        config = json.loads(json.dumps(__import__("yaml").safe_load(service["spec"]["serveConfigV2"])))
        engine = dict(config["applications"][0]["args"]["llm_configs"][0]["engine_kwargs"])
        model_dir = self.download(m.MODEL_URI.split(f"{m.BUCKET}/", 1)[1] + "/", self.work / "model-from-s3")
        adapters = {m.ADAPTER_NAME: str(self.work / "adapter")}
        port = 8001
        command = bare.serve_command(str(model_dir), m.MODEL_ID, engine, port, adapters)
        env = {**os.environ, **BASE_ENV, "PYTHONPATH": str(self.sites["serve"])}
        log = open(self.logs / "vllm-serve.log", "w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 240 and process.poll() is None:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2):
                        break
                except OSError:
                    time.sleep(1)
            if process.poll() is not None:
                return {"bare_vllm_error": (self.logs / "vllm-serve.log").read_text()[-3000:],
                        "bare_vllm_command": command}
            started = round(time.perf_counter() - t0, 1)
            prompts = (self._messages(self.test_rows()) * 2)[:LOAD_REQUESTS]
            throughput = load.measure(f"{url}/v1", m.MODEL_ID, prompts, LOAD_CONCURRENCY, m.MAX_TOKENS)
            return {"bare_vllm": {"start_s": started, "load": throughput, "command": command[2:]},
                    "bare_vllm_output_tokens_per_s": throughput["output_tokens_per_s"]}
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()

    def _copy_ray_logs(self, label: str) -> None:
        session = Path("/tmp/ray/session_latest/logs")
        if session.exists():
            target = self.logs / f"ray-{label}"
            target.mkdir(exist_ok=True)
            for path in [*session.glob("serve/*.log"), *session.glob("ray-data/*.log"), *session.glob("worker-*.err"),
                         *session.glob("job-driver-*.log")]:
                shutil.copy(path, target / path.name)
