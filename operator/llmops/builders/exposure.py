"""LLMService spec.expose -> a Gateway API HTTPRoute to the RayService's serve Service, and the API-key policy.

Pure functions. Secrets appear only by name: neither object carries a key, and the operator never reads one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api.llmservice import Expose
from ..settings import Settings
from .common import Owner, owned

GATEWAY_GROUP = "gateway.networking.k8s.io"
ENVOY_GATEWAY_GROUP = "gateway.envoyproxy.io"
API_KEY_HEADER = "x-api-key"
# The OpenAI API lives under /v1; Serve's own paths (/-/healthz, /-/routes) stay inside the cluster.
EXPOSED_PATH_PREFIX = "/v1"
# How long a discovery reading of an Api holds before it is read again:
PRESENT_SECONDS = 60.0   # an API that was there
ABSENT_SECONDS = 10.0    # one that was missing, sooner: a user waiting on it has just installed it


@dataclass(frozen=True)
class Api:
    """An API the route needs, as discovery names it."""

    group_version: str
    plural: str
    kind: str
    needed_for: str   # the spec field that asks for it
    install_hint: str


HTTP_ROUTE = Api(f"{GATEWAY_GROUP}/v1", "httproutes", "HTTPRoute", "spec.expose",
                 "install the Gateway API CRDs (v1.0 or newer) and a Gateway implementation")
SECURITY_POLICY = Api(f"{ENVOY_GATEWAY_GROUP}/v1alpha1", "securitypolicies", "SecurityPolicy",
                      "spec.expose.apiKey", "install Envoy Gateway, or remove spec.expose.apiKey and enforce the key "
                      "with your Gateway's own policy on the route")


def needed_apis(expose: Expose | None) -> list[Api]:
    if expose is None:
        return []
    return [HTTP_ROUTE, SECURITY_POLICY] if expose.api_key is not None else [HTTP_ROUTE]


def serve_service(ray_service: str) -> str:
    """The Service KubeRay points at the RayService's serving pods (its GenerateServeServiceName), the same one
    across NewCluster upgrades."""
    return f"{ray_service}-serve-svc"


def http_route(owner: Owner, name: str, ray_service: str, port: int, expose: Expose,
               settings: Settings) -> dict[str, Any]:
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": expose.gateway.name}
    if expose.gateway.namespace:
        parent["namespace"] = expose.gateway.namespace
    if expose.gateway.section_name:
        parent["sectionName"] = expose.gateway.section_name
    spec: dict[str, Any] = {"parentRefs": [parent]}
    if expose.hostnames:
        spec["hostnames"] = list(expose.hostnames)
    spec["rules"] = [{
        "matches": [{"path": {"type": "PathPrefix", "value": EXPOSED_PATH_PREFIX}}],
        "backendRefs": [{"group": "", "kind": "Service", "name": serve_service(ray_service), "port": port}],
    }]
    return owned({"apiVersion": HTTP_ROUTE.group_version, "kind": HTTP_ROUTE.kind, "metadata": {"name": name},
                  "spec": spec}, owner, settings)


def api_key_policy(owner: Owner, name: str, expose: Expose, settings: Settings) -> dict[str, Any]:
    """Envoy Gateway's SecurityPolicy on the route: a request passes only with a key from the Secret."""
    assert expose.api_key is not None
    return owned({
        "apiVersion": SECURITY_POLICY.group_version, "kind": SECURITY_POLICY.kind, "metadata": {"name": name},
        "spec": {
            "targetRefs": [{"group": GATEWAY_GROUP, "kind": HTTP_ROUTE.kind, "name": name}],
            "apiKeyAuth": {
                "credentialRefs": [{"group": "", "kind": "Secret", "name": expose.api_key.secret_ref.name}],
                "extractFrom": [{"headers": [API_KEY_HEADER]}],
            },
        },
    }, owner, settings)


def build(owner: Owner, name: str, ray_service: str, port: int, expose: Expose | None,
          settings: Settings) -> list[dict[str, Any]]:
    """The route and, with apiKey, its policy (policy first: the route must never be open while it is missing)."""
    if expose is None:
        return []
    route = http_route(owner, name, ray_service, port, expose, settings)
    if expose.api_key is None:
        return [route]
    return [api_key_policy(owner, name, expose, settings), route]
