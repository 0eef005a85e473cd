"""Faults: a soak with failures on purpose, failover after SIGKILL, SIGTERM draining.

Slow (servers in child processes, thousands of batches): CI runs them in their own step
(``pytest -m slow``). The long soak is ``python benchmarks/soak.py --batches 20000``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from common import assert_clean, exchange, make_layer_batch

import flightquant as fq
from flightquant.testing import start_server_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- soak
def test_soak_ci(tmp_path):
    """~2400 batches over many streams (1 in 5 poisoned); RSS/fd/threads grow < 10%."""
    report = tmp_path / "soak.json"
    batches = os.environ.get("FQ_SOAK_BATCHES", "2400")
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "soak.py"),
            "--batches",
            batches,
            "--warmup",
            "2000",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    out = json.loads(report.read_text())
    assert out["problems"] == []
    assert out["server_alive"]
    assert out["batches_answered"] == out["batches_sent_valid"]
    assert out["rows_seen"] == out["batches_answered"] * 4  # every row exactly once
    for key, growth in out["growth"].items():
        assert growth < 0.10, (key, out["before"], out["after"])
    assert run.returncode == 0, run.stdout[-2000:]


# --------------------------------------------------------------------------- fault
def test_failover_after_sigkill():
    """Two servers in child processes, one SIGKILLed mid-job: every row once, in order."""
    from flightquant.client import Client

    procs = [start_server_process(max_streams=16) for _ in range(2)]
    ports = [p for _, p in procs]
    batches = [make_layer_batch(start=4 * i, rows=4, elements=2048, seed=7 + i) for i in range(120)]
    want = fq.quantize(pa.Table.from_batches(batches), bits=4, group_size=64)
    killed = {}

    def victim() -> int:
        """The server with a stream open now (else the first one)."""
        for i, port in enumerate(ports):
            with flight.connect(f"grpc://127.0.0.1:{port}") as c:
                stats = json.loads(
                    next(iter(c.do_action(flight.Action("stats", b"")))).body.to_pybytes()
                )
            if stats["streams_active"]:
                return i
        return 0

    def source():
        for i, b in enumerate(batches):
            if i == 40 and not killed:
                idx = victim()
                killed["index"] = idx
                procs[idx][0].send_signal(signal.SIGKILL)
                procs[idx][0].wait()
            yield b

    try:
        with Client([f"grpc://127.0.0.1:{p}" for p in ports]) as client:
            got = client.quantize(source(), bits=4, group_size=64)
            got = pa.Table.from_batches(list(got)) if not isinstance(got, pa.Table) else got
        assert killed, "the job ended before the kill"
        assert got.num_rows == want.num_rows
        keys = got.column("layer_name").to_pylist()
        assert keys == want.column("layer_name").to_pylist()  # every row once, in order
        assert len(set(keys)) == len(keys)
        assert got.combine_chunks().equals(want.combine_chunks())
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- SIGTERM
def _serve_cmd_ports(proc, timeout: float = 60) -> dict:
    """Read the bound ports that ``flightquant serve`` prints (flight + health)."""
    import re
    import selectors

    found: dict = {}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline and not ("flight" in found and "health" in found):
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        try:
            obj = json.loads(line)
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if "health" in k and isinstance(v, int):
                        found["health"] = v
                    elif k in ("port", "flight_port") and isinstance(v, int):
                        found["flight"] = v
                    elif k == "location" and isinstance(v, str):
                        found.setdefault("flight", int(v.rsplit(":", 1)[1]))
                continue
        except ValueError:
            pass
        m = re.search(r"health\D*(\d{2,5})", line)
        if m:
            found["health"] = int(m.group(1))
        m = re.search(r"grpc(?:\+tls)?://[^\s:]+:(\d+)", line)
        if m:
            found.setdefault("flight", int(m.group(1)))
    found["lines"] = lines
    return found


@pytest.mark.parametrize("stall", [False, True], ids=["clean", "stalled-client"])
def test_sigterm_drains(stall):
    """SIGTERM: the open stream finishes, new streams get UNAVAILABLE, health goes
    NOT_SERVING, and the process exits 0 in bounded time even while a client stalls."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flightquant",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--health-port",
            "0",
            "--drain-timeout",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        ports = _serve_cmd_ports(proc)
        if "flight" not in ports or "health" not in ports:
            pytest.fail(
                f"flightquant serve did not print its flight and health ports: {ports['lines']}"
            )
        loc = f"grpc://127.0.0.1:{ports['flight']}"
        health = grpc.insecure_channel(f"127.0.0.1:{ports['health']}")
        stub = health_pb2_grpc.HealthStub(health)

        def check():
            return stub.Check(
                health_pb2.HealthCheckRequest(service="flightquant"), timeout=5
            ).status  # noqa: E731

        assert check() == health_pb2.HealthCheckResponse.SERVING

        c1 = flight.connect(loc)
        w1, r1 = c1.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
        b = make_layer_batch(rows=3, elements=130, seed=3)
        w1.begin(b.schema)
        w1.write_batch(b)
        assert r1.read_chunk().data.num_rows == 3  # stream 1 is in flight
        c2 = flight.connect(loc)
        if stall:  # stream 2 stalls: it sends one batch, then nothing (no done_writing)
            w2, r2 = c2.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
            w2.begin(b.schema)
            w2.write_batch(b)
            r2.read_chunk()

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while check() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING

        with flight.connect(loc) as c3:
            with pytest.raises(flight.FlightUnavailableError) as info:
                exchange(c3, b"{}", b.schema, [b], timeout=10)
            assert_clean(info.value)

        # the in-flight stream 1 still gets its answer and ends cleanly
        w1.write_batch(b)
        assert r1.read_chunk().data.num_rows == 3
        w1.done_writing()
        with pytest.raises(StopIteration):
            r1.read_chunk()
        w1.close()

        rc = proc.wait(timeout=30)  # a stalled stream 2 must be ended by the drain deadline
        elapsed = time.monotonic() - t0
        assert elapsed < 20, elapsed
        assert rc == 0, proc.stdout.read()[-3000:]
        for c in (c1, c2):
            c.close()
        health.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
