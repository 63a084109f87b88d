"""The chart and the kustomize base on the real local plane; the operator running with the chart's rights.

The chart is installed for real (`helm install --wait`): the API server admits every object, the Deployment's pod
passes the `restricted` Pod Security admission, is scheduled, and kwok runs it as if (its image cannot be pulled
here). The operator itself then runs as a local process, configured as that pod is (its args, env and settings
ConfigMap), authenticated with a token of the chart's ServiceAccount: every request it makes is authorized by the
chart's RBAC, and the audit log shows it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import pytest
import yaml
from kubernetes import client

from gitops import SnapshotContract
from integration.harness import REPO, Cluster, OperatorProcess, condition, phase, stalled_as, wait_for
from integration.rbac import ServiceAccount, allowed, audit_records, kubeconfig_for
from llmops.dev.install import install_crds
from llmops.dev.nodes import Pool
from llmops.dev.plane import BUILD_HINT, LocalPlane, bin_dir
from llmops.dev.simulator import Simulator
from manifests import finetune, llmservice

pytestmark = pytest.mark.integration

CHART = REPO / "charts" / "llmops-operator"
KUSTOMIZE_BASE = REPO / "deploy" / "kustomize" / "base"
METRICS = ("llmops_reconciles_total", "llmops_reconcile_duration_seconds", "llmops_resources",
           "llmops_api_errors_total")


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str
    account: ServiceAccount


def helm(plane, *args: str) -> subprocess.CompletedProcess:
    path = bin_dir() / "helm"
    if not path.exists():
        pytest.fail(f"{path} is missing: build the local toolchain with `{BUILD_HINT}`")
    result = subprocess.run([str(path), *args], env=plane.env(), capture_output=True, text=True)
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def restricted_namespace(cluster, name: str) -> str:
    cluster.core.create_namespace({"metadata": {"name": name,
                                                "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    return name


@pytest.fixture(scope="module")
def release(plane, cluster):
    """The chart, cluster-wide, with leader election (a Lease in the release namespace)."""
    namespace = restricted_namespace(cluster, "llmops-it")
    helm(plane, "install", "llmops-it", str(CHART), "--namespace", namespace, "--set", "leaderElection.enabled=true",
         "--wait", "--timeout", "120s")
    yield Release("llmops-it", namespace, ServiceAccount(namespace, "llmops-it-operator"))
    helm(plane, "uninstall", "llmops-it", "--namespace", namespace, "--wait")
    cluster.core.delete_namespace(namespace)


@pytest.fixture(scope="module")
def chart_operator(release, plane, cluster, operator, tmp_path_factory):
    """`llmops run` as the chart's pod runs it, with the chart's ServiceAccount token.

    The session's operator (admin credentials, all namespaces) is stopped meanwhile, so that everything that happens
    to the test's resources is this operator's doing; it is started again afterwards."""
    folder = tmp_path_factory.mktemp("chart-operator")
    deployment = client.AppsV1Api(cluster.api_client).read_namespaced_deployment("llmops-it-operator",
                                                                                 release.namespace)
    container = deployment.spec.template.spec.containers[0]
    settings = cluster.core.read_namespaced_config_map("llmops-it-operator-settings", release.namespace)
    (folder / "settings.yaml").write_text(settings.data["settings.yaml"])
    env = {e.name: e.value for e in container.env if e.value is not None}
    # POD_NAME and POD_NAMESPACE come from the downward API in the pod; here they are set as the pod would get them.
    assert {e.name: e.value_from.field_ref.field_path for e in container.env if e.value_from} == {
        "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    env.update(LLMOPS_SETTINGS_FILE=str(folder / "settings.yaml"), POD_NAME="chart-operator",
               POD_NAMESPACE=release.namespace,
               KUBECONFIG=str(kubeconfig_for(release.account, cluster, plane, folder / "kubeconfig")))
    # OperatorProcess chooses the ports and a plain log format; every other argument is the chart's.
    own = ("--probe-port", "--metrics-port", "--log-format")
    args = tuple(a for a in container.args[1:] if not a.startswith(own))
    assert container.args[0] == "run" and "--leader-election=llmops" in args

    operator.stop()
    proc = OperatorProcess(plane, folder / "operator.log", env_extra=env, args=args).start()
    yield proc
    proc.stop()
    operator.start()


def test_operator_runs_a_finetune_with_the_charts_rights(chart_operator, release, plane, cluster, ns):
    manifest = yaml.safe_dump({**finetune("ft"), "metadata": {"name": "ft", "namespace": ns}})
    plane.kubectl("apply", "--server-side", "-f", "-", input=manifest, quiet=True)
    try:
        wait_for(lambda: phase(cluster.get("FineTune", ns, "ft")) == "Running", timeout=90, what="phase Running")
    except AssertionError as e:
        status = (cluster.get("FineTune", ns, "ft") or {}).get("status")
        raise AssertionError(f"{e}\nstatus: {status}\noperator log:\n{chart_operator.log()[-4000:]}") from None

    def metrics_while_running():   # a reconcile is counted when it returns, after the status write and its Event
        text = chart_operator.metrics()
        running = 'llmops_resources{kind="FineTune",phase="Running"} 1' in text
        return text if running and 'llmops_reconciles_total{kind="FineTune",result="ok"}' in text else None
    text = wait_for(metrics_while_running, timeout=30,
                    what="llmops_resources to count the Running FineTune, and its reconcile counted")
    for name in METRICS:
        assert f"# TYPE {name} " in text, name
    assert 'llmops_reconciles_total{kind="FineTune",result="ok"}' in text
    assert 'llmops_reconcile_duration_seconds_count{kind="FineTune"}' in text

    simulator = Simulator(plane.kubeconfig, run_seconds=0)
    wait_for(lambda: (simulator.step() or True) and phase(cluster.get("FineTune", ns, "ft")) == "Succeeded",
             timeout=90, what="FineTune to succeed")

    log = chart_operator.log()
    assert "403" not in log and "Forbidden" not in log, log[-3000:]
    # The work was done with the chart's account, and none of its requests was refused.
    records = list(audit_records(plane, release.account))
    # Other tests' namespaces are being deleted meanwhile; the API server refuses every write there (403,
    # NamespaceTerminating) whatever the rights, so only refusals elsewhere count.
    def terminating(namespace):
        try:
            return cluster.core.read_namespace(namespace).status.phase == "Terminating"
        except Exception:
            return True   # already gone
    refused = [(r["verb"], r.get("objectRef")) for r in records if r["responseStatus"]["code"] == 403
               and not ((r.get("objectRef") or {}).get("namespace") not in (None, ns)
                        and terminating(r["objectRef"]["namespace"]))]
    assert not refused, refused
    done = {(r["verb"], r["objectRef"].get("resource"), r["objectRef"].get("subresource", ""))
            for r in records if r.get("objectRef", {}).get("namespace") == ns}
    assert {("patch", "rayjobs", ""), ("patch", "roles", ""), ("patch", "finetunes", "status"),
            ("create", "events", "")} <= done, done
    # Leader election went through with the chart's rights: this operator holds the Lease in the release namespace
    # (created there by the operator itself; its requests on it are among the audit records checked above).
    lease = client.CoordinationV1Api(cluster.api_client).read_namespaced_lease("llmops", release.namespace)
    assert lease.spec.holder_identity == "chart-operator"
    lease_requests = {(r["verb"], r["objectRef"].get("name")) for r in records
                      if (r.get("objectRef") or {}).get("resource") == "leases"}
    assert lease_requests and {verb for verb, _ in lease_requests} <= {"get", "create", "update", "list", "watch"}, \
        lease_requests
    assert {name for _, name in lease_requests} <= {"llmops", None}, lease_requests
    # A second replica with the same rights waits, watching that Lease by name (no refusal: it never falls back to
    # reading it at intervals), and writes nothing.
    standby = OperatorProcess(plane, chart_operator.log_path.with_name("standby.log"),
                              env_extra={**chart_operator.env_extra, "POD_NAME": "chart-standby"},
                              args=chart_operator.args).start()
    try:
        wait_for(lambda: "waiting to lead" in standby.log(), timeout=30, what="the standby replica to wait")
        wait_for(lambda: any(r["verb"] == "watch" and (r.get("objectRef") or {}).get("resource") == "leases"
                             for r in audit_records(plane, release.account)), timeout=30,
                 what="the standby replica to watch the Lease")
        assert "cannot watch the Lease" not in standby.log(), standby.log()[-3000:]
    finally:
        standby.stop()
    watched = [r for r in audit_records(plane, release.account)
               if (r.get("objectRef") or {}).get("resource") == "leases" and r["verb"] in ("list", "watch")]
    assert watched and all(r["objectRef"].get("name") == "llmops" and r["responseStatus"]["code"] < 400
                           for r in watched), watched
    # The operator writes only status: a GitOps tool's server-side diff of the manifest finds nothing to change.
    diff = plane.kubectl("diff", "--server-side", "-f", "-", input=manifest, check=False, quiet=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_operator_exposes_a_service_with_the_charts_rights(chart_operator, release, plane, cluster, ns):
    """spec.expose with an API key: the route and its policy are written with the chart's account (which reads
    API discovery, never the Secret)."""
    cluster.core.create_namespaced_secret(ns, {"metadata": {"name": "keys"}, "stringData": {"a": "sk-test"}})
    doc = llmservice("pub")
    doc["metadata"]["namespace"] = ns
    doc["spec"]["expose"] = {"gateway": {"name": "gw"}, "apiKey": {"secretRef": {"name": "keys"}}}
    plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(doc), quiet=True)

    def written():
        try:
            return all(cluster.custom.get_namespaced_custom_object(group, version, ns, plural, "pub-llm")
                       for group, version, plural in (("gateway.networking.k8s.io", "v1", "httproutes"),
                                                      ("gateway.envoyproxy.io", "v1alpha1", "securitypolicies")))
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise
    try:
        wait_for(written, timeout=90, what="the HTTPRoute and SecurityPolicy")
    except AssertionError as e:
        status = (cluster.get("LLMService", ns, "pub") or {}).get("status")
        raise AssertionError(f"{e}\nstatus: {status}\noperator log:\n{chart_operator.log()[-4000:]}") from None
    records = [r for r in audit_records(plane, release.account)
               if (r.get("objectRef") or {}).get("namespace") == ns or "/apis/gateway" in r.get("requestURI", "")]
    assert not [r["requestURI"] for r in records if r["responseStatus"]["code"] == 403]
    assert any(r["requestURI"] == "/apis/gateway.networking.k8s.io/v1" for r in records)   # discovery, allowed
    assert not [r for r in records if (r.get("objectRef") or {}).get("resource") == "secrets"]


def test_service_account_has_only_the_rights_it_needs(release, plane, cluster, ns):
    account = release.account

    def can(verb, resource, group="", namespace=ns, subresource="", name=""):
        return allowed(cluster, account, verb, resource, group, namespace, subresource, name)

    needed = [("list", "finetunes", "llmops.dev"), ("watch", "llmservices", "llmops.dev"),
              ("watch", "rayjobs", "ray.io"), ("create", "rayjobs", "ray.io"), ("patch", "rayjobs", "ray.io"),
              ("delete", "rayservices", "ray.io"), ("list", "rayclusters", "ray.io"),
              ("patch", "configmaps", ""), ("get", "configmaps", ""), ("create", "serviceaccounts", ""),
              ("create", "roles", "rbac.authorization.k8s.io"), ("patch", "rolebindings", "rbac.authorization.k8s.io"),
              ("watch", "pods", ""), ("create", "events", ""),
              ("watch", "jobs", "batch"), ("create", "jobs", "batch"), ("patch", "jobs", "batch"),
              ("create", "persistentvolumeclaims", ""), ("patch", "persistentvolumeclaims", ""),
              ("create", "httproutes", "gateway.networking.k8s.io"), ("patch", "httproutes", "gateway.networking.k8s.io"),
              ("delete", "httproutes", "gateway.networking.k8s.io"),
              ("create", "securitypolicies", "gateway.envoyproxy.io"),
              ("patch", "securitypolicies", "gateway.envoyproxy.io"),
              ("delete", "securitypolicies", "gateway.envoyproxy.io")]
    for verb, resource, group in needed:
        assert can(verb, resource, group), (verb, resource)
        assert can(verb, resource, group, namespace=None), (verb, resource, "all namespaces")
    assert can("patch", "finetunes", "llmops.dev", subresource="status")
    # Leader election: the one Lease in the release namespace, nothing else of Leases, nowhere else.
    lease = ("leases", "coordination.k8s.io")
    assert can("create", *lease, namespace=release.namespace)
    for verb in ("get", "list", "watch", "update"):   # list and watch: by name (a field selector on it)
        assert can(verb, *lease, namespace=release.namespace, name="llmops"), verb
        assert not can(verb, *lease, namespace=release.namespace, name="someone-else"), verb
        assert not can(verb, *lease, namespace=ns, name="llmops"), verb
    for verb in ("list", "watch"):   # ... never every Lease
        assert not can(verb, *lease, namespace=release.namespace), verb
    for verb in ("patch", "delete"):
        assert not can(verb, *lease, namespace=release.namespace, name="llmops"), verb
    assert not can("create", *lease, namespace=ns)

    for verb in ("get", "list", "watch"):
        assert not can(verb, "secrets"), verb
        assert not can(verb, "secrets", namespace=None), verb
    refused = [("patch", "finetunes", "llmops.dev"), ("delete", "finetunes", "llmops.dev"),
               ("delete", "rayjobs", "ray.io"), ("get", "rayjobs", "ray.io"), ("create", "pods", ""), ("get", "pods", ""),
               ("delete", "jobs", "batch"), ("delete", "persistentvolumeclaims", ""),
               ("delete", "configmaps", ""), ("update", "roles", "rbac.authorization.k8s.io"),
               ("escalate", "roles", "rbac.authorization.k8s.io"), ("bind", "roles", "rbac.authorization.k8s.io"),
               ("list", "namespaces", ""), ("create", "rayclusters", "ray.io"),
               ("get", "httproutes", "gateway.networking.k8s.io"), ("create", "gateways", "gateway.networking.k8s.io"),
               ("patch", "gateways", "gateway.networking.k8s.io")]
    for verb, resource, group in refused:
        assert not can(verb, resource, group), (verb, resource)

    # Namespace mode: a Role in each watched namespace, nothing anywhere else.
    other = cluster.namespace("other")
    scoped = restricted_namespace(cluster, "llmops-scoped")
    helm(plane, "install", "llmops-scoped", str(CHART), "--namespace", scoped, "--set", f"watchNamespaces={{{ns}}}",
         "--set", "replicas=0")
    try:
        scoped_account = ServiceAccount(scoped, "llmops-scoped-operator")
        assert allowed(cluster, scoped_account, "patch", "rayjobs", "ray.io", ns)
        assert allowed(cluster, scoped_account, "list", "finetunes", "llmops.dev", ns)
        assert not allowed(cluster, scoped_account, "patch", "rayjobs", "ray.io", other)
        assert not allowed(cluster, scoped_account, "list", "finetunes", "llmops.dev", None)
        assert not allowed(cluster, scoped_account, "get", "secrets", "", ns)
        # Without leader election: no rights on Leases.
        assert not allowed(cluster, scoped_account, "create", "leases", "coordination.k8s.io", scoped)
    finally:
        helm(plane, "uninstall", "llmops-scoped", "--namespace", scoped)
        cluster.core.delete_namespace(scoped)


def test_kustomize_base_applies_server_side(plane, cluster):
    plane.kubectl("apply", "--server-side", "-k", str(KUSTOMIZE_BASE), quiet=True)
    try:
        apps = client.AppsV1Api(cluster.api_client)
        wait_for(lambda: (apps.read_namespaced_deployment("llmops-operator", "llmops-system").status.available_replicas
                          or 0) == 1, timeout=90, what="the operator Deployment (run by kwok) to be available")
        # Applying again changes nothing and conflicts with nothing.
        again = plane.kubectl("apply", "--server-side", "-k", str(KUSTOMIZE_BASE), quiet=True)
        assert "configured" not in again.stdout, again.stdout
    finally:
        # Not `kubectl delete -k`: that would also delete the CRDs the rest of the session needs.
        plane.kubectl("delete", "namespace", "llmops-system", "--wait=false", quiet=True)
        plane.kubectl("delete", "clusterrole,clusterrolebinding", "llmops-operator", quiet=True)


def test_a_cluster_without_kuberay_stalls_naming_it_until_it_is_installed(tmp_path):
    """KubeRay left out (a newcomer's first mistake): the operator starts, each resource says what is missing
    (before, the operator waited for ever to list RayJobs and nothing had a status), and once KubeRay's CRDs are
    installed it goes on with no change to the resource. A plane of its own: the shared one's KubeRay stays."""
    plane = LocalPlane(tmp_path / "plane", pools=(Pool("cpu", 1, cpu="8", memory="32Gi"),))
    plane.start(with_kuberay=False)
    operator = None
    try:
        plane.kubectl("delete", "crd", "rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io", quiet=True)
        install_crds(plane)
        cluster = Cluster(plane.kubeconfig, SnapshotContract())
        operator = OperatorProcess(plane, tmp_path / "operator.log").start()
        ns = cluster.namespace()
        cluster.create(finetune("no-kuberay"), ns)
        stalled = stalled_as(cluster, "FineTune", ns, "no-kuberay", "CRDMissing", show=operator.log)
        assert "does not serve ray.io/v1 RayJob: install KubeRay" in condition(stalled, "Stalled")["message"]
        assert "does not serve it (is its CRD installed?" in operator.log()
        plane.install_kuberay_crds()
        wait_for(lambda: cluster.ray_list("rayjobs", ns), timeout=120, what="the RayJob, once KubeRay's CRDs are in",
                 show=operator.log)
        wait_for(lambda: condition(cluster.get("FineTune", ns, "no-kuberay"), "Stalled").get("status") == "False",
                 timeout=60, what="Stalled=False")
    finally:
        if operator is not None:
            operator.stop()
        plane.stop()
        shutil.rmtree(tmp_path / "plane", ignore_errors=True)
