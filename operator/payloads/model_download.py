"""Download a model once into its cache claim: the model cache's Job runs this (docs/model-cache.md).

    python -m payloads.model_download --source <hf id | s3://... | gs://...> --dest pvc://<claim>/<dir>
                                      [--revision <branch, tag or commit>]

It lists the model's files first (so the report can say how many bytes there are), copies them one by one into
the claim (each through a `.partial` file renamed when whole, so a rerun skips what is already there), reports
bytes done every LLMOPS_PROGRESS_INTERVAL_S, and writes the completion marker last: a claim without it holds no
complete model. Credentials come from the pod's environment only (HF_TOKEN; AWS_* / GOOGLE_* or the pod's
cloud identity for object storage), never from arguments, and the reporter redacts them from every message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

from payloads import storage
from payloads.report import ReportError, ResultReporter, interval_from

logger = logging.getLogger("llmops.payloads.model_download")

MARKER = ".llmops-model-complete.json"
PARTIAL = ".partial"
HUB_STAGING = ".llmops-hub"   # huggingface_hub's own folder (its metadata beside each file), removed at the end
CHUNK_BYTES = 8 * 2**20
ATTEMPTS = 4


class DownloadError(RuntimeError):
    """A download that retrying cannot fix; the message says what to change."""


@dataclass(frozen=True)
class ModelFile:
    name: str   # path relative to the model's root, "/"-separated
    size: int


class Source:
    """Where the model comes from: its files, and a way to write one of them to a local path."""

    def files(self) -> List[ModelFile]:
        raise NotImplementedError

    def fetch(self, item: ModelFile, target: str, progress: Callable[[int], None]) -> None:
        raise NotImplementedError


class ObjectStoreSource(Source):
    """s3:// or gs://: every file below the prefix, read through pyarrow's filesystems (as the other payloads)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.filesystem, self.root = storage.resolve(uri)

    def files(self) -> List[ModelFile]:
        import pyarrow.fs as pafs

        found = self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        prefix = self.root.rstrip("/") + "/"
        out = [ModelFile(info.path[len(prefix):], int(info.size or 0)) for info in found
               if info.type == pafs.FileType.File and info.path.startswith(prefix)]
        return sorted(out, key=lambda f: f.name)

    def fetch(self, item: ModelFile, target: str, progress: Callable[[int], None]) -> None:
        with self.filesystem.open_input_stream(f"{self.root.rstrip('/')}/{item.name}") as src, \
                open(target, "wb") as dst:
            while True:
                chunk = src.read(CHUNK_BYTES)
                if not chunk:
                    return
                dst.write(chunk)
                progress(len(chunk))


class HubSource(Source):
    """A Hugging Face id: the repository's files at the revision, through huggingface_hub (HF_TOKEN, HF_ENDPOINT
    from the environment)."""

    def __init__(self, repo_id: str, revision: Optional[str]):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.endpoint = os.environ.get("HF_ENDPOINT") or None   # a hub mirror, when the pod's environment names one
        self.api = HfApi(endpoint=self.endpoint, token=os.environ.get("HF_TOKEN") or None)
        info = self.api.model_info(repo_id, revision=revision, files_metadata=True)
        self.commit = info.sha or revision   # every file from the same commit, even if the branch moves
        self.siblings = info.siblings or []

    def files(self) -> List[ModelFile]:
        return sorted((ModelFile(s.rfilename, int(s.size or 0)) for s in self.siblings), key=lambda f: f.name)

    def fetch(self, item: ModelFile, target: str, progress: Callable[[int], None]) -> None:
        from huggingface_hub import hf_hub_download

        root = target[: -len(item.name + PARTIAL)]   # the model's folder: target is <root>/<name>.partial
        staged = hf_hub_download(self.repo_id, item.name, revision=self.commit, local_dir=root + HUB_STAGING,
                                 token=self.api.token, endpoint=self.endpoint)
        os.replace(staged, target)
        progress(item.size)


def source_for(source: str, revision: Optional[str]) -> Source:
    if "://" in source:
        location = storage.parse(source)
        if not location.is_object_store:
            raise DownloadError(f"{source}: only a Hugging Face id, s3:// or gs:// is downloaded into a cache")
        return ObjectStoreSource(location.uri)
    return HubSource(source, revision)


class Progress:
    """Bytes done, reported at most every `interval` seconds (and at the start and the end)."""

    def __init__(self, reporter: ResultReporter, source: str, files: Iterable[ModelFile], interval: float,
                 clock: Callable[[], float] = time.monotonic):
        self.reporter, self.source, self.interval, self.clock = reporter, source, interval, clock
        listed = list(files)
        self.total, self.count, self.done = sum(f.size for f in listed), len(listed), 0
        self.last: Optional[float] = None

    def figures(self) -> dict:
        return {"bytesDone": self.done, "bytesTotal": self.total, "files": self.count}

    def add(self, count: int) -> None:
        self.done += count
        if self.last is None or self.clock() - self.last >= self.interval:
            self.send()

    def send(self) -> None:
        self.last = self.clock()
        try:
            self.reporter.running(f"downloading {self.source}", progress=self.figures())
        except ReportError as exc:   # progress is best effort; the final report is not
            logger.warning("progress report failed: %s", exc)


def marker_matches(dest: str, source: str, revision: Optional[str]) -> Optional[dict]:
    try:
        with open(os.path.join(dest, MARKER), encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    return marker if (marker.get("source"), marker.get("revision")) == (source, revision) else None


def _retrying(action: Callable[[], None], what: str, sleep: Callable[[float], None] = time.sleep) -> None:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return action()
        except DownloadError:
            raise
        except Exception as exc:  # network and storage errors: the library says which; retry a few times
            if attempt == ATTEMPTS:
                raise DownloadError(f"{what} failed after {attempt} attempts: {exc}") from exc
            logger.warning("%s failed (%s); retrying", what, exc)
            sleep(2.0 * attempt)


def download(source: str, dest: str, revision: Optional[str], reporter: ResultReporter,
             interval: float = 30.0, opener: Callable[[str, Optional[str]], Source] = source_for) -> dict:
    """Copy the model into `dest` (a local folder), marker last; returns the figures it reports."""
    done = marker_matches(dest, source, revision)
    if done is not None:   # an earlier run completed it
        return {k: done[k] for k in ("bytesDone", "bytesTotal", "files")}
    origin = opener(source, revision)
    files = origin.files()
    if not files:
        raise DownloadError(f"{source} holds no files: check the model's name (and revision)")
    os.makedirs(dest, exist_ok=True)
    free = _free_bytes(dest)
    progress = Progress(reporter, source, files, interval)
    if free is not None and free < progress.total:
        raise DownloadError(f"the model takes {progress.total} bytes but the claim has {free} free: raise the "
                            "cache's size")
    progress.send()
    for item in files:
        target = os.path.join(dest, *item.name.split("/"))
        if os.path.isfile(target) and os.path.getsize(target) == item.size:
            progress.add(item.size)   # a rerun: this file is whole already
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + PARTIAL
        fetched = [0]

        def one(item: ModelFile = item, partial: str = partial) -> None:
            progress.done -= fetched[0]   # a retry starts the file again
            fetched[0] = 0

            def count(n: int) -> None:
                fetched[0] += n
                progress.add(n)
            origin.fetch(item, partial, count)

        _retrying(one, f"downloading {posixpath.join(source, item.name)}")
        os.replace(partial, target)
    shutil.rmtree(os.path.join(dest, HUB_STAGING), ignore_errors=True)
    figures = progress.figures()
    with open(os.path.join(dest, MARKER + PARTIAL), "w", encoding="utf-8") as handle:
        json.dump({"source": source, "revision": revision, **figures}, handle, sort_keys=True)
    os.replace(os.path.join(dest, MARKER + PARTIAL), os.path.join(dest, MARKER))
    return figures


def _free_bytes(path: str) -> Optional[int]:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True, help="pvc://<claim>/<dir>")
    parser.add_argument("--revision")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    reporter = ResultReporter.from_env()
    try:
        dest = storage.local_path(args.dest)
        figures = download(args.source, dest, args.revision, reporter, interval_from())
    except Exception as exc:
        logger.exception("download failed")
        reporter.failed(f"{type(exc).__name__}: {exc}" if not isinstance(exc, DownloadError) else str(exc))
        return 1
    reporter.succeeded(f"{args.source} is cached ({figures['files']} files, {figures['bytesTotal']} bytes)",
                       progress=figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
