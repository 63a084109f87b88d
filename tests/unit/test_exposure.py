"""LLMService spec.expose: the HTTPRoute and API-key policy it renders, and what the reconcile decides when the APIs
they need are there or not (discovery read through a fake API client)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from llmops.builders import llmservice as builder
from llmops.builders.common import BuildContext, Owner
from llmops.builders.exposure import HTTP_ROUTE, SECURITY_POLICY
from llmops.decide import llmservice as decider
from llmops.handlers import observe
from llmops.handlers.discovery import Discovery
from llmops.handlers.engine import Engine
from llmops.handlers.ordering import apply_rounds
from llmops.kube import ApiError
from llmops.settings import Settings

SECRET_VALUE = "sk-do-not-leak"   # what a Secret would hold; the spec only ever names the Secret
EXPOSE = {"gateway": {"name": "llm-gateway", "namespace": "gateways", "sectionName": "https"},
          "hostnames": ["llm.example.com"]}
WITH_KEY = {**EXPOSE, "apiKey": {"secretRef": {"name": "llm-api-keys"}}}
GATEWAY_DOC = {"resources": [{"name": "httproutes"}, {"name": "httproutes/status"}, {"name": "gateways"}]}
ENVOY_DOC = {"resources": [{"name": "securitypolicies"}, {"name": "securitypolicies/status"}]}


class FakeKube:
    """Answers discovery reads from `documents` (group/version -> document; absent: 404) and counts them."""

    def __init__(self, documents: dict[str, dict[str, Any]]):
        self.documents = documents
        self.reads: list[str] = []

    async def request(self, method: str, path: str, *_: Any, **__: Any) -> dict[str, Any]:
        assert method == "GET" and path.startswith("/apis/"), (method, path)
        self.reads.append(path)
        group_version = path[len("/apis/"):]
        if group_version not in self.documents:
            raise ApiError(404, "the server could not find the requested resource", "NotFound")
        return self.documents[group_version]


def body(expose: dict | None = None, status: dict | None = None, **spec: Any) -> dict[str, Any]:
    full = {"modelId": "ft-model", "model": {"source": "Qwen/Qwen2.5-7B-Instruct"}, **spec}
    if expose is not None:
        full["expose"] = expose
    return {"apiVersion": "llmops.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "svc", "namespace": "team", "uid": "uid-1", "generation": 1},
            "spec": full, "status": status or {}}


def decide(obj: dict[str, Any], documents: dict[str, dict]) -> tuple[Any, FakeKube]:
    kube = FakeKube(documents)
    engine = Engine(kube, BuildContext(settings=Settings(), payloads={}))   # type: ignore[arg-type]
    asyncio.run(observe.prepare_llmservice(engine, obj))
    return decider.decide(observe.llmservice(engine, obj), engine.ctx), kube


def kinds(outcome) -> list[str]:
    return [c["kind"] for c in outcome.children]


BOTH = {HTTP_ROUTE.group_version: GATEWAY_DOC, SECURITY_POLICY.group_version: ENVOY_DOC}


# ---- what is rendered --------------------------------------------------------------------------------------
def test_route_points_at_the_serve_service_kuberay_creates():
    outcome, _ = decide(body(EXPOSE), BOTH)
    route = next(c for c in outcome.children if c["kind"] == "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["metadata"]["name"] == "svc-llm"
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "llm-gateway", "namespace": "gateways", "sectionName": "https"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    [rule] = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": "svc-llm-serve-svc", "port": 8000}]
    # the same Service and port as the in-cluster endpoint in status
    assert outcome.verdict.fields.endpoint.startswith("http://svc-llm-serve-svc.team.svc.")
    assert ":8000/v1" in outcome.verdict.fields.endpoint
    ref = route["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("LLMService", "uid-1", True)


def test_gateway_in_the_same_namespace_and_every_listener_by_default():
    outcome, _ = decide(body({"gateway": {"name": "gw"}}), BOTH)
    route = next(c for c in outcome.children if c["kind"] == "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}]
    assert "hostnames" not in route["spec"]
    assert kinds(outcome) == ["HTTPRoute", "RayService"]   # no key asked for: no policy
    assert outcome.verdict.fields.route_name == "svc-llm" and outcome.verdict.fields.api_key_policy_name is None


def test_api_key_policy_names_the_secret_and_carries_no_value():
    outcome, _ = decide(body(WITH_KEY), BOTH)
    assert kinds(outcome) == ["SecurityPolicy", "HTTPRoute", "RayService"]
    policy = outcome.children[0]
    assert policy["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"
    assert policy["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                             "name": "svc-llm"}]
    assert policy["spec"]["apiKeyAuth"] == {
        "credentialRefs": [{"group": "", "kind": "Secret", "name": "llm-api-keys"}],
        "extractFrom": [{"headers": ["x-api-key"]}]}
    text = json.dumps(outcome.children)
    assert SECRET_VALUE not in text and "stringData" not in text and '"data"' not in text
    assert outcome.verdict.fields.api_key_policy_name == "svc-llm"
    # every status field written is one the CRD's status schema declares (server-side apply refuses others)
    status = outcome.verdict.fields
    assert (status.route_name, status.api_key_policy_name, status.routing) == ("svc-llm", "svc-llm", "default")


def test_the_policy_is_written_before_the_route_it_guards():
    outcome, _ = decide(body(WITH_KEY), BOTH)
    rounds = [[c["kind"] for c in r] for r in apply_rounds(outcome.children, "RayService")]
    assert rounds == [["SecurityPolicy"], ["HTTPRoute"], ["RayService"]]


def test_without_expose_nothing_is_exposed_and_no_api_is_looked_up():
    outcome, kube = decide(body(), {})
    assert kinds(outcome) == ["RayService"] and kube.reads == []
    assert outcome.delete == [] and outcome.verdict.fields.route_name is None


def test_render_without_a_cluster_shows_the_route():
    """`llmops render` has no API server to ask: it shows what the operator writes once the APIs exist."""
    from llmops.builders.serving import resolve_adapters
    from llmops.api.llmservice import LLMServiceSpec
    obj = body(WITH_KEY)
    spec = LLMServiceSpec.model_validate(obj["spec"])
    children = builder.build(Owner.of(obj), spec, BuildContext(settings=Settings(), payloads={}),
                             resolve_adapters(spec, {}, {}))
    assert [c["kind"] for c in children] == ["SecurityPolicy", "HTTPRoute", "RayService"]


# ---- missing APIs ------------------------------------------------------------------------------------------
def test_without_the_gateway_api_the_service_still_serves_but_is_stalled():
    outcome, _ = decide(body(EXPOSE), {})
    assert kinds(outcome) == ["RayService"]
    v = outcome.verdict
    assert (v.phase, v.state, v.reason) == ("Pending", "stalled", "GatewayAPIMissing")
    assert "spec.expose needs HTTPRoute (gateway.networking.k8s.io/v1)" in v.message
    assert "install the Gateway API CRDs" in v.message
    assert outcome.requeue_after is not None   # looks again: CRDs installed later are picked up
    assert v.fields.route_name is None


def test_an_api_key_without_its_policy_api_exposes_nothing():
    """Fail closed: the Gateway API is there, Envoy Gateway is not, so no open route is written."""
    outcome, _ = decide(body(WITH_KEY), {HTTP_ROUTE.group_version: GATEWAY_DOC})
    assert kinds(outcome) == ["RayService"]
    v = outcome.verdict
    assert (v.state, v.reason) == ("stalled", "ApiKeyPolicyMissing")
    assert "spec.expose.apiKey needs SecurityPolicy (gateway.envoyproxy.io/v1alpha1)" in v.message


def test_an_open_route_is_removed_when_a_key_is_asked_for_that_cannot_be_checked():
    outcome, _ = decide(body(WITH_KEY, status={"routeName": "svc-llm"}), {HTTP_ROUTE.group_version: GATEWAY_DOC})
    assert outcome.delete == [("gateway.networking.k8s.io/v1", "HTTPRoute", "svc-llm")]


def test_a_group_without_the_resource_counts_as_missing():
    outcome, _ = decide(body(EXPOSE), {HTTP_ROUTE.group_version: {"resources": [{"name": "gateways"}]}})
    assert outcome.verdict.reason == "GatewayAPIMissing"


# ---- removal -------------------------------------------------------------------------------------------------
def test_dropping_expose_deletes_the_route_then_its_policy():
    outcome, _ = decide(body(status={"routeName": "svc-llm", "apiKeyPolicyName": "svc-llm"}), BOTH)
    assert outcome.delete == [("gateway.networking.k8s.io/v1", "HTTPRoute", "svc-llm"),
                              ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy", "svc-llm")]
    assert kinds(outcome) == ["RayService"]


def test_dropping_the_key_keeps_the_route_and_deletes_the_policy():
    outcome, _ = decide(body(EXPOSE, status={"routeName": "svc-llm", "apiKeyPolicyName": "svc-llm"}), BOTH)
    assert outcome.delete == [("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy", "svc-llm")]
    assert kinds(outcome) == ["HTTPRoute", "RayService"]


def test_suspending_removes_the_exposure_with_the_ray_service():
    outcome, _ = decide(body(WITH_KEY, status={"routeName": "svc-llm", "apiKeyPolicyName": "svc-llm"},
                             suspend=True), BOTH)
    assert outcome.delete == [("gateway.networking.k8s.io/v1", "HTTPRoute", "svc-llm"),
                              ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy", "svc-llm"),
                              ("ray.io/v1", "RayService", "svc-llm")]
    assert outcome.verdict.fields.route_name is None


# ---- discovery -----------------------------------------------------------------------------------------------
def test_discovery_reads_each_group_once_until_stale(monkeypatch):
    kube = FakeKube({HTTP_ROUTE.group_version: GATEWAY_DOC})
    discovery = Discovery(kube)   # type: ignore[arg-type]
    clock = [1000.0]
    monkeypatch.setattr("llmops.handlers.discovery.time.monotonic", lambda: clock[0])
    asyncio.run(discovery.refresh([HTTP_ROUTE, SECURITY_POLICY]))
    assert discovery.served(HTTP_ROUTE) and not discovery.served(SECURITY_POLICY)
    assert sorted(kube.reads) == ["/apis/gateway.envoyproxy.io/v1alpha1", "/apis/gateway.networking.k8s.io/v1"]
    clock[0] += 5
    asyncio.run(discovery.refresh([HTTP_ROUTE, SECURITY_POLICY]))
    assert len(kube.reads) == 2          # both fresh
    clock[0] += 10
    kube.documents[SECURITY_POLICY.group_version] = ENVOY_DOC   # Envoy Gateway installed meanwhile
    asyncio.run(discovery.refresh([HTTP_ROUTE, SECURITY_POLICY]))
    assert kube.reads[2:] == ["/apis/gateway.envoyproxy.io/v1alpha1"]   # only the missing one was stale
    assert discovery.served(SECURITY_POLICY)


def test_discovery_passes_on_errors_other_than_not_found():
    class Forbidden(FakeKube):
        async def request(self, *_: Any, **__: Any) -> dict[str, Any]:
            raise ApiError(403, "forbidden", "Forbidden")
    with pytest.raises(ApiError):
        asyncio.run(Discovery(Forbidden({})).refresh([HTTP_ROUTE]))   # type: ignore[arg-type]



def test_invalidating_makes_the_next_refresh_read_again():
    kube = FakeKube({HTTP_ROUTE.group_version: GATEWAY_DOC})
    discovery = Discovery(kube)   # type: ignore[arg-type]
    assert not discovery.invalidate()   # nothing read yet: nothing to forget
    asyncio.run(discovery.refresh([HTTP_ROUTE]))
    del kube.documents[HTTP_ROUTE.group_version]   # the CRDs were deleted
    assert discovery.invalidate()
    asyncio.run(discovery.refresh([HTTP_ROUTE]))
    assert len(kube.reads) == 2 and not discovery.served(HTTP_ROUTE)
