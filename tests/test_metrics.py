"""Prometheus ``/metrics`` and ``--log-format json``: scraped from a real ``flightquant serve``
and read with prometheus_client's own parser; counters rise by exactly what was sent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from common import make_layer_batch, wait_for

import flightquant as fq
from flightquant import logs, metrics, protocol
from flightquant.security import auth_headers
from flightquant.testing import ServeProcess

parser = pytest.importorskip("prometheus_client.parser")

TOKEN = "metrics-test-secret-3f9a"
WRONG = "not-the-token-77c1"
#: a row key no log line may repeat (payload, not metadata)
SECRET_ROW = "payload.row.c0ffee"


def scrape(port: int, path: str = "/metrics") -> dict:
    """``{(sample name, sorted label items): value}`` parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def _exchange(location: str, command: bytes, batches, token: str | None = TOKEN) -> list:
    """Send ``batches`` through DoExchange; the answers' app_metadata (dicts), or raise."""
    with flight.connect(location) as client:
        options = flight.FlightCallOptions(headers=auth_headers(token) if token else [])
        writer, reader = client.do_exchange(
            flight.FlightDescriptor.for_command(command), options=options
        )
        metas = []
        try:
            writer.begin(batches[0].schema)
            for b in batches:
                writer.write_batch(b)
                chunk = reader.read_chunk()
                metas.append(json.loads(chunk.app_metadata.to_pybytes()))
            writer.done_writing()
            for _ in reader:
                pass
        finally:
            writer.close()
    return metas


def _batch(start: int, rows: int = 3) -> pa.RecordBatch:
    b = make_layer_batch(start, rows=rows, elements=512)  # row 0 of 5: 512 = 16 Q8_0 blocks
    names = pa.array([f"{SECRET_ROW}.{i}" for i in range(b.num_rows)])
    return b.set_column(0, "layer_name", names)


class _Serve(ServeProcess):
    """``flightquant serve`` with metrics and JSON logs; stderr lines collected."""

    def __init__(self, *args: str):
        env = dict(os.environ, FLIGHTQUANT_TOKEN=TOKEN)
        super().__init__("--port", "0", *args, env=env, pump_stderr=True)
        self.location = self.wait_serving()
        self.metrics_port = int(self.serving_line.rsplit("metrics on port ", 1)[1].rstrip(")"))

    def events(self, name: str | None = None) -> list[dict]:
        # (a line from gRPC's or Arrow's C++ logging would not be ours to format)
        out = [json.loads(line) for line in list(self.err) if line.startswith("{")]
        return [e for e in out if name is None or e["event"] == name]


@pytest.fixture(scope="module")
def served():
    s = _Serve("--metrics-port", "0", "--log-format", "json", "--threads", "1")
    yield s
    s.close()


def test_counters_rise_by_exactly_what_was_sent(served):
    before = scrape(served.metrics_port)
    batches = [_batch(i) for i in range(0, 12, 3)]
    metas = _exchange(served.location, b'{"bits": 4}', batches)
    metas += _exchange(served.location, b'{"format": "Q8_0"}', [_batch(0, rows=1)])
    labels = {"op": "quantize", "format": "native"}
    wait_for(
        lambda: (
            value(scrape(served.metrics_port), "flightquant_streams_total", status="ok", **labels)
            - value(before, "flightquant_streams_total", status="ok", **labels)
            == 1
            and value(scrape(served.metrics_port), "flightquant_streams_active") == 0
        ),
        what="both streams to be counted",
    )
    after = scrape(served.metrics_port)

    def rise(name, **kw):
        return value(after, name, **kw) - value(before, name, **kw)

    q8 = {"op": "quantize", "format": "Q8_0"}
    assert rise("flightquant_streams_total", status="ok", **q8) == 1
    assert rise("flightquant_batches_total", **labels) == 4
    assert rise("flightquant_batches_total", **q8) == 1
    assert rise("flightquant_input_bytes_total") == sum(m["input_bytes"] for m in metas)
    assert rise("flightquant_output_bytes_total") == sum(m["output_bytes"] for m in metas)
    assert rise("flightquant_elements_total") == sum(m["elements"] for m in metas)
    assert rise("flightquant_rows_total") == 4 * 3 + 1
    # the batch histogram counts batches; every batch falls in +Inf, the sum is engine time
    assert rise("flightquant_batch_seconds_count", **labels) == 4
    assert rise("flightquant_batch_seconds_bucket", le="+Inf", **labels) == 4
    assert rise("flightquant_batch_seconds_count", **q8) == 1
    assert rise("flightquant_stream_seconds_count", **labels) == 1
    assert rise("flightquant_batch_seconds_sum", **labels) == pytest.approx(
        sum(m["kernel_seconds"] for m in metas[:4]), abs=1e-5
    )
    assert (
        sum(rise(n, kind=k) for n in ["flightquant_errors_total"] for k in protocol.ERROR_KINDS)
        == 0
    )
    assert value(after, "flightquant_streams_max") == 64
    assert value(after, "flightquant_memory_limit_bytes") > 0
    assert value(after, "flightquant_memory_reserved_bytes") == 0
    assert value(after, "flightquant_memory_waiting") == 0

    # one set of counters, two views: the stats action reads the same numbers
    with flight.connect(served.location) as client:
        call = flight.FlightCallOptions(headers=auth_headers(TOKEN))
        stats = json.loads(next(client.do_action("stats", options=call)).body.to_pybytes())
    now = scrape(served.metrics_port)
    assert value(now, "flightquant_input_bytes_total") == stats["bytes_in"]
    assert value(now, "flightquant_elements_total") == stats["elements"]
    assert (
        sum(v for (n, _), v in now.items() if n == "flightquant_batches_total")
        == (stats["batches"])
    )
    ok = [(n, lb) for (n, lb) in now if n == "flightquant_streams_total" and ("status", "ok") in lb]
    assert sum(now[k] for k in ok) == stats["streams_served"]
    for kind, n in stats["errors"].items():
        assert value(now, "flightquant_errors_total", kind=kind) == n


def test_errors_are_counted_by_kind(served):
    before = scrape(served.metrics_port)
    with pytest.raises(pa.ArrowInvalid, match="bits"):
        _exchange(served.location, b'{"bits": 99}', [_batch(0)])
    bad = _batch(0)
    n = len(bad.column(1).values)
    weights = pa.ListArray.from_arrays(bad.column(1).offsets, pa.array(np.full(n, np.nan, "f4")))
    with pytest.raises(pa.ArrowInvalid, match="non-finite"):
        _exchange(served.location, b"{}", [bad.set_column(1, "weights", weights)])
    with pytest.raises(flight.FlightUnauthenticatedError):
        _exchange(served.location, b"{}", [_batch(0)], token=WRONG)
    with pytest.raises(flight.FlightUnauthenticatedError), flight.connect(served.location) as c:
        list(c.do_action("stats"))  # not a stream: counted in errors only
    expected = {
        ("unknown", "unknown", "invalid_argument"): 1,  # options never parsed
        ("quantize", "native", "invalid_argument"): 1,
        ("unknown", "unknown", "unauthenticated"): 1,
    }
    wait_for(
        lambda: value(scrape(served.metrics_port), "flightquant_streams_active") == 0,
        what="the streams to end",
    )
    after = scrape(served.metrics_port)
    for (op, fmt, status), n in expected.items():
        labels = {"op": op, "format": fmt, "status": status}
        got = value(after, "flightquant_streams_total", **labels) - value(
            before, "flightquant_streams_total", **labels
        )
        assert got == n, (labels, got)

    def rise(kind):
        return value(after, "flightquant_errors_total", kind=kind) - value(
            before, "flightquant_errors_total", kind=kind
        )

    assert rise("invalid_argument") == 2
    assert rise("unauthenticated") == 2
    assert all(
        rise(k) == 0
        for k in protocol.ERROR_KINDS
        if k not in ("invalid_argument", "unauthenticated")
    )


def test_metrics_endpoint_survives_garbage_and_a_stalled_client(served):
    port = served.metrics_port
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    stalled.sendall(b"GET /metr")  # half a request line, then nothing
    garbage = [
        b"\x00\xff\xfe garbage \x80\r\n\r\n",
        b"NOT-A-METHOD / HTTP/9.9\r\n\r\n",
        b"GET /" + b"A" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n" + b"X: y\r\n" * 200,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    ]
    for raw in garbage:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass  # a reset is an acceptable answer to garbage
    try:
        m = scrape(port)  # answered while the stalled client still holds its connection
        assert ("flightquant_streams_active", ()) in m
        with pytest.raises(urllib.error.HTTPError) as info:
            scrape(port, "/")
        assert info.value.code == 404
    finally:
        stalled.close()
    assert served.proc.poll() is None
    with flight.connect(served.location) as client:
        call = flight.FlightCallOptions(headers=auth_headers(TOKEN))
        assert (
            json.loads(next(client.do_action("health", options=call)).body.to_pybytes())["status"]
            == "ok"
        )


def test_json_log_one_line_per_stream_without_token_or_payload(served):
    streams_before = sum(
        v for (n, _), v in scrape(served.metrics_port).items() if n == "flightquant_streams_total"
    )
    _exchange(served.location, b'{"bits": 8}', [_batch(0)])
    wait_for(
        lambda: len(served.events("stream")) == streams_before + 1, what="the stream's log line"
    )
    assert served.stop() == 0
    wait_for(lambda: served.events("stop"), what="the stop event")
    events = served.events()  # every line of ours parses as JSON ...
    assert not [x for x in served.err if " flightquant." in x and not x.startswith("{")]
    streams = [e for e in events if e["event"] == "stream"]
    assert len(streams) == streams_before + 1  # one line per stream, refused ones included
    for e in streams:
        assert tuple(e) == logs.STREAM_KEYS
        assert (e["status"] == "ok") == (e["error"] is None)
        assert e["status"] in ("ok", *protocol.ERROR_KINDS)
    last = streams[-1]
    assert last["op"] == "quantize" and last["format"] == "native" and last["status"] == "ok"
    assert last["batches"] == 1 and last["rows"] == 3
    assert last["input_bytes"] > last["output_bytes"] > 0 and last["seconds"] >= 0
    assert last["peer"].startswith("ipv4:127.0.0.1:") or "127.0.0.1" in last["peer"]
    errors = [e for e in streams if e["status"] == "invalid_argument"]
    assert any("bits" in e["error"] for e in errors) and any(
        "non-finite" in e["error"] for e in errors
    )
    assert all(len(e["error"] or "") <= 2000 for e in streams)
    assert [e["event"] for e in events if e["event"] in ("start", "drain", "stop")] == [
        "start",
        "drain",
        "stop",
    ]
    assert events[0]["event"] == "start" and events[0]["metrics_port"] == served.metrics_port
    text = "".join(served.err)
    assert TOKEN not in text and WRONG not in text
    # a row's key appears only where the client's own error message names it
    assert all(SECRET_ROW not in json.dumps({**e, "error": None}) for e in events)


# ------------------------------------------------------------------- embedded servers


def test_embedded_servers_have_their_own_registries(server):
    a = server(metrics_port=0)
    b = server(metrics_port=0)
    assert a.metrics.registry is not b.metrics.registry and a.metrics_port != b.metrics_port
    _exchange(a.location, b"{}", [_batch(0)], token=None)
    q = fq.quantize(_batch(0, rows=1), format="Q8_0")  # dequantize: labelled by the batch
    _exchange(a.location, b'{"op": "dequantize"}', [q], token=None)
    wait_for(lambda: a.stats()["streams_served"] == 2, what="a to count the streams")
    m = scrape(a.metrics_port)
    assert value(m, "flightquant_batches_total", op="quantize", format="native") == 1
    assert value(m, "flightquant_streams_total", op="dequantize", format="Q8_0", status="ok") == 1
    assert not any(n == "flightquant_batches_total" for n, _ in scrape(b.metrics_port))
    assert a.config()["metrics_port"] == a.metrics_port and server().metrics_port is None


def test_refused_streams_count_as_unavailable_and_extra_gauges_are_read(server):
    s = server(metrics_port=0, max_streams=1)
    sessions = [1, 2]
    s.metrics.add_gauge("flightquant_test_sessions", "a gauge added later", lambda: len(sessions))
    s.metrics.add_gauge("flightquant_test_broken", "a read that fails", lambda: 1 / 0)
    s.metrics.add_counter("flightquant_test_sessions_opened", "a counter added later", lambda: 5)
    batch = _batch(0)
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        reader.read_chunk()  # the first stream holds the only slot
        m = scrape(s.metrics_port)
        assert value(m, "flightquant_streams_active") == 1
        with pytest.raises(flight.FlightUnavailableError, match="max_streams"):
            _exchange(s.location, b"{}", [batch], token=None)
        writer.done_writing()
        for _ in reader:
            pass
        writer.close()
    wait_for(lambda: s.stats()["streams_active"] == 0, what="the stream to end")
    m = scrape(s.metrics_port)
    assert (
        value(m, "flightquant_streams_total", op="unknown", format="unknown", status="unavailable")
        == 1
    )
    assert value(m, "flightquant_streams_total", op="quantize", format="native", status="ok") == 1
    assert value(m, "flightquant_test_sessions") == 2
    assert value(m, "flightquant_test_sessions_opened_total") == 5
    assert not any(n == "flightquant_test_broken" for n, _ in m)
    port = s.metrics_port
    s.shutdown()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_stalled_metrics_client_is_dropped_after_the_timeout(server, monkeypatch):
    monkeypatch.setattr(metrics._Handler, "timeout", 0.3)
    s = server(metrics_port=0)
    with socket.create_connection(("127.0.0.1", s.metrics_port), timeout=10) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never end
        assert stalled.recv(1024) == b""  # the server closed it (recv would time out else)


def test_serve_refuses_a_busy_metrics_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "flightquant",
                "serve",
                "--port",
                "0",
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert "metrics endpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_json_formatter_keeps_a_traceback_on_one_line():
    import io
    import logging

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("flightquant.test_json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        try:
            raise RuntimeError("kernel exploded")
        except RuntimeError:
            log.exception("internal error in stream")
        logs.event(log, "drain", "draining", deadline=3.0)
    finally:
        log.removeHandler(handler)
    first, second = out.getvalue().splitlines()
    record = json.loads(first)
    assert record["event"] == "log" and record["level"] == "ERROR"
    assert "RuntimeError: kernel exploded" in record["exception"]
    assert json.loads(second) == {"event": "drain", "deadline": 3.0}
