"""The model cache's download against a small real model served locally: a tiny Qwen2 model saved by
transformers, held by an S3 server (moto's) and by a stand-in for the Hugging Face hub's HTTP API (the two
requests huggingface_hub makes: the repository's file list, and each file); the download copies it into a claim
folder that transformers then loads."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from payloads import model_download

SECRET_KEY = "cache-test-secret-key-5f3a9c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen2-0.01B")
    config = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("a file below a folder is copied too\n")
    return folder


@pytest.fixture()
def s3(monkeypatch):
    """A local S3 endpoint; the payload finds it through the environment, as in a pod with a storage Secret."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "cache-test", "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                       "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="models")
    yield client
    server.stop()


def _upload(client, folder: Path, prefix: str) -> dict[str, int]:
    sizes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        client.upload_file(str(path), "models", f"{prefix}/{name}")
        sizes[name] = path.stat().st_size
    return sizes


def _run(tmp_path, monkeypatch, *args: str) -> int:
    monkeypatch.setenv("LLMOPS_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("LLMOPS_PROGRESS_INTERVAL_S", "0")
    return model_download.main(list(args))


def test_downloads_a_real_model_that_transformers_loads(tmp_path, monkeypatch, s3, tiny_model, reporter_env):
    sizes = _upload(s3, tiny_model, "qwen/tiny-qwen2-0.01B")

    assert _run(tmp_path, monkeypatch, "--source", "s3://models/qwen/tiny-qwen2-0.01B",
                "--dest", "pvc://llm-cache/tiny-qwen2-0.01B") == 0

    dest = tmp_path / "pvc" / "llm-cache" / "tiny-qwen2-0.01B"
    copied = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert set(copied) == set(sizes) | {model_download.MARKER}
    for name in sizes:
        assert copied[name] == (tiny_model / name).read_bytes()
    total = sum(sizes.values())
    marker = json.loads(copied[model_download.MARKER])
    assert marker == {"source": "s3://models/qwen/tiny-qwen2-0.01B", "revision": None, "bytesDone": total,
                      "bytesTotal": total, "files": len(sizes)}

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert model.config.num_hidden_layers == 2

    patches = reporter_env.patches
    running = [json.loads(p["progress"]) for p in patches if p.get("state") == "Running"]
    assert running[0] == {"bytesDone": 0, "bytesTotal": total, "files": len(sizes)}
    assert [r["bytesDone"] for r in running] == sorted(r["bytesDone"] for r in running)
    final = reporter_env.data
    assert final["state"] == "Succeeded"
    assert json.loads(final["progress"]) == {"bytesDone": total, "bytesTotal": total, "files": len(sizes)}
    assert all(SECRET_KEY not in json.dumps(p) for p in patches)


def test_a_rerun_after_completion_downloads_nothing(tmp_path, monkeypatch, s3, tiny_model, reporter_env):
    _upload(s3, tiny_model, "tiny")
    args = ("--source", "s3://models/tiny", "--dest", "pvc://llm-cache/tiny")
    assert _run(tmp_path, monkeypatch, *args) == 0
    for item in s3.list_objects_v2(Bucket="models")["Contents"]:   # the source is gone: only the marker can say
        s3.delete_object(Bucket="models", Key=item["Key"])
    assert _run(tmp_path, monkeypatch, *args) == 0
    assert reporter_env.data["state"] == "Succeeded"


def test_a_partial_folder_is_completed_not_trusted(tmp_path, monkeypatch, s3, tiny_model, reporter_env):
    sizes = _upload(s3, tiny_model, "tiny")
    dest = tmp_path / "pvc" / "llm-cache" / "tiny"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")   # a pod died while writing it
    assert _run(tmp_path, monkeypatch, "--source", "s3://models/tiny", "--dest", "pvc://llm-cache/tiny") == 0
    assert (dest / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    assert (dest / model_download.MARKER).exists() and len(sizes) > 1


def test_a_missing_model_fails_with_a_report_naming_it(tmp_path, monkeypatch, s3, reporter_env):
    assert _run(tmp_path, monkeypatch, "--source", "s3://models/nothing-here", "--dest", "pvc://c/nothing") == 1
    assert reporter_env.data["state"] == "Failed"
    assert "s3://models/nothing-here holds no files" in reporter_env.data["message"]
    assert not (tmp_path / "pvc" / "c" / "nothing" / model_download.MARKER).exists()


def test_a_claim_too_small_fails_before_copying(tmp_path, monkeypatch, s3, tiny_model, reporter_env):
    _upload(s3, tiny_model, "tiny")
    monkeypatch.setattr(model_download, "_free_bytes", lambda path: 10)
    assert _run(tmp_path, monkeypatch, "--source", "s3://models/tiny", "--dest", "pvc://c/tiny") == 1
    assert "raise the cache's size" in reporter_env.data["message"]
    assert not any((tmp_path / "pvc" / "c" / "tiny").iterdir())


def test_a_pvc_source_is_refused(tmp_path, monkeypatch, reporter_env):
    assert _run(tmp_path, monkeypatch, "--source", "pvc://other/model", "--dest", "pvc://c/model") == 1
    assert "only a Hugging Face id, s3:// or gs://" in reporter_env.data["message"]
    assert reporter_env.data["state"] == "Failed"


# ---- the hub ----------------------------------------------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves one repository from a folder as the hub's API does: /api/models/<repo>/revision/<rev> lists its files
    (with sizes), /<repo>/resolve/<commit>/<file> serves each with the headers huggingface_hub reads. Records the
    Authorization header of every request."""

    def __init__(self, repo: str, folder: Path):
        self.repo, self.folder, self.auth = repo, folder, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.auth.append(handler.headers.get("Authorization"))
        path = unquote(urlparse(handler.path).path)
        listing, resolve = f"/api/models/{self.repo}/revision/", f"/{self.repo}/resolve/{COMMIT}/"
        code = 200
        if path.startswith(listing):
            siblings = [{"rfilename": p.relative_to(self.folder).as_posix(), "size": p.stat().st_size}
                        for p in self.files()]
            data = json.dumps({"id": self.repo, "modelId": self.repo, "sha": COMMIT, "siblings": siblings}).encode()
            headers = {"Content-Type": "application/json"}
        elif path.startswith(resolve) and (self.folder / path[len(resolve):]).is_file():
            data = (self.folder / path[len(resolve):]).read_bytes()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        else:
            data, headers = b'{"error": "Repository not found"}', {"X-Error-Code": "RepositoryNotFound"}
            code = 404
        handler.send_response(code)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def hub(monkeypatch, tiny_model):
    server = FakeHub("tiny-org/tiny-qwen2-0.01B", tiny_model)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_cachetesttoken0123456789")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    server.stop()


def test_downloads_a_hub_model_at_one_commit_with_the_token(tmp_path, monkeypatch, hub, tiny_model, reporter_env):
    assert _run(tmp_path, monkeypatch, "--source", "tiny-org/tiny-qwen2-0.01B", "--revision", "main",
                "--dest", "pvc://llm-cache/tiny-qwen2-0.01B") == 0
    dest = tmp_path / "pvc" / "llm-cache" / "tiny-qwen2-0.01B"
    names = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert names == sorted([p.relative_to(tiny_model).as_posix() for p in hub.files()] + [model_download.MARKER])
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(dest).config.num_hidden_layers == 2
    assert set(hub.auth) == {"Bearer hf_cachetesttoken0123456789"}
    assert reporter_env.data["state"] == "Succeeded"
    assert all("hf_cachetesttoken" not in json.dumps(p) for p in reporter_env.patches)


def test_a_hub_model_that_does_not_exist_fails_naming_it(tmp_path, monkeypatch, hub, reporter_env):
    assert _run(tmp_path, monkeypatch, "--source", "tiny-org/no-such-model", "--dest", "pvc://c/m") == 1
    assert reporter_env.data["state"] == "Failed"
    assert "tiny-org/no-such-model" in reporter_env.data["message"] and "404" in reporter_env.data["message"]
