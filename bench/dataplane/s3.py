"""A real S3 API on the machine: moto's server, reached through the standard AWS variables the payloads use.

On a cluster the Ray pods get the storage secret's keys as environment variables (`envFrom`); here the same
variables point every client (pyarrow in the payloads and LLaMA-Factory, boto3 in Ray's LLM stack) at the local
server. The bucket's content is mirrored to a local folder after each phase, so a later device call (whose moto
starts empty) can restore it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .manifests import BUCKET

# Not the bucket name: the payloads redact every secret-looking variable's value from their reports.
KEY_ID, SECRET = "bench-access-key", "bench-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def credentials(port: int) -> dict[str, str]:
    """What the `s3-credentials` secret holds on a cluster, pointed at this server."""
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


class S3Server:
    def __init__(self, log: Path):
        self.port = free_port()
        self.env = credentials(self.port)
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        code = ("import sys, time\nfrom moto.server import ThreadedMotoServer\n"
                f"ThreadedMotoServer(ip_address='127.0.0.1', port={self.port}).start()\n"
                "while True: time.sleep(3600)\n")
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"moto exited: {self.log.read_text()[-2000:]}")
                time.sleep(0.3)
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id=KEY_ID,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def upload_tree(self, folder: Path, prefix: str) -> int:
        client, count = self.client(), 0
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = path.relative_to(folder).as_posix()
            client.upload_file(str(path), BUCKET, f"{prefix.rstrip('/')}/{key}" if prefix else key)
            count += 1
        return count

    def keys(self, prefix: str = "") -> list[str]:
        paginator, keys = self.client().get_paginator("list_objects_v2"), []
        for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def mirror_to(self, folder: Path) -> int:
        """Copy the whole bucket into folder (what a later call restores with restore_from)."""
        keys = [k for k in self.keys() if not k.endswith("/")]  # folder markers hold nothing
        for key in keys:
            target = folder / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.get(key))
        return len(keys)

    def restore_from(self, folder: Path) -> int:
        return self.upload_tree(folder, "") if folder.exists() else 0
