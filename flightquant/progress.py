"""Progress reporting, one owner for the in-process API, the client and the CLI.

``progress(label, fraction)`` is called once after each row is done: ``label`` is the
row's key (the value of the batch's first string column: the tensor or layer name), and
``fraction`` is the rows done over the rows in all, rising to exactly 1.0. A batch
without a string column (or without rows) is one call labelled ``"batch <i>"``. When the
total is unknown each call gets None, then 1.0 once at the end. An exception raised by
the callback is logged once and never breaks the work.

The CLI's bar (:func:`bar`) lives here too: a tqdm bar on a terminal, nothing otherwise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from . import wire

Progress = Callable[[str, "float | None"], Any]

log = logging.getLogger("flightquant.progress")


def row_keys(batch: pa.RecordBatch) -> list[str | None] | None:
    """The key of each row (:func:`wire.key_column`), None without a string column."""
    i = wire.key_column(batch.schema)
    return None if i is None else batch.column(i).to_pylist()


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
        rows_before = self.rows_done
        self.rows_done += batch.num_rows
        if self.progress is None:
            return
        keys = row_keys(batch) if batch.num_rows else None
        if keys is None:  # one call for the batch
            self.report(f"batch {index}", self._fraction(self.rows_done))
            return
        for i, key in enumerate(keys, start=1):
            label = key if key is not None else f"batch {index}"
            self.report(label, self._fraction(rows_before + i))

    def _fraction(self, rows_done: int) -> float | None:
        if self.total_rows:
            return min(rows_done, self.total_rows) / self.total_rows
        if self.total_batches:
            return min(self.batches_done, self.total_batches) / self.total_batches
        if self.total_rows == 0 or self.total_batches == 0:
            return 1.0
        return None

    def finish(self) -> None:
        """The job is complete: one last call when the total was unknown (or empty)."""
        if self.progress is not None and self.last_fraction != 1.0:
            self.report(self.last_label or "done", 1.0)

    def report(self, label: str, fraction: float | None) -> None:
        self.last_label = label
        self.last_fraction = fraction
        try:
            self.progress(label, fraction)
        except Exception:
            log.warning("progress callback raised; ignored", exc_info=not self._failed)
            self._failed = True


class NoBar:
    """The bar of a quiet job, or of one whose stderr is not a terminal."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, *, quiet: bool = False, unit: str = "bytes"):
    """The CLI's progress bar over ``total`` ``unit`` (bytes are shown scaled; a None
    total counts rows)."""
    if quiet or not sys.stderr.isatty():
        return NoBar()
    from tqdm import tqdm

    common = {"desc": desc, "file": sys.stderr, "leave": False, "dynamic_ncols": True}
    if total is None:
        return tqdm(unit=" rows", **common)
    if unit == "bytes":
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, **common)
    return tqdm(total=total, unit=f" {unit}", **common)
