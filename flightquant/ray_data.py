"""Ray Data integration: a callable class for ``Dataset.map_batches``.

Ray is an optional extra (``pip install flightquant[ray]``); this module does not import it.

Example
-------
>>> import ray, flightquant.ray_data as frd                     # doctest: +SKIP
>>> ds = ray.data.read_parquet("s3://bucket/layers/")            # doctest: +SKIP
>>> q = ds.map_batches(
...     frd.FlightQuantizer,
...     fn_constructor_kwargs={"locations": ["grpc://a:8815", "grpc://b:8815"], "bits": 4},
...     batch_format="pyarrow",
...     batch_size=64,
...     concurrency=4,
... )                                                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from .arrays import DEFAULT_BATCH_BYTES
from .options import QuantOptions

__all__ = ["FlightQuantizer", "FlightDequantizer", "FlightCalibrator"]

#: blocks bigger than this are sent as several batches (each stays under a server's limit)
DEFAULT_MAX_BATCH_BYTES = DEFAULT_BATCH_BYTES


class FlightQuantizer:
    """Quantize each Ray Data block (a ``pyarrow.Table``) through flightquant servers.

    Parameters
    ----------
    locations : str, list of str or None
        Servers (``grpc://host:8815``) to stream through; a :class:`flightquant.Client`
        spreads the blocks over them and fails over. ``None`` quantizes in-process.
    token : str, optional
        Bearer token of the servers.
    max_batch_bytes : int
        A block larger than this is sent as several RecordBatches (rows are never split).
    client_options : dict, optional
        More keyword arguments of :class:`flightquant.Client` (TLS roots, timeout, ...).
    threads : int, optional
        Kernel threads for the in-process path (ignored with ``locations``).
    **options
        Quantization options of :func:`flightquant.quantize`: ``bits``, ``group_size``,
        ``scheme``, ``method``, ``clip``, ``columns``, ``stats``.

    The options are validated in the constructor, so a typo fails when the actors start,
    not on the first block. Results equal ``flightquant.quantize(block, **options)`` row
    for row, wherever they were computed.
    """

    _op = "quantize"

    def __init__(
        self,
        locations: str | Sequence[str] | None = None,
        *,
        token: str | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        client_options: dict[str, Any] | None = None,
        threads: int | None = None,
        **options: Any,
    ):
        if "op" in options:
            raise TypeError("FlightQuantizer takes no 'op' option; use FlightDequantizer")
        if self._op == "dequantize" and options:
            raise TypeError(
                f"FlightDequantizer takes no quantization options, got {sorted(options)}"
            )
        QuantOptions.from_mapping({"op": self._op, **options})  # fail early on bad options
        if (
            isinstance(max_batch_bytes, bool)
            or not isinstance(max_batch_bytes, int)
            or max_batch_bytes < 1
        ):
            raise ValueError(f"max_batch_bytes must be a positive integer, got {max_batch_bytes!r}")
        if token is not None and not locations:
            raise ValueError("token needs locations (it is the servers' bearer token)")
        self.options = dict(options)
        self.max_batch_bytes = max_batch_bytes
        self.threads = threads
        self.locations = (
            [locations] if isinstance(locations, str) else (list(locations) if locations else None)
        )
        self._client = None
        if self.locations:
            from .client import Client

            self._client = Client(self.locations, token=token, **(client_options or {}))

    def __call__(self, block: pa.Table) -> pa.Table:
        block = _pyarrow_block(block, "FlightQuantizer")
        batches = list(_split(block, self.max_batch_bytes))
        if self._client is not None:
            run = getattr(self._client, self._op)
            out = list(run(iter(batches), **self.options))
        else:
            from . import api

            if self._op == "quantize":
                out = list(api.quantize(iter(batches), threads=self.threads, **self.options))
            else:
                out = list(api.dequantize(iter(batches), threads=self.threads))
        return pa.Table.from_batches(out)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __del__(self):  # Ray actors end without a hook; close the connections anyway
        try:
            self.close()
        except Exception:  # pragma: no cover
            pass

    def __repr__(self) -> str:  # never shows the token
        where = self.locations or "in-process"
        return f"{type(self).__name__}({where!r}, {self.options!r})"


class FlightDequantizer(FlightQuantizer):
    """Restore quantized Ray Data blocks to floats (same arguments, no quantization options)."""

    _op = "dequantize"


class FlightCalibrator:
    """Feed each Ray Data block of activations to a calibration session on a server.

    A block is a table of calibration rows (layer name, ``tokens x width`` float values,
    ``shape``; see :mod:`flightquant.calibration`). Every worker sends to the same server:
    the session's, chosen from ``locations`` by a stable hash of its name. Each call
    returns a one-row table of what it added (``rows``, ``tokens``, ``elements``,
    ``batches``), so ``ds.map_batches(...).sum("tokens")`` counts the tokens calibrated.

    >>> ds.map_batches(                                               # doctest: +SKIP
    ...     FlightCalibrator,
    ...     fn_constructor_kwargs={"locations": "grpc://a:8815", "session": "run-1"},
    ...     batch_format="pyarrow",
    ...     concurrency=4,
    ... ).sum("tokens")
    """

    def __init__(
        self,
        locations: str | Sequence[str],
        session: str,
        *,
        token: str | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        client_options: dict[str, Any] | None = None,
    ):
        from .client import Client
        from .options import CalibrateOptions

        CalibrateOptions.from_mapping({"session": session})  # fail early on a bad name
        if not locations:
            raise ValueError("FlightCalibrator needs the servers' locations")
        self.session = session
        self.max_batch_bytes = max_batch_bytes
        self.locations = [locations] if isinstance(locations, str) else list(locations)
        self._client = Client(self.locations, token=token, **(client_options or {}))

    def __call__(self, block: pa.Table) -> pa.Table:
        block = _pyarrow_block(block, "FlightCalibrator")
        totals = self._client.calibrate(self.session, _split(block, self.max_batch_bytes))
        return pa.table({k: pa.array([v], pa.int64()) for k, v in totals.items()})

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover
            pass

    def __repr__(self) -> str:
        return f"FlightCalibrator({self.locations!r}, session={self.session!r})"


def _split(table: pa.Table, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """The table's rows as RecordBatches of about ``max_bytes`` or less (at least one)."""
    batches = [b for b in table.to_batches() if b.num_rows]
    if not batches:
        yield pa.RecordBatch.from_pylist([], schema=table.schema)
        return
    for batch in batches:
        nbytes = batch.nbytes
        if nbytes <= max_bytes or batch.num_rows <= 1:
            yield batch
            continue
        rows = max(1, int(batch.num_rows * max_bytes / nbytes))
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)


def _pyarrow_block(block, who: str) -> pa.Table:
    """A Ray Data block as a Table; a TypeError saying how to fix ``map_batches`` if the
    block is not Arrow."""
    if isinstance(block, pa.RecordBatch):
        block = pa.Table.from_batches([block])
    if not isinstance(block, pa.Table):
        raise TypeError(
            f"{who} needs pyarrow blocks: pass batch_format='pyarrow' to "
            f"map_batches (got {type(block).__name__})"
        )
    return block
