"""Least rights for the Ray pods: the ServiceAccount a job's pods run as may get and patch its own result
ConfigMap, and nothing else. Proven three ways, for a FineTune's and a BatchInference's account:

* SubjectAccessReview (the authorizer's answer) over a matrix of verbs and resources;
* real requests with a token from the TokenRequest API (as the kubelet would mount it), through the kubernetes
  client: the allowed ones succeed, every other one is refused with 403;
* SelfSubjectRulesReview with that token: apart from the self-review rules every account has, exactly one rule
  (configmaps, get+patch, its own result ConfigMap) is left.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from integration.rbac import ServiceAccount, allowed, kubeconfig_for
from manifests import batchinference, finetune
from reliability.support import wait_until

pytestmark = pytest.mark.integration

SELF_REVIEW_GROUPS = {"authorization.k8s.io", "authentication.k8s.io"}


def status_of(call: Callable[[], Any]) -> int:
    try:
        call()
        return 200
    except ApiException as e:
        return e.status


def as_account(cluster, plane, account: ServiceAccount, path) -> client.ApiClient:
    return config.new_client_from_config(str(kubeconfig_for(account, cluster, plane, path, seconds=600)))


def checks_for(api: client.ApiClient, ns: str, other_ns: str, own: str, own_config: str, own_job: str,
               other_result: str) -> tuple[dict[str, Callable], dict[str, Callable]]:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    allowed_calls = {
        "get own result ConfigMap": lambda: core.read_namespaced_config_map(own, ns),
        "patch own result ConfigMap": lambda: core.patch_namespaced_config_map(own, ns, {"data": {"probe": "1"}}),
    }
    denied_calls = {
        "replace (PUT) own result ConfigMap": lambda: core.replace_namespaced_config_map(
            own, ns, {"metadata": {"name": own}, "data": {"x": "y"}}),
        "delete own result ConfigMap": lambda: core.delete_namespaced_config_map(own, ns),
        "get own job ConfigMap": lambda: core.read_namespaced_config_map(own_config, ns),
        "get another job's result ConfigMap": lambda: core.read_namespaced_config_map(other_result, ns),
        "patch another job's result ConfigMap": lambda: core.patch_namespaced_config_map(
            other_result, ns, {"data": {"state": "Succeeded"}}),
        "get the planted Secret": lambda: core.read_namespaced_secret("hf-token", ns),
        "list Secrets": lambda: core.list_namespaced_secret(ns),
        "list ConfigMaps": lambda: core.list_namespaced_config_map(ns),
        "watch ConfigMaps": lambda: core.list_namespaced_config_map(ns, watch=True, timeout_seconds=1),
        "list ConfigMaps in another namespace": lambda: core.list_namespaced_config_map(other_ns),
        "create a ConfigMap": lambda: core.create_namespaced_config_map(ns, {"metadata": {"name": "sneaky"}}),
        "list Pods": lambda: core.list_namespaced_pod(ns),
        "create a Pod": lambda: core.create_namespaced_pod(ns, {"metadata": {"name": "sneaky"}, "spec": {
            "containers": [{"name": "c", "image": "busybox"}]}}),
        "list Events": lambda: core.list_namespaced_event(ns),
        "list Namespaces": lambda: core.list_namespace(),
        "get own ServiceAccount": lambda: core.read_namespaced_service_account(own_job + "-ray", ns),
        "request a token for another account": lambda: core.create_namespaced_service_account_token(
            "default", ns, {"spec": {"expirationSeconds": 600}}),
        "get own RayJob": lambda: custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", own_job),
        "patch own RayJob": lambda: custom.patch_namespaced_custom_object(
            "ray.io", "v1", ns, "rayjobs", own_job, {"spec": {"suspend": True}}),
        "list RayJobs": lambda: custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayjobs"),
        "list FineTunes": lambda: custom.list_namespaced_custom_object("llmops.dev", "v1alpha1", ns, "finetunes"),
        "patch a FineTune's status": lambda: custom.patch_namespaced_custom_object_status(
            "llmops.dev", "v1alpha1", ns, "finetunes", "rights", {"status": {"phase": "Succeeded"}}),
        "list Roles": lambda: client.RbacAuthorizationV1Api(api).list_namespaced_role(ns),
    }
    return allowed_calls, denied_calls


# (verb, resource, group, name or "") the authorizer must refuse; own result get/patch it must allow
SAR_DENIED = [("update", "configmaps", "", "{own}"), ("delete", "configmaps", "", "{own}"),
              ("get", "configmaps", "", "{config}"), ("get", "configmaps", "", "{other}"),
              ("patch", "configmaps", "", "{other}"), ("list", "configmaps", "", ""), ("watch", "configmaps", "", ""),
              ("create", "configmaps", "", ""), ("get", "secrets", "", "hf-token"), ("list", "secrets", "", ""),
              ("list", "pods", "", ""), ("create", "pods", "", ""), ("create", "pods/exec", "", ""),
              ("get", "rayjobs", "ray.io", "{job}"), ("patch", "rayjobs", "ray.io", "{job}"),
              ("list", "finetunes", "llmops.dev", ""), ("patch", "finetunes/status", "llmops.dev", "rights"),
              ("create", "serviceaccounts/token", "", "default"),
              ("escalate", "roles", "rbac.authorization.k8s.io", ""),
              ("bind", "clusterroles", "rbac.authorization.k8s.io", ""), ("impersonate", "users", "", ""),
              ("list", "namespaces", "", "")]


def test_job_accounts_may_only_get_and_patch_their_own_result(plane, cluster, ns, operators, tmp_path, record):
    operators.start(ns, name="operator")
    other_ns = cluster.namespace("rel-other")
    cluster.core.create_namespaced_secret(ns, {"metadata": {"name": "hf-token"}, "stringData": {"token": "hf_x"}})
    cluster.create(finetune("rights"), ns)
    cluster.create(batchinference("judge"), ns)
    jobs = {"rights": ("rights-ft", "judge-bi"), "judge": ("judge-bi", "rights-ft")}
    sar_checks = real_checks = 0
    problems: list[str] = []
    for owner, (prefix, other_prefix) in jobs.items():
        account = ServiceAccount(ns, f"{prefix}-ray")
        own, config_map, other = f"{prefix}-result", f"{prefix}-config", f"{other_prefix}-result"
        ok, _ = wait_until(lambda: allowed(cluster, account, "patch", "configmaps", namespace=ns, name=own)
                           and cluster.ray("rayjobs", ns, prefix), timeout=90)
        assert ok, f"{account.name}'s Role never bound"
        wait_until(lambda: allowed(cluster, ServiceAccount(ns, f"{other_prefix}-ray"), "get", "configmaps",
                                   namespace=ns, name=other), timeout=90)

        # The authorizer.
        for verb in ("get", "patch"):
            sar_checks += 1
            if not allowed(cluster, account, verb, "configmaps", namespace=ns, name=own):
                problems.append(f"SAR: {account.name} may not {verb} its own result ConfigMap")
        for verb, resource, group, name in SAR_DENIED:
            sar_checks += 1
            resource, sub = (resource.split("/") + [""])[:2]
            name = name.format(own=own, config=config_map, other=other, job=prefix)
            if allowed(cluster, account, verb, resource, group=group, namespace=ns, subresource=sub, name=name):
                problems.append(f"SAR: {account.name} may {verb} {resource}{'/' + sub if sub else ''} {name}")

        # Real requests with a bound token.
        api = as_account(cluster, plane, account, tmp_path / f"{owner}.kubeconfig")
        allowed_calls, denied_calls = checks_for(api, ns, other_ns, own, config_map, prefix, other)
        for what, call in allowed_calls.items():
            real_checks += 1
            if (code := status_of(call)) != 200:
                problems.append(f"real: {account.name} could not {what} (HTTP {code})")
        for what, call in denied_calls.items():
            real_checks += 1
            if (code := status_of(call)) != 403:
                problems.append(f"real: {account.name} {what}: HTTP {code}, want 403")

        # Everything the account may do in the namespace, as the API server lists it.
        review = client.AuthorizationV1Api(api).create_self_subject_rules_review(
            client.V1SelfSubjectRulesReview(spec=client.V1SelfSubjectRulesReviewSpec(namespace=ns)))
        rules = [r for r in review.status.resource_rules
                 if not set(r.api_groups or []) <= SELF_REVIEW_GROUPS or not r.api_groups]
        wanted = [(["configmaps"], [own], {"get", "patch"})]
        got = [(sorted(r.resources or []), sorted(r.resource_names or []), set(r.verbs)) for r in rules]
        real_checks += 1
        if got != wanted:
            problems.append(f"rules review: {account.name} may {got}, want exactly {wanted}")

    cluster.core.delete_namespace(other_ns)
    record(accounts=len(jobs), sar_checks=sar_checks, real_request_checks=real_checks, violations=len(problems))
    assert not problems, "\n".join(problems)
