"""Report a payload's state and results to the operator through one ConfigMap.

The operator creates the ConfigMap, names it in ``LLMOPS_RESULT_CONFIGMAP`` and grants the pod's service account
get/patch on that object only. This module sends JSON merge patches of its ``data`` with the standard library
(no kubernetes client in the Ray image), authenticating with the pod's service-account token and CA.

Test seam: ``LLMOPS_KUBE_API_URL`` (e.g. ``http://127.0.0.1:8080``), ``LLMOPS_SA_TOKEN_PATH`` and
``LLMOPS_SA_CA_PATH`` (or the matching ``ResultReporter`` arguments) point it at a local server.
Without ``LLMOPS_RESULT_CONFIGMAP`` the reporter only logs, so a payload can run outside Kubernetes;
``LLMOPS_RESULT_FILE`` then names a JSON file that receives the same merge patches as the ConfigMap's ``data``
would (runs without an API server, such as the GPU data-plane benchmark, read their results from it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

logger = logging.getLogger("llmops.payloads.report")

CONFIGMAP_ENV = "LLMOPS_RESULT_CONFIGMAP"
NAMESPACE_ENV = "LLMOPS_NAMESPACE"
API_URL_ENV = "LLMOPS_KUBE_API_URL"
TOKEN_PATH_ENV = "LLMOPS_SA_TOKEN_PATH"
CA_PATH_ENV = "LLMOPS_SA_CA_PATH"
RESULT_FILE_ENV = "LLMOPS_RESULT_FILE"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

RUNNING, SUCCEEDED, FAILED = "Running", "Succeeded", "Failed"
STATES = (RUNNING, SUCCEEDED, FAILED)
KEYS = ("state", "message", "progress", "metrics", "outputURI", "reportedAt", "adapter")
MAX_MESSAGE_CHARS = 2000

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|API_KEY|ACCESS_KEY", re.I)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.I)
_SECRET_QUERY = re.compile(
    r"([?&](?:x-amz-[a-z-]+|x-goog-[a-z-]+|signature|sig|token|access_token|api_key|key|credential)=)[^&\s'\"]+",
    re.I,
)
_BEARER = re.compile(r"(\bbearer\s+)[A-Za-z0-9._~+/=-]+", re.I)
REDACTED = "[REDACTED]"


PROGRESS_INTERVAL_ENV, DEFAULT_PROGRESS_INTERVAL_S = "LLMOPS_PROGRESS_INTERVAL_S", 30.0


def interval_from(env: Optional[Mapping[str, str]] = None) -> float:
    """Seconds between a long job's progress reports."""
    env = os.environ if env is None else env
    return float(env.get(PROGRESS_INTERVAL_ENV) or DEFAULT_PROGRESS_INTERVAL_S)


class ReportError(RuntimeError):
    """The report could not be delivered (after retries, for transient errors)."""


def redact(text: str, secrets: Iterable[str] = (), env: Optional[Mapping[str, str]] = None) -> str:
    """Remove credentials from text that is about to leave the pod.

    Drops the values of secret-looking environment variables and of ``secrets``, URL user-info, signed-URL
    query parameters and bearer tokens.
    """
    env = os.environ if env is None else env
    values = [v for k, v in env.items() if _SECRET_ENV_NAME.search(k) and v and len(v) >= 6]
    values += [s for s in secrets if s and len(s) >= 6]
    for value in sorted(set(values), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    return _BEARER.sub(rf"\1{REDACTED}", text)


def rfc3339_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_patch(
    fields: Mapping[str, Any], reported_at: str, secrets: Iterable[str] = (), env: Optional[Mapping[str, str]] = None
) -> Dict[str, Any]:
    """The merge-patch body for ``fields``: every value becomes a string (JSON for objects), None deletes the key.

    Raises ValueError for a key outside the contract or an unknown state.
    """
    unknown = set(fields) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown result keys {sorted(unknown)}; allowed: {', '.join(KEYS)}")
    if fields.get("state") is not None and fields["state"] not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {fields['state']!r}")
    secrets = list(secrets)
    data: Dict[str, Optional[str]] = {}
    for key, value in {**fields, "reportedAt": reported_at}.items():
        if value is None:
            data[key] = None
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
        text = redact(text, secrets, env)
        if key == "message" and len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 3] + "..."
        data[key] = text
    return {"data": data}


def merge_into_file(path: str, data: Mapping[str, Optional[str]]) -> None:
    """Apply ``data`` to the JSON object in ``path`` as a merge patch applies to a ConfigMap's data (None deletes
    a key); written to a temporary file and renamed, so a reader never sees half a report."""
    try:
        with open(path, encoding="utf-8") as handle:
            current = json.load(handle)
    except FileNotFoundError:
        current = {}
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read the result file {path}: {exc}") from exc
    for key, value in data.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(current, handle, sort_keys=True, indent=1)
        os.replace(temporary, path)
    except OSError as exc:
        raise ReportError(f"cannot write the result file {path}: {exc}") from exc


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


@dataclass
class ResultReporter:
    """Patches ``data`` of one ConfigMap. ``configmap=None`` means no API server: log only, or merge into
    ``result_file`` when one is named."""

    configmap: Optional[str]
    namespace: Optional[str] = None
    api_url: Optional[str] = None
    token_path: str = f"{SERVICE_ACCOUNT_DIR}/token"
    ca_path: Optional[str] = f"{SERVICE_ACCOUNT_DIR}/ca.crt"
    attempts: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 10.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    result_file: Optional[str] = None

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides: Any) -> "ResultReporter":
        env = os.environ if env is None else env
        api_url = env.get(API_URL_ENV)
        if not api_url and env.get("KUBERNETES_SERVICE_HOST"):
            host = env["KUBERNETES_SERVICE_HOST"]
            host = f"[{host}]" if ":" in host else host
            api_url = f"https://{host}:{env.get('KUBERNETES_SERVICE_PORT', '443')}"
        namespace = env.get(NAMESPACE_ENV)
        if not namespace:
            try:
                namespace = _read(f"{SERVICE_ACCOUNT_DIR}/namespace")
            except OSError:
                namespace = None
        settings: Dict[str, Any] = dict(
            configmap=env.get(CONFIGMAP_ENV) or None,
            namespace=namespace,
            api_url=api_url,
            token_path=env.get(TOKEN_PATH_ENV) or f"{SERVICE_ACCOUNT_DIR}/token",
            ca_path=env.get(CA_PATH_ENV) or f"{SERVICE_ACCOUNT_DIR}/ca.crt",
            result_file=env.get(RESULT_FILE_ENV) or None,
        )
        settings.update(overrides)
        return cls(**settings)

    def report(self, **fields: Any) -> Dict[str, Any]:
        """Send ``fields`` (keys from KEYS; ``outputURI`` spelled as in the ConfigMap). Returns the patch sent.

        Raises ReportError when the API server cannot be reached or refuses the patch.
        """
        token = None
        if self.configmap:
            try:
                token = _read(self.token_path)
            except OSError as exc:
                raise ReportError(
                    f"cannot read the service-account token at {self.token_path}: {exc.strerror}"
                ) from exc
        body = build_patch(fields, rfc3339_now(), secrets=[token] if token else [])
        logger.info("result report: %s", json.dumps(body["data"], sort_keys=True))
        if self.configmap:
            self._send(body, token)
        elif self.result_file:
            merge_into_file(self.result_file, body["data"])
        return body

    def running(self, message: str, progress: Optional[Mapping[str, int]] = None, **extra: Any) -> Dict[str, Any]:
        return self.report(state=RUNNING, message=message, progress=progress, **extra)

    def succeeded(self, message: str, **extra: Any) -> Dict[str, Any]:
        return self.report(state=SUCCEEDED, message=message, **extra)

    def failed(self, message: str, **extra: Any) -> Dict[str, Any]:
        return self.report(state=FAILED, message=message, **extra)

    def _url(self) -> str:
        if not self.api_url:
            raise ReportError(f"no API server address: set KUBERNETES_SERVICE_HOST or {API_URL_ENV}")
        if not self.namespace:
            raise ReportError(f"no namespace: set {NAMESPACE_ENV} or mount the service-account namespace file")
        quote = urllib.parse.quote
        return (
            f"{self.api_url.rstrip('/')}/api/v1/namespaces/{quote(self.namespace, safe='')}"
            f"/configmaps/{quote(self.configmap or '', safe='')}"
        )

    def _ssl_context(self) -> Optional[ssl.SSLContext]:
        if not (self.api_url or "").startswith("https://"):
            return None
        if self.ca_path and os.path.exists(self.ca_path):
            return ssl.create_default_context(cafile=self.ca_path)
        return ssl.create_default_context()

    def _send(self, body: Mapping[str, Any], token: Optional[str]) -> None:
        url = self._url()
        payload = json.dumps(body).encode("utf-8")
        headers = {
            "Content-Type": "application/merge-patch+json",
            "Accept": "application/json",
            "Authorization": f"Bearer {token}",
        }
        context = self._ssl_context()
        for attempt in range(1, self.attempts + 1):
            request = urllib.request.Request(url, data=payload, headers=headers, method="PATCH")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
                    response.read()
                    return
            except urllib.error.HTTPError as exc:
                detail = f"HTTP {exc.code} {exc.reason}"
                retryable = exc.code in _RETRYABLE_STATUS
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                detail = f"{type(reason).__name__}: {reason}"
                retryable = True
            if not retryable or attempt == self.attempts:
                raise ReportError(
                    f"patching ConfigMap {self.namespace}/{self.configmap} failed after {attempt} attempt(s): {detail}"
                )
            delay = self.backoff_s * 2 ** (attempt - 1)
            logger.warning("result report attempt %d failed (%s); retrying in %.1fs", attempt, detail, delay)
            self.sleep(delay)
