#!/usr/bin/env python3
"""The data plane for real: the three payloads, rendered by the operator, run by Ray, vLLM, LLaMA-Factory and Ray
Serve on one GPU, against a real S3 API.

Two sides:

    python3 bench/dataplane_gpu.py render          # here: the operator renders the run's resources
    python3 bench/dataplane_carry.py               # here: the wheels, trimmed and packed for the GPU machine
    # there (device calls; docs/benchmarks.md "Data plane on a GPU" lists them):
    PYTHONPATH=/tmp/dp/serve:operator:bench python3 bench/dataplane_gpu.py run --phases finetune,batch,serve

`render` writes .dataplane/rendered-<GPU>.json, one per GPU the machine may have (H100, H200): every object
`llmops render` makes for the manifests in bench/dataplane/manifests.py (a FineTune, two BatchInferences, one with
the FineTune's adapter, and an LLMService serving it); `run` takes the one for the GPU nvidia-smi names. `run` plays KubeRay's part with them (bench/dataplane/raycluster.py says exactly how) and writes
<out>/dataplane.json, also kept in --work, so phases can run in separate calls of a warm machine:

* finetune: a random-weight Qwen2-architecture model and a ViGGO-shaped task (bench/dataplane/task.py) put in
  moto's S3 server; `python -m payloads.finetune` submitted as the RayJob's entrypoint to a `ray start --head`
  cluster with the GPU; LLaMA-Factory 0.9.4 trains with USE_RAY=1 (one Ray Train worker), checkpoints go to S3,
  the adapter is published and checked with peft;
* batch_base, batch_adapter: one of the two jobs alone (a call each where the machine's time is short);
* batch: `python -m payloads.batch_inference` for the base model and for the FineTune's adapter (ray.data.llm with
  vLLM), scored by the shipped metrics; then bare vLLM (`LLM.chat` with the same engine arguments, the adapter as
  a LoRARequest) over the same rows in a fresh process;
* serve: the RayService's serveConfigV2 PUT to the dashboard's Serve API, queried with the openai client
  (/v1/models, the adapter's replies against the batch outputs, output tokens/s at 32 streams); then
  `vllm serve` with the same engine arguments under the same load;
* serve_replies: serve without the `vllm serve` comparison (its ratio measured in an earlier run);
* routing: two replicas on the one GPU, Ray Serve's default router against prefix affinity on many long prompts
  (bench/dataplane/routing.py);
* serve_cold_start: a second LLMService with minReplicas 0 (bench/dataplane/coldstart.py): the first request,
  a warm one, the replica stopping after the idle delay, and the cold start with the model already on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "operator")]
from dataplane import manifests as _m  # noqa: E402  (after the path)
RENDERED = REPO / ".dataplane"
FINETUNE = {"epochs": 24.0, "learning_rate": 2e-3, "rank": 16}
# Not in a call's state: the checkpoints (the adapter is published beside them) and the routing model (rebuilt
# in seconds, too large to carry back).
STATE_LEAVES_OUT = ("/llmops-checkpoints", "/" + _m.ROUTE_MODEL_URI.split(f"{_m.BUCKET}/", 1)[1])


def render(folder: Path) -> None:
    from dataplane import manifests as m
    from llmops.render import render_manifests

    folder.mkdir(parents=True, exist_ok=True)
    for gpu in m.ACCELERATORS:
        m.ACCELERATOR = gpu
        docs = [m.finetune(**FINETUNE), m.batch_inference("viggo-base", with_adapter=False),
                m.batch_inference("viggo-eval", with_adapter=True), m.llm_service(FINETUNE["rank"]),
                m.llm_service_zero(), m.llm_service_routing("default"), m.llm_service_routing("prefixAffinity")]
        objects, errors = render_manifests(docs)
        if errors:
            raise SystemExit("the operator refused the run's manifests:\n" + "\n".join(errors))
        path = folder / f"rendered-{gpu}.json"
        path.write_text(json.dumps(objects, indent=1))
        print(f"{len(objects)} objects rendered for {gpu} into {path}")


def rendered_for_this_gpu(declared: str | None) -> Path:
    """The rendering whose accelerator is this machine's GPU (the FineTune's Ray workers ask for its type), or the
    one a CPU dry run declares."""
    import subprocess

    from dataplane import manifests as m

    name = declared or ""
    if not declared and shutil.which("nvidia-smi"):
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout
    found = [gpu for gpu in m.ACCELERATORS if gpu in name.upper()]
    if not found:
        raise SystemExit(f"no rendering for this machine's GPU ({name.strip() or 'none found'}); "
                         f"bench/dataplane/manifests.py ACCELERATORS renders {', '.join(m.ACCELERATORS)}")
    path = RENDERED / f"rendered-{found[0]}.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python3 bench/dataplane_gpu.py render` here and carry .dataplane")
    return path


def run(args: argparse.Namespace) -> None:
    from dataplane.run import Run

    args.work.mkdir(parents=True, exist_ok=True)
    if args.state and not (args.work / "bucket").exists():
        with tarfile.open(args.state) as archive:
            archive.extractall(args.work, filter="data")
    shutil.copy(rendered_for_this_gpu(args.declare_resources), args.work / "rendered.json")
    sites = dict(item.split("=", 1) for item in args.sites.split(","))
    bench = Run(args.work, args.out, {name: Path(path) for name, path in sites.items()}, args.declare_resources)
    try:
        bench.save("versions", versions(sites))
        for phase in args.phases.split(","):
            try:
                getattr(bench, phase)()
            except Exception as exc:  # recorded, and the next phase still runs
                bench.save(f"{phase}_error", f"{type(exc).__name__}: {exc}"[-4000:])
    finally:
        bench.close()
        with tarfile.open(args.out / "logs.tar.xz", "w:xz") as archive:
            archive.add(bench.logs, arcname="logs")
        # What a later call needs if the machine was given back in between (carry it as --state).
        with tarfile.open(args.out / "state.tar.xz", "w:xz") as archive:
            for name in ("bucket", "data", "dataplane.json"):
                if (args.work / name).exists():  # not the checkpoints: the adapter is published beside them
                    archive.add(args.work / name, arcname=name, filter=lambda info: None if any(
                        part in info.name for part in STATE_LEAVES_OUT) else info)
        shutil.rmtree(bench.logs, ignore_errors=True)
    summary(bench.results)


def versions(sites: dict[str, str]) -> dict[str, str]:
    import importlib.metadata as md
    import subprocess

    found = {}
    for name in ("ray", "vllm", "torch", "transformers"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    lf = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('llamafactory'), "
                         "m.version('transformers'), m.version('peft'))"],
                        env={"PYTHONPATH": sites["finetune"]}, capture_output=True, text=True)
    if lf.returncode == 0:
        found["llamafactory"], found["finetune_transformers"], found["finetune_peft"] = lf.stdout.split()
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        found["gpu"] = gpu.stdout.strip()
    found["python"] = sys.version.split()[0]
    return found


def summary(results: dict) -> None:
    ft, batch, serve = (results.get(k) or {} for k in ("finetune", "batch", "serve"))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("_error")}, indent=1))
    print(f"versions: {results.get('versions')}")
    print(f"finetune: {ft.get('phase')} via Ray, wall {ft.get('wall_s')} s, {ft.get('train_samples_per_s')} "
          f"samples/s, adapter checked {ft.get('adapter_checked')}; {ft.get('message')}")
    print(f"batch: rows {batch.get('rows')}, exact match base {batch.get('exact_match_base')} -> adapter "
          f"{batch.get('exact_match_adapter')}; {batch.get('rows_per_s')} rows/s vs bare vLLM "
          f"{batch.get('bare_vllm_rows_per_s')} ({batch.get('ratio_vs_bare_vllm')})")
    print(f"serve: running {serve.get('running')}, models {serve.get('models')}, adapter replies = batch "
          f"{serve.get('adapter_replies_equal_to_batch')}/{serve.get('adapter_replies_checked')}, "
          f"{serve.get('output_tokens_per_s')} tok/s vs vllm serve {serve.get('bare_vllm_output_tokens_per_s')} "
          f"({serve.get('ratio_vs_bare_vllm')})")
    zero = results.get("serve_cold_start") or {}
    print(f"serve_cold_start: first request {zero.get('first_request_s')} s, warm {zero.get('warm_request_s')} s, "
          f"to zero {zero.get('to_zero_after_last_request_s')} s after the last request (delay "
          f"{zero.get('scale_to_zero_delay_s')} s), cold start with the model on disk "
          f"{zero.get('cold_start_request_s')} s")
    route = results.get("routing") or {}
    rates = [((route.get(r) or {}).get("load") or {}).get("output_tokens_per_s") for r in ("default", "prefixAffinity")]
    print(f"routing: output tokens/s default {rates[0]}, prefixAffinity {rates[1]} "
          f"({route.get('ratio_prefix_affinity_vs_default')})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("render").add_argument("--out", type=Path, default=RENDERED)
    runner = sub.add_parser("run")
    runner.add_argument("--phases", default="finetune,batch,serve")
    runner.add_argument("--work", type=Path, default=Path("/tmp/dp/run"))
    runner.add_argument("--out", type=Path, required=True)
    runner.add_argument("--sites", default="serve=/tmp/dp/serve,finetune=/tmp/dp/finetune")
    runner.add_argument("--state", type=Path, help="a previous call's <out>/state.tar.xz: the bucket, the data and "
                        "the results so far, restored into an empty --work")
    runner.add_argument("--declare-resources", help="JSON of Ray resources to declare (a CPU dry run of the plumbing: "
                        "'{\"accelerator_type:H200\": 1}'); on the GPU machine Ray detects them")
    args = parser.parse_args()
    if args.command == "render":
        render(args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
