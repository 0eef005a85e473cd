"""The Flight server: protocol only, every batch goes through the codec.

``DoExchange`` takes a command descriptor whose bytes are the options as a JSON object
(empty = defaults), reads RecordBatches and answers each with exactly one processed batch
plus ``app_metadata`` (JSON: batch index, rows, elements, bytes, kernel seconds). The
server has no quantization logic of its own: a result equals ``flightquant.quantize`` of
the same batch, bit for bit.

Error mapping (what a plain pyarrow client raises in brackets):

* bad options, bad data, a batch over ``max_batch_bytes``, an unknown action, a path
  descriptor -> INVALID_ARGUMENT (``pyarrow.ArrowInvalid``), the message says what to fix;
* over ``max_streams`` or draining -> UNAVAILABLE (``FlightUnavailableError``), retry
  elsewhere or later;
* out of memory: the budget cannot take the next batch within ``memory_wait``, a batch
  that alone costs more than the budget, or a ``MemoryError`` -> RESOURCE_EXHAUSTED in
  meaning, sent as UNAVAILABLE (``FlightUnavailableError``) with a message that starts
  "RESOURCE_EXHAUSTED:": pyarrow's Flight server cannot send the RESOURCE_EXHAUSTED code
  (its transport maps no status to it; a ``MemoryError`` would arrive as UNKNOWN), and
  UNAVAILABLE is the code clients already retry elsewhere or later;
* a stream idle for ``idle_timeout`` -> ended by the server (see :mod:`flightquant.idle`);
  the client gets an in-band DEADLINE_EXCEEDED message, then its connection closes;
* anything unexpected -> INTERNAL (``FlightInternalError``) "internal error: ...; see
  server log", with the traceback in the server log only.

No Python traceback ever reaches a client (see :class:`InvalidArgument`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.flight as flight

from . import budget, calibration, codec, logs, metrics, protocol
from ._version import __version__
from .errors import MESSAGE_LIMIT, shorten
from .idle import Activity, IdleWatchdog, idle_message
from .kernels import build_info, resolve_threads
from .options import CalibrateOptions, QuantOptions, parse_command
from .protocol import ACTIONS, PIPELINE_HEADER
from .sessions import DEFAULTS as SESSION_DEFAULTS
from .sessions import SessionStore
from .validate import validate_batch, validate_schema

__all__ = ["Server", "InvalidArgument"]

_LOG = logging.getLogger("flightquant.server")

_PIPELINE_KEY = "flightquant-pipeline"


# ---------------------------------------------------------------------------------------
# errors without tracebacks
#
# pyarrow turns a handler's non-Flight exception into a Status whose detail is
# ``traceback.format_exception(...)`` of it, and that text reaches the client ("...
# Detail: Python exception: Traceback (most recent call last): File ..."). ``raise ... from
# None`` does not help (the frames are still there), and there is no FlightError class for
# INVALID_ARGUMENT. When formatting fails, pyarrow falls back to "Python exception:
# <type name>" (PythonErrorDetail::ToString). The exceptions below make the formatting fail
# on purpose: ``traceback.TracebackException`` reads ``exc.__suppress_context__`` as an
# attribute, and ours raises. ``raise`` itself sets the flag at the C level, so raising
# works normally. These exceptions are made only to be raised out of a handler, never
# logged or shown elsewhere. tests/test_flight_server.py checks that no traceback leaks.


class _Unformattable(Exception):
    pass


class _NoTraceback:
    @property
    def __suppress_context__(self) -> bool:
        raise _Unformattable("flightquant: this exception carries no traceback by design")

    @__suppress_context__.setter
    def __suppress_context__(self, value: bool) -> None:
        pass


class InvalidArgument(_NoTraceback, ValueError):
    """Raised out of a handler: INVALID_ARGUMENT with just the message (no traceback)."""


class Unimplemented(_NoTraceback, NotImplementedError):
    """Raised out of a handler: UNIMPLEMENTED with just the message (no traceback)."""


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------


class Server(flight.FlightServerBase):
    """A Flight server that quantizes (or dequantizes) the batches streamed to it.

    The server starts listening when constructed; use it as a context manager or call
    :meth:`shutdown` (or :meth:`drain`). :meth:`serve` blocks until shut down.

    Parameters
    ----------
    location : str
        ``grpc://host:port`` or ``grpc+tls://host:port``; port 0 picks a free port (read
        it back from :attr:`port` / :attr:`location`).
    threads : int, optional
        Kernel threads per batch. None (auto): the allowed cores less one (left to the
        transport), shared among the running streams, at least 1.
    max_streams : int
        Concurrent DoExchange streams; one more is refused at once with UNAVAILABLE.
    max_batch_bytes : int
        Largest input batch (Arrow buffer bytes); a larger one fails its stream with
        INVALID_ARGUMENT.
    memory_limit : int, optional
        Bytes all streams together may hold (inputs being received, batches, outputs).
        Default: ``budget.DEFAULT_FRACTION`` (half) of what the process may use, the
        smallest of the cgroup limit, ``RLIMIT_AS`` less the mapped address space, and
        physical memory. Each stream reserves ``2 * max_batch_bytes`` before it reads a
        batch (a message is briefly held twice while received), then the batch's real
        size plus its output bound; see :mod:`flightquant.budget`.
    memory_wait : float
        Seconds a stream waits for its reservation before RESOURCE_EXHAUSTED.
    idle_timeout : float or None
        Seconds a stream may wait on its client (for the next message, or for the client
        to take an answer) before the server ends it; None never ends idle streams.
    auth_token : str, optional
        Require ``authorization: Bearer <token>`` on every call (UNAUTHENTICATED otherwise).
    tls_certificates, verify_client, root_certificates
        Passed to :class:`pyarrow.flight.FlightServerBase` (TLS and mutual TLS).
    health_port : int, optional
        Start the ``grpc.health.v1`` service on this port (0: any free port) of the same
        host; NOT_SERVING while draining.
    drain_timeout : float
        Default deadline of :meth:`drain` in seconds.
    max_sessions, max_session_layers, max_session_width : int
        Calibration sessions (``op: "calibrate"``): how many may be open, layers per
        session, columns per layer (see :mod:`flightquant.sessions`).
    session_idle_timeout : float or None
        Seconds a calibration session may go unused before it is dropped; None: never.
    metrics_port : int, optional
        Serve Prometheus metrics over plain HTTP at ``/metrics`` on this port (0: any free
        port; read it back from :attr:`metrics_port`). Not covered by TLS or the token.
    metrics_host : str
        Interface of the metrics port: loopback unless chosen, whatever the Flight host.
    log : logging.Logger
        One INFO line per finished stream (:func:`flightquant.logs.stream`: text, or JSON
        with :class:`flightquant.logs.JsonFormatter`); tracebacks of internal errors.

    Examples
    --------
    >>> import pyarrow.flight as flight
    >>> with Server("grpc://127.0.0.1:0") as server:  # doctest: +SKIP
    ...     client = flight.connect(server.location)
    ...     writer, reader = client.do_exchange(
    ...         flight.FlightDescriptor.for_command(b'{"bits": 4}'))
    """

    def __init__(
        self,
        location: str = "grpc://127.0.0.1:0",
        *,
        threads: int | None = None,
        max_streams: int = 64,
        max_batch_bytes: int = 256 << 20,
        memory_limit: int | None = None,
        memory_wait: float = 10.0,
        idle_timeout: float | None = 60.0,
        auth_token: str | None = None,
        tls_certificates: list | None = None,
        verify_client: bool = False,
        root_certificates: bytes | None = None,
        health_port: int | None = None,
        drain_timeout: float = 30.0,
        max_sessions: int = SESSION_DEFAULTS["max_sessions"],
        max_session_layers: int = SESSION_DEFAULTS["max_session_layers"],
        max_session_width: int = SESSION_DEFAULTS["max_session_width"],
        session_idle_timeout: float | None = SESSION_DEFAULTS["session_idle_timeout"],
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        log: logging.Logger = _LOG,
    ):
        resolve_threads(threads)
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
            raise ValueError(f"max_streams must be an integer >= 1, got {max_streams!r}")
        if (
            isinstance(max_batch_bytes, bool)
            or not isinstance(max_batch_bytes, int)
            or max_batch_bytes < 1
        ):
            raise ValueError(f"max_batch_bytes must be an integer >= 1, got {max_batch_bytes!r}")
        if not (isinstance(drain_timeout, (int, float)) and drain_timeout >= 0):
            raise ValueError(f"drain_timeout must be a number >= 0, got {drain_timeout!r}")
        if memory_limit is not None and (
            isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 1
        ):
            raise ValueError(f"memory_limit must be None or an integer >= 1, got {memory_limit!r}")
        if isinstance(memory_wait, bool) or not (
            isinstance(memory_wait, (int, float)) and memory_wait >= 0
        ):
            raise ValueError(f"memory_wait must be a number >= 0, got {memory_wait!r}")
        if idle_timeout is not None and (
            isinstance(idle_timeout, bool)
            or not isinstance(idle_timeout, (int, float))
            or not idle_timeout > 0
        ):
            raise ValueError(f"idle_timeout must be None or a number > 0, got {idle_timeout!r}")
        parts = urlsplit(location)
        if parts.scheme not in ("grpc", "grpc+tcp", "grpc+tls") or not parts.hostname:
            raise ValueError(
                f"location must look like grpc://host:port or grpc+tls://host:port, got {location!r}"
            )
        if parts.scheme == "grpc+tls" and not tls_certificates:
            raise ValueError("a grpc+tls:// location needs tls_certificates (certificate and key)")
        if tls_certificates and parts.scheme != "grpc+tls":
            raise ValueError(
                f"tls_certificates given but the location {location!r} is not grpc+tls://"
            )
        self.threads = threads
        self._cores = resolve_threads(None)
        self.max_streams = max_streams
        self.max_batch_bytes = max_batch_bytes
        self.drain_timeout = float(drain_timeout)
        self.log = log
        if memory_limit is None:
            available, source = budget.memory_available()
            memory_limit = max(1, int(available * budget.DEFAULT_FRACTION))
            self._memory_source = f"{budget.DEFAULT_FRACTION:g} x {source} ({available} bytes)"
        else:
            self._memory_source = "memory_limit"
        self.memory_limit = memory_limit
        self.memory_wait = float(memory_wait)
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self._budget = budget.MemoryBudget(memory_limit)
        self._sessions = SessionStore(
            self._budget,
            max_sessions=max_sessions,
            max_layers=max_session_layers,
            max_width=max_session_width,
            idle_timeout=session_idle_timeout,
            memory_wait=self.memory_wait,
        )
        # what a stream reserves before it reads: never more than the whole budget (a
        # larger message is then read unreserved, and refused once its size is known)
        self._read_reserve = min(budget.receive_bound(max_batch_bytes), memory_limit)
        if self._read_reserve < budget.receive_bound(max_batch_bytes):
            log.warning(
                "memory_limit=%d is below 2 x max_batch_bytes=%d: one stream at a time can "
                "receive a batch; lower --max-batch-bytes",
                memory_limit,
                max_batch_bytes,
            )
        self._host = parts.hostname
        self._scheme = parts.scheme
        self._tls = bool(tls_certificates)
        self._verify_client = bool(verify_client)
        self._auth = auth_token is not None
        self._stats = metrics.Counters()
        #: the Prometheus view of the counters; ``add_gauge`` adds one
        self.metrics = metrics.ServerMetrics(self)
        self._metrics_endpoint: metrics.MetricsEndpoint | None = None
        self._draining = False
        self._aborting = False
        self._shutdown_lock = threading.Lock()
        self._shutdown_thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._health = None

        middleware = {_PIPELINE_KEY: _PipelineFactory()}
        if auth_token is not None:
            from .security import BearerTokenMiddlewareFactory

            middleware["auth"] = BearerTokenMiddlewareFactory(
                auth_token, on_reject=self._unauthenticated
            )
        super().__init__(
            location,
            tls_certificates=tls_certificates,
            verify_client=verify_client,
            root_certificates=root_certificates,
            middleware=middleware,
        )
        self._watchdog = IdleWatchdog(self.idle_timeout, self.port, log)
        self._sessions.start()
        sessions = self._sessions
        self.metrics.add_gauge(
            "flightquant_calibration_sessions",
            "calibration sessions open",
            lambda: sessions.snapshot()["sessions"],
        )
        self.metrics.add_gauge(
            "flightquant_calibration_bytes",
            "bytes the calibration sessions hold (part of the memory reserved)",
            lambda: sessions.snapshot()["bytes"],
        )
        self.metrics.add_counter(
            "flightquant_calibration_sessions_expired",
            "calibration sessions dropped after --session-idle-timeout",
            lambda: sessions.expired,
        )
        if health_port is not None:
            try:
                from .health import HealthServer

                self._health = HealthServer(self._host, health_port)
            except BaseException:
                super().shutdown()
                raise
        if metrics_port is not None:
            try:
                self._metrics_endpoint = metrics.MetricsEndpoint(
                    self.metrics.registry, metrics_host, metrics_port
                )
            except BaseException:
                if self._health is not None:
                    self._health.stop()
                super().shutdown()
                self._watchdog.stop()
                raise

    # -- properties ----------------------------------------------------------------------

    @property
    def location(self) -> str:
        """The URL clients connect to, with the bound port."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{self._scheme}://{host}:{self.port}"

    @property
    def health_port(self) -> int | None:
        """Port of the ``grpc.health.v1`` service, or None when it is off."""
        return None if self._health is None else self._health.port

    @property
    def metrics_port(self) -> int | None:
        """Port of the Prometheus ``/metrics`` endpoint, or None when it is off."""
        return None if self._metrics_endpoint is None else self._metrics_endpoint.port

    @property
    def draining(self) -> bool:
        return self._draining

    def stats(self) -> dict[str, Any]:
        """Counters: streams (active, served), batches, rows, elements, bytes, errors, and
        ``memory`` (limit, reserved and peak reserved bytes, streams waiting, refusals)."""
        out = self._stats.snapshot()
        out["memory"] = self._budget.snapshot()
        out["idle_streams_ended"] = self._watchdog.expired
        out["calibration"] = self._sessions.snapshot()
        return out

    def config(self) -> dict[str, Any]:
        """Limits and defaults, as the ``config`` action answers them."""
        return {
            "version": __version__,
            "max_streams": self.max_streams,
            "max_batch_bytes": self.max_batch_bytes,
            "memory_limit": self.memory_limit,
            "memory_limit_source": self._memory_source,
            "memory_wait": self.memory_wait,
            "idle_timeout": self.idle_timeout,
            "threads": self.threads,
            "kernel_threads": (
                self.threads
                if self.threads is not None
                else f"auto: {max(1, self._cores - 1)} shared by the running streams"
            ),
            "default_options": QuantOptions.from_mapping({}).to_dict(),
            "build_info": build_info(),
            "tls": self._tls,
            "verify_client": self._verify_client,
            "auth": self._auth,
            "health_port": self.health_port,
            "metrics_port": self.metrics_port,
            "drain_timeout": self.drain_timeout,
            "calibration": self._sessions.config(),
        }

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "draining": self._draining}

    def __repr__(self) -> str:
        return f"Server({self.location!r}, max_streams={self.max_streams})"

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop now: refuse new streams, wait for running ones, close the port.

        Idempotent and thread-safe. Like :meth:`pyarrow.flight.FlightServerBase.shutdown`
        it waits for running calls without a deadline; use :meth:`drain` for a bounded
        stop. Never call it from inside a handler.
        """
        with self._shutdown_lock:
            self._draining = True
            if self._shutdown_thread is None:
                self._shutdown_thread = threading.Thread(
                    target=self._do_shutdown, name="fq-shutdown", daemon=True
                )
                self._shutdown_thread.start()
            thread = self._shutdown_thread
        thread.join()

    def _do_shutdown(self) -> None:
        try:
            if self._health is not None:
                self._health.stop()
            super().shutdown()
        finally:
            self._watchdog.stop()
            if self._metrics_endpoint is not None:
                self._metrics_endpoint.stop()
            self._sessions.stop()
            self._closed.set()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop gracefully: refuse new streams, let running ones finish, then shut down.

        New streams get UNAVAILABLE ("server is draining") and the health service reports
        NOT_SERVING at once. Running streams get ``timeout`` seconds (default
        ``drain_timeout``) to finish. After the deadline each remaining stream is ended
        with UNAVAILABLE at its next batch (a :class:`flightquant.Client` resends the
        unanswered batches elsewhere), and the server shuts down. A stream whose client
        went silent (the handler waits for a batch that never comes) gets a further grace
        of ``max(1, min(5, timeout))`` seconds, then its connection is closed (see
        :mod:`flightquant.idle`), which ends it; should the shutdown still not finish
        within a few seconds more, ``drain`` returns False and leaves it to a background
        thread (``flightquant serve`` then exits the process).

        Returns True when every stream finished on its own and the server is shut down.
        """
        timeout = self.drain_timeout if timeout is None else float(timeout)
        self._draining = True
        if self._health is not None:
            self._health.set_not_serving()
        deadline = time.monotonic() + timeout
        st = self._stats
        with st.changed:
            while st.streams_active and (left := deadline - time.monotonic()) > 0:
                st.changed.wait(left)
            clean = st.streams_active == 0
        if not clean:
            self.log.warning(
                "drain deadline (%.1fs) passed with %d stream(s) still running; ending them",
                timeout,
                st.streams_active,
            )
            self._aborting = True
        with self._shutdown_lock:
            if self._shutdown_thread is None:
                self._shutdown_thread = threading.Thread(
                    target=self._do_shutdown, name="fq-shutdown", daemon=True
                )
                self._shutdown_thread.start()
        grace = max(1.0, min(5.0, timeout))
        finished = self._closed.wait(max(0.0, deadline - time.monotonic()) + grace)
        if not finished and self._watchdog.end_waiting(protocol.UNAVAILABLE, _CUT):
            # streams waiting on silent clients would keep the shutdown waiting forever
            finished = self._closed.wait(grace)
        if not finished:
            self.log.error(
                "shutdown still waiting for %d stalled stream(s) after the drain deadline",
                st.streams_active,
            )
        return clean and finished

    # -- actions -------------------------------------------------------------------------

    def list_actions(self, context):
        return list(ACTIONS.items())

    def do_action(self, context, action):
        kind = action.type
        if kind == protocol.HEALTH:
            body = self.health()
        elif kind == protocol.STATS:
            body = self.stats()
        elif kind == protocol.CONFIG:
            body = self.config()
        elif kind in (protocol.CALIBRATION_LIST, protocol.CALIBRATION_DROP):
            body = self._session_action(kind, action.body)
        else:
            self._count_error("invalid_argument")
            raise InvalidArgument(
                f"unknown action {kind!r}; valid actions are: {', '.join(ACTIONS)}"
            )
        return iter([flight.Result(json.dumps(body).encode())])

    def list_flights(self, context, criteria) -> Iterator:
        return iter(())

    def get_flight_info(self, context, descriptor):
        raise Unimplemented(_USE_EXCHANGE)

    def get_schema(self, context, descriptor):
        raise Unimplemented(_USE_EXCHANGE)

    def do_get(self, context, ticket):
        try:
            acc = self._sessions.get(calibration.parse_ticket(ticket.ticket))
        except ValueError as exc:
            self._count_error("invalid_argument")
            raise InvalidArgument(shorten(_message(exc), MESSAGE_LIMIT)) from None
        return flight.GeneratorStream(calibration.IMATRIX_SCHEMA, calibration.table_batches(acc))

    def _session_action(self, kind: str, body) -> Any:
        """The calibration session actions: list, drop."""
        if kind == protocol.CALIBRATION_LIST:
            return self._sessions.list()
        try:
            name = calibration.parse_drop(body.to_pybytes() if body is not None else b"")
            return {"session": name, "dropped": self._sessions.drop(name)}
        except ValueError as exc:
            self._count_error("invalid_argument")
            raise InvalidArgument(shorten(_message(exc), MESSAGE_LIMIT)) from None

    def do_put(self, context, descriptor, reader, writer):
        raise Unimplemented(_USE_EXCHANGE)

    # -- DoExchange ----------------------------------------------------------------------

    def _count_error(self, kind: str) -> None:
        self._stats.error(kind)

    def _unauthenticated(self, info) -> None:
        """A call refused for its token: a stream (counted and logged) or another call."""
        if info.method != flight.FlightMethod.DO_EXCHANGE:
            self._stats.error("unauthenticated")
            return
        self._stream_ended("?", None, "unauthenticated", "missing or invalid bearer token")

    def do_exchange(self, context, descriptor, reader, writer):
        st = self._stats
        with st.lock:
            if self._draining:
                refused = "server is draining (shutting down); send the stream to another server"
            elif st.streams_active >= self.max_streams:
                refused = (
                    f"server busy: {st.streams_active} streams active, the limit is "
                    f"max_streams={self.max_streams}; retry later, use another server, or "
                    "start this one with a larger --max-streams"
                )
            else:
                refused = None
                st.streams_active += 1
        if refused is not None:
            self._stream_ended(_peer(context), None, "unavailable", refused)
            raise flight.FlightUnavailableError(refused)

        t0 = time.perf_counter()
        run = _StreamRun(Activity(_peer(context), writer))
        self._watchdog.register(run.activity)
        outcome = "ok"
        try:
            self._exchange(context, descriptor, reader, writer, run)
            if run.activity.timed_out:  # the watchdog closed the connection
                if self._aborting:
                    outcome = "unavailable"
                    raise flight.FlightUnavailableError(_CUT)
                outcome = "deadline_exceeded"
                raise flight.FlightTimedOutError(self._idle_message(run))
            if context.is_cancelled():
                outcome = "cancelled"  # a client that vanishes looks like end-of-stream
                run.error = (outcome, "stream cancelled by the client")
        except Exception as exc:
            kind, message = run.error or self._classify(exc, context, run)
            outcome = kind
            message = shorten(message, MESSAGE_LIMIT)
            run.error = (kind, message)
            if kind == "deadline_exceeded":
                raise flight.FlightTimedOutError(message) from None
            if kind == "resource_exhausted":
                self.log.warning(
                    "stream peer=%s batch=%d: %s", run.activity.peer, run.batches, message
                )
                raise flight.FlightUnavailableError(message) from None
            if isinstance(exc, flight.FlightError) and kind != "cancelled":
                raise  # keeps its status code; pyarrow sends no traceback for these
            if kind == "cancelled":
                raise flight.FlightCancelledError(message) from None
            if kind == "invalid_argument":
                raise InvalidArgument(message) from None
            self.log.exception(
                "internal error in stream peer=%s op=%s batch=%d",
                _peer(context),
                run.op,
                run.batches,
            )
            raise flight.FlightInternalError(message) from None
        finally:
            self._watchdog.unregister(run.activity)
            self._stream_ended(
                run.activity.peer,
                run,
                outcome,
                run.error[1] if run.error and outcome != "ok" else None,
                time.perf_counter() - t0,
            )

    def _stream_ended(
        self,
        peer: str,
        run: _StreamRun | None,
        status: str,
        error: str | None,
        seconds: float = 0.0,
    ) -> None:
        """Count a stream that ended (``run`` None: refused before it started) and log its
        one line."""
        op = run.op if run is not None else metrics.UNKNOWN
        fmt = run.format if run is not None else metrics.UNKNOWN
        self._stats.stream_done(op, fmt, status, seconds, started=run is not None)
        logs.stream(
            self.log,
            peer=peer,
            op=op,
            format=fmt,
            batches=run.batches if run else 0,
            rows=run.rows if run else 0,
            input_bytes=run.bytes_in if run else 0,
            output_bytes=run.bytes_out if run else 0,
            seconds=seconds,
            status=status,
            error=error,
        )

    def _idle_message(self, run: _StreamRun) -> str:
        return idle_message(run.activity.idle_for, self.idle_timeout or 0.0)

    def _exchange(self, context, descriptor, reader, writer, run: _StreamRun) -> None:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise ValueError(
                "DoExchange needs a command descriptor holding the options as JSON, e.g. "
                'FlightDescriptor.for_command(b\'{"bits": 4}\') (b"" for the defaults)'
            )
        options = parse_command(descriptor.command)
        run.op = options.op
        if isinstance(options, CalibrateOptions):
            run.format = "none"  # (a metrics label: calibration has no format)
            self._calibrate(options.session, reader, writer, run)
            return
        run.format = options.format
        schema = _read_schema(reader)
        run.activity.touch()
        validate_schema(schema, where="the stream's schema")
        out_schema = codec.output_schema(schema, options)
        run.format = metrics.format_label(options.op, options.format, schema)
        out = _Writer(writer, run.activity)
        out.begin(out_schema)
        batches = _Receiver(
            reader, self._budget, self._read_reserve, self.memory_wait, run.activity
        )
        if context.get_middleware(_PIPELINE_KEY) is None:
            self._serve_batches(batches, options, out, run)
            return
        # read-ahead: a pump thread receives the next batch while this one is processed
        pump = _ReadAhead(batches)
        try:
            self._serve_batches(pump, options, out, run)
        except BaseException as exc:
            pump.stop()
            kind, message = run.error = self._classify(exc, context, run)
            if kind not in ("cancelled", "deadline_exceeded"):
                try:  # the client ends the call when it sees this, which frees the pump
                    out.write_metadata(protocol.encode_error(kind, shorten(message, MESSAGE_LIMIT)))
                except Exception:
                    pass  # the client is gone: the pump's read ends by itself
            raise
        finally:
            pump.stop()
            pump.join()

    def _calibrate(self, session: str, reader, writer, run: _StreamRun) -> None:
        """A calibration stream: each batch is added to ``session`` whole or not at all;
        each answer is a metadata-only message with the batch's totals."""
        _read_schema(reader)
        run.activity.touch()
        out = _Writer(writer, run.activity)
        batches = _Receiver(
            reader, self._budget, self._read_reserve, self.memory_wait, run.activity
        )
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
                    totals = self._sessions.add(
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
            self._stats.batch_done(run.op, run.format, _CalibrationInfo(totals))

    def _kernel_threads(self) -> int:
        """Kernel threads for the next batch.

        ``threads=None`` (auto): the allowed cores less one, which the transport needs
        (gRPC receive and send, the read-ahead), shared among the running streams, and at
        least 1. Measured on 2 cores: 2 OpenMP threads per batch beside the transport were
        slower than 1 (benchmarks/bench_flight.py). Results do not depend on it.
        """
        if self.threads is not None:
            return self.threads
        return max(1, (self._cores - 1) // max(1, self._stats.streams_active))

    def _serve_batches(
        self, batches, options: QuantOptions, writer: _Writer, run: _StreamRun
    ) -> None:
        limit = self.max_batch_bytes
        st = self._stats
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
                    if self._aborting:
                        raise flight.FlightUnavailableError(_CUT)
                    need = size + budget.output_bound(batch, options)
                    if need > self.memory_limit:  # refused at once, unless it is malformed
                        validate_batch(batch, where=f"input batch {index}")
                    held.resize(
                        need,
                        self.memory_wait,
                        f"input batch {index} ({batch.num_rows} rows, {size} bytes)",
                    )
                    out, info = codec.process_batch(batch, options, threads=self._kernel_threads())
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

    def _classify(self, exc: BaseException, context, run: _StreamRun) -> tuple[str, str]:
        """(error kind, client-facing message) of a handler's exception."""
        if run.activity.timed_out:
            if self._aborting:
                return "unavailable", _CUT
            return "deadline_exceeded", self._idle_message(run)
        if isinstance(exc, flight.FlightCancelledError) or (
            not isinstance(exc, flight.FlightError) and context.is_cancelled()
        ):
            return "cancelled", "stream cancelled by the client"
        if isinstance(exc, budget.BudgetExhausted):
            return "resource_exhausted", protocol.resource_exhausted_message(str(exc))
        if isinstance(exc, MemoryError):  # numpy, pyarrow (ArrowMemoryError), the kernels
            return "resource_exhausted", protocol.resource_exhausted_message(
                f"the server ran out of memory in batch {run.batches} ({_short(exc, 200)}); "
                "retry later or on another server, or send smaller batches"
            )
        if isinstance(exc, flight.FlightUnavailableError):
            return "unavailable", str(exc)
        if isinstance(exc, flight.FlightError):
            return "internal", str(exc)
        if isinstance(exc, ValueError):
            return "invalid_argument", _message(exc)
        return "internal", protocol.internal_message(_short(exc))


def _read_schema(reader):
    try:
        return reader.schema
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, (ValueError, MemoryError)):
            raise
        raise ValueError(
            f"could not read the stream's schema ({_short(exc, 200)}): begin the exchange "
            "with writer.begin(schema) and send record batches"
        ) from None


def _read_chunk(reader):
    """The next message; a broken input stream is the client's error (INVALID_ARGUMENT)."""
    try:
        return reader.read_chunk()
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, (ValueError, flight.FlightError, MemoryError)):
            raise
        raise ValueError(f"could not read the next record batch: {_short(exc, 200)}") from None


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

    Used only when the client says it pipelines (header ``x-flightquant-pipeline``): such a
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


class _PipelineFactory(flight.ServerMiddlewareFactory):
    """Marks DoExchange calls whose client sent ``x-flightquant-pipeline``."""

    def start_call(self, info, headers):
        if info.method == flight.FlightMethod.DO_EXCHANGE and headers.get(PIPELINE_HEADER):
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


class _StreamRun:
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


_CUT = (
    "server is shutting down (drain deadline passed); resend the unanswered batches to "
    "another server"
)

_USE_EXCHANGE = (
    "flightquant serves DoExchange (command = options JSON) and the actions "
    f"{', '.join(ACTIONS)}; other Flight methods are not implemented"
)


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # pragma: no cover - peer() is informational only
        return "?"
