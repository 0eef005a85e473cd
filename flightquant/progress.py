"""Progress reporting, the same in-process and over the network.

``progress(label, fraction)``: ``label`` is the row key of the batch just done (the value
of its first string column, e.g. the layer name) or ``"batch <i>"``; ``fraction`` rises to
exactly 1.0 (None per batch when the total is unknown, then 1.0 once at the end). An
exception raised by the callback is logged once and never breaks the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa

Progress = Callable[[str, "float | None"], Any]

log = logging.getLogger("flightquant.progress")


def label_of(batch: pa.RecordBatch, index: int) -> str:
    """The row key of a batch's first row, or ``"batch <index>"``."""
    if batch.num_rows:
        for i, field in enumerate(batch.schema):
            if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
                value = batch.column(i)[0].as_py()
                if value is not None:
                    return value
    return f"batch {index}"


class Tracker:
    """Turns finished batches into ``progress`` calls (nothing when ``progress`` is None)."""

    def __init__(
        self, progress: Progress | None, total_rows: int | None, total_batches: int | None
    ):
        self.progress = progress
        self.total_rows = total_rows
        self.total_batches = total_batches
        self.rows_done = 0
        self.batches_done = 0
        self.last_label: str | None = None
        self.last_fraction: float | None = None
        self._failed = False

    def done(self, batch: pa.RecordBatch) -> None:
        """One more output batch (``batch`` is its input or output: same rows)."""
        index = self.batches_done
        self.batches_done += 1
        self.rows_done += batch.num_rows
        if self.progress is None:
            return
        label = label_of(batch, index)
        self.last_label = label
        if self.total_rows:
            fraction = min(self.rows_done, self.total_rows) / self.total_rows
        elif self.total_batches:
            fraction = min(self.batches_done, self.total_batches) / self.total_batches
        elif self.total_rows == 0 or self.total_batches == 0:
            fraction = 1.0
        else:
            fraction = None
        self.report(label, fraction)

    def finish(self) -> None:
        """The job is complete: one last call when the total was unknown (or empty)."""
        if self.progress is not None and self.last_fraction != 1.0:
            self.report(self.last_label or "done", 1.0)

    def report(self, label: str, fraction: float | None) -> None:
        self.last_fraction = fraction
        try:
            self.progress(label, fraction)
        except Exception:
            log.warning("progress callback raised; ignored", exc_info=not self._failed)
            self._failed = True
