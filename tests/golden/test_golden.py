"""Golden files: every object the operator renders for each example, reviewed as YAML diffs.

Regenerate on purpose with `pytest tests/golden --update-golden` and read the diff before committing.
Payload sources are shipped in the namespace's shared payload ConfigMap; here they appear as a digest so that a
payload edit shows as one changed line instead of the whole file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from llmops import yamlio
from llmops.builders.common import BuildContext, is_shared
from llmops.builders.common import load_payloads
from llmops.render import render_manifests
from llmops.settings import CLOUDS, Settings

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
EXAMPLE_SETS = sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir())


def _digest_payloads(objects: list[dict]) -> list[dict]:
    for obj in objects:
        if is_shared(obj):
            for key, value in list((obj.get("data") or {}).items()):
                obj["data"][key] = "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return objects


def rendered(example_dir: Path) -> dict[str, str]:
    docs = [d for f in sorted(example_dir.glob("*.yaml")) for d in yamlio.load_all(f.read_text())]
    # As the workflow ends up: FineTunes done and gates passed, so the served adapters appear.
    objects, errors = render_manifests(docs, BuildContext(settings=Settings(), payloads=load_payloads()),
                                       assume_ready=True)
    assert not errors, errors
    files: dict[str, list[dict]] = {}
    for obj in _digest_payloads(objects):
        refs = obj["metadata"].get("ownerReferences")
        name = f"{refs[0]['kind'].lower()}-{refs[0]['name']}.yaml" if refs else "shared.yaml"
        files.setdefault(name, []).append(obj)
    return {name: yamlio.dump_all(objs) for name, objs in files.items()}


@pytest.mark.parametrize("example_dir", EXAMPLE_SETS, ids=[p.name for p in EXAMPLE_SETS])
def test_rendered_children_match_golden(example_dir, request):
    folder = GOLDEN / example_dir.name
    files = rendered(example_dir)
    if request.config.getoption("--update-golden"):
        folder.mkdir(exist_ok=True)
        for stale in folder.glob("*.yaml"):
            if stale.name not in files:
                stale.unlink()
        for name, text in files.items():
            (folder / name).write_text(text)
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(files), \
        "golden files differ in number: run pytest tests/golden --update-golden and review the diff"
    for name, text in files.items():
        assert (folder / name).read_text() == text, \
            f"{example_dir.name}/{name} differs: run pytest tests/golden --update-golden and review the diff"


def test_render_cli_works_offline(capsys):
    from llmops.cli import main
    assert main(["render", "-f", str(ROOT / "examples" / "viggo" / "finetune.yaml")]) == 0
    printed = _digest_payloads(list(yamlio.load_all(capsys.readouterr().out)))
    # The CLI prints exactly the reviewed children: the FineTune's golden file and the shared payloads.
    golden = [o for name in ("finetune-viggo.yaml", "shared.yaml")
              for o in yamlio.load_all((GOLDEN / "viggo" / name).read_text())]
    key = lambda o: (o["kind"], o["metadata"]["name"])   # noqa: E731
    assert sorted(printed, key=key) == sorted(golden, key=key)


def test_render_cli_assume_ready_shows_the_gated_adapter(capsys):
    from llmops.cli import main
    manifest = ROOT / "examples" / "viggo"   # a folder renders all its manifests
    def serve_config(args):
        assert main(["render", "-f", str(manifest), *args]) == 0
        service = next(o for o in yamlio.load_all(capsys.readouterr().out) if o["kind"] == "RayService")
        return service["spec"]["serveConfigV2"]
    # the gate (viggo-eval's exactMatch) waits by default; once assumed passed, the adapter is served
    assert "lora_config" not in serve_config([])
    assert "dynamic_lora_loading_path: s3://llmops-demo/adapters" in serve_config(["--assume-ready"])


@pytest.mark.parametrize("cloud", CLOUDS)
def test_gpu_placement_per_cloud_matches_golden(cloud, request):
    """Where each example's GPU workers land under each `cloud` (the chart's one per-cluster value): the node
    selector, tolerations and the Ray resources of every worker group."""
    docs = [d for f in sorted((ROOT / "examples" / "viggo").glob("*.yaml")) for d in yamlio.load_all(f.read_text())]
    objects, errors = render_manifests(docs, BuildContext(settings=Settings(cloud=cloud), payloads=load_payloads()),
                                       assume_ready=True)
    assert not errors, errors
    placement = {}
    for obj in objects:
        if obj["kind"] in ("RayJob", "RayService"):
            cluster = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig")
            for group in cluster["workerGroupSpecs"]:
                pod = group["template"]["spec"]
                placement[f"{obj['kind']}/{obj['metadata']['name']}/{group['groupName']}"] = {
                    "nodeSelector": pod["nodeSelector"], "tolerations": pod["tolerations"],
                    "rayStartParams": group["rayStartParams"],
                    "gpuLimits": {k: v for k, v in pod["containers"][0]["resources"]["limits"].items() if "/" in k}}
    text = yamlio.dump(placement)
    golden = GOLDEN / "clouds" / f"{cloud}.yaml"
    if request.config.getoption("--update-golden"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.read_text() == text, f"{golden.name} differs: run pytest tests/golden --update-golden"
