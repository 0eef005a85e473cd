"""The server's counters, and their Prometheus view at ``/metrics``.

One set of numbers, two views: :class:`Counters` is what the server counts (under one
lock, where a batch is answered and where a stream ends); the ``stats`` action returns its
snapshot and :class:`ServerMetrics` turns the same snapshot into Prometheus metric families
when scraped. Nothing is counted twice and nothing is counted on the hot path for
Prometheus alone: a scrape reads, a batch only adds.

``prometheus_client`` is imported only when metrics are read or served, so a server
without ``metrics_port`` never loads it. Each server has its own ``CollectorRegistry``:
several servers in one process never share or collide.

Adding a gauge (or a counter, ``add_counter``) later takes one line (a calibration
session count, say)::

    server.metrics.add_gauge("flightquant_sessions_active", "open sessions", lambda: n)
"""

from __future__ import annotations

import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .protocol import ERROR_KINDS

__all__ = ["Counters", "ServerMetrics", "MetricsEndpoint", "UNKNOWN", "format_label"]

#: ``op`` / ``format`` label of a stream refused before its options were read
UNKNOWN = "unknown"

#: upper bounds (seconds) of the histogram buckets: engine time of one batch, one stream
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STREAM_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


def format_label(op: str, fmt: str, schema) -> str:
    """The ``format`` label of a stream: the option for quantize; for dequantize (whose
    options name no format) the format of the quantized columns in ``schema``, "mixed"
    when they differ."""
    if op != "dequantize":
        return fmt
    from . import wire

    found = set()
    for field in schema:
        if wire.is_quantized_field(field):
            try:
                found.add(wire.parse_codes_field(field).format)
            except ValueError:
                return UNKNOWN
    return found.pop() if len(found) == 1 else ("mixed" if found else fmt)


class _Histogram:
    """Bucket counts (not cumulative; the last one is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1  # value <= bound: Prometheus' "le"
        self.sum += value


class Counters:
    """Thread-safe counters behind the ``stats`` action and ``/metrics``.

    ``lock`` guards every field; ``changed`` is notified when a stream ends (drain waits
    on it). Streams are counted by ``(op, format, status)``, batches and their engine time
    by ``(op, format)``; ``errors`` counts every failed call by kind, streams or not.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.streams_active = 0
        self.streams_served = 0
        self.batches = 0
        self.rows = 0
        self.elements = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.kernel_seconds = 0.0
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.streams: dict[tuple[str, str, str], int] = {}
        self.batches_by: dict[tuple[str, str], int] = {}
        self.batch_seconds: dict[tuple[str, str], _Histogram] = {}
        self.stream_seconds: dict[tuple[str, str], _Histogram] = {}

    def batch_done(self, op: str, fmt: str, info) -> None:
        """One answered batch (``info``: the codec's ``BatchInfo``)."""
        key = (op, fmt)
        with self.lock:
            self.batches += 1
            self.rows += info.rows
            self.elements += info.elements
            self.bytes_in += info.input_bytes
            self.bytes_out += info.output_bytes
            self.kernel_seconds += info.kernel_seconds
            self.batches_by[key] = self.batches_by.get(key, 0) + 1
            hist = self.batch_seconds.get(key)
            if hist is None:
                hist = self.batch_seconds[key] = _Histogram(BATCH_BUCKETS)
            hist.observe(BATCH_BUCKETS, info.kernel_seconds)

    def stream_done(
        self, op: str, fmt: str, status: str, seconds: float, *, started: bool = True
    ) -> None:
        """A stream ended with ``status`` ("ok" or a kind); ``started``: it was counted in
        ``streams_active`` (a refused stream was not, and has no duration)."""
        key = (op, fmt)
        with self.lock:
            if status == "ok":
                self.streams_served += 1
            else:
                self.errors[status] += 1
            self.streams[(op, fmt, status)] = self.streams.get((op, fmt, status), 0) + 1
            if started:
                self.streams_active -= 1
                hist = self.stream_seconds.get(key)
                if hist is None:
                    hist = self.stream_seconds[key] = _Histogram(STREAM_BUCKETS)
                hist.observe(STREAM_BUCKETS, seconds)
                self.changed.notify_all()

    def error(self, kind: str) -> None:
        """A failed call that is not a stream (an unknown action, say)."""
        with self.lock:
            self.errors[kind] += 1

    def snapshot(self) -> dict[str, Any]:
        """The ``stats`` action's counters, plus ``streams_by`` (op, format, status,
        streams) and ``batches_by`` (op, format, batches)."""
        with self.lock:
            return {
                "streams_active": self.streams_active,
                "streams_served": self.streams_served,
                "batches": self.batches,
                "rows": self.rows,
                "elements": self.elements,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "kernel_seconds": round(self.kernel_seconds, 6),
                "errors": dict(self.errors),
                "streams_by": [
                    {"op": op, "format": fmt, "status": status, "streams": n}
                    for (op, fmt, status), n in sorted(self.streams.items())
                ],
                "batches_by": [
                    {"op": op, "format": fmt, "batches": n}
                    for (op, fmt), n in sorted(self.batches_by.items())
                ],
            }

    def histograms(self) -> dict[str, dict[tuple[str, str], tuple[list[int], float]]]:
        """``{"batch_seconds"|"stream_seconds": {(op, format): (counts, sum)}}``, a copy."""
        with self.lock:
            return {
                name: {k: (list(h.counts), h.sum) for k, h in hists.items()}
                for name, hists in (
                    ("batch_seconds", self.batch_seconds),
                    ("stream_seconds", self.stream_seconds),
                )
            }


# ---------------------------------------------------------------------------------------
# the Prometheus view


class ServerMetrics:
    """A Prometheus collector over a server's counters, read when scraped.

    ``server`` needs ``stats()`` (with ``memory``), ``_stats`` (the :class:`Counters`),
    ``max_streams`` and ``draining``. :attr:`registry` is this server's own
    ``CollectorRegistry``, made on first use.
    """

    def __init__(self, server) -> None:
        self._server = server
        self._extra: list[tuple[str, str, str, Callable[[], float]]] = []
        self._registry = None
        self._lock = threading.Lock()

    def add_gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Expose ``read()`` (a number, read at each scrape) as the gauge ``name``.

        A ``read`` that raises is left out of that scrape; the others still answer.
        """
        self._extra.append(("gauge", name, documentation, read))

    def add_counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Expose ``read()`` (a count that only rises) as the counter ``name`` (``_total``
        is added to the sample's name when missing), as :meth:`add_gauge`."""
        self._extra.append(("counter", name, documentation, read))

    @property
    def registry(self):
        """This server's ``prometheus_client.CollectorRegistry`` (only this collector)."""
        with self._lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                registry = CollectorRegistry(auto_describe=False)
                registry.register(self)
                self._registry = registry
            return self._registry

    def describe(self) -> Iterable:
        return ()  # names are fixed by this module; no collect() at registration

    def collect(self) -> Iterable:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        server = self._server
        stats = server.stats()
        hists = server._stats.histograms()
        memory = stats["memory"]

        streams = CounterMetricFamily(
            "flightquant_streams",
            "DoExchange streams that ended, by op, format and status (ok or the error kind)",
            labels=("op", "format", "status"),
        )
        for row in stats["streams_by"]:
            streams.add_metric((row["op"], row["format"], row["status"]), row["streams"])
        yield streams

        batches = CounterMetricFamily(
            "flightquant_batches", "batches answered, by op and format", labels=("op", "format")
        )
        for row in stats["batches_by"]:
            batches.add_metric((row["op"], row["format"]), row["batches"])
        yield batches

        errors = CounterMetricFamily(
            "flightquant_errors",
            "failed calls by kind, streams and actions alike (the stats action's errors)",
            labels=("kind",),
        )
        for kind, n in stats["errors"].items():
            errors.add_metric((kind,), n)
        yield errors

        for name, value, doc in (
            ("flightquant_input_bytes", stats["bytes_in"], "Arrow buffer bytes received"),
            ("flightquant_output_bytes", stats["bytes_out"], "Arrow buffer bytes sent"),
            ("flightquant_elements", stats["elements"], "tensor elements (de)quantized"),
            ("flightquant_rows", stats["rows"], "rows (tensors) of the batches answered"),
            (
                "flightquant_idle_streams_ended",
                stats["idle_streams_ended"],
                "streams ended for idling on their client",
            ),
            ("flightquant_memory_refused", memory["refused"], "memory reservations refused"),
        ):
            yield CounterMetricFamily(name, doc, value=value)

        for name, key, bounds, doc in (
            (
                "flightquant_batch_seconds",
                "batch_seconds",
                BATCH_BUCKETS,
                "engine (codec and kernel) seconds per batch, by op and format",
            ),
            (
                "flightquant_stream_seconds",
                "stream_seconds",
                STREAM_BUCKETS,
                "seconds from a stream's start to its end, by op and format",
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=("op", "format"))
            for (op, fmt), (counts, total) in sorted(hists[key].items()):
                buckets, running = [], 0
                for bound, n in zip((*map(str, bounds), "+Inf"), counts, strict=True):
                    running += n
                    buckets.append((bound, running))
                family.add_metric((op, fmt), buckets, total)
            yield family

        for name, value, doc in (
            ("flightquant_streams_active", stats["streams_active"], "streams running now"),
            ("flightquant_streams_max", server.max_streams, "max_streams: more are refused"),
            ("flightquant_memory_reserved_bytes", memory["reserved"], "bytes reserved now"),
            ("flightquant_memory_peak_reserved_bytes", memory["peak_reserved"], "peak reserved"),
            ("flightquant_memory_limit_bytes", memory["limit"], "the memory budget (limit)"),
            ("flightquant_memory_waiting", memory["waiting"], "streams waiting for memory"),
            ("flightquant_draining", int(server.draining), "1 while draining (shutting down)"),
        ):
            yield GaugeMetricFamily(name, doc, value=value)

        for kind, name, doc, read in list(self._extra):
            try:
                value = float(read())
            except Exception:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, doc, value=value)


class _Handler(WSGIRequestHandler):
    #: a client that stalls mid-request holds its thread this long, no longer
    timeout = 10.0

    def log_message(self, format, *args) -> None:  # one line per scrape is noise
        pass


class _HTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that times out or resets: nothing to report, others carry on


class MetricsEndpoint:
    """Plain HTTP serving ``registry`` at ``/metrics`` (404 elsewhere), one thread per
    connection, each request bounded by :attr:`_Handler.timeout`.

    Examples
    --------
    >>> from prometheus_client import CollectorRegistry
    >>> endpoint = MetricsEndpoint(CollectorRegistry(), "127.0.0.1", 0)
    >>> endpoint.port > 0
    True
    >>> endpoint.stop()
    """

    def __init__(self, registry, host: str = "127.0.0.1", port: int = 0):
        from prometheus_client import make_wsgi_app

        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/metrics":
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"flightquant serves Prometheus metrics at /metrics\n"]

        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except OSError as exc:
            raise OSError(f"cannot bind the metrics endpoint to {host}:{port}: {exc}") from None

        class Server(_HTTPServer):
            address_family = family

        try:
            self._httpd = Server((host, port), _Handler)
        except OSError as exc:
            raise OSError(
                f"cannot bind the metrics endpoint to {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._httpd.set_app(app)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fq-metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port (idempotent)."""
        if self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._thread = None

    def __repr__(self) -> str:
        return f"MetricsEndpoint(host={self.host!r}, port={self.port})"
