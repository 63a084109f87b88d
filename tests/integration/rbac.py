"""Acting as a ServiceAccount in tests: a kubeconfig with a TokenRequest token, SubjectAccessReviews, audit records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kubernetes import client

from integration.harness import Cluster
from llmops.dev.plane import LocalPlane


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    @property
    def groups(self) -> list[str]:
        return ["system:serviceaccounts", f"system:serviceaccounts:{self.namespace}", "system:authenticated"]


def kubeconfig_for(account: ServiceAccount, cluster: Cluster, plane: LocalPlane, path: Path,
                   seconds: int = 3600) -> Path:
    """A kubeconfig for the plane's API server whose user is a bound token of `account` (TokenRequest API),
    as the kubelet would mount it into the operator's pod."""
    token = cluster.core.create_namespaced_service_account_token(
        account.name, account.namespace, {"spec": {"expirationSeconds": seconds}}).status.token
    server = json.loads(plane.kubeconfig.read_text())["clusters"][0]["cluster"]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": account.name,
        "clusters": [{"name": "plane", "cluster": server}],
        "users": [{"name": account.name, "user": {"token": token}}],
        "contexts": [{"name": account.name, "context": {"cluster": "plane", "user": account.name}}],
    }, indent=2))
    path.chmod(0o600)
    return path


def allowed(cluster: Cluster, account: ServiceAccount, verb: str, resource: str, group: str = "",
            namespace: str | None = None, subresource: str = "", name: str = "") -> bool:
    """What the API server's authorizer answers for `account` (SubjectAccessReview)."""
    attributes = client.V1ResourceAttributes(verb=verb, resource=resource, group=group, namespace=namespace,
                                             subresource=subresource or None, name=name or None)
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=account.user, groups=account.groups, resource_attributes=attributes))
    return bool(cluster.auth.create_subject_access_review(review).status.allowed)


def audit_records(plane: LocalPlane, account: ServiceAccount) -> Iterator[dict[str, Any]]:
    """The plane's audit log (level Metadata) entries for requests made as `account`."""
    with open(plane.logs / "audit.log") as log:
        for line in log:
            record = json.loads(line)
            if record.get("user", {}).get("username") == account.user:
                yield record
