"""Storage URIs: parsing, the pvc:// mount mapping and the local filesystem helpers."""

from __future__ import annotations

import pytest

pyarrow_fs = pytest.importorskip("pyarrow.fs", reason="the payload tests run in the Ray venv (.venv-ray)")

from payloads import storage as s  # noqa: E402


@pytest.mark.parametrize(
    "uri, parsed",
    [
        ("s3://bucket/viggo/test.jsonl", ("s3", "bucket", "viggo/test.jsonl")),
        ("gs://bucket/adapters/viggo-lora/", ("gs", "bucket", "adapters/viggo-lora")),
        ("S3://bucket", ("s3", "bucket", "")),
        ("pvc://checkpoints//viggo/lora/", ("pvc", "checkpoints", "viggo/lora")),
    ],
)
def test_parse_normalises(uri, parsed):
    assert s.parse(uri) == s.StorageURI(*parsed)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("/data/test.jsonl", "not a storage URI"),
        ("https://host/x", "unsupported scheme 'https'"),
        ("file:///tmp/x", "unsupported scheme 'file'"),
        ("s3:///key", "names no bucket"),
        ("pvc://My_Claim/x", "not a valid PersistentVolumeClaim name"),
        ("pvc://data/../etc/passwd", "'..' path segments"),
        ("s3://b/x?versionId=1", "query or fragment"),
    ],
)
def test_parse_rejects(uri, message):
    with pytest.raises(s.StorageURIError, match=message):
        s.parse(uri)


def test_name_parent_and_containment():
    adapter = s.parse("s3://bucket/adapters/viggo-lora")
    assert (adapter.name, adapter.parent.uri) == ("viggo-lora", "s3://bucket/adapters")
    assert s.parse("s3://bucket/x").parent.uri == "s3://bucket"
    with pytest.raises(s.StorageURIError, match="has no parent"):
        _ = s.parse("s3://bucket").parent
    out = s.parse("pvc://data/viggo/out")
    assert out.contains(s.parse("pvc://data/viggo/out/part-0.json"))
    assert out.contains(out)
    assert not out.contains(s.parse("pvc://data/viggo/out-old"))
    assert not out.contains(s.parse("s3://data/viggo/out"))
    assert s.parse("s3://bucket").contains(s.parse("s3://bucket/anything"))


def test_pvc_uris_map_to_the_mount(monkeypatch, tmp_path):
    assert s.local_path("pvc://checkpoints/viggo/lora") == "/mnt/llmops/pvc/checkpoints/viggo/lora"
    assert s.local_path("pvc://checkpoints") == "/mnt/llmops/pvc/checkpoints"
    monkeypatch.setenv(s.PVC_MOUNT_ROOT_ENV, str(tmp_path))
    filesystem, path = s.resolve("pvc://data/viggo/test.jsonl")
    assert isinstance(filesystem, pyarrow_fs.LocalFileSystem)
    assert path == f"{tmp_path}/data/viggo/test.jsonl"
    with pytest.raises(s.StorageURIError, match="has no local path"):
        s.local_path("s3://bucket/x")


def test_marker_helpers_on_the_local_filesystem(tmp_path):
    filesystem = pyarrow_fs.LocalFileSystem()
    marker = f"{tmp_path}/out/_SUCCESS"
    assert not s.file_exists(filesystem, marker)
    assert s.delete_file_if_exists(filesystem, marker) is False
    s.write_bytes(filesystem, marker, b'{"rows": 1}')
    assert (tmp_path / "out" / "_SUCCESS").read_bytes() == b'{"rows": 1}'
    assert s.delete_file_if_exists(filesystem, marker) is True
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_unknown_format_is_rejected_before_any_io():
    with pytest.raises(s.StorageURIError, match="unsupported format 'xlsx'"):
        s.read_dataset("pvc://data/x", "xlsx")
