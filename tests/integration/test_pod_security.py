"""`ray_pod_security: restricted`, judged by the API server's own Pod Security admission: in a namespace that
enforces `restricted`, every pod that KubeRay and the Job controller create for a FineTune and an LLMService
is admitted (head, workers, KubeRay's job submitter, the head with KubeRay's autoscaler container). With the
default setting the same namespace refuses them (test_operator_core: PodsRefused)."""

from __future__ import annotations

from integration.harness import phase, restricted_operator, wait_for
from manifests import finetune, llmservice


def _pods(cluster, ns: str, selector: str) -> list:
    return cluster.core.list_namespaced_pod(ns, label_selector=selector).items


def test_restricted_pods_pass_the_restricted_admission(plane, cluster, tmp_path, alone):
    with restricted_operator(plane, cluster, tmp_path, "restricted") as ns:
        cluster.create(finetune("ft"), ns)
        cluster.create(llmservice("svc"), ns)
        job = wait_for(lambda: cluster.get("FineTune", ns, "ft") if phase(cluster.get("FineTune", ns, "ft"))
                       == "Running" else None, timeout=120, what="the FineTune Running (its Ray pods admitted)")
        ray_job = job["status"]["rayJobName"]
        # KubeRay creates the submitter Job once the cluster is up; the Job controller then creates its pod
        submitter = wait_for(lambda: _pods(cluster, ns, f"job-name={ray_job}"), timeout=60,
                             what="KubeRay's submitter pod, admitted")
        ray_pods = _pods(cluster, ns, "ray.io/node-type")
        heads = [p for p in ray_pods if p.metadata.labels["ray.io/node-type"] == "head"]
        serving_head = wait_for(lambda: [p for p in _pods(cluster, ns, "ray.io/node-type=head")
                                         if any(c.name == "autoscaler" for c in p.spec.containers)],
                                timeout=60, what="the LLMService's head pod with KubeRay's autoscaler, admitted")
        assert len(heads) >= 1 and len(ray_pods) >= 3, [p.metadata.name for p in ray_pods]   # FineTune: 1 + 2
        for pod in [*ray_pods, *submitter, *serving_head]:
            assert pod.spec.security_context.run_as_non_root is True, pod.metadata.name
            assert pod.spec.security_context.seccomp_profile.type == "RuntimeDefault", pod.metadata.name
            for c in [*pod.spec.containers, *(pod.spec.init_containers or [])]:
                assert c.security_context.allow_privilege_escalation is False, (pod.metadata.name, c.name)
                assert c.security_context.capabilities.drop == ["ALL"], (pod.metadata.name, c.name)
