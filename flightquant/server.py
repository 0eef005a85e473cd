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

The kinds and how each travels: :mod:`flightquant.protocol`; the one ladder from an
exception to a kind and a status: :mod:`flightquant.server_errors`; the limits:
:mod:`flightquant.server_config`; what a stream does once admitted:
:mod:`flightquant.stream`. This module admits streams, answers the actions, counts and
logs each stream, drains and shuts down.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow.flight as flight

from . import budget, calibration, logs, metrics, protocol
from ._version import __version__
from .errors import MESSAGE_LIMIT, shorten
from .idle import Activity, IdleWatchdog, idle_message
from .kernels import build_info, resolve_threads
from .options import QuantOptions
from .protocol import ACTIONS
from .server_config import DEFAULTS, check, check_location
from .server_errors import CUT, InvalidArgument, Unimplemented, classify, message, to_flight
from .sessions import SessionStore
from .stream import PIPELINE_KEY, Pipeline, PipelineFactory, StreamRun

__all__ = ["Server", "InvalidArgument"]

_LOG = logging.getLogger("flightquant.server")


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
        threads: int | None = DEFAULTS["threads"],
        max_streams: int = DEFAULTS["max_streams"],
        max_batch_bytes: int = DEFAULTS["max_batch_bytes"],
        memory_limit: int | None = DEFAULTS["memory_limit"],
        memory_wait: float = DEFAULTS["memory_wait"],
        idle_timeout: float | None = DEFAULTS["idle_timeout"],
        auth_token: str | None = None,
        tls_certificates: list | None = None,
        verify_client: bool = False,
        root_certificates: bytes | None = None,
        health_port: int | None = None,
        drain_timeout: float = DEFAULTS["drain_timeout"],
        max_sessions: int = DEFAULTS["max_sessions"],
        max_session_layers: int = DEFAULTS["max_session_layers"],
        max_session_width: int = DEFAULTS["max_session_width"],
        session_idle_timeout: float | None = DEFAULTS["session_idle_timeout"],
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        log: logging.Logger = _LOG,
    ):
        threads = check("threads", threads)
        max_streams = check("max_streams", max_streams)
        max_batch_bytes = check("max_batch_bytes", max_batch_bytes)
        memory_limit = check("memory_limit", memory_limit)
        memory_wait = check("memory_wait", memory_wait)
        idle_timeout = check("idle_timeout", idle_timeout)
        drain_timeout = check("drain_timeout", drain_timeout)
        parts = check_location(location, tls_certificates)
        self.threads = threads
        self._cores = resolve_threads(None)
        self.max_streams = max_streams
        self.max_batch_bytes = max_batch_bytes
        self.drain_timeout = drain_timeout
        self.log = log
        if memory_limit is None:
            available, source = budget.memory_available()
            memory_limit = max(1, int(available * budget.DEFAULT_FRACTION))
            self._memory_source = f"{budget.DEFAULT_FRACTION:g} x {source} ({available} bytes)"
        else:
            self._memory_source = "memory_limit"
        self.memory_limit = memory_limit
        self.memory_wait = memory_wait
        self.idle_timeout = idle_timeout
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
        self._pipeline = Pipeline(
            memory=self._budget,
            read_reserve=self._read_reserve,
            memory_wait=self.memory_wait,
            memory_limit=memory_limit,
            max_batch_bytes=max_batch_bytes,
            sessions=self._sessions,
            stats=self._stats,
            threads=self._kernel_threads,
            aborting=lambda: self._aborting,
            classify=self._classify,
        )
        #: the Prometheus view of the counters; ``add_gauge`` adds one
        self.metrics = metrics.ServerMetrics(self)
        self._metrics_endpoint: metrics.MetricsEndpoint | None = None
        self._draining = False
        self._aborting = False
        self._shutdown_lock = threading.Lock()
        self._shutdown_thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._health = None

        middleware = {PIPELINE_KEY: PipelineFactory()}
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
        if not finished and self._watchdog.end_waiting(protocol.UNAVAILABLE, CUT):
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
            raise self._refuse(
                protocol.INVALID_ARGUMENT,
                f"unknown action {kind!r}; valid actions are: {', '.join(ACTIONS)}",
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
            raise self._refuse(protocol.INVALID_ARGUMENT, message(exc)) from None
        return flight.GeneratorStream(calibration.IMATRIX_SCHEMA, calibration.table_batches(acc))

    def _session_action(self, kind: str, body) -> Any:
        """The calibration session actions: list, drop."""
        if kind == protocol.CALIBRATION_LIST:
            return self._sessions.list()
        try:
            name = calibration.parse_drop(body.to_pybytes() if body is not None else b"")
            return {"session": name, "dropped": self._sessions.drop(name)}
        except ValueError as exc:
            raise self._refuse(protocol.INVALID_ARGUMENT, message(exc)) from None

    def do_put(self, context, descriptor, reader, writer):
        raise Unimplemented(_USE_EXCHANGE)

    # -- DoExchange ----------------------------------------------------------------------

    def _refuse(self, kind: str, text: str) -> Exception:
        """A call other than a stream fails: counted, and its exception (see to_flight)."""
        self._stats.error(kind)
        return to_flight(kind, shorten(text, MESSAGE_LIMIT))

    def _unauthenticated(self, info) -> None:
        """A call refused for its token: a stream (counted and logged) or another call."""
        if info.method != flight.FlightMethod.DO_EXCHANGE:
            self._stats.error(protocol.UNAUTHENTICATED)
            return
        self._stream_ended("?", None, protocol.UNAUTHENTICATED, "missing or invalid bearer token")

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
            self._stream_ended(_peer(context), None, protocol.UNAVAILABLE, refused)
            raise to_flight(protocol.UNAVAILABLE, refused)

        t0 = time.perf_counter()
        run = StreamRun(Activity(_peer(context), writer))
        self._watchdog.register(run.activity)
        outcome = "ok"
        try:
            self._pipeline.exchange(context, descriptor, reader, writer, run)
            if run.activity.timed_out:  # the watchdog closed the connection
                raise to_flight(*self._classify(None, context, run))
            if context.is_cancelled():
                outcome = protocol.CANCELLED  # a client that vanishes looks like end-of-stream
                run.error = (outcome, "stream cancelled by the client")
        except Exception as exc:
            kind, text = run.error or self._classify(exc, context, run)
            outcome = kind
            run.error = (kind, shorten(text, MESSAGE_LIMIT))
            if kind == protocol.RESOURCE_EXHAUSTED:
                self.log.warning(
                    "stream peer=%s batch=%d: %s", run.activity.peer, run.batches, run.error[1]
                )
            elif kind == protocol.INTERNAL and not isinstance(exc, flight.FlightError):
                self.log.exception(
                    "internal error in stream peer=%s op=%s batch=%d",
                    run.activity.peer,
                    run.op,
                    run.batches,
                )
            raise to_flight(*run.error) from None
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
        run: StreamRun | None,
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

    def _classify(self, exc: BaseException | None, context, run: StreamRun) -> tuple[str, str]:
        """(error kind, client-facing message) of a handler's exception."""
        timed_out = run.activity.timed_out
        return classify(
            exc,
            batch=run.batches,
            timed_out=timed_out,
            aborting=self._aborting,
            idle=idle_message(run.activity.idle_for, self.idle_timeout or 0.0) if timed_out else "",
            cancelled=context.is_cancelled(),
        )


_USE_EXCHANGE = (
    "flightquant serves DoExchange (command = options JSON) and the actions "
    f"{', '.join(ACTIONS)}; other Flight methods are not implemented"
)


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # pragma: no cover - peer() is informational only
        return "?"
