"""LLMService spec.expose on the real plane: the HTTPRoute to KubeRay's serve Service and Envoy Gateway's API-key
SecurityPolicy (their real CRDs, installed by the plane; no Gateway controller runs, so routes are stored, not
served), their clean-up, and the statuses while those CRDs are missing."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from integration.harness import condition, stalled_as, wait_for
from llmops.dev.plane import ENVOY_GATEWAY_CRDS, GATEWAY_API_CRDS
from manifests import llmservice

pytestmark = pytest.mark.integration

ROUTES = ("gateway.networking.k8s.io", "v1", "httproutes")
POLICIES = ("gateway.envoyproxy.io", "v1alpha1", "securitypolicies")
KEY_VALUE = "sk-llmops-test-7f3a"   # the Secret's value: must never appear in what the operator writes
EXPOSE = {"gateway": {"name": "llm-gateway", "namespace": "gateways", "sectionName": "https"},
          "hostnames": ["llm.example.com"]}


def _exposed(name: str, expose: dict) -> dict:
    doc = llmservice(name)
    doc["spec"]["expose"] = expose
    return doc


def _get(cluster, api, ns, name):
    try:
        return cluster.custom.get_namespaced_custom_object(*api[:2], ns, api[2], name)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def _status(cluster, ns, name):
    return (cluster.get("LLMService", ns, name) or {}).get("status") or {}


@pytest.fixture()
def api_keys(cluster, ns):
    cluster.core.create_namespaced_secret(ns, {"metadata": {"name": "llm-api-keys"},
                                               "stringData": {"client-a": KEY_VALUE}})
    return "llm-api-keys"


def test_route_and_key_policy_point_at_the_serve_service_and_go_with_the_service(cluster, operator, ns, api_keys):
    cluster.create(_exposed("pub", {**EXPOSE, "apiKey": {"secretRef": {"name": api_keys}}}), ns)
    route = wait_for(lambda: _get(cluster, ROUTES, ns, "pub-llm"), what="the HTTPRoute")
    policy = _get(cluster, POLICIES, ns, "pub-llm")
    assert policy is not None   # written before the route
    owner = cluster.get("LLMService", ns, "pub")
    for obj in (route, policy):
        [ref] = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("LLMService", "pub",
                                                                            owner["metadata"]["uid"], True)
    # Attached to the Gateway the spec names, sent to the Service KubeRay names <RayService>-serve-svc, port 8000.
    ray_service = wait_for(lambda: cluster.ray("rayservices", ns, "pub-llm"), what="the RayService")
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "llm-gateway", "namespace": "gateways", "sectionName": "https"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    [rule] = route["spec"]["rules"]
    [backend] = rule["backendRefs"]
    assert (backend["kind"], backend["name"], backend["port"]) == (
        "Service", f"{ray_service['metadata']['name']}-serve-svc", 8000)
    assert rule["matches"][0]["path"] == {"type": "PathPrefix", "value": "/v1"}
    status = wait_for(lambda: (lambda s: s if s.get("routeName") else None)(_status(cluster, ns, "pub")),
                      what="status.routeName")
    assert status["endpoint"].startswith(f"http://{backend['name']}.{ns}.svc.") and ":8000/v1" in status["endpoint"]
    assert (status["routeName"], status["apiKeyPolicyName"]) == ("pub-llm", "pub-llm")
    assert status["routing"] == "default"   # one replica
    # The key is checked from the Secret by reference: no value in the route, the policy or the status.
    assert policy["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                             "name": "pub-llm"}]
    assert policy["spec"]["apiKeyAuth"]["credentialRefs"][0]["name"] == api_keys
    for text in (json.dumps(route), json.dumps(policy), json.dumps(cluster.get("LLMService", ns, "pub"))):
        assert KEY_VALUE not in text

    cluster.delete("LLMService", ns, "pub")   # the garbage collector removes what the service owned
    wait_for(lambda: _get(cluster, ROUTES, ns, "pub-llm") is None and _get(cluster, POLICIES, ns, "pub-llm") is None,
             timeout=60, what="the route and policy to go with the LLMService")


def test_routes_only_when_asked_and_removed_when_expose_is_dropped(cluster, operator, ns):
    cluster.create(llmservice("inside"), ns)
    wait_for(lambda: cluster.ray("rayservices", ns, "inside-llm"), what="the RayService")
    cluster.create(_exposed("outside", EXPOSE), ns)
    wait_for(lambda: _get(cluster, ROUTES, ns, "outside-llm"), what="the exposed service's route")
    routes = cluster.custom.list_namespaced_custom_object(*ROUTES[:2], ns, ROUTES[2])["items"]
    assert [r["metadata"]["name"] for r in routes] == ["outside-llm"]   # none for the service that did not ask
    assert _get(cluster, POLICIES, ns, "outside-llm") is None            # no key asked for: no policy
    assert "routeName" not in _status(cluster, ns, "inside")

    cluster.patch("LLMService", ns, "outside", {"spec": {"expose": None}})
    wait_for(lambda: _get(cluster, ROUTES, ns, "outside-llm") is None, what="the route to be deleted")
    wait_for(lambda: "routeName" not in _status(cluster, ns, "outside"), what="status.routeName to go")
    assert cluster.ray("rayservices", ns, "outside-llm") is not None   # still served inside the cluster


def _remove_crds(plane, names):
    plane.kubectl("delete", "crd", *names, "--wait=true", quiet=True)


def test_missing_gateway_api_is_stalled_then_picked_up_once_installed(plane, cluster, operator, ns):
    _remove_crds(plane, GATEWAY_API_CRDS)
    try:
        cluster.create(_exposed("early", EXPOSE), ns)
        svc = stalled_as(cluster, "LLMService", ns, "early", "GatewayAPIMissing")
        message = condition(svc, "Stalled")["message"]
        assert "spec.expose needs HTTPRoute (gateway.networking.k8s.io/v1)" in message
        assert "install the Gateway API CRDs" in message
        assert condition(svc, "Ready")["status"] == "False" and svc["status"]["phase"] == "Pending"
        assert cluster.ray("rayservices", ns, "early-llm") is not None   # serving in the cluster goes on
        assert "routeName" not in svc["status"]
    finally:
        plane.install_gateway_api()
    wait_for(lambda: _get(cluster, ROUTES, ns, "early-llm"), timeout=60, what="the route once the CRDs are back")
    wait_for(lambda: condition(cluster.get("LLMService", ns, "early"), "Stalled").get("status") == "False",
             timeout=30, what="Stalled to clear")


def test_an_api_key_without_envoy_gateway_exposes_nothing(plane, cluster, operator, ns, api_keys):
    """Fail closed: the Gateway API is there but nothing could check the key, so no route is written, and an open
    route written before the key was asked for is removed."""
    cluster.create(_exposed("keyed", EXPOSE), ns)
    wait_for(lambda: _get(cluster, ROUTES, ns, "keyed-llm"), what="the open route")
    _remove_crds(plane, ENVOY_GATEWAY_CRDS)
    try:
        cluster.patch("LLMService", ns, "keyed", {"spec": {"expose": {"apiKey": {"secretRef": {"name": api_keys}}}}})
        svc = stalled_as(cluster, "LLMService", ns, "keyed", "ApiKeyPolicyMissing")
        assert "spec.expose.apiKey needs SecurityPolicy (gateway.envoyproxy.io/v1alpha1)" in \
            condition(svc, "Stalled")["message"]
        wait_for(lambda: _get(cluster, ROUTES, ns, "keyed-llm") is None, what="the open route to be removed")
    finally:
        plane.install_gateway_api()
    wait_for(lambda: _get(cluster, ROUTES, ns, "keyed-llm") and _get(cluster, POLICIES, ns, "keyed-llm"),
             timeout=60, what="route and policy once Envoy Gateway's CRD is back")
