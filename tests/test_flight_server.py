"""The Flight server over real loopback sockets, driven by a plain pyarrow client.

The client code in this file uses only ``pyarrow.flight`` (``flight.connect`` and
``do_exchange``); flightquant is imported for the in-process reference results.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from common import SEED_SCHEMA, make_layer_batch, wait_for

import flightquant as fq
from flightquant import codec


def _cmd(options: dict | bytes | None = None) -> flight.FlightDescriptor:
    if isinstance(options, bytes):
        return flight.FlightDescriptor.for_command(options)
    return flight.FlightDescriptor.for_command(json.dumps(options or {}).encode())


def _exchange(location: str, batches, options=None):
    """Send ``batches`` in one DoExchange; return [(result batch, metadata dict)]."""
    out = []
    with flight.connect(location) as client:
        writer, reader = client.do_exchange(_cmd(options))
        writer.begin(batches[0].schema)
        for batch in batches:
            writer.write_batch(batch)
            chunk = reader.read_chunk()
            out.append((chunk.data, json.loads(chunk.app_metadata.to_pybytes())))
        writer.done_writing()
        with pytest.raises(StopIteration):
            reader.read_chunk()
        writer.close()
    return out


def _action(location: str, name: str) -> dict:
    with flight.connect(location) as client:
        results = list(client.do_action(flight.Action(name, b"")))
    assert len(results) == 1
    return json.loads(results[0].body.to_pybytes())


def _no_traceback(text: str) -> None:
    for marker in ("Traceback", 'File "'):
        assert marker not in text, f"traceback text reached the client: {text!r}"


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bits": 2, "group_size": 32, "scheme": "symmetric"},
        {"bits": 8, "group_size": 64, "method": "mse", "stats": True},
        {"scheme": "ternary", "group_size": 128, "clip": 2.0},
    ],
    ids=["defaults", "sym2", "asym8-mse-stats", "ternary-clip"],
)
def test_plain_client_quantize_equals_in_process(server, options):
    s = server()
    batches = [make_layer_batch(0, 3), make_layer_batch(3, 4), make_layer_batch(7, 0)]
    results = _exchange(s.location, batches, options)
    assert len(results) == len(batches)
    kwargs = {k: v for k, v in options.items()}
    for i, (batch, (out, meta)) in enumerate(zip(batches, results, strict=True)):
        expected = fq.quantize(batch, **kwargs)
        assert out.equals(expected), f"batch {i} differs from fq.quantize"
        assert out.schema.equals(expected.schema, check_metadata=True)
        assert meta["batch_index"] == i
        assert meta["rows"] == batch.num_rows
        assert meta["elements"] == sum(len(x) for x in batch.column("weights").to_pylist())
        assert meta["input_bytes"] > 0 or batch.num_rows == 0
        assert meta["output_bytes"] >= 0
        assert meta["kernel_seconds"] >= 0
        assert ("sse" in meta) == bool(options.get("stats"))


def test_plain_client_dequantize_round_trip(server):
    s = server()
    batch = make_layer_batch(0, 5)
    quantized = fq.quantize(batch, bits=8, group_size=64)
    [(out, meta)] = _exchange(s.location, [quantized], {"op": "dequantize"})
    expected = fq.dequantize(quantized)
    assert out.equals(expected)
    assert out.schema.field("weights").type == pa.list_(pa.float32())
    assert meta["rows"] == 5 and meta["batch_index"] == 0
    # 8-bit reconstruction is close to the input
    got = np.concatenate(out.column("weights").to_numpy(zero_copy_only=False))
    want = np.concatenate(batch.column("weights").to_numpy(zero_copy_only=False))
    assert np.max(np.abs(got - want)) < 0.05


def test_empty_command_means_defaults(server):
    s = server()
    batch = make_layer_batch(0, 2)
    [(out, _)] = _exchange(s.location, [batch], b"")
    assert out.equals(fq.quantize(batch))


# --------------------------------------------------------------------------- errors


def _nan_batch() -> pa.RecordBatch:
    batch = make_layer_batch(0, 3)
    weights = batch.column("weights").to_pylist()
    weights[1][17] = float("nan")
    return pa.RecordBatch.from_arrays(
        [batch.column(0), pa.array(weights, pa.list_(pa.float32())), batch.column(2)],
        schema=SEED_SCHEMA,
    )


BAD = [
    pytest.param(b"{not json", make_layer_batch, ["JSON", "bits"], id="invalid-json"),
    pytest.param(
        b'{"bitz": 4}',
        make_layer_batch,
        ["unknown option", "bitz", "valid options"],
        id="unknown-key",
    ),
    pytest.param(b'{"bits": 3}', make_layer_batch, ["bits", "2, 4, 8", "3"], id="bits-3"),
    pytest.param(
        b'{"scheme": "fancy"}', make_layer_batch, ["scheme", "asymmetric", "fancy"], id="bad-scheme"
    ),
    pytest.param(b"[4]", make_layer_batch, ["JSON object"], id="not-an-object"),
    pytest.param(b"{}", _nan_batch, ["nan", "layer.1", "element 17", "weights"], id="nan"),
    pytest.param(
        b'{"columns": ["layer_name"]}', make_layer_batch, ["layer_name"], id="non-float-column"
    ),
    pytest.param(b'{"columns": ["nope"]}', make_layer_batch, ["nope"], id="missing-column"),
]


@pytest.mark.parametrize("command, make, fragments", BAD)
def test_bad_input_is_invalid_argument_without_traceback(server, command, make, fragments):
    s = server()
    batch = make()
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(_cmd(command))
        with pytest.raises(pa.ArrowInvalid) as info:
            writer.begin(batch.schema)
            writer.write_batch(batch)
            writer.done_writing()
            reader.read_all()
        try:
            writer.close()
        except Exception:
            pass
    message = str(info.value)
    assert "INVALID_ARGUMENT" in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)
    _no_traceback(message)
    # the same server answers the next stream correctly
    good = make_layer_batch(10, 2)
    [(out, _)] = _exchange(s.location, [good])
    assert out.equals(fq.quantize(good))
    stats = s.stats()
    assert stats["errors"]["invalid_argument"] == 1
    assert stats["streams_served"] == 1 and stats["streams_active"] == 0


def test_oversize_batch_refused_with_the_limit_in_the_message(server):
    s = server(max_batch_bytes=4096)
    small = make_layer_batch(0, 1, elements=100)
    big = make_layer_batch(1, 4, elements=1000)
    assert big.get_total_buffer_size() > 4096
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(_cmd({}))
        writer.begin(small.schema)
        writer.write_batch(small)
        assert reader.read_chunk().data.equals(fq.quantize(small))  # under the limit: fine
        with pytest.raises(pa.ArrowInvalid) as info:
            writer.write_batch(big)
            writer.done_writing()
            reader.read_all()
        try:
            writer.close()
        except Exception:
            pass
    message = str(info.value)
    for fragment in ("batch 1", "4096", "max_batch_bytes", "--max-batch-bytes", "split"):
        assert fragment in message, (fragment, message)
    _no_traceback(message)
    [(out, _)] = _exchange(s.location, [small])
    assert out.equals(fq.quantize(small))


def test_path_descriptor_is_invalid_argument(server):
    s = server()
    batch = make_layer_batch()
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("x"))
        with pytest.raises(pa.ArrowInvalid, match="command descriptor") as info:
            writer.begin(batch.schema)
            writer.write_batch(batch)
            writer.done_writing()
            reader.read_all()
    _no_traceback(str(info.value))


def test_unexpected_error_is_internal_with_log_and_no_traceback(server, monkeypatch, caplog):
    s = server()
    calls = {"n": 0}
    real = codec.process_batch

    def flaky(batch, options, *, threads=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("kernel exploded")
        return real(batch, options, threads=threads)

    monkeypatch.setattr(codec, "process_batch", flaky)
    batch = make_layer_batch()
    with caplog.at_level(logging.INFO, logger="flightquant.server"):
        with flight.connect(s.location) as client:
            writer, reader = client.do_exchange(_cmd({}))
            with pytest.raises(flight.FlightInternalError) as info:
                writer.begin(batch.schema)
                writer.write_batch(batch)
                writer.done_writing()
                reader.read_all()
    message = str(info.value)
    assert "internal error: RuntimeError: kernel exploded; see server log" in message
    _no_traceback(message)
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert any(r.exc_info for r in caplog.records), "the traceback belongs in the server log"
    assert "outcome=internal" in logged
    [(out, _)] = _exchange(s.location, [batch])  # still serving
    assert out.equals(fq.quantize(batch))
    assert s.stats()["errors"]["internal"] == 1


def test_other_flight_methods_are_unimplemented_without_traceback(server):
    s = server()
    with flight.connect(s.location) as client:
        with pytest.raises(pa.ArrowNotImplementedError, match="DoExchange") as info:
            client.get_flight_info(flight.FlightDescriptor.for_command(b"{}"))
        _no_traceback(str(info.value))
        assert list(client.list_flights()) == []


# --------------------------------------------------------------------------- actions


def test_actions_health_stats_config(server):
    s = server(threads=1, max_streams=7, max_batch_bytes=1 << 20)
    with flight.connect(s.location) as client:
        assert {a.type for a in client.list_actions()} == {
            "health",
            "stats",
            "config",
            "calibration-sessions",
            "calibration-drop",
        }
    health = _action(s.location, "health")
    assert health == {"status": "ok", "version": fq.__version__, "draining": False}

    batch = make_layer_batch(0, 3)
    _exchange(s.location, [batch, batch])
    stats = _action(s.location, "stats")
    assert stats["streams_active"] == 0
    assert stats["streams_served"] == 1
    assert stats["batches"] == 2
    assert stats["rows"] == 6
    assert stats["elements"] == 2 * sum(len(x) for x in batch.column("weights").to_pylist())
    assert stats["bytes_in"] > stats["bytes_out"] > 0
    assert set(stats["errors"]) == {
        "invalid_argument",
        "unavailable",
        "resource_exhausted",
        "deadline_exceeded",
        "unauthenticated",
        "internal",
        "cancelled",
    }
    assert stats["memory"]["reserved"] == 0  # every reservation was given back
    assert stats["memory"]["peak_reserved"] >= 2 << 20  # 2 x max_batch_bytes before a read

    config = _action(s.location, "config")
    assert config["max_streams"] == 7
    assert config["max_batch_bytes"] == 1 << 20
    assert config["memory_limit"] == s.memory_limit > 0
    assert config["idle_timeout"] == 60.0
    assert config["threads"] == 1
    assert config["default_options"]["bits"] == 4
    assert config["default_options"]["group_size"] == 128
    assert config["auth"] is False and config["tls"] is False
    assert config["health_port"] is None
    assert "backend" in config["build_info"]


def test_unknown_action_lists_the_valid_ones(server):
    s = server()
    with flight.connect(s.location) as client:
        with pytest.raises(pa.ArrowInvalid) as info:
            list(client.do_action(flight.Action("reboot", b"")))
    message = str(info.value)
    assert "reboot" in message and "health, stats, config" in message
    _no_traceback(message)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_clients_all_get_correct_results(server):
    s = server(max_streams=16)
    n_clients, n_batches = 8, 5
    errors: list[BaseException] = []
    results: dict[int, list] = {}
    barrier = threading.Barrier(n_clients)

    def work(k: int) -> None:
        try:
            batches = [
                make_layer_batch(100 * k + 3 * j, 3, elements=2000) for j in range(n_batches)
            ]
            with flight.connect(s.location) as client:
                writer, reader = client.do_exchange(_cmd({"bits": 4, "group_size": 64}))
                writer.begin(SEED_SCHEMA)
                barrier.wait(10)  # all streams open at once
                out = []
                for b in batches:
                    writer.write_batch(b)
                    out.append(reader.read_chunk().data)
                writer.done_writing()
                writer.close()
            results[k] = list(zip(batches, out, strict=True))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == n_clients
    for pairs in results.values():
        for batch, out in pairs:
            assert out.equals(fq.quantize(batch, bits=4, group_size=64))
    stats = s.stats()
    assert stats["streams_served"] == n_clients
    assert stats["batches"] == n_clients * n_batches
    assert stats["streams_active"] == 0


_KILLED_CLIENT = textwrap.dedent(
    """
    import sys, pyarrow as pa, pyarrow.flight as flight
    batch = pa.record_batch({"w": pa.array([[1.0, 2.0, 3.0]], pa.list_(pa.float32()))})
    client = flight.connect(sys.argv[1])
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
    writer.begin(batch.schema)
    writer.write_batch(batch)
    reader.read_chunk()
    print("streaming", flush=True)
    sys.stdin.read()  # wait to be killed
    """
)


def test_killed_client_frees_its_stream_slot(server):
    s = server(max_streams=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, s.location],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline().strip() == b"streaming"
        assert s.stats()["streams_active"] == 1
        proc.kill()
    finally:
        proc.wait(30)
    wait_for(lambda: s.stats()["streams_active"] == 0, what="the killed client's slot")
    assert s.stats()["errors"]["cancelled"] == 1
    # the single slot is free again
    batch = make_layer_batch()
    [(out, _)] = _exchange(s.location, [batch])
    assert out.equals(fq.quantize(batch))


def test_cancelled_reader_frees_its_stream_slot(server):
    s = server()
    batch = make_layer_batch()
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(_cmd({}))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        reader.read_chunk()
        assert s.stats()["streams_active"] == 1
        reader.cancel()
        wait_for(lambda: s.stats()["streams_active"] == 0, what="the cancelled stream's slot")


def test_stream_over_max_streams_is_refused_at_once(server):
    s = server(max_streams=2)
    batch = make_layer_batch()
    with flight.connect(s.location) as client:
        open_streams = []
        for _ in range(2):
            writer, reader = client.do_exchange(_cmd({}))
            writer.begin(batch.schema)
            writer.write_batch(batch)
            reader.read_chunk()
            open_streams.append((writer, reader))
        writer3, reader3 = client.do_exchange(_cmd({}))
        with pytest.raises(flight.FlightUnavailableError) as info:
            writer3.begin(batch.schema)
            writer3.write_batch(batch)
            reader3.read_chunk()
        message = str(info.value)
        assert "max_streams=2" in message and "--max-streams" in message
        _no_traceback(message)
        assert s.stats()["errors"]["unavailable"] == 1
        for writer, _reader in open_streams:
            writer.done_writing()
            writer.close()
    wait_for(lambda: s.stats()["streams_active"] == 0, what="streams to close")
    [(out, _)] = _exchange(s.location, [batch])
    assert out.equals(fq.quantize(batch))


# --------------------------------------------------------------------------- drain / logs


def test_drain_refuses_new_streams_and_lets_running_ones_finish(server):
    s = server()
    batch = make_layer_batch()
    result = {}
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(_cmd({}))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        reader.read_chunk()
        t = threading.Thread(target=lambda: result.setdefault("clean", s.drain(20.0)))
        t.start()
        wait_for(lambda: s.draining, what="draining")
        assert _action(s.location, "health")["draining"] is True
        w2, r2 = client.do_exchange(_cmd({}))
        with pytest.raises(flight.FlightUnavailableError, match="draining"):
            w2.begin(batch.schema)
            w2.write_batch(batch)
            r2.read_chunk()
        writer.write_batch(batch)  # the running stream still works
        assert reader.read_chunk().data.equals(fq.quantize(batch))
        writer.done_writing()
        writer.close()
        t.join(30)
    assert result["clean"] is True


def test_drain_deadline_ends_a_running_stream_with_unavailable(server):
    s = server()
    batch = make_layer_batch()
    result = {}
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(_cmd({}))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        reader.read_chunk()
        t = threading.Thread(target=lambda: result.setdefault("clean", s.drain(0.2)))
        t.start()
        wait_for(lambda: s._aborting, what="the drain deadline")
        with pytest.raises(flight.FlightUnavailableError, match="shutting down"):
            writer.write_batch(batch)
            reader.read_chunk()
        t.join(30)
    assert result["clean"] is False
    assert s.stats()["streams_active"] == 0


def test_drain_gives_up_on_a_silent_client(server):
    s = server()
    batch = make_layer_batch()
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(_cmd({}))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        reader.read_chunk()
        assert s.drain(0.1) is False  # the handler waits for a batch that never comes
        # ... until the grace period ends: its connection is closed, the shutdown completes
        assert s._closed.is_set()
        assert s.stats()["streams_active"] == 0
        reader.cancel()
    s.shutdown()
    assert s.stats()["streams_active"] == 0


def test_one_log_line_per_stream_and_no_token_in_logs(server, caplog):
    token = "s3cret-token-value"
    s = server(auth_token=token)
    batch = make_layer_batch()
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    with caplog.at_level(logging.INFO, logger="flightquant.server"):
        with flight.connect(s.location) as client:
            writer, reader = client.do_exchange(_cmd({}), options=options)
            writer.begin(batch.schema)
            writer.write_batch(batch)
            reader.read_chunk()
            writer.done_writing()
            writer.close()
        wait_for(lambda: s.stats()["streams_served"] == 1, what="the stream to finish")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream ")]
    assert len(lines) == 1, lines
    line = lines[0]
    for fragment in (
        "peer=",
        "op=quantize",
        "batches=1",
        "bytes_in=",
        "bytes_out=",
        "seconds=",
        "outcome=ok",
    ):
        assert fragment in line, (fragment, line)
    assert all(token not in r.getMessage() for r in caplog.records)
    assert _action_with_token(s.location, token)["auth"] is True


def _action_with_token(location: str, token: str) -> dict:
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    with flight.connect(location) as client:
        results = list(client.do_action(flight.Action("config", b""), options=options))
    return json.loads(results[0].body.to_pybytes())


def test_constructor_validates_its_arguments():
    from flightquant.server import Server

    with pytest.raises(ValueError, match="max_streams"):
        Server(max_streams=0)
    with pytest.raises(ValueError, match="max_batch_bytes"):
        Server(max_batch_bytes=-1)
    with pytest.raises(ValueError, match="threads"):
        Server(threads=0)
    with pytest.raises(ValueError, match="grpc"):
        Server("http://127.0.0.1:0")
    with pytest.raises(ValueError, match="tls_certificates"):
        Server("grpc+tls://127.0.0.1:0")


def test_context_manager_and_location(server):
    from flightquant.server import Server

    with Server("grpc://127.0.0.1:0") as s:
        assert s.port > 0
        assert s.location == f"grpc://127.0.0.1:{s.port}"
        assert _action(s.location, "health")["status"] == "ok"
    with pytest.raises(flight.FlightUnavailableError):
        _action(s.location, "health")
