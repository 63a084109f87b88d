"""The release workflow: linted by actionlint (built from source like the rest of the toolchain), and publishing
exactly the images the chart and the operator settings default to."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from llmops.dev.plane import BUILD_HINT, bin_dir
from llmops.settings import FINETUNE_IMAGE, PROJECT_VERSION, RUNTIME_IMAGE_REPOSITORY, Settings

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yaml"
CHART = REPO / "charts" / "llmops-operator"
DEFAULT_OWNER = "llmops"


@pytest.fixture(scope="module")
def actionlint() -> str:
    path = bin_dir() / "actionlint"
    if not path.exists():
        pytest.fail(f"{path} is missing: build the local toolchain with `{BUILD_HINT}`")
    return str(path)


def lint(actionlint: str, *files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([actionlint, "-no-color", *map(str, files)], capture_output=True, text=True, cwd=REPO)


def test_every_workflow_passes_actionlint(actionlint):
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert RELEASE in files
    result = lint(actionlint, *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    """Guards the test above: a misspelt key and an undefined output fail the lint."""
    broken = tmp_path / ".github" / "workflows" / "release.yaml"
    broken.parent.mkdir(parents=True)
    text = RELEASE.read_text().replace("runs-on: ubuntu-24.04", "run-on: ubuntu-24.04", 1)
    broken.write_text(text.replace("needs.version.outputs.owner", "needs.version.outputs.ownr", 1))
    result = subprocess.run([actionlint, "-no-color", str(broken)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "run-on" in result.stdout and "ownr" in result.stdout, result.stdout


def _workflow() -> dict:
    return yaml.safe_load(RELEASE.read_text())


def test_a_version_tag_publishes_both_images_and_the_chart():
    flow = _workflow()
    assert flow[True]["push"]["tags"] == ["v*"]      # YAML 1.1 reads the key `on` as true
    assert flow["permissions"] == {"contents": "read", "packages": "write"}
    images = {i["image"]: i["dockerfile"] for i in flow["jobs"]["images"]["strategy"]["matrix"]["include"]}
    assert images == {"llmops-operator": "docker/operator.Dockerfile",
                      "llmops-ray-llamafactory": "docker/ray-runtime.Dockerfile"}
    assert all((REPO / f).exists() for f in images.values())
    push = next(s for s in flow["jobs"]["images"]["steps"] if s.get("uses", "").startswith("docker/build-push"))
    assert push["with"]["push"] is True
    assert push["with"]["tags"] == ("ghcr.io/${{ needs.version.outputs.owner }}/${{ matrix.image }}:"
                                    "${{ needs.version.outputs.version }}")
    chart_steps = " ".join(s.get("run", "") for s in flow["jobs"]["chart"]["steps"])
    assert 'helm push "dist/llmops-operator-${VERSION}.tgz" "oci://ghcr.io/${OWNER}/charts"' in chart_steps
    assert flow["jobs"]["chart"]["needs"] == ["version", "images"]   # the chart only after its images exist


def _published(owner: str, version: str) -> set[str]:
    """Every image reference the workflow pushes for a tag, as it computes them."""
    flow = _workflow()
    return {f"ghcr.io/{owner}/{i['image']}:{version}" for i in flow["jobs"]["images"]["strategy"]["matrix"]["include"]}


def _chart_defaults_after_release(owner: str) -> dict:
    """values.yaml as the chart job rewrites it before packaging (its sed, applied here)."""
    step = next(s for s in _workflow()["jobs"]["chart"]["steps"] if "sed -i" in s.get("run", ""))
    match = re.search(r'sed -i "s#(.+?)#(.+?)#g"', step["run"])
    old, new = match.group(1), match.group(2).replace("${OWNER}", owner)
    return yaml.safe_load((CHART / "values.yaml").read_text().replace(old, new))


@pytest.mark.parametrize("owner", [DEFAULT_OWNER, "acme-ml"])
def test_the_published_chart_defaults_to_the_published_images(owner):
    values = _chart_defaults_after_release(owner)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    operator = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    assert {operator, values["settings"]["finetune_image"]} == _published(owner, PROJECT_VERSION)


def test_the_operators_own_default_is_the_published_runtime_image():
    assert Settings().finetune_image == FINETUNE_IMAGE in _published(DEFAULT_OWNER, PROJECT_VERSION)
    assert RUNTIME_IMAGE_REPOSITORY == f"ghcr.io/{DEFAULT_OWNER}/llmops-ray-llamafactory"
