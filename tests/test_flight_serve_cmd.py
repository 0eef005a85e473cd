"""``flightquant serve`` as a real process: location line, health, SIGTERM drain, bad args."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import grpc
import pyarrow.flight as flight
import pytest
from common import make_layer_batch, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

import flightquant as fq
from flightquant.client import Client
from flightquant.testing import ServeProcess


@pytest.fixture
def serve():
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        s = ServeProcess(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _action(client: flight.FlightClient, name: str) -> dict:
    return json.loads(next(iter(client.do_action(flight.Action(name, b"")))).body.to_pybytes())


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_serve_prints_location_answers_and_exits_zero_on_sigterm(serve):
    s = serve(
        "--port",
        "0",
        "--health-port",
        "0",
        "--max-streams",
        "3",
        "--max-batch-bytes",
        "64MiB",
        "--threads",
        "1",
    )
    line = s.first_line()
    assert line.startswith("flightquant serving on grpc://127.0.0.1:"), line
    location = line.split()[3]
    health_port = int(line.rsplit("port ", 1)[1].rstrip(")"))
    assert _health(health_port) == health_pb2.HealthCheckResponse.SERVING
    batch = make_layer_batch()
    with Client(location) as client:
        assert client.health()["status"] == "ok"
        config = client.config()
        assert (config["max_streams"], config["max_batch_bytes"], config["threads"]) == (
            3,
            64 << 20,
            1,
        )
        assert client.quantize(batch, bits=8).equals(fq.quantize(batch, bits=8))
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    err = s.proc.stderr.read()
    assert "draining" in err and "stopped" in err
    assert "Traceback" not in err


def test_sigterm_drains_a_running_stream(serve):
    s = serve("--port", "0", "--drain-timeout", "30")
    location = s.first_line().split()[3]
    batch = make_layer_batch()
    with flight.connect(location) as client:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        reader.read_chunk()
        s.proc.send_signal(signal.SIGTERM)
        # new streams are refused once the signal is handled; the running one goes on
        wait_for(lambda: _action(client, "health")["draining"], what="the server to drain")
        w2, r2 = client.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
        with pytest.raises(flight.FlightUnavailableError, match="draining"):
            w2.begin(batch.schema)
            w2.write_batch(batch)
            r2.read_chunk()
        writer.write_batch(batch)
        assert reader.read_chunk().data.equals(fq.quantize(batch))
        assert s.proc.poll() is None  # still waiting for our stream
        writer.done_writing()
        writer.close()
    assert s.proc.wait(30) == 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tls-cert", "cert.pem"], "--tls-key"),
        (["--token-file", "/nonexistent/token"], "does not exist"),
        (["--max-batch-bytes", "lots"], "size"),
        (["--port", "70000"], "port"),
    ],
    ids=["cert-without-key", "missing-token-file", "bad-size", "bad-port"],
)
def test_bad_arguments_exit_2_with_one_line(args, fragment):
    proc = subprocess.run(
        [sys.executable, "-m", "flightquant", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_busy_port_exits_2(serve):
    s = serve("--port", "0")
    port = s.first_line().rsplit(":", 1)[1]
    proc = subprocess.run(
        [sys.executable, "-m", "flightquant", "serve", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "in use" in proc.stderr and "Traceback" not in proc.stderr
