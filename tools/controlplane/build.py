#!/usr/bin/env python3
"""Build the local control plane from Go source into a cache folder outside the repository.

Produces kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, kwok, helm, actionlint, the
KubeRay operator and Kueue, plus KubeRay's and Kueue's CRDs, the Gateway API's standard CRDs, Envoy Gateway's
SecurityPolicy CRD and kwok's stage configs, under ``$LLMOPS_CACHE`` (default
``~/.cache/llmops``); and gitops-health (``tools/gitops-health``), which reads our resources with kstatus and
with Argo CD's Lua runtime for the tests. Every version comes from ``versions.env`` beside this file. A binary
already built for the pinned version is never rebuilt, so a warm run takes seconds.

    python tools/controlplane/build.py            # build what is missing
    python tools/controlplane/build.py --print-bin  # print the bin folder and exit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
KUBERAY_CRD_DIR = "config/crd/bases"
KUEUE_CRD_DIR = "config/components/crd/bases"
KWOK_STAGES = ("node-initialize", "pod-ready", "pod-complete", "pod-delete")


def read_versions() -> dict[str, str]:
    versions = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def cache_dir() -> Path:
    return Path(os.environ.get("LLMOPS_CACHE", Path.home() / ".cache" / "llmops")).expanduser()


def log(message: str) -> None:
    print(f"[controlplane build {time.strftime('%H:%M:%S')}] {message}", flush=True)


def go(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-buildvcs=false", **(env or {})}
    started = time.monotonic()
    result = subprocess.run(["go", *args], cwd=cwd, env=full_env, text=True, capture_output=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"go {' '.join(args)} failed in {cwd} (exit {result.returncode})")
    log(f"  go {args[0]} done in {time.monotonic() - started:.0f}s")
    return result.stdout


def module_dir(module: str, version: str, work: Path) -> Path:
    """Download a module into the module cache and return its source folder."""
    out = go(["mod", "download", "-json", f"{module}@{version}"], cwd=work)
    return Path(json.loads(out)["Dir"])


def is_built(bin_dir: Path, name: str, version: str) -> bool:
    stamp = bin_dir / f".{name}.version"
    return (bin_dir / name).exists() and stamp.exists() and stamp.read_text().strip() == version


def mark_built(bin_dir: Path, name: str, version: str) -> None:
    (bin_dir / f".{name}.version").write_text(version + "\n")


def write_module(src: Path, module: str, go_mod_body: str, files: dict[str, str]) -> None:
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(f"module {module}\n\ngo 1.24\n\n{go_mod_body}")
    for name, text in files.items():
        (src / name).write_text(text)


def staging_replaces(kubernetes_go_mod: str, staging_version: str) -> list[str]:
    """Turn upstream's `k8s.io/x => ./staging/src/k8s.io/x` replaces into released `v0.N.M` modules."""
    modules = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", kubernetes_go_mod, flags=re.M)
    if not modules:
        raise SystemExit("found no staging replace directives in k8s.io/kubernetes's go.mod")
    return [f"replace {m} => {m} {staging_version}" for m in sorted(set(modules))]


def build_kubernetes(cache: Path, bin_dir: Path, version: str) -> None:
    if all(is_built(bin_dir, c, version) for c in KUBERNETES_COMMANDS):
        log(f"kubernetes {version}: present")
        return
    log(f"kubernetes {version}: building {', '.join(KUBERNETES_COMMANDS)} (cold: 15-30 min on 2 cores)")
    src = cache / "src" / "kubernetes"
    src.mkdir(parents=True, exist_ok=True)
    upstream = module_dir("k8s.io/kubernetes", version, src)
    staging_version = "v0." + version.split(".", 1)[1]
    replaces = staging_replaces((upstream / "go.mod").read_text(), staging_version)
    imports = "".join(f'\t_ "k8s.io/kubernetes/cmd/{c}"\n' for c in KUBERNETES_COMMANDS)
    write_module(
        src,
        "llmops.local/controlplane/kubernetes",
        f"require k8s.io/kubernetes {version}\n\n" + "\n".join(replaces) + "\n",
        {"tools.go": f"//go:build tools\n\npackage tools\n\nimport (\n{imports})\n"},
    )
    go(["mod", "tidy"], cwd=src)
    major, minor = version.lstrip("v").split(".")[:2]
    stamps = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        stamps += [f"-X {pkg}.gitVersion={version}", f"-X {pkg}.gitMajor={major}", f"-X {pkg}.gitMinor={minor}",
                   f"-X {pkg}.gitTreeState=clean"]
    go(["build", "-trimpath", "-ldflags", "-s -w " + " ".join(stamps), "-o", str(bin_dir) + "/",
        *(f"k8s.io/kubernetes/cmd/{c}" for c in KUBERNETES_COMMANDS)], cwd=src)
    for c in KUBERNETES_COMMANDS:
        mark_built(bin_dir, c, version)


def build_etcd(cache: Path, bin_dir: Path, version: str) -> None:
    if is_built(bin_dir, "etcd", version):
        log(f"etcd {version}: present")
        return
    log(f"etcd {version}: building")
    src = cache / "src" / "etcd"
    write_module(src, "llmops.local/controlplane/etcd", f"require go.etcd.io/etcd/server/v3 {version}\n",
                 {"main.go": (HERE / "etcd" / "main.go").read_text()})
    go(["mod", "tidy"], cwd=src)
    go(["build", "-trimpath", "-ldflags", "-s -w", "-o", str(bin_dir / "etcd"), "."], cwd=src)
    mark_built(bin_dir, "etcd", version)


def go_install(bin_dir: Path, name: str, package: str, version: str, work: Path) -> None:
    if is_built(bin_dir, name, version):
        log(f"{name} {version}: present")
        return
    log(f"{name} {version}: building")
    go(["install", "-trimpath", "-ldflags", "-s -w", f"{package}@{version}"], cwd=work, env={"GOBIN": str(bin_dir)})
    mark_built(bin_dir, name, version)


def build_controller(cache: Path, bin_dir: Path, name: str, module: str, package: str, version: str,
                     crd_dir: str, share: str) -> None:
    """A controller's binary and the CRDs its module ships (into share/<share>)."""
    go_install(bin_dir, name, package, version, cache)
    crds = cache / "share" / share
    if not crds.exists():
        shutil.copytree(module_dir(module, version, cache) / crd_dir, crds)
        for f in crds.iterdir():
            f.chmod(0o644)
    crds.chmod(0o755)


def build_kuberay(cache: Path, bin_dir: Path, version: str) -> None:
    module = "github.com/ray-project/kuberay/ray-operator"
    build_controller(cache, bin_dir, "ray-operator", module, module, version, KUBERAY_CRD_DIR, "kuberay-crds")


def build_kueue(cache: Path, bin_dir: Path, version: str) -> None:
    """Kueue's manager (``cmd/kueue``) and its CRDs; the plane starts it only when asked (``--with-kueue``)."""
    build_controller(cache, bin_dir, "kueue", "sigs.k8s.io/kueue", "sigs.k8s.io/kueue/cmd/kueue", version,
                     KUEUE_CRD_DIR, "kueue-crds")


def copy_crds(cache: Path, name: str, module: str, version: str, folder: str, pattern: str) -> None:
    """CustomResourceDefinitions from a Go module's folder into share/<name> (nothing else: no admission policies)."""
    crds = cache / "share" / name
    stamp = crds / ".version"
    if stamp.exists() and stamp.read_text().strip() == version:
        log(f"{name} {version}: present")
        return
    log(f"{name} {version}: fetching")
    source = module_dir(module, version, cache) / folder
    files = sorted(f for f in source.glob(pattern) if "kind: CustomResourceDefinition" in f.read_text())
    if not files:
        raise SystemExit(f"{module} {version} has no CRDs matching {pattern} under {source}")
    shutil.rmtree(crds, ignore_errors=True)
    crds.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, crds / f.name)
        (crds / f.name).chmod(0o644)
    stamp.write_text(version + "\n")


def build_kwok(cache: Path, bin_dir: Path, version: str) -> None:
    go_install(bin_dir, "kwok", "sigs.k8s.io/kwok/cmd/kwok", version, cache)
    stages = cache / "share" / "kwok-stages"
    if not stages.exists():
        source = module_dir("sigs.k8s.io/kwok", version, cache) / "kustomize" / "stage"
        stages.mkdir(parents=True)
        for name in KWOK_STAGES:
            matches = sorted(source.rglob(f"{name}.yaml"))
            if not matches:
                raise SystemExit(f"kwok {version} has no stage {name}.yaml under {source}")
            shutil.copyfile(matches[0], stages / f"{name}.yaml")


def build_gitops_health(cache: Path, bin_dir: Path, v: dict[str, str]) -> None:
    """The GitOps clients' own code on our resources: kstatus and gopher-lua, with Kubernetes' API modules at the
    plane's version (their packages are then already in Go's build cache)."""
    source = (HERE.parent / "gitops-health" / "main.go").read_text()
    requires = {
        "sigs.k8s.io/cli-utils": v["CLI_UTILS_VERSION"],
        "github.com/yuin/gopher-lua": v["GOPHER_LUA_VERSION"],
        "layeh.com/gopher-json": v["GOPHER_JSON_VERSION"],
        "k8s.io/api": "v0." + v["KUBERNETES_VERSION"].split(".", 1)[1],
        "k8s.io/apimachinery": "v0." + v["KUBERNETES_VERSION"].split(".", 1)[1],
    }
    version = "+".join(requires.values()) + "+" + hashlib.sha256(source.encode()).hexdigest()[:12]
    if is_built(bin_dir, "gitops-health", version):
        log("gitops-health: present")
        return
    log("gitops-health: building")
    src = cache / "src" / "gitops-health"
    write_module(src, "llmops.local/tools/gitops-health",
                 "require (\n" + "".join(f"\t{m} {ver}\n" for m, ver in requires.items()) + ")\n",
                 {"main.go": source})
    go(["mod", "tidy"], cwd=src)
    go(["build", "-trimpath", "-ldflags", "-s -w", "-o", str(bin_dir / "gitops-health"), "."], cwd=src)
    mark_built(bin_dir, "gitops-health", version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-bin", action="store_true", help="print the bin folder and exit")
    args = parser.parse_args()
    cache = cache_dir()
    bin_dir = cache / "bin"
    if args.print_bin:
        print(bin_dir)
        return 0
    if shutil.which("go") is None:
        raise SystemExit("go is not on PATH: install Go 1.24 or newer, then rerun this script")
    v = read_versions()
    bin_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    build_etcd(cache, bin_dir, v["ETCD_VERSION"])
    build_kubernetes(cache, bin_dir, v["KUBERNETES_VERSION"])
    build_kuberay(cache, bin_dir, v["KUBERAY_VERSION"])
    build_kwok(cache, bin_dir, v["KWOK_VERSION"])
    build_kueue(cache, bin_dir, v["KUEUE_VERSION"])
    # LLMService spec.expose: the Gateway API's standard channel, and the one Envoy Gateway CRD apiKey writes.
    copy_crds(cache, "gateway-api-crds", "sigs.k8s.io/gateway-api", v["GATEWAY_API_VERSION"], "config/crd/standard",
              "gateway.networking.k8s.io_*.yaml")
    copy_crds(cache, "envoy-gateway-crds", "github.com/envoyproxy/gateway", v["ENVOY_GATEWAY_VERSION"],
              "charts/gateway-helm/crds/generated", "gateway.envoyproxy.io_securitypolicies.yaml")
    go_install(bin_dir, "helm", "helm.sh/helm/v3/cmd/helm", v["HELM_VERSION"], cache)
    go_install(bin_dir, "actionlint", "github.com/rhysd/actionlint/cmd/actionlint", v["ACTIONLINT_VERSION"], cache)
    build_gitops_health(cache, bin_dir, v)
    log(f"all present in {bin_dir} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
