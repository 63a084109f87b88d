"""Pure builder properties that hold for every example and kind."""

from __future__ import annotations

import json

import pytest

from llmops.builders.common import (DNS1035_LABEL, RAY_NAME_MAX, Owner, child_name, is_shared, payloads_name,
                                    ray_name)
from llmops.builders.sizing import ephemeral_storage, model_params_b, quantity_bytes, shm_size
from llmops.builders.common import load_payloads
from llmops.render import render_manifests
from llmops.builders.common import BuildContext
from llmops.settings import Settings
from manifests import batchinference, example, finetune, llmservice

def _render(*docs):
    objects, errors = render_manifests(list(docs), BuildContext(settings=Settings(), payloads=load_payloads()))
    assert not errors, errors
    return objects


def _all_examples():
    return _render(example("viggo/finetune.yaml"), example("viggo/batchinference.yaml"),
                   example("viggo/llmservice.yaml"))


def _pod_specs(obj):
    cluster = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig")
    yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]["spec"]


def _files_the_entrypoint_reads(job: dict, pod: dict) -> list[str]:
    """Absolute paths the RayJob's entrypoint names: `--config` style arguments and the `-m` module's source file."""
    words = job["spec"]["entrypoint"].split()
    paths = [w for w in words if w.startswith("/")]
    env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
    for flag, module in zip(words, words[1:]):
        if flag == "-m":
            paths.append(f"{env['PYTHONPATH']}/{module.replace('.', '/')}.py")
    return paths


def test_every_file_the_entrypoint_reads_is_a_mounted_configmap_key():
    objects = _all_examples()
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    jobs = [o for o in objects if o["kind"] == "RayJob"]
    assert {j["metadata"]["labels"]["llmops.dev/owner-kind"] for j in jobs} == {"FineTune", "BatchInference"}
    for job in jobs:
        head = next(_pod_specs(job))   # the driver runs the entrypoint on the head
        volumes = {v["name"]: v["configMap"]["name"] for v in head["volumes"] if "configMap" in v}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in head["containers"][0]["volumeMounts"]
                  if m["name"] in volumes}
        files = _files_the_entrypoint_reads(job, head)
        assert len(files) == 2, (job["metadata"]["name"], files)   # the job config and the payload module
        for path in files:
            folder, _, key = path.rpartition("/")
            assert folder in mounts, f"{job['metadata']['name']}: {path} is on no ConfigMap mount ({sorted(mounts)})"
            assert key in config_maps[mounts[folder]]["data"], f"{job['metadata']['name']}: {path} is not mounted"


def test_every_child_is_owned_by_its_resource():
    for obj in _all_examples():
        if is_shared(obj):
            continue
        refs = obj["metadata"]["ownerReferences"]
        assert len(refs) == 1 and refs[0]["controller"] is True and refs[0]["apiVersion"] == "llmops.dev/v1alpha1"


def test_render_and_the_operator_know_the_same_kinds():
    from llmops.api import KINDS
    from llmops.handlers.kinds import RECONCILERS
    from llmops.render import PLANNED
    assert set(PLANNED) == set(RECONCILERS) == set(KINDS)


def test_payload_sources_are_shared_by_the_jobs_of_a_namespace():
    objects = _all_examples()
    shared = [o for o in objects if is_shared(o)]
    assert len(shared) == 1   # the FineTune and the BatchInference of one namespace mount the same one
    payloads = shared[0]
    assert payloads["immutable"] is True and "ownerReferences" not in payloads["metadata"]
    assert payloads["metadata"]["name"] == payloads_name(load_payloads())
    mounted = {v["configMap"]["name"] for o in objects if o["kind"] == "RayJob" for pod in _pod_specs(o)
               for v in pod["volumes"] if v["name"] == "llmops-payloads"}
    assert mounted == {payloads["metadata"]["name"]}
    job_configs = [o for o in objects if o["kind"] == "ConfigMap" and not is_shared(o)]
    assert not any(k.startswith("payload.") for o in job_configs for k in o["data"])   # no per-job copies
    changed = {**load_payloads(), "report.py": "# changed\n"}
    assert payloads_name(changed) != payloads["metadata"]["name"]   # an upgrade gets a new one


def test_secrets_appear_only_as_references():
    ft = finetune("s")
    ft["spec"]["secrets"] = {"huggingFaceToken": {"name": "hf", "key": "token"}, "storage": {"name": "s3"}}
    objects = _render(ft)
    assert not [o for o in objects if o["kind"] == "Secret"]   # the operator never copies a Secret
    containers = [c for o in objects if o["kind"] == "RayJob" for pod in _pod_specs(o) for c in pod["containers"]]
    assert len(containers) >= 2   # the head and every worker group
    for container in containers:
        tokens = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
        assert tokens == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}], tokens
        assert {"secretRef": {"name": "s3"}} in container["envFrom"], container["envFrom"]
        assert not [e for e in container["env"] if "value" in e and e["name"] in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY")]


def test_head_runs_no_gpu_work_and_workers_are_on_the_pool():
    for obj in _all_examples():
        if obj["kind"] not in ("RayJob", "RayService"):
            continue
        cluster = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig")
        assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"]
        worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
        assert worker["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L4"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]


def test_result_role_grants_one_configmap_only():
    role = next(o for o in _render(batchinference("b")) if o["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["b-bi-result"],
                              "verbs": ["get", "patch"]}]


def test_long_names_are_shortened_stably():
    owner = Owner("llmops.dev/v1alpha1", "FineTune", "x" * 120, "ns", "uid")
    name = child_name(owner, "ft-config")
    assert len(name) <= 63 and name.endswith("-ft-config") and name == child_name(owner, "ft-config")
    assert child_name(Owner("a", "b", "short", "ns", "u"), "ft") == "short-ft"


@pytest.mark.parametrize("name", ["viggo.v2", "0", "7b-tune", "a.b", "a-b", "x" * 253, "a." + "9" * 200, "a..b"])
def test_ray_objects_get_names_kuberay_accepts_for_any_legal_name(name):
    ray = ray_name(Owner("llmops.dev/v1alpha1", "FineTune", name, "ns", "u"), "ft")
    assert DNS1035_LABEL.fullmatch(ray) and len(ray) <= RAY_NAME_MAX and ray.endswith("-ft"), ray
    assert ray == ray_name(Owner("llmops.dev/v1alpha1", "FineTune", name, "ns", "u2"), "ft")  # stable


def test_ray_names_of_names_alike_but_for_dots_differ_and_plain_names_stay_as_they_were():
    def ray(name):
        return ray_name(Owner("llmops.dev/v1alpha1", "FineTune", name, "ns", "u"), "ft")
    assert ray("a.b") != ray("a-b") == "a-b-ft"
    assert ray("viggo") == "viggo-ft" and ray("0").startswith("r-0-")


@pytest.mark.parametrize("source,expected", [("Qwen/Qwen2.5-7B-Instruct", 7.0), ("meta-llama/Llama-3.1-70B", 70.0),
                                             ("Qwen/Qwen2.5-0.5B", 0.5), ("s3://bucket/model", 7.0)])
def test_model_size_from_name(source, expected):
    assert model_params_b(source) == expected


def test_service_without_adapters_has_no_lora_config():
    service = _render(llmservice("plain"))[0]
    assert "lora_config" not in service["spec"]["serveConfigV2"]
    assert service["kind"] == "RayService"


def test_attention_follows_what_the_training_image_has():
    import yaml
    from llmops.builders import finetune as ft_builder
    doc = finetune("attn")
    doc["metadata"].update(namespace="default", uid="u")
    doc["apiVersion"] = "llmops.dev/v1alpha1"

    def train_yaml(settings):
        cm = next(o for o in ft_builder.build_manifest(doc, BuildContext(settings=settings, payloads={}))
                  if o["metadata"]["name"].endswith("-config"))
        return yaml.safe_load(cm["data"]["train.yaml"])
    stock = train_yaml(Settings())
    assert stock["flash_attn"] == "sdpa" and stock["neat_packing"] is True and stock["packing"] is True
    runtime = train_yaml(Settings(finetune_flash_attention=True))
    assert runtime["flash_attn"] == "fa2"
    doc["spec"]["training"] = {"attention": "eager"}
    assert train_yaml(Settings())["flash_attn"] != "sdpa"


def _declared_resources(group):
    """rayStartParams `resources` read the way Ray's KubeRay autoscaler reads it (outer quotes and backslashes
    dropped, then JSON); the Ray-venv test runs Ray's own reader on the same objects."""
    value = group["rayStartParams"]["resources"]
    return json.loads(value[1:-1].replace("\\", ""))


@pytest.mark.parametrize("accelerator, ray_type", [("L4", "L4"), ("A100", "A100-80G"), ("H100", "H100")])
def test_every_gpu_worker_group_declares_its_accelerator_resource(accelerator, ray_type):
    docs = [finetune("f"), batchinference("b"), llmservice("s", adapters=[{"name": "a", "uri": "s3://b/ad/a"}])]
    for doc in docs:
        doc["spec"]["resources"]["accelerator"] = accelerator
    rays = [o for o in _render(*docs) if o["kind"] in ("RayJob", "RayService")]
    assert sorted(o["kind"] for o in rays) == ["RayJob", "RayJob", "RayService"]
    for ray in rays:
        cluster = ray["spec"].get("rayClusterSpec") or ray["spec"].get("rayClusterConfig")
        assert "resources" not in cluster["headGroupSpec"]["rayStartParams"]   # the head runs no GPU work
        for group in cluster["workerGroupSpecs"]:
            assert _declared_resources(group) == {f"accelerator_type:{ray_type}": 1}, ray["metadata"]["name"]


def test_the_service_replica_asks_for_what_the_worker_group_declares():
    import yaml
    service = _render(llmservice("s"))[0]
    llm_config = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"][0]
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert f"accelerator_type:{llm_config['accelerator_type']}" in _declared_resources(group)


def test_scale_to_zero_renders_an_empty_autoscaling_worker_group():
    """minReplicas 0: no worker pod at the start, in-tree autoscaling that may add them up to what maxReplicas
    needs, and the accelerator declared so that the autoscaler can bring a worker back for a replica."""
    doc = llmservice("s")
    doc["spec"].update(autoscaling={"minReplicas": 0, "maxReplicas": 3}, engine={"tensorParallelSize": 2})
    service = _render(doc)[0]
    cluster = service["spec"]["rayClusterConfig"]
    [group] = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (0, 0, 6)   # 2 GPUs a replica
    assert cluster["enableInTreeAutoscaling"] is True
    assert _declared_resources(group) == {"accelerator_type:L4": 1}
    assert "excludeHeadPodFromServeSvc" not in service["spec"]   # the head's proxy answers while no worker runs


def test_example_evaluation_prompts_with_the_text_the_adapter_was_trained_on():
    """The example BatchInference asks with each row's own instruction and input, the columns the FineTune
    trained on, not a paraphrase of them (the score then measures the adapter, as the reference run did)."""
    ft, bi = example("viggo/finetune.yaml"), example("viggo/batchinference.yaml")
    columns = ft["spec"]["dataset"]["columns"]
    prompt = bi["spec"]["prompt"]
    assert prompt == {"systemField": columns["prompt"], "userField": columns["query"]}
    assert bi["spec"]["evaluation"]["referenceField"] == columns["response"]
    job = next(o for o in _all_examples() if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "viggo-eval-bi-config")
    assert json.loads(job["data"]["job.json"])["prompt"] == {"systemField": "instruction", "systemPrompt": None,
                                                             "userField": "input"}


def _job_engine_kwargs(objects, name):
    job = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{name}-bi-config")
    return json.loads(job["data"]["job.json"])["engineKwargs"]


@pytest.mark.parametrize("rank, max_lora_rank", [(8, 8), (4, 8), (16, 16), (48, 64), (256, 256)])
def test_batch_job_config_carries_the_lora_engine_args_at_the_finetunes_rank(rank, max_lora_rank):
    ft = finetune("ft")
    ft["spec"]["method"] = {"type": "lora", "rank": rank}
    kwargs = _job_engine_kwargs(_render(ft, batchinference("b", fine_tune="ft")), "b")
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, max_lora_rank, 1)


def test_batch_job_config_without_adapter_has_no_lora_args_and_a_uri_adapter_gets_the_default_or_its_own():
    assert not {"enable_lora", "max_lora_rank", "max_loras"} & set(_job_engine_kwargs(_render(batchinference("b")), "b"))
    bi = batchinference("b")
    bi["spec"]["model"]["adapter"] = {"uri": "s3://bucket/adapters/x"}
    assert _job_engine_kwargs(_render(bi), "b")["max_lora_rank"] == 64
    bi["spec"]["engine"] = {"extraEngineArgs": {"max_lora_rank": 32}}
    assert _job_engine_kwargs(_render(bi), "b")["max_lora_rank"] == 32


@pytest.mark.parametrize("accelerator, seqs, tokens", [("L4", 256, 8192), ("A100", 256, 8192),
                                                      ("H100", 1024, 16384), ("H200", 1024, 16384)])
def test_batch_job_gets_vllms_offline_scheduler_limits_for_its_gpu(accelerator, seqs, tokens):
    bi = batchinference("b")
    bi["spec"]["resources"]["accelerator"] = accelerator
    kwargs = _job_engine_kwargs(_render(bi), "b")
    assert (kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]) == (seqs, tokens)


def test_batch_job_scheduler_limits_yield_to_the_spec_and_fit_a_whole_prompt_without_chunked_prefill():
    bi = batchinference("b")
    bi["spec"]["engine"] = {"maxNumBatchedTokens": 4096, "extraEngineArgs": {"max_num_seqs": 64}}
    kwargs = _job_engine_kwargs(_render(bi), "b")
    assert (kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]) == (64, 4096)
    bi["spec"]["engine"] = {"enableChunkedPrefill": False, "maxModelLen": 32768}
    assert _job_engine_kwargs(_render(bi), "b")["max_num_batched_tokens"] == 32768


def test_assume_ready_serves_the_gated_adapter_and_default_render_waits():
    import yaml
    from llmops.render import render_manifests
    docs = [example("viggo/finetune.yaml"), example("viggo/batchinference.yaml"), example("viggo/llmservice.yaml")]
    ctx = BuildContext(settings=Settings(), payloads=load_payloads())

    def llm_config(assume_ready):
        objects, errors = render_manifests(docs, ctx, assume_ready=assume_ready)
        assert not errors, errors
        service = next(o for o in objects if o["kind"] == "RayService")
        return yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"][0]
    assert "lora_config" not in llm_config(False)
    ready = llm_config(True)
    assert ready["lora_config"] == {"dynamic_lora_loading_path": "s3://llmops-demo/adapters",
                                    "max_num_adapters_per_replica": 4}
    assert ready["engine_kwargs"]["max_lora_rank"] == 8


@pytest.mark.parametrize("cloud, label", [("gpu-operator", "nvidia.com/gpu.product"),
                                          ("gke", "cloud.google.com/gke-accelerator"),
                                          ("eks", "karpenter.k8s.aws/instance-gpu-name")])
def test_the_cloud_setting_picks_the_node_labels_and_settings_add_profiles(cloud, label):
    from llmops.settings import AcceleratorProfile
    settings = Settings(cloud=cloud, accelerators={"T4": AcceleratorProfile(
        node_selector={"pool": "t4"}, ray_accelerator_type="T4", gpu_memory_gib=16)})
    assert label in settings.profiles()["L4"].node_selector and "T4" in settings.profiles()
    assert Settings.load(environ={"LLMOPS_CLOUD": cloud}).cloud == cloud


def test_an_accelerator_the_cloud_lacks_is_a_clear_error():
    from llmops.render import render_manifests
    ft = finetune("f")
    ft["spec"]["resources"]["accelerator"] = "A10G"   # an AWS GPU: no GKE machine has it
    _, errors = render_manifests([ft], BuildContext(settings=Settings(cloud="gke"), payloads={}))
    assert len(errors) == 1 and "'A10G' is not a profile of this operator (cloud gke)" in errors[0]
    assert "use one of A100, H100, H200, L4" in errors[0]


def test_every_ray_pod_mounts_an_in_memory_dev_shm_sized_from_its_memory():
    for ray in (o for o in _all_examples() if o["kind"] in ("RayJob", "RayService")):
        for pod in _pod_specs(ray):
            container = pod["containers"][0]
            volume = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
            memory = quantity_bytes(container["resources"]["limits"]["memory"])
            size = quantity_bytes(volume["emptyDir"]["sizeLimit"])
            assert volume["emptyDir"]["medium"] == "Memory"
            # larger than Ray's default object store (30% of memory), within the memory limit it counts against
            assert 0.3 * memory < size < 0.5 * memory, (ray["metadata"]["name"], volume)


@pytest.mark.parametrize("memory, expected", [("32Gi", "13107Mi"), ("8Gi", "3276Mi"), ("16G", "6103Mi"),
                                              ("100Mi", "64Mi")])
def test_shm_size(memory, expected):
    assert shm_size(memory) == expected


@pytest.mark.parametrize("source, gib", [("Qwen/Qwen2.5-7B-Instruct", 36), ("meta-llama/Llama-3.1-70B", 177),
                                         ("Qwen/Qwen2.5-0.5B", 22), ("s3://bucket/model", 36)])
def test_gpu_workers_request_disk_for_the_models_weights(source, gib):
    assert ephemeral_storage(source) == f"{gib}Gi"
    ft = finetune("f")
    ft["spec"]["baseModel"]["source"] = source
    svc = llmservice("s")
    svc["spec"]["model"]["source"] = source
    for ray in (o for o in _render(ft, svc) if o["kind"] in ("RayJob", "RayService")):
        cluster = ray["spec"].get("rayClusterSpec") or ray["spec"].get("rayClusterConfig")
        worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
        assert worker["requests"]["ephemeral-storage"] == f"{gib}Gi"
        assert "ephemeral-storage" not in worker["limits"]   # a request places the pod; no limit evicts it


def test_ray_pods_run_as_the_specs_own_account_which_gains_only_the_result_configmap():
    ft = finetune("f")
    ft["spec"]["serviceAccountName"] = "ml-irsa"
    svc = llmservice("s")
    svc["spec"]["serviceAccountName"] = "ml-irsa"
    objects = _render(ft, svc)
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]     # none created: the user's is used
    for ray in (o for o in objects if o["kind"] in ("RayJob", "RayService")):
        assert {pod["serviceAccountName"] for pod in _pod_specs(ray)} == {"ml-irsa"}
    role = next(o for o in objects if o["kind"] == "Role")
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["f-ft-result"],
                              "verbs": ["get", "patch"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ml-irsa", "namespace": "default"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_settings_annotate_the_accounts_the_operator_creates():
    annotations = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/llmops-ray"}
    objects, errors = render_manifests([batchinference("b")], BuildContext(
        settings=Settings(ray_service_account_annotations=annotations), payloads={}))
    assert not errors
    account = next(o for o in objects if o["kind"] == "ServiceAccount")
    assert account["metadata"]["name"] == "b-bi-ray" and account["metadata"]["annotations"] == annotations
    plain = next(o for o in _render(batchinference("b")) if o["kind"] == "ServiceAccount")
    assert "annotations" not in plain["metadata"]


def test_a_service_without_its_own_account_runs_as_the_namespace_default():
    service = _render(llmservice("s"))[0]
    assert all("serviceAccountName" not in pod for pod in _pod_specs(service))


def test_default_images_are_the_published_forms():
    """ray-llm is built by Ray for Python 3.12 on CUDA 13.0 only (docs/clusters.md cites Ray's build config): the
    tags are `<ray version>-py312-cu130`; the FineTune default is the runtime image this project's release
    workflow publishes, tagged with the project's version."""
    import re
    import tomllib
    from pathlib import Path
    from llmops.settings import IMAGE_RAY_VERSION, PROJECT_VERSION, RUNTIME_IMAGE_REPOSITORY
    settings = Settings()
    assert re.fullmatch(r"rayproject/ray-llm:2\.\d+\.\d+-py312-cu130", settings.inference_image)
    assert settings.inference_image == f"rayproject/ray-llm:{IMAGE_RAY_VERSION}-py312-cu130"
    assert settings.finetune_image == f"{RUNTIME_IMAGE_REPOSITORY}:{PROJECT_VERSION}"
    assert re.fullmatch(r"ghcr\.io/[a-z0-9-]+/llmops-ray-llamafactory:\d+\.\d+\.\d+", settings.finetune_image)
    root = Path(__file__).resolve().parents[2]
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"] == PROJECT_VERSION
    assert settings.finetune_pip == []   # the runtime image carries LLaMA-Factory


def test_pip_in_the_runtime_env_raises_rays_setup_timeout():
    import yaml
    from llmops.settings import FINETUNE_PIP_FALLBACK, STOCK_RAY_IMAGE

    def runtime(settings):
        job = next(o for o in _render_with(settings, finetune("f")) if o["kind"] == "RayJob")
        return yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "pip" not in runtime(Settings()) and "config" not in runtime(Settings())
    stock = runtime(Settings(finetune_image=STOCK_RAY_IMAGE, finetune_pip=FINETUNE_PIP_FALLBACK))
    assert stock["pip"] == FINETUNE_PIP_FALLBACK
    assert stock["config"] == {"setup_timeout_seconds": 1800}   # Ray's own 600 s is short for several GB of pip


def _render_with(settings, *docs):
    objects, errors = render_manifests(list(docs), BuildContext(settings=settings, payloads=load_payloads()))
    assert not errors, errors
    return objects


def test_a_jobs_cluster_is_whole_with_its_head_and_spec_workers():
    """decide counts a job's pods against 1 + spec.resources.workers (the cached RayJob has no spec): the builder
    must give the cluster exactly that many."""
    docs = (example("viggo/finetune.yaml"), example("viggo/batchinference.yaml"), finetune("two"))
    wanted = {d["metadata"]["name"]: 1 + d["spec"]["resources"]["workers"] for d in docs}
    jobs = [o for o in _render(*docs) if o["kind"] == "RayJob"]
    assert len(jobs) == len(docs)
    for job in jobs:
        cluster = job["spec"]["rayClusterSpec"]
        owner = job["metadata"]["ownerReferences"][0]["name"]
        assert 1 + sum(g["replicas"] for g in cluster["workerGroupSpecs"]) == wanted[owner], owner
