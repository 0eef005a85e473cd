"""The client's calibration calls: feed a named session on its server, read it back as
an importance matrix, list and drop sessions (:mod:`flightquant.calibration` has the
names and the sums; the server side is :mod:`flightquant.sessions`).

:class:`CalibrationCalls` is a part of :class:`flightquant.Client`; it uses the client's
connections (``_flight_client``), call options and ``locations``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from . import calibration, protocol
from .options import CalibrateOptions

__all__ = ["CalibrationCalls"]


class CalibrationCalls:
    """The calibration methods of :class:`flightquant.Client`."""

    locations: list[str]
    max_in_flight: int

    def session_location(self, session: str) -> str:
        """The server that holds ``session``: the same for every client given the same
        locations (a stable hash of the name), so many workers feed one session."""
        key = CalibrateOptions.from_mapping({"session": session}).session.encode()
        return self.locations[zlib.crc32(key) % len(self.locations)]

    def calibrate(self, session: str, data: Any) -> dict[str, int]:
        """Add activations to the calibration session ``session`` on its server.

        ``data``: a Table, a RecordBatch, a dict ``{layer name: array [..., width]}``, or
        an iterable of RecordBatches or such dicts. Each row is one layer's activations
        (the layer name in the first string column, ``tokens x width`` float values, and
        ``shape`` ``[tokens, width]``; see :mod:`flightquant.calibration`). A bad batch
        raises ``pyarrow.ArrowInvalid`` and adds nothing; the batches before it stay added.

        Returns the totals added: batches, rows, tokens, elements.

        Examples
        --------
        >>> client.calibrate("run-1", {"blk.0.attn_q.weight": acts})  # doctest: +SKIP
        {'batches': 1, 'rows': 1, 'tokens': 512, 'elements': 2097152}
        """
        command = CalibrateOptions.from_mapping({"session": session}).to_json()
        location = self.session_location(session)
        client = self._flight_client(location)
        totals = {"batches": 0, "rows": 0, "tokens": 0, "elements": 0}
        batches = _calibration_batches(data)
        batch = next(batches, None)
        while batch is not None:  # one stream per run of batches with one schema
            batch = self._calibrate_stream(client, command, batch, batches, totals)
        return totals

    def _calibrate_stream(self, client, command: bytes, first, batches, totals):
        """Send ``first`` and the following batches of its schema; returns the first batch
        of another schema (None at the end)."""
        writer, reader = client.do_exchange(
            flight.FlightDescriptor.for_command(command), options=self._call_options()
        )
        schema = first.schema
        pending = 0
        batch: pa.RecordBatch | None = first
        try:
            try:
                writer.begin(schema)
                while batch is not None and batch.schema.equals(schema):
                    writer.write_batch(batch)
                    pending += 1
                    if pending >= self.max_in_flight:
                        _calibration_reply(reader, totals)
                        pending -= 1
                    batch = next(batches, None)
                writer.done_writing()
                while pending:
                    _calibration_reply(reader, totals)
                    pending -= 1
            except (flight.FlightError, pa.ArrowException, OSError) as exc:
                # a failed write says little: the server's status comes with the next read
                raise _flight_error(_status(reader) or exc) from None
        finally:
            try:
                writer.close()
            except Exception:
                pass  # the status was read (or raised) above
        return batch

    def imatrix_table(self, session: str) -> pa.Table:
        """Session ``session`` as a table: ``layer_name``, ``in_sum2`` (list<float32>),
        ``count`` (int64), one row per layer, sorted by name."""
        ticket = flight.Ticket(calibration.imatrix_ticket(session))
        client = self._flight_client(self.session_location(session))
        try:
            return client.do_get(ticket, options=self._call_options()).read_all()
        except (flight.FlightError, pa.ArrowException) as exc:
            raise _flight_error(exc) from None

    def imatrix(self, session: str, *, datasets=(), chunk_size: int = 512):
        """Session ``session`` as a :class:`flightquant.modelfiles.imatrix.Imatrix`
        (``write_imatrix`` saves it as llama.cpp's GGUF imatrix)."""
        from .modelfiles.imatrix import imatrix_from_sums

        sums = calibration.sums_from_table(self.imatrix_table(session))
        return imatrix_from_sums(sums, datasets=datasets, chunk_size=chunk_size)

    def calibration_sessions(self) -> list[dict[str, Any]]:
        """Every server's calibration sessions (name, layers, tokens, bytes, idle time, and
        the server's ``location``)."""
        out = []
        for location in self.locations:
            for s in self._action_at(location, protocol.CALIBRATION_LIST, b""):
                out.append({**s, "location": location})
        return out

    def drop_session(self, session: str) -> bool:
        """Drop ``session`` on its server (its memory is freed); False if there was none."""
        body = json.dumps({"session": session}).encode()
        location = self.session_location(session)
        return bool(self._action_at(location, protocol.CALIBRATION_DROP, body)["dropped"])

    def _action_at(self, location: str, name: str, body: bytes) -> Any:
        try:
            results = list(
                self._flight_client(location).do_action(
                    flight.Action(name, body), options=self._call_options()
                )
            )
        except (flight.FlightError, pa.ArrowException) as exc:
            raise _flight_error(exc) from None
        return json.loads(results[0].body.to_pybytes())


def _flight_error(exc: BaseException) -> BaseException:
    """The same kind of error with the server's message alone."""
    message = protocol.server_message(exc)
    if isinstance(exc, pa.ArrowInvalid) or not isinstance(exc, flight.FlightError):
        return pa.ArrowInvalid(message) if isinstance(exc, pa.ArrowInvalid) else exc
    return type(exc)(message)


def _status(reader) -> BaseException | None:
    """The error that ends the call, read off its remaining messages (None if it ends
    cleanly)."""
    try:
        while True:
            reader.read_chunk()
    except StopIteration:
        return None
    except (flight.FlightError, pa.ArrowException, OSError) as exc:
        return exc


def _calibration_reply(reader, totals: dict[str, int]) -> None:
    chunk = reader.read_chunk()
    meta = json.loads(chunk.app_metadata.to_pybytes()) if chunk.app_metadata else {}
    totals["batches"] += 1
    for key in ("rows", "tokens", "elements"):
        totals[key] += int(meta.get(key, 0))


def _calibration_batches(data: Any) -> Iterator[pa.RecordBatch]:
    if isinstance(data, pa.RecordBatch):
        yield data
    elif isinstance(data, pa.Table):
        yield from (b for b in data.to_batches() if b.num_rows)
    elif isinstance(data, Mapping):
        yield calibration.activation_batch(data)
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "calibrate takes a pyarrow.Table, a RecordBatch, a dict of layer name -> "
            f"activations, or an iterable of those; got {type(data).__name__}"
        )
    else:
        for item in data:
            yield from _calibration_batches(item)
