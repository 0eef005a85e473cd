"""The standard ``grpc.health.v1`` health service on its own port, for orchestrators.

Kubernetes (``grpc:`` probes), Envoy and ``grpc_health_probe`` speak this protocol. It runs
on grpcio, beside pyarrow's own gRPC server, so a probe never competes with data streams.
Both the overall service ``""`` and ``"flightquant"`` report SERVING after start and
NOT_SERVING once the Flight server starts draining.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

__all__ = ["HealthServer", "SERVICE_NAME"]

SERVICE_NAME = "flightquant"
_SERVICES = ("", SERVICE_NAME)


class HealthServer:
    """A grpcio server that answers ``grpc.health.v1.Health/Check`` and ``Watch``.

    Parameters
    ----------
    host : str
        Interface to bind; ``"0.0.0.0"`` for all, the default is loopback only.
    port : int
        Port to bind; 0 picks a free one (read it back from ``.port``).

    Examples
    --------
    >>> hs = HealthServer()
    >>> hs.port > 0
    True
    >>> hs.set_not_serving()
    >>> hs.stop()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.Lock()
        # experimental_thread_pool is stored on the class (shared by every instance), so
        # leave it None: Watch callbacks then run on the server's own pool.
        self._servicer = health.HealthServicer(experimental_non_blocking=True)
        # Watch streams hold a worker each; a few workers are plenty for probes.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="fq-health"),
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises RuntimeError when it cannot bind
            raise OSError(f"cannot bind the health service to {address}: {exc}") from None
        if not bound:
            raise OSError(f"cannot bind the health service to {address} (port in use?)")
        self.host = host
        self.port = int(bound)
        self._stopped = False
        self.set_serving()  # before start: no window where "flightquant" is unknown
        self._server.start()

    def _set(self, status) -> None:
        with self._lock:
            if self._stopped:
                return
            for name in _SERVICES:
                self._servicer.set(name, status)

    def set_serving(self) -> None:
        """Report SERVING for ``""`` and ``"flightquant"``."""
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def set_not_serving(self) -> None:
        """Report NOT_SERVING (draining or shutting down) for ``""`` and ``"flightquant"``."""
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, then stop the server (``grace`` seconds for open RPCs).

        Idempotent; blocks until the server has stopped.
        """
        with self._lock:
            if self._stopped:
                return
            for name in _SERVICES:
                self._servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            self._stopped = True
        # ends open Watch streams with their last status before the port closes
        self._servicer.enter_graceful_shutdown()
        self._server.stop(grace).wait()

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"HealthServer(host={self.host!r}, port={self.port})"
