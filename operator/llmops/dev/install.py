"""Install llmops's CRDs into a plane and wait until the API server serves them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..api import KINDS

if TYPE_CHECKING:
    from .plane import LocalPlane

REPO_CRDS = Path(__file__).resolve().parents[3] / "crds"


def install_crds(plane: LocalPlane) -> None:
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_CRDS), quiet=True)
    plane.wait_crds_established([k.crd_name for k in KINDS.values()])
