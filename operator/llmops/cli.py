"""The `llmops` command: run the operator, generate CRDs, render children offline, drive the local plane."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import yamlio

REPO = Path(__file__).resolve().parents[2]
CRD_DIRS = (REPO / "crds", REPO / "charts" / "llmops-operator" / "crds")


def dev_root() -> Path:
    from .dev.plane import cache_dir
    return Path(os.environ.get("LLMOPS_DEV_DIR", cache_dir() / "dev")).expanduser()


def cmd_crds(args: argparse.Namespace) -> int:
    from .api.crd import all_crds
    rendered = {name: yamlio.dump(crd) for name, crd in all_crds().items()}
    stale = []
    for folder in CRD_DIRS:
        for name, text in rendered.items():
            path = folder / name
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path.relative_to(REPO)))
            else:
                folder.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        if args.check:
            extra = {p.name for p in folder.glob("*.yaml")} - set(rendered) if folder.exists() else set()
            stale += [str((folder / e).relative_to(REPO)) + " (no longer generated)" for e in sorted(extra)]
    if stale:
        print("CRDs are stale: " + ", ".join(stale) + "\nrun `llmops crds` and commit the result", file=sys.stderr)
        return 1
    if not args.check:
        print(f"wrote {len(rendered)} CRDs to " + " and ".join(str(d.relative_to(REPO)) for d in CRD_DIRS))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .render import render_manifests
    path = Path(args.file)
    if args.file == "-":
        text = sys.stdin.read()
    elif path.is_dir():   # a workflow's folder: its manifests, as separate documents
        text = "\n---\n".join(p.read_text() for p in sorted(path.glob("*.yaml")))
    else:
        text = path.read_text()
    objects, errors = render_manifests(yamlio.load_all(text), assume_ready=args.assume_ready)
    for error in errors:
        print(error, file=sys.stderr)
    print(yamlio.dump_all(objects), end="")
    return 1 if errors else 0


def cmd_run(args: argparse.Namespace) -> int:
    from .handlers.main import run
    return run(namespaces=args.namespace, all_namespaces=not args.namespace, probe_port=args.probe_port,
               metrics_port=args.metrics_port, leader_election=args.leader_election,
               lease_namespace=args.leader_election_namespace, log_format=args.log_format)


def cmd_dev(args: argparse.Namespace) -> int:
    from .dev.plane import LocalPlane, PlaneError
    root = dev_root()
    try:
        if args.action == "up":
            if (root / "state.json").exists() and all(LocalPlane.load(root).status().values()):
                print(f"already up; export KUBECONFIG={root / 'kubeconfig'}")
                return 0
            plane = LocalPlane(root, with_kueue=args.with_kueue)
            plane.start()
            from .dev.install import install_crds
            install_crds(plane)
            print(f"local control plane is up.\n  export KUBECONFIG={plane.kubeconfig}\n"
                  f"  export PATH={plane.env()['PATH'].split(os.pathsep)[0]}:$PATH\n  logs: {plane.logs}")
        elif args.action == "down":
            if not (root / "state.json").exists():
                print("not running")
                return 0
            LocalPlane.load(root).stop()
            print("stopped")
        elif args.action == "status":
            if not (root / "state.json").exists():
                print("not running")
                return 1
            status = LocalPlane.load(root).status()
            for name, alive in status.items():
                print(f"{name:26} {'running' if alive else 'STOPPED'}")
            return 0 if all(status.values()) else 1
        elif args.action == "env":
            plane = LocalPlane(root)
            print(f"export KUBECONFIG={plane.kubeconfig}\nexport PATH={plane.env()['PATH'].split(os.pathsep)[0]}:$PATH")
    except PlaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .dev.demo import main as demo
    except ModuleNotFoundError as e:
        if e.name != "kubernetes":
            raise
        print("error: llmops demo needs the dev extra: pip install 'llmops[dev]'", file=sys.stderr)
        return 1
    return demo(keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the operator")
    p.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable); "
                   "default: all namespaces")
    p.add_argument("--probe-port", type=int, default=8080, help="liveness/readiness port (0: off)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: off)")
    p.add_argument("--leader-election", metavar="LEASE", default=None,
                   help="run as one of several replicas: the one holding this coordination.k8s.io Lease reconciles, "
                        "the others stand by (default: no leader election, run alone)")
    p.add_argument("--leader-election-namespace", metavar="NS", default=None,
                   help="the Lease's namespace (default: env POD_NAMESPACE, else the service account's, else "
                        "default)")
    p.add_argument("--log-format", choices=("json", "plain"), default="json")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("crds", help="write crds/ and the chart's crds/ from the API models")
    p.add_argument("--check", action="store_true", help="fail if the checked-in CRDs are stale")
    p.set_defaults(func=cmd_crds)

    p = sub.add_parser("render", help="print every object the operator would create for a manifest (offline)")
    p.add_argument("-f", "--file", required=True, help="manifest file, a folder of them, or - for stdin")
    p.add_argument("--assume-ready", action="store_true",
                   help="render each LLMService as it will be once its FineTunes succeeded and its gates passed "
                        "(default: FineTunes succeeded, gates still waiting)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("dev", help="the local control plane (real kube-apiserver, etcd, KubeRay, kwok)")
    p.add_argument("action", choices=("up", "down", "status", "env"))
    p.add_argument("--with-kueue", action="store_true",
                   help="up: also run Kueue (RayJob integration), so a FineTune's spec.queueName is honoured")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("demo", help="local demo: plane + operator + the ViGGO example workflow")
    p.add_argument("--keep", action="store_true", help="leave the plane and operator running afterwards")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
