"""The one place that writes to the API server: server-side apply, status apply, events, deletes.

Reconciles read the watch-fed indexes (handlers/informers.py lists and watches through `read` and `stream`), so a
reconcile that finds nothing to change sends no request. Credentials are the ones kopf logs in with (kubeconfig or
in-cluster service account).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import re
import ssl
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from .api import GROUP, KINDS, VERSION

log = logging.getLogger("llmops")

WARNING = re.compile(r'\d{3} \S+ "((?:[^"\\]|\\.)*)"')   # code, agent, "text" (RFC 9111)
WARNINGS_REMEMBERED = 256   # distinct texts logged once each; past that, at debug level

PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Event"): "events",
    ("v1", "Pod"): "pods",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("batch/v1", "Job"): "jobs",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("ray.io/v1", "RayJob"): "rayjobs",
    ("ray.io/v1", "RayService"): "rayservices",
    ("ray.io/v1", "RayCluster"): "rayclusters",
    ("kueue.x-k8s.io/v1beta2", "Workload"): "workloads",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes",
    ("gateway.envoyproxy.io/v1alpha1", "SecurityPolicy"): "securitypolicies",
    **{(f"{GROUP}/{VERSION}", k.kind): k.plural for k in KINDS.values()},
}


@contextmanager
def collector_paused(freeze: bool = False):
    """For work that makes many objects and no cycles (decoding JSON, indexing what it decoded): the cyclic
    collector has nothing to find in it, and walking the heap as it grows costs more than the work (decoding a
    list of 5000 RayJobs took 0.5-1.4 s with it, 0.18 s without). `freeze`: what exists at the end lives long
    (a listing and its index): moved out of the collector's sight for good, so that no later collection walks
    it (it is still freed when no longer referenced)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


# A server-side apply that sets a field the installed CRD lacks: "(namespace/name; group/version, Kind=K): .path: ..."
TYPED_PATCH = re.compile(r"failed to create typed patch object \([^;]*; /?([^,]+), Kind=([^)]+)\): (.+)")


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = ""):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.missing: tuple[str, str] | None = None   # (apiVersion, kind) an apply found not served (404)

    @property
    def outdated_schema(self) -> tuple[str, str, str] | None:
        """(apiVersion, kind, what it lacks) when an apply set a field that the installed CRD does not have (a CRD
        older than the operator). The API server answers 500, but the request fails the same way until the CRD
        changes."""
        found = TYPED_PATCH.search(self.message) if self.status == 500 else None
        return (found.group(1), found.group(2), found.group(3)) if found else None

    @property
    def quota_exceeded(self) -> bool:
        """A ResourceQuota of the namespace refused the object (over it, or not yet counted by the quota
        controller): it may pass once the quota frees, is raised, or has been counted."""
        return self.status == 403 and any(f"{why} quota" in self.message
                                          for why in ("exceeded", "status unknown for", "insufficient"))

    @property
    def not_permitted(self) -> bool:
        """RBAC refused the operator the request: it may pass once its roles grant it."""
        return self.status == 403 and "is forbidden: User " in self.message and " cannot " in self.message

    @property
    def namespace_ending(self) -> bool:
        return self.status == 403 and "being terminated" in self.message

    @property
    def transient(self) -> bool:
        return (self.status in (409, 429) or self.status >= 500) and self.outdated_schema is None


def warnings_of(values: list[str]) -> list[str]:
    """The texts of a response's Warning headers: the API server's notes on deprecated APIs, on names it advises
    against, on unknown fields it dropped from a create or merge patch (a server-side apply fails on those)."""
    return [re.sub(r"\\(.)", r"\1", m.group(1)) for value in values for m in WARNING.finditer(value)]


def path_of(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    plural = PLURALS[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


def pem(data: str | bytes) -> str:
    """A certificate as PEM text: kopf hands over a kubeconfig's certificate-authority-data as it is written there
    (base64 of the PEM), a service account's CA as PEM."""
    text = data.decode("ascii") if isinstance(data, bytes) else data
    return text if text.lstrip().startswith("-----BEGIN ") else base64.b64decode(text).decode("ascii")


@dataclass
class Credentials:
    server: str
    token: str | None = None
    ca_path: str | None = None
    ca_data: bytes | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False


class Kube:
    """Minimal async API client for the operator's writes."""

    def __init__(self, credentials: Credentials, field_manager: str, user_agent: str = "llmops-operator"):
        self.credentials = credentials
        self.field_manager = field_manager
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._streams: aiohttp.ClientSession | None = None
        self.requests_by_verb: dict[str, int] = {}
        self._warned: set[str] = set()

    def _ssl(self) -> ssl.SSLContext | bool:
        c = self.credentials
        if c.insecure:
            return False
        context = ssl.create_default_context(cafile=c.ca_path, cadata=pem(c.ca_data) if c.ca_data else None)
        if c.cert_path and c.key_path:
            context.load_cert_chain(c.cert_path, c.key_path)
        return context

    def _new_session(self, limit: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        headers = {"User-Agent": self.user_agent}
        if self.credentials.token:
            headers["Authorization"] = f"Bearer {self.credentials.token}"
        return aiohttp.ClientSession(base_url=self.credentials.server.rstrip("/"), headers=headers,
                                     connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=limit), timeout=timeout)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self._new_session(32, aiohttp.ClientTimeout(total=30))
        return self._session

    async def close(self) -> None:
        for session in (self._session, self._streams):
            if session is not None:
                await session.close()

    async def read(self, method: str, path: str, params: dict[str, str] | None = None, body: Any = None,
                   keep: bool = False) -> dict[str, Any]:
        """A request that is not one of the operator's writes (lists, the leader lease): not counted in
        `requests_by_verb`; no time limit but the server's, as a large list takes a while. `keep`: the answer
        lives long (see `collector_paused`)."""
        return await self._send(method, path, body, "application/json", params, keep,
                                aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120))

    async def stream(self, path: str, params: dict[str, str], read_timeout: float):
        """A watch: its events as the server sends them, one JSON object a line. Its own connections, so that long
        streams never wait for (or hold) the writes' connections."""
        if self._streams is None or self._streams.closed:
            self._streams = self._new_session(0, aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                                       sock_read=read_timeout))
        async with self._streams.get(path, params=params) as response:
            if response.status >= 400:
                await self._answer(response)
            pending = b""
            async for chunk in response.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)

    @staticmethod
    async def _answer(response: aiohttp.ClientResponse, keep: bool = False) -> dict[str, Any]:
        text = await response.text()
        if response.status >= 400:
            try:
                payload = json.loads(text)
            except ValueError:
                raise ApiError(response.status, text) from None
            raise ApiError(response.status, payload.get("message", text), payload.get("reason", ""))
        with collector_paused(freeze=keep):
            return json.loads(text) if text else {}

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                      params: dict[str, str] | None = None) -> dict[str, Any]:
        self.requests_by_verb[method] = self.requests_by_verb.get(method, 0) + 1
        return await self._send(method, path, body, content_type, params)

    async def _send(self, method: str, path: str, body: Any, content_type: str, params: dict[str, str] | None,
                    keep: bool = False, timeout: aiohttp.ClientTimeout | None = None) -> dict[str, Any]:
        session = await self.session()
        data = None if body is None else json.dumps(body)
        extra = {"timeout": timeout} if timeout is not None else {}   # else the session's
        async with session.request(method, path, data=data, params=params, headers={"Content-Type": content_type},
                                   **extra) as response:
            if "Warning" in response.headers:
                self._warn(method, path, warnings_of(response.headers.getall("Warning")))
            return await self._answer(response, keep)

    def _warn(self, method: str, path: str, texts: list[str]) -> None:
        """Each distinct warning once: a burst of RayJobs would otherwise repeat one a thousand times."""
        for text in texts:
            if text in self._warned:
                continue
            if len(self._warned) >= WARNINGS_REMEMBERED:
                log.debug("the API server warns about %s %s: %s", method, path, text)
                continue
            self._warned.add(text)
            log.warning("the API server warns about %s %s: %s (each warning is logged once)", method, path, text)

    async def apply(self, obj: dict[str, Any], subresource: str = "") -> dict[str, Any]:
        """Server-side apply under the operator's field manager (force: the operator owns its children)."""
        meta = obj["metadata"]
        path = path_of(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if subresource:
            path += f"/{subresource}"
        try:
            return await self.request("PATCH", path, obj, "application/apply-patch+yaml",
                                      {"fieldManager": self.field_manager, "force": "true"})
        except ApiError as e:
            if e.status == 404 and not subresource:   # an apply creates what is absent: the kind is not served
                e.missing = (obj["apiVersion"], obj["kind"])
            raise

    async def apply_status(self, api_version: str, kind: str, namespace: str, name: str,
                           status: dict[str, Any]) -> dict[str, Any]:
        return await self.apply({"apiVersion": api_version, "kind": kind,
                                 "metadata": {"name": name, "namespace": namespace}, "status": status}, "status")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path_of(api_version, kind, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object named `name`, or None: a list narrowed to one name (the operator may list, not get)."""
        listed = await self.request("GET", path_of(api_version, kind, namespace),
                                    params={"fieldSelector": f"metadata.name={name}"})
        items = listed.get("items") or []
        return items[0] if items else None

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        listed = await self.request("GET", path_of(api_version, kind, namespace),
                                    params={"labelSelector": label_selector})
        return listed.get("items") or []

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self.request("POST", path_of(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            await self.request("DELETE", path_of(api_version, kind, namespace, name),
                               {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        except ApiError as e:
            if e.status != 404:
                raise


async def with_retries(call, attempts: int = 4, first_delay: float = 0.2):
    """Retry transient API errors (conflicts, throttling, 5xx, connection drops) with backoff."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return await call()
        except ApiError as e:
            if not e.transient or attempt == attempts - 1:
                raise
        except (aiohttp.ClientError, asyncio.TimeoutError):
            if attempt == attempts - 1:
                raise
        await asyncio.sleep(delay)
        delay *= 2
