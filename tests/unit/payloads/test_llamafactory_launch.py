"""payloads.llamafactory_launch: LLaMA-Factory's `S3FileSystem()` reaches the endpoint the environment names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from payloads import llamafactory_launch as launch

OPERATOR = Path(launch.__file__).resolve().parents[1]

# What LLaMA-Factory 0.9.4 does with `ray_storage_filesystem: s3` (hparams/training_args.py), then what Ray Train
# receives: the filesystem pickled with its options.
CLI = """#!/usr/bin/env python3
import json, sys
import pyarrow.fs as fs
filesystem = fs.S3FileSystem()
options = filesystem.__reduce__()[1][0]
print(json.dumps({"argv": sys.argv[1:], "endpoint": options["endpoint_override"], "scheme": options["scheme"]}))
"""


def run(tmp_path: Path, env: dict, script: str = CLI) -> subprocess.CompletedProcess:
    cli = tmp_path / "llamafactory-cli"
    cli.write_text(script)
    cli.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in launch.ENDPOINT_ENVS}
    return subprocess.run([sys.executable, "-m", "payloads.llamafactory_launch", str(cli), "train", "/tmp/x.yaml"],
                          env={**clean, "PYTHONPATH": str(OPERATOR), **env}, capture_output=True, text=True,
                          check=True)


def test_the_cli_gets_the_environment_s_endpoint(tmp_path):
    out = json.loads(run(tmp_path, {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}).stdout)
    assert out == {"argv": ["train", "/tmp/x.yaml"], "endpoint": "http://127.0.0.1:9000", "scheme": "https"}


def test_the_s3_specific_variable_wins_as_in_the_aws_sdks(tmp_path):
    out = json.loads(run(tmp_path, {"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2"}).stdout)
    assert out["endpoint"] == "http://b:2"


def test_without_an_endpoint_the_filesystem_is_pyarrow_s_own(tmp_path):
    assert json.loads(run(tmp_path, {}).stdout)["endpoint"] == ""


def test_an_explicit_endpoint_is_kept(monkeypatch):
    import pyarrow.fs

    monkeypatch.setattr(pyarrow.fs, "S3FileSystem", pyarrow.fs.S3FileSystem)
    assert launch.install_s3_endpoint_default({"AWS_ENDPOINT_URL": "http://env:1"}) == "http://env:1"
    options = pyarrow.fs.S3FileSystem(endpoint_override="http://mine:2").__reduce__()[1][0]
    assert options["endpoint_override"] == "http://mine:2"
    launch.install_s3_endpoint_default({"AWS_ENDPOINT_URL": "http://env:3"})  # twice: wraps the original once
    assert pyarrow.fs.S3FileSystem().__reduce__()[1][0]["endpoint_override"] == "http://env:3"


def test_a_wrapper_that_is_not_python_is_executed_as_it_is(tmp_path):
    out = run(tmp_path, {"AWS_ENDPOINT_URL": "http://x:1"}, script="#!/bin/sh\necho wrapped \"$@\"\n").stdout
    assert out.strip() == "wrapped train /tmp/x.yaml"
