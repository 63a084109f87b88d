"""Which optional APIs (the Gateway API, Envoy Gateway's policies) the API server serves, read from its discovery
documents and read again once stale, so that CRDs installed later are noticed without a restart."""

from __future__ import annotations

import asyncio
import time

from ..builders.exposure import ABSENT_SECONDS, PRESENT_SECONDS, Api
from ..kube import ApiError, Kube, with_retries


class Discovery:
    def __init__(self, kube: Kube):
        self.kube = kube
        self._seen: dict[str, tuple[bool, float]] = {}   # group/version/plural -> (served, when read)
        self._lock = asyncio.Lock()

    @staticmethod
    def _key(api: Api) -> str:
        return f"{api.group_version}/{api.plural}"

    def served(self, api: Api) -> bool:
        """What the last read said (False before any)."""
        return self._seen.get(self._key(api), (False, 0.0))[0]

    def invalidate(self) -> bool:
        """Forget every reading (the next refresh reads again); False when there was none."""
        had = bool(self._seen)
        self._seen.clear()
        return had

    def _stale(self, api: Api, now: float) -> bool:
        seen = self._seen.get(self._key(api))
        return seen is None or now - seen[1] > (PRESENT_SECONDS if seen[0] else ABSENT_SECONDS)

    async def refresh(self, apis: list[Api]) -> None:
        """Read the discovery document of every stale API in `apis` (one request per group version)."""
        async with self._lock:   # concurrent reconciles share one read
            now = time.monotonic()
            stale = [api for api in apis if self._stale(api, now)]
            for group_version in sorted({api.group_version for api in stale}):
                try:
                    document = await with_retries(lambda: self.kube.request("GET", f"/apis/{group_version}"))
                except ApiError as e:
                    if e.status != 404:
                        raise
                    document = {}
                plurals = {r.get("name") for r in document.get("resources") or []}
                for api in stale:
                    if api.group_version == group_version:
                        self._seen[self._key(api)] = (api.plural in plurals, time.monotonic())
