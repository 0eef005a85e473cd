"""The grpc.health.v1 service: SERVING after start, NOT_SERVING while the server drains."""

from __future__ import annotations

import threading
import time

import grpc
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flightquant.health import SERVICE_NAME, HealthServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(port: int, service: str = "", timeout: float = 5.0):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def test_serving_after_start_for_both_names():
    hs = HealthServer()
    try:
        assert hs.port > 0
        assert _check(hs.port, "") == SERVING
        assert _check(hs.port, SERVICE_NAME) == SERVING
        hs.set_not_serving()
        assert _check(hs.port, "") == NOT_SERVING
        assert _check(hs.port, SERVICE_NAME) == NOT_SERVING
        hs.set_serving()
        assert _check(hs.port, SERVICE_NAME) == SERVING
    finally:
        hs.stop()


def test_unknown_service_is_not_found():
    with HealthServer() as hs:
        with pytest.raises(grpc.RpcError) as info:
            _check(hs.port, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_sees_transition_and_stop_ends_it():
    hs = HealthServer()
    channel = grpc.insecure_channel(f"127.0.0.1:{hs.port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=20)
        assert next(stream).status == SERVING
        hs.set_not_serving()
        assert next(stream).status == NOT_SERVING
        t0 = time.monotonic()
        hs.stop(grace=0.5)
        assert time.monotonic() - t0 < 10
        with pytest.raises((grpc.RpcError, StopIteration)):
            while True:  # the stream ends (cancelled or closed) once the server stops
                next(stream)
    finally:
        channel.close()
        hs.stop()


def test_stop_is_idempotent_and_frees_port():
    hs = HealthServer()
    port = hs.port
    hs.stop()
    hs.stop()
    with pytest.raises(grpc.RpcError) as info:
        _check(port, timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    hs.set_serving()  # no effect and no error after stop


def test_bind_conflict_is_clear():
    with HealthServer() as hs:
        with pytest.raises(OSError, match=str(hs.port)):
            HealthServer(port=hs.port)


# ------------------------------------------------------------------ with the Flight server
def _server_health_port(server) -> int:
    for attr in ("health_port",):
        value = getattr(server, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    health = getattr(server, "health", None) or getattr(server, "_health", None)
    if health is not None and getattr(health, "port", None):
        return int(health.port)
    pytest.skip("the Flight server does not expose its health port (health_port / .health.port)")


@pytest.fixture
def fq_server():
    try:
        from flightquant.server import Server
    except ImportError:
        pytest.skip("flightquant.server not available yet")
    server = Server("grpc://127.0.0.1:0", health_port=0, drain_timeout=20.0)
    try:
        yield server
    finally:
        server.shutdown()


def _batch(i: int) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "layer_name": pa.array([f"layer.{i}"]),
            "weights": pa.array([[float(j % 7) - 3.0 for j in range(64)]], pa.list_(pa.float32())),
        }
    )


def test_flight_server_health_serving_then_not_serving_during_drain(fq_server):
    port = _server_health_port(fq_server)
    assert _check(port, "") == SERVING
    assert _check(port, SERVICE_NAME) == SERVING

    with flight.connect(f"grpc://127.0.0.1:{fq_server.port}") as client:
        writer, reader = client.do_exchange(
            flight.FlightDescriptor.for_command(b'{"bits": 4, "group_size": 32}')
        )
        writer.begin(_batch(0).schema)
        writer.write_batch(_batch(0))
        first = reader.read_chunk()  # the stream is really in flight now
        assert first.data.num_rows == 1

        drained = threading.Event()
        drain_result = {}

        def drain():
            try:
                drain_result["value"] = fq_server.drain(20.0)
            finally:
                drained.set()

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        # health flips while the stream is still open (poll: drain runs in a thread)
        deadline = time.monotonic() + 10
        status = SERVING
        while time.monotonic() < deadline:
            status = _check(port, SERVICE_NAME)
            if status == NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == NOT_SERVING
        assert _check(port, "") == NOT_SERVING
        assert not drained.is_set(), "drain returned while a stream was still open"

        # the in-flight stream still gets its answers
        writer.write_batch(_batch(1))
        writer.done_writing()
        second = reader.read_chunk()
        assert second.data.num_rows == 1
        writer.close()
    assert drained.wait(20), "drain did not return after the last stream closed"
    t.join(5)
