"""The stream pipeline of a DoExchange: receive under the memory budget, serve each batch
through the codec (or a calibration session), answer it, in order.

:class:`Pipeline` is what the server's handler runs once it has admitted a stream; the
server keeps admission, counting and the error ladder (:mod:`flightquant.server_errors`).
A client that sends :data:`flightquant.protocol.PIPELINE_HEADER` gets a read-ahead pump
(:class:`_ReadAhead`) and, on an error, the in-band error message first.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from . import budget, codec, metrics, protocol
from .errors import MESSAGE_LIMIT, shorten
from .idle import Activity
from .options import CalibrateOptions, QuantOptions, parse_command
from .server_errors import CUT, short
from .validate import validate_batch, validate_schema

__all__ = ["Pipeline", "PipelineFactory", "StreamRun", "PIPELINE_KEY"]

#: the middleware key of a pipelining client's call
PIPELINE_KEY = "flightquant-pipeline"


class Pipeline:
    """Serves admitted streams within the server's limits.

    ``threads()``: kernel threads for the next batch; ``aborting()``: the drain deadline
    passed; ``classify(exc, context, run)``: the server's ``(kind, message)`` of an error.
    """

    def __init__(
        self,
        *,
        memory: budget.MemoryBudget,
        read_reserve: int,
        memory_wait: float,
        memory_limit: int,
        max_batch_bytes: int,
        sessions,
        stats: metrics.Counters,
        threads: Callable[[], int],
        aborting: Callable[[], bool],
        classify: Callable[..., tuple[str, str]],
    ):
        self.budget = memory
        self.read_reserve = read_reserve
        self.memory_wait = memory_wait
        self.memory_limit = memory_limit
        self.max_batch_bytes = max_batch_bytes
        self.sessions = sessions
        self.stats = stats
        self.threads = threads
        self.aborting = aborting
        self.classify = classify

    def exchange(self, context, descriptor, reader, writer, run: StreamRun) -> None:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise ValueError(
                "DoExchange needs a command descriptor holding the options as JSON, e.g. "
                'FlightDescriptor.for_command(b\'{"bits": 4}\') (b"" for the defaults)'
            )
        options = parse_command(descriptor.command)
        run.op = options.op
        if isinstance(options, CalibrateOptions):
            run.format = "none"  # (a metrics label: calibration has no format)
            self.calibrate(options.session, reader, writer, run)
            return
        run.format = options.format
        schema = _read_schema(reader)
        run.activity.touch()
        validate_schema(schema, where="the stream's schema")
        out_schema = codec.output_schema(schema, options)
        run.format = metrics.format_label(options.op, options.format, schema)
        out = _Writer(writer, run.activity)
        out.begin(out_schema)
        batches = _Receiver(reader, self.budget, self.read_reserve, self.memory_wait, run.activity)
        if context.get_middleware(PIPELINE_KEY) is None:
            self.serve_batches(batches, options, out, run)
            return
        # read-ahead: a pump thread receives the next batch while this one is processed
        pump = _ReadAhead(batches)
        try:
            self.serve_batches(pump, options, out, run)
        except BaseException as exc:
            pump.stop()
            kind, message = run.error = self.classify(exc, context, run)
            if kind not in (protocol.CANCELLED, protocol.DEADLINE_EXCEEDED):
                try:  # the client ends the call when it sees this, which frees the pump
                    out.write_metadata(protocol.encode_error(kind, shorten(message, MESSAGE_LIMIT)))
                except Exception:
                    pass  # the client is gone: the pump's read ends by itself
            raise
        finally:
            pump.stop()
            pump.join()

    def calibrate(self, session: str, reader, writer, run: StreamRun) -> None:
        """A calibration stream: each batch is added to ``session`` whole or not at all;
        each answer is a metadata-only message with the batch's totals."""
        _read_schema(reader)
        run.activity.touch()
        out = _Writer(writer, run.activity)
        batches = _Receiver(reader, self.budget, self.read_reserve, self.memory_wait, run.activity)
        for index, (batch, held) in enumerate(batches):
            with held:
                run.activity.begin_work()
                try:
                    size = batch.get_total_buffer_size()
                    if size > self.max_batch_bytes:
                        raise ValueError(
                            f"input batch {index} is {size} bytes, over this server's limit "
                            f"of {self.max_batch_bytes} bytes (max_batch_bytes); send smaller "
                            "record batches"
                        )
                    totals = self.sessions.add(
                        session,
                        batch,
                        reserve=lambda n, held=held, index=index: held.resize(
                            held.nbytes + n,
                            self.memory_wait,
                            f"input batch {index} ({n} bytes of float64 sums)",
                        ),
                    )
                finally:
                    run.activity.end_work()
                totals["batch_index"] = index
                out.write_metadata(json.dumps(totals).encode())
            run.batches = index + 1
            run.rows += totals["rows"]
            run.bytes_in += totals["input_bytes"]
            self.stats.batch_done(run.op, run.format, _CalibrationInfo(totals))

    def serve_batches(
        self, batches, options: QuantOptions, writer: _Writer, run: StreamRun
    ) -> None:
        limit = self.max_batch_bytes
        st = self.stats
        index = 0
        activity = run.activity
        for batch, held in batches:
            with held:  # the batch's reservation, returned once its answer is sent
                activity.begin_work()
                try:
                    size = batch.get_total_buffer_size()
                    if size > limit:
                        raise ValueError(
                            f"input batch {index} is {size} bytes, over this server's limit of "
                            f"{limit} bytes (max_batch_bytes); split the data into smaller "
                            "record batches (e.g. Table.to_batches(max_chunksize=...)) or start "
                            "the server with a larger --max-batch-bytes"
                        )
                    if self.aborting():
                        raise flight.FlightUnavailableError(CUT)
                    need = size + budget.output_bound(batch, options)
                    if need > self.memory_limit:  # refused at once, unless it is malformed
                        validate_batch(batch, where=f"input batch {index}")
                    held.resize(
                        need,
                        self.memory_wait,
                        f"input batch {index} ({batch.num_rows} rows, {size} bytes)",
                    )
                    out, info = codec.process_batch(batch, options, threads=self.threads())
                    meta = info.to_dict()
                    meta["batch_index"] = index
                finally:
                    activity.end_work()
                writer.write_with_metadata(out, json.dumps(meta).encode())
                del out, batch
            index += 1
            run.batches = index
            run.rows += info.rows
            run.bytes_in += info.input_bytes
            run.bytes_out += info.output_bytes
            st.batch_done(run.op, run.format, info)


def _read_schema(reader):
    try:
        return reader.schema
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, (ValueError, MemoryError)):
            raise
        raise ValueError(
            f"could not read the stream's schema ({short(exc, 200)}): begin the exchange "
            "with writer.begin(schema) and send record batches"
        ) from None


def _read_chunk(reader):
    """The next message; a broken input stream is the client's error (INVALID_ARGUMENT)."""
    try:
        return reader.read_chunk()
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, (ValueError, flight.FlightError, MemoryError)):
            raise
        raise ValueError(f"could not read the next record batch: {short(exc, 200)}") from None


class _Writer:
    """The stream's writer, one write at a time (the idle watchdog may write too)."""

    def __init__(self, writer, activity: Activity):
        self._writer = writer
        self._activity = activity

    def begin(self, schema: pa.Schema) -> None:
        with self._activity.write_lock:
            self._writer.begin(schema)

    def write_with_metadata(self, batch: pa.RecordBatch, metadata: bytes) -> None:
        with self._activity.write_lock:
            self._writer.write_with_metadata(batch, metadata)
        self._activity.touch()  # the client took the answer (or gRPC buffered it)

    def write_metadata(self, metadata: bytes) -> None:
        with self._activity.write_lock:
            self._writer.write_metadata(metadata)


class _Receiver:
    """Yields ``(batch, reservation)``: each read is reserved from the memory budget first.

    Before a read the stream holds the bound of one message (a client may send up to
    ``max_batch_bytes`` and its receipt briefly needs twice that); once the batch is in,
    the reservation shrinks to the batch's size. The consumer owns each yielded
    reservation and releases it when the batch is answered.
    """

    def __init__(
        self, reader, memory: budget.MemoryBudget, reserve: int, wait: float, activity: Activity
    ):
        self._reader = reader
        self._budget = memory
        self._reserve = reserve
        self._wait = wait
        self._activity = activity

    def __iter__(self):
        activity = self._activity
        while True:
            activity.begin_work()  # waiting for memory is the server's doing, not idling
            try:
                held = self._budget.reserve(self._reserve, self._wait, "receiving the next batch")
            finally:
                activity.end_work()
            try:
                chunk = _read_chunk(self._reader)
                activity.touch()
                data = chunk.data
                if data is None:  # a metadata-only message: nothing to process
                    held.release()
                    continue
                held.resize(data.get_total_buffer_size(), 0.0)
            except StopIteration:
                held.release()
                return
            except BaseException:
                held.release()
                raise
            yield data, held


class _ReadAhead:
    """Reads the next batch on its own thread while the handler processes the current one.

    Used only when the client says it pipelines (:data:`protocol.PIPELINE_HEADER`): such a
    client keeps sending without waiting for each answer and ends the call when it gets an
    error message (``app_metadata`` ``{"error": {"code", "message"}}`` with no batch).
    A lock-step client (send one, wait for its answer) would deadlock a handler that must
    report an error while its pump waits for a batch that never comes, so plain clients
    get the serial loop. At most one batch waits in the queue, one more in the pump; the
    reservations of batches never handed over are released when the pump stops.
    """

    _END = object()

    def __init__(self, batches: _Receiver):
        self._batches = batches
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fq-read-ahead", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        items = iter(self._batches)
        try:
            while not self._stopped.is_set():
                try:
                    item = next(items)
                except StopIteration:
                    break
                if not self._put(item):
                    item[1].release()
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the handler thread
            self._put(exc)
        finally:
            items.close()

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stopped.set()

    def join(self) -> None:
        self._thread.join()
        while True:  # batches read but never processed: give their memory back
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                item[1].release()


class _PipelineMiddleware(flight.ServerMiddleware):
    pass


class PipelineFactory(flight.ServerMiddlewareFactory):
    """Marks DoExchange calls whose client sent :data:`protocol.PIPELINE_HEADER`."""

    def start_call(self, info, headers):
        if info.method == flight.FlightMethod.DO_EXCHANGE and headers.get(protocol.PIPELINE_HEADER):
            return _PipelineMiddleware()
        return None


class _CalibrationInfo:
    """A calibration batch's totals as the counters take a codec batch's ``BatchInfo``."""

    __slots__ = ("rows", "elements", "input_bytes", "output_bytes", "kernel_seconds")

    def __init__(self, totals: dict[str, Any]) -> None:
        self.rows = totals["rows"]
        self.elements = totals["elements"]
        self.input_bytes = totals["input_bytes"]
        self.output_bytes = 0
        self.kernel_seconds = 0.0


class StreamRun:
    """One stream's tallies (for its log line and the counters) and its error once
    classified."""

    __slots__ = ("op", "format", "batches", "rows", "bytes_in", "bytes_out", "error", "activity")

    def __init__(self, activity: Activity) -> None:
        self.activity = activity
        self.error: tuple[str, str] | None = None  # (kind, message) once classified
        self.op = metrics.UNKNOWN  # until the options are read
        self.format = metrics.UNKNOWN
        self.batches = 0
        self.rows = 0
        self.bytes_in = 0
        self.bytes_out = 0
