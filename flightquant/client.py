"""The Flight client: send Arrow data or NumPy arrays through one or more servers.

Results equal the in-process functions (:func:`flightquant.quantize`, ...) bit for bit: the
client only moves batches; the server runs the same codec.

Each call opens one ``DoExchange`` per run of batches that share a schema. A writer thread
feeds the stream while the caller's thread reads results, with at most ``max_in_flight``
batches sent and not yet answered, so an input larger than memory streams through in
bounded memory. With several locations, calls start at the next location in turn; when a
server becomes unreachable or refuses (UNAVAILABLE, dropped connection), the batches not
yet answered are resent to the next location, so every row comes back exactly once and in
order. INVALID_ARGUMENT (bad options or data) is never retried: it raises
``pyarrow.ArrowInvalid`` (a ``ValueError``) with the server's message.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from . import protocol
from .arrays import QuantizedTensor, arrays_to_batches, batches_to_results, with_importance
from .client_calibration import CalibrationCalls
from .options import QuantOptions, check_importance_method
from .progress import Progress, Tracker

__all__ = ["Client", "Progress"]

log = logging.getLogger("flightquant.client")


def _retryable(exc: BaseException) -> bool:
    """UNAVAILABLE, RESOURCE_EXHAUSTED or a lost connection: the batches may go to another
    server (the kind as :func:`flightquant.protocol.error_kind` reads it)."""
    return protocol.error_kind(exc) in protocol.RETRIED


def _pem(value: bytes | str | os.PathLike | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(os.fspath(value), "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {value!r}: {exc.strerror}") from None


class _SourceError(Exception):
    """An exception raised by the caller's iterable (not the network)."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


class _Source:
    """The caller's batches, pulled lazily; one batch can be looked at before taking it."""

    def __init__(self, batches: Iterable[pa.RecordBatch]):
        self._it = iter(batches)
        self._head: pa.RecordBatch | None = None
        self._done = False
        self.index = 0

    def peek(self) -> pa.RecordBatch | None:
        if self._head is None and not self._done:
            try:
                item = next(self._it)
            except StopIteration:
                self._done = True
                return None
            except BaseException as exc:
                raise _SourceError(exc) from exc
            if not isinstance(item, pa.RecordBatch):
                raise _SourceError(
                    TypeError(
                        f"item {self.index} of the iterable is a {type(item).__name__}, "
                        "not a pyarrow.RecordBatch"
                    )
                )
            self._head = item
        return self._head

    def take_if(self, schema: pa.Schema) -> pa.RecordBatch | None:
        """The next batch when it has ``schema``; None at the end or on a schema change."""
        head = self.peek()
        if head is None or not head.schema.equals(schema, check_metadata=True):
            return None
        self._head = None
        self.index += 1
        return head


class _Attempt:
    """One DoExchange on one location: a writer thread plus the caller reading.

    The writer thread only writes batches. Ending the client's half of the stream
    (``done_writing``) is left to the reading thread, once every batch is sent and
    answered: pyarrow's reader, when the call fails, finishes the stream itself and sends
    WritesDone from the reading thread without a lock against the writer's own
    ``done_writing``, and two concurrent WritesDone abort the process (gRPC
    "GRPC_CALL_ERROR_TOO_MANY_OPERATIONS ... Check failed", issue 11 defect 6). So the
    reading thread reads only while an answer is due or the writer has stopped.
    """

    def __init__(self, job: _Job, location: str, schema: pa.Schema):
        self.job = job
        self.location = location
        self.schema = schema
        self.stop = False
        self.sent_all = False  # the source is exhausted and every batch written
        self.writer_done = False  # the writer thread has stopped (sent all, failed, stopped)
        self.writes_closed = False
        self.write_error: BaseException | None = None
        self.cancelled = False
        self.reader = None
        self.writer = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        job = self.job
        descriptor = flight.FlightDescriptor.for_command(job.options.to_json())
        client = job.client._flight_client(self.location)
        self.writer, self.reader = client.do_exchange(
            descriptor, options=job.client._call_options(pipeline=True)
        )
        resend = list(job.pending)
        self.thread = threading.Thread(
            target=self._write, args=(resend,), name="fq-client-writer", daemon=True
        )
        self.thread.start()

    def _write(self, resend: list[pa.RecordBatch]) -> None:
        job = self.job
        cond = job.cond
        try:
            self.writer.begin(self.schema)
            for batch in resend:
                if self.stop:
                    return
                self.writer.write_batch(batch)
            while True:
                with cond:
                    while len(job.pending) >= job.max_in_flight and not self.stop:
                        cond.wait()
                    if self.stop:
                        return
                batch = job.source.take_if(self.schema)
                with cond:
                    if self.stop:  # the reader gave up while the source was producing:
                        if batch is not None:  # unanswered, so the next attempt sends it
                            job.pending.append(batch)
                        return
                    if batch is None:
                        self.sent_all = True  # the reading thread ends the writes
                        return
                    job.pending.append(batch)
                    cond.notify_all()
                self.writer.write_batch(batch)
        except BaseException as exc:  # reported by the reading side
            self.write_error = exc
            if isinstance(exc, _SourceError):
                self._cancel()  # the server waits for more input: end the call
        finally:
            with cond:
                self.writer_done = True
                cond.notify_all()

    def _cancel(self) -> None:
        if not self.cancelled and self.reader is not None:
            self.cancelled = True
            try:
                self.reader.cancel()
            except Exception:  # pragma: no cover - best effort
                pass

    def finish(self, cancel: bool) -> None:
        """Stop the writer thread (cancelling the call when asked) and close the call."""
        with self.job.cond:
            self.stop = True
            self.job.cond.notify_all()
        if cancel:
            self._cancel()
        if self.thread is not None:
            self.thread.join(30.0)
            if self.thread.is_alive():  # pragma: no cover - cancel unblocks the writer
                log.warning("writer thread for %s did not stop", self.location)
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass  # the call's status was already read (or the call was cancelled)


class _Job:
    """One call of quantize/dequantize: batches in order, failover across locations."""

    def __init__(
        self,
        client: Client,
        batches: Iterable[pa.RecordBatch],
        options: QuantOptions,
        progress: Progress | None,
        total_rows: int | None,
        total_batches: int | None,
    ):
        self.client = client
        self.options = options
        self.source = _Source(batches)
        self.pending: collections.deque[pa.RecordBatch] = collections.deque()
        self.cond = threading.Condition()
        self.max_in_flight = client.max_in_flight
        self.tracker = Tracker(progress, total_rows, total_batches)

    def run(self) -> Iterator[pa.RecordBatch]:
        locations = self.client.locations
        at = self.client._next_start()
        failures: list[tuple[str, str]] = []
        while True:
            try:
                head = self.source.peek() if not self.pending else self.pending[0]
            except _SourceError as exc:
                raise exc.exc from None
            if head is None:
                break
            schema = head.schema
            location = locations[at % len(locations)]
            attempt = _Attempt(self, location, schema)
            try:
                progressed = False
                for out in self._attempt(attempt):
                    progressed = True
                    failures.clear()
                    yield out
            except _Failover as fo:
                log.warning(
                    "stream to %s failed (%s); %d unanswered batch(es) go to the next location",
                    location,
                    fo.message,
                    len(self.pending),
                )
                if progressed or fo.progressed:
                    # the stream got somewhere (e.g. a server ended it for idling while the
                    # source was slow): the next stream may too, even on the same server
                    failures.clear()
                    at += 1
                    continue
                failures.append((location, fo.message))
                if len(failures) >= len(locations):
                    detail = "; ".join(f"{loc}: {msg}" for loc, msg in failures)
                    raise flight.FlightUnavailableError(
                        f"no server could take the stream, tried {len(failures)} location(s): "
                        f"{detail}"
                    ) from None
                at += 1
        self.tracker.finish()

    def _attempt(self, attempt: _Attempt) -> Iterator[pa.RecordBatch]:
        clean = False
        progressed = False
        try:
            try:
                attempt.start()
                while True:
                    with self.cond:  # read only while an answer is due (see _Attempt)
                        while not self.pending and not attempt.writer_done:
                            self.cond.wait()
                        close = not self.pending and attempt.sent_all and not attempt.writes_closed
                    if close:
                        attempt.writes_closed = True
                        attempt.writer.done_writing()
                    try:
                        chunk = attempt.reader.read_chunk()
                    except StopIteration:
                        break
                    out = chunk.data
                    if out is None:  # an in-band error from a read-ahead server, or nothing
                        _raise_in_band_error(chunk.app_metadata)
                        continue
                    with self.cond:
                        if not self.pending:
                            raise flight.FlightServerError(
                                f"{attempt.location} sent more results than batches sent"
                            )
                        self.pending.popleft()
                        self.cond.notify_all()
                    progressed = True
                    self.tracker.done(out)
                    yield out
            except Exception as exc:
                attempt.finish(cancel=True)
                werr = attempt.write_error
                if isinstance(werr, _SourceError):
                    raise werr.exc from None
                if attempt.cancelled and isinstance(exc, flight.FlightCancelledError) and werr:
                    exc = werr
                if _retryable(exc):
                    raise _Failover(protocol.server_message(exc), progressed) from None
                if isinstance(exc, pa.ArrowInvalid):
                    raise pa.ArrowInvalid(protocol.server_message(exc)) from None
                raise
            attempt.finish(cancel=False)
            clean = True
            werr = attempt.write_error
            if isinstance(werr, _SourceError):
                raise werr.exc from None
            if werr is not None:
                if _retryable(werr):
                    raise _Failover(protocol.server_message(werr), progressed)
                raise werr
            if self.pending:
                raise _Failover(
                    f"the stream ended with {len(self.pending)} batch(es) unanswered", progressed
                )
        finally:
            if not clean:  # the caller stopped reading, or an error above
                attempt.finish(cancel=True)


#: tells the server this client keeps sending without waiting for each answer and ends
#: the call on an in-band error message, so the server may read ahead
_PIPELINE = (protocol.PIPELINE_HEADER.encode(), protocol.PIPELINE_VALUE.encode())


def _raise_in_band_error(app_metadata) -> None:
    """Raise the error a read-ahead server sends in band (:func:`protocol.decode_error`)."""
    error = protocol.decode_error(app_metadata)
    if error is not None:
        raise protocol.exception_for(*error)


class _Failover(Exception):
    def __init__(self, message: str, progressed: bool):
        super().__init__(message)
        self.message = message
        self.progressed = progressed


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema], schema=schema)


class Client(CalibrationCalls):
    """Quantize through flightquant servers with the in-process API's containers.

    Parameters
    ----------
    locations : str or list of str
        ``grpc://host:port`` (or ``grpc+tls://``) of one server or several; calls start at
        the next location in turn and fail over to the others.
    token : str, optional
        Bearer token, sent as ``authorization: Bearer <token>``.
    tls_root_certs, cert_chain, private_key : bytes, PEM text or path, optional
        CA to verify the server, and the client certificate and key for mutual TLS.
    max_in_flight : int
        Batches sent and not yet answered, per stream (memory bound and pipelining).
    timeout : float, optional
        Deadline in seconds of each call (actions, and each whole stream).

    Examples
    --------
    >>> with Client("grpc://127.0.0.1:8815") as client:  # doctest: +SKIP
    ...     q = client.quantize(table, bits=4, group_size=128)
    ...     client.health()["status"]
    'ok'
    """

    def __init__(
        self,
        locations: str | Sequence[str] = "grpc://127.0.0.1:8815",
        *,
        token: str | None = None,
        tls_root_certs: bytes | str | os.PathLike | None = None,
        cert_chain: bytes | str | os.PathLike | None = None,
        private_key: bytes | str | os.PathLike | None = None,
        max_in_flight: int = 4,
        timeout: float | None = None,
    ):
        if isinstance(locations, str):
            locations = [locations]
        locations = list(locations)
        if not locations or not all(isinstance(loc, str) and loc for loc in locations):
            raise ValueError(
                f"locations must be a URL such as 'grpc://host:8815' or a non-empty list of "
                f"them, got {locations!r}"
            )
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(
                f"timeout must be None or a positive number of seconds, got {timeout!r}"
            )
        if (cert_chain is None) != (private_key is None):
            raise ValueError("mutual TLS needs both cert_chain and private_key")
        from .security import auth_headers

        self.locations = locations
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self._headers = auth_headers(token)
        self._tls = {
            "tls_root_certs": _pem(tls_root_certs, "tls_root_certs"),
            "cert_chain": _pem(cert_chain, "cert_chain"),
            "private_key": _pem(private_key, "private_key"),
        }
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()
        self._rr = itertools.count()

    def __repr__(self) -> str:  # never shows the token
        return f"Client({self.locations!r}, max_in_flight={self.max_in_flight})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (idempotent)."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            try:
                c.close()
            except Exception:  # pragma: no cover
                pass

    # -- plumbing ------------------------------------------------------------------------

    def _flight_client(self, location: str) -> flight.FlightClient:
        with self._lock:
            c = self._clients.get(location)
            if c is None:
                kwargs = {k: v for k, v in self._tls.items() if v is not None}
                c = self._clients[location] = flight.connect(location, **kwargs)
            return c

    def _call_options(self, pipeline: bool = False) -> flight.FlightCallOptions:
        headers = self._headers + [_PIPELINE] if pipeline else self._headers
        return flight.FlightCallOptions(headers=headers, timeout=self.timeout)

    def _next_start(self) -> int:
        with self._lock:
            return next(self._rr) % len(self.locations)

    def _action(self, name: str) -> dict[str, Any]:
        failures = []
        for location in self.locations:
            try:
                results = list(
                    self._flight_client(location).do_action(
                        flight.Action(name, b""), options=self._call_options()
                    )
                )
            except Exception as exc:
                if _retryable(exc):
                    failures.append(f"{location}: {protocol.server_message(exc)}")
                    continue
                if isinstance(exc, pa.ArrowInvalid):
                    raise pa.ArrowInvalid(protocol.server_message(exc)) from None
                raise
            return json.loads(results[0].body.to_pybytes())
        raise flight.FlightUnavailableError(
            f"no server answered the {name!r} action: {'; '.join(failures)}"
        )

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "version": ..., "draining": bool}`` of the first live server."""
        return self._action(protocol.HEALTH)

    def stats(self) -> dict[str, Any]:
        """The first live server's counters (streams, batches, elements, bytes, errors)."""
        return self._action(protocol.STATS)

    def config(self) -> dict[str, Any]:
        """The first live server's limits and defaults."""
        return self._action(protocol.CONFIG)

    # -- data ----------------------------------------------------------------------------

    def quantize(
        self,
        data: Any,
        progress: Progress | None = None,
        importance: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Quantize a Table, a RecordBatch or an iterable of RecordBatches on the servers.

        Takes the options of :func:`flightquant.quantize` (``threads`` excepted: the server
        decides), ``importance`` included (it travels in the batches as ``<c>_importance``
        columns). Returns the same container; an iterable gives a lazy iterator.

        Examples
        --------
        >>> q = client.quantize(table, bits=4, group_size=64)  # doctest: +SKIP
        """
        if "op" in options:
            raise TypeError("quantize takes no 'op' option; use Client.dequantize")
        opts = QuantOptions.from_mapping(options)
        if importance is not None:
            data = with_importance(data, importance, opts.columns)
        return self._run(data, opts, progress)

    def dequantize(self, data: Any, progress: Progress | None = None) -> Any:
        """Restore quantized Arrow data to floats on the servers (same container back)."""
        return self._run(data, QuantOptions.from_mapping({"op": "dequantize"}), progress)

    def quantize_arrays(
        self,
        arrays: Mapping[str, np.ndarray],
        progress: Progress | None = None,
        importance: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> dict[str, QuantizedTensor]:
        """Quantize a dict of NumPy arrays on the servers; equals :func:`fq.quantize_arrays`
        (``importance`` too).

        ``progress(name, completed / total)`` is called once after each array.
        """
        if "columns" in options or "op" in options:
            raise TypeError("quantize_arrays takes no 'columns' or 'op' option")
        opts = QuantOptions.from_mapping(options)
        if importance:
            check_importance_method(opts, "the arrays")
        batches = arrays_to_batches(arrays, importance=importance)
        job = _Job(self, batches, opts, progress, total_rows=len(arrays), total_batches=None)
        return batches_to_results(job.run())

    def _run(self, data: Any, options: QuantOptions, progress: Progress | None) -> Any:
        if isinstance(data, pa.RecordBatch):
            job = _Job(self, [data], options, progress, data.num_rows, 1)
            return list(job.run())[0]
        if isinstance(data, pa.Table):
            batches = data.to_batches() or [_empty_batch(data.schema)]
            job = _Job(self, batches, options, progress, data.num_rows, len(batches))
            return pa.Table.from_batches(list(job.run()))
        if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
            raise TypeError(
                "data must be a pyarrow.Table, a pyarrow.RecordBatch or an iterable of "
                f"RecordBatches, got {type(data).__name__}"
                + (
                    "; for a dict of NumPy arrays use quantize_arrays"
                    if isinstance(data, Mapping)
                    else ""
                )
            )
        total_rows = total_batches = None
        if isinstance(data, Sequence) and all(isinstance(b, pa.RecordBatch) for b in data):
            total_rows = sum(b.num_rows for b in data)
            total_batches = len(data)
        return _Job(self, data, options, progress, total_rows, total_batches).run()
