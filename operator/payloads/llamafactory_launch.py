"""``python -m payloads.llamafactory_launch <llamafactory-cli> train <config>``: the CLI, with S3 endpoints honoured.

LLaMA-Factory 0.9.4 turns ``ray_storage_filesystem: s3`` into ``pyarrow.fs.S3FileSystem()``, and pyarrow reads
``AWS_ENDPOINT_URL`` only when it parses a URI, not in that constructor: on S3-compatible storage (MinIO, Ceph,
R2, a cloud's S3 interoperability endpoint) Ray Train would send the checkpoints to AWS instead. Here the
constructor gets the endpoint from the environment when the caller names none, then the CLI runs in this process.
The driver (``finetune_log.run_training``) starts LLaMA-Factory through this module.

A CLI that is not a Python script (a wrapper) is executed as it is; the endpoint default then does not apply.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Mapping, Optional, Sequence

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the service-specific one first, as the AWS SDKs read


def s3_endpoint(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    env = os.environ if env is None else env
    return next((env[name] for name in ENDPOINT_ENVS if env.get(name)), None)


def install_s3_endpoint_default(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Make ``pyarrow.fs.S3FileSystem(...)`` default ``endpoint_override`` to the environment's endpoint."""
    endpoint = s3_endpoint(env)
    if not endpoint:
        return None
    import pyarrow.fs

    original = getattr(pyarrow.fs.S3FileSystem, "llmops_original", pyarrow.fs.S3FileSystem)

    def s3_filesystem(*args, **kwargs):
        if not args:
            kwargs.setdefault("endpoint_override", endpoint)
        return original(*args, **kwargs)

    s3_filesystem.llmops_original = original
    pyarrow.fs.S3FileSystem = s3_filesystem
    return endpoint


def is_python_script(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            first = handle.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m payloads.llamafactory_launch <llamafactory-cli> <args...>")
    cli, args = argv[0], argv[1:]
    if not is_python_script(cli):
        os.execv(cli, [cli, *args])
    install_s3_endpoint_default()
    sys.argv = [cli, *args]
    runpy.run_path(cli, run_name="__main__")


if __name__ == "__main__":
    main()
