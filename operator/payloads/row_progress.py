"""Rows done while a batch job runs: counted as they leave the engine stage, reported every interval.

The count lives in a small Ray actor that every block of generated rows tells its size on its way to the writer;
a thread in the driver reads it and reports `rowsDone` (and, once two blocks have arrived, `rowsPerSecond`: the
rows after the first block over the time since it arrived, which leaves the engine's start out). Reports are
best effort: a failed one is logged, and the job goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from payloads.report import ReportError

logger = logging.getLogger("llmops.payloads.row_progress")

class RowCount:
    """Arrivals of generated rows: how many, and when the first and the latest block came (the actor's clock)."""

    def __init__(self) -> None:
        self.rows = 0
        self.first_block_rows = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None

    def add(self, rows: int) -> None:
        now = time.time()
        if self.first is None:
            self.first, self.first_block_rows = now, rows
        self.rows += rows
        self.last = now

    def snapshot(self) -> Tuple[int, int, Optional[float], Optional[float]]:
        return self.rows, self.first_block_rows, self.first, self.last


def progress_of(snapshot: Tuple[int, int, Optional[float], Optional[float]], total: int) -> Dict[str, Any]:
    rows, first_rows, first, last = snapshot
    progress: Dict[str, Any] = {"rowsDone": rows, "rowsTotal": total}
    if first is not None and last is not None and last > first and rows > first_rows:
        progress["rowsPerSecond"] = round((rows - first_rows) / (last - first), 1)
    return progress


class RowProgress:
    """`with RowProgress(total, report) as progress: write(progress.counted(ds))`; then `progress.final()`."""

    def __init__(self, total: int, report: Callable[[Dict[str, Any]], None], interval_s: float):
        import ray

        self.total, self.report, self.interval_s = total, report, interval_s
        self.counter = ray.remote(num_cpus=0)(RowCount).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="row-progress", daemon=True)
        self._reported: Optional[Dict[str, Any]] = None

    def counted(self, ds: Any) -> Any:
        counter = self.counter

        def count(batch: Any) -> Any:
            counter.add.remote(batch.num_rows)
            return batch

        return ds.map_batches(count, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)

    def final(self) -> Dict[str, Any]:
        import ray

        return progress_of(ray.get(self.counter.snapshot.remote()), self.total)

    def __enter__(self) -> "RowProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                progress = self.final()
                if progress != self._reported:
                    self.report(progress)
                    self._reported = progress
            except ReportError as exc:
                logger.warning("progress report failed: %s", exc)
            except Exception as exc:  # a progress report must never end the job
                logger.warning("progress not read: %s", exc)
