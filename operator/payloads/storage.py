"""Storage URIs as the payloads see them inside the Ray pods.

Three schemes exist:

- ``s3://bucket/key`` and ``gs://bucket/key``: object storage, opened with pyarrow's filesystems (credentials come
  from the pod's environment: IRSA / workload identity / AWS_* variables).
- ``pvc://<claim>/<path>``: a PersistentVolumeClaim that the operator mounts on every Ray pod at
  ``/mnt/llmops/pvc/<claim>``, so the URI is the local path ``/mnt/llmops/pvc/<claim>/<path>``.
  ``LLMOPS_PVC_ROOT`` moves that mount root (tests use it; the operator never sets it).

Dataset helpers read and write the three tabular formats (``jsonl``, ``parquet``, ``csv``) through Ray Data.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs
    import ray.data

PVC_MOUNT_ROOT = "/mnt/llmops/pvc"
PVC_MOUNT_ROOT_ENV = "LLMOPS_PVC_ROOT"
OBJECT_STORE_SCHEMES = ("s3", "gs")
SCHEMES = OBJECT_STORE_SCHEMES + ("pvc",)
FORMATS = ("jsonl", "parquet", "csv")

# File extensions the readers pick up when a URI names a directory; anything else there (e.g. a `_SUCCESS`
# marker) is ignored.
_READ_EXTENSIONS = {
    "jsonl": ["jsonl", "json", "jsonl.gz", "json.gz", "jsonl.zst", "json.zst"],
    "parquet": ["parquet"],
    "csv": ["csv", "csv.gz", "csv.zst"],
}
_CLAIM_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class StorageURIError(ValueError):
    """A URI this payload cannot use; the message names the URI and the rule it breaks."""


@dataclass(frozen=True)
class StorageURI:
    scheme: str
    root: str  # the bucket or the claim
    key: str  # path below the root, without leading or trailing "/"; "" for the root itself

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.root}/{self.key}" if self.key else f"{self.scheme}://{self.root}"

    @property
    def is_object_store(self) -> bool:
        return self.scheme in OBJECT_STORE_SCHEMES

    @property
    def name(self) -> str:
        """The last path segment (the root when there is no key)."""
        return self.key.rsplit("/", 1)[-1] if self.key else self.root

    @property
    def parent(self) -> "StorageURI":
        if not self.key:
            raise StorageURIError(f"{self.uri} has no parent")
        return StorageURI(self.scheme, self.root, self.key.rpartition("/")[0])

    def contains(self, other: "StorageURI") -> bool:
        """True when ``other`` is this location or lies below it (whole path segments only)."""
        if (self.scheme, self.root) != (other.scheme, other.root):
            return False
        return not self.key or other.key == self.key or other.key.startswith(self.key + "/")

    def __str__(self) -> str:
        return self.uri


def parse(uri: str) -> StorageURI:
    """Parse and normalise a storage URI; raises StorageURIError with the reason."""
    if not isinstance(uri, str) or "://" not in uri:
        raise StorageURIError(f"{uri!r} is not a storage URI; expected one of {', '.join(s + '://' for s in SCHEMES)}")
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise StorageURIError(f"{uri!r} has unsupported scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if "?" in rest or "#" in rest:
        raise StorageURIError(f"{uri!r} must not carry a query or fragment")
    root, _, key = rest.partition("/")
    if not root:
        raise StorageURIError(f"{uri!r} names no {'claim' if scheme == 'pvc' else 'bucket'}")
    if scheme == "pvc" and (len(root) > 253 or not _CLAIM_NAME.fullmatch(root)):
        raise StorageURIError(f"{uri!r}: {root!r} is not a valid PersistentVolumeClaim name")
    segments = [s for s in key.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise StorageURIError(f"{uri!r} must not contain '.' or '..' path segments")
    return StorageURI(scheme, root, "/".join(segments))


def pvc_mount_root(env: Optional[Mapping[str, str]] = None) -> str:
    env = os.environ if env is None else env
    return env.get(PVC_MOUNT_ROOT_ENV) or PVC_MOUNT_ROOT


def local_path(uri: str | StorageURI, env: Optional[Mapping[str, str]] = None) -> str:
    """The local path of a ``pvc://`` URI on a Ray pod."""
    location = uri if isinstance(uri, StorageURI) else parse(uri)
    if location.scheme != "pvc":
        raise StorageURIError(f"{location.uri} is not a pvc:// URI and has no local path")
    return posixpath.join(pvc_mount_root(env), location.root, location.key).rstrip("/")


def resolve(uri: str | StorageURI) -> Tuple["pyarrow.fs.FileSystem", str]:
    """(pyarrow filesystem, path inside it) for a storage URI."""
    import pyarrow.fs

    location = uri if isinstance(uri, StorageURI) else parse(uri)
    if location.scheme == "pvc":
        return pyarrow.fs.LocalFileSystem(), local_path(location)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(location.uri)
    return filesystem, path.rstrip("/")


def file_exists(filesystem: "pyarrow.fs.FileSystem", path: str) -> bool:
    import pyarrow.fs

    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def delete_file_if_exists(filesystem: "pyarrow.fs.FileSystem", path: str) -> bool:
    if not file_exists(filesystem, path):
        return False
    filesystem.delete_file(path)
    return True


def write_bytes(filesystem: "pyarrow.fs.FileSystem", path: str, data: bytes) -> None:
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise StorageURIError(f"unsupported format {fmt!r}; expected one of {', '.join(FORMATS)}")


def read_dataset(uri: str | StorageURI, fmt: str, columns: Optional[Sequence[str]] = None) -> "ray.data.Dataset":
    """A lazy Ray Dataset over a file or a directory of files in ``fmt``, optionally projected to ``columns``.

    Missing paths fail here (Ray lists the files eagerly).
    """
    import ray.data

    _check_format(fmt)
    filesystem, path = resolve(uri)
    extensions = _READ_EXTENSIONS[fmt]
    if fmt == "parquet":
        ds = ray.data.read_parquet(path, filesystem=filesystem, file_extensions=extensions)
    elif fmt == "jsonl":
        # Arrow's JSON reader parses newline-delimited JSON (Ray's `lines=True` mode would ignore `filesystem`).
        ds = ray.data.read_json(path, filesystem=filesystem, file_extensions=extensions)
    else:
        ds = ray.data.read_csv(path, filesystem=filesystem, file_extensions=extensions)
    # Ray pushes the projection down into the parquet reader.
    return ds.select_columns(list(columns)) if columns else ds


def write_dataset(ds: "ray.data.Dataset", uri: str | StorageURI, fmt: str) -> None:
    """Write ``ds`` as the only content of the directory ``uri`` (existing content is replaced)."""
    from ray.data import SaveMode

    _check_format(fmt)
    filesystem, path = resolve(uri)
    writer = {"jsonl": ds.write_json, "parquet": ds.write_parquet, "csv": ds.write_csv}[fmt]
    writer(path, filesystem=filesystem, mode=SaveMode.OVERWRITE)
