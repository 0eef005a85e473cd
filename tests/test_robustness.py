"""Robustness: hostile input over the wire, a soak, failover after SIGKILL, decoder fuzz.

Every hostile case must end in a clear status (INVALID_ARGUMENT, UNAVAILABLE, CANCELLED,
UNIMPLEMENTED; never UNKNOWN or INTERNAL, never a Python traceback in the message), the
server must stay up, and a valid stream right after must be answered correctly.

The hostile cases are counted; after the module the count is printed (see it with ``-s``)
and written as JSON to ``$FQ_ROBUSTNESS_REPORT`` when that is set. The soak, SIGKILL
failover and SIGTERM draining are in tests/test_faults.py (slow).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import common
import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from common import CLEAN_CODES, PYARROW_PRE_HANDLER, exchange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flightquant as fq
from flightquant import codec
from flightquant.options import QuantOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES: collections.Counter = collections.Counter()
FUZZ = settings(
    max_examples=int(os.environ.get("FQ_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("FQ_FUZZ_RANDOM") is None,
    database=None,
)


def assert_clean(exc: BaseException) -> None:
    """A status a person can act on (common.assert_clean), counted."""
    common.assert_clean(exc)
    CASES["status:" + type(exc).__name__] += 1


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server():
    from flightquant.server import Server

    with Server("grpc://127.0.0.1:0", max_batch_bytes=4 << 20, max_streams=8) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with flight.connect(f"grpc://127.0.0.1:{server.port}") as c:
        yield c


def _valid_batch(seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    return pa.record_batch(
        {
            "layer_name": pa.array([f"ok.{seed}.{i}" for i in range(3)]),
            "weights": pa.array(
                [rng.standard_normal(n).astype(np.float32) for n in (5, 130, 0)],
                pa.list_(pa.float32()),
            ),
        }
    )


def assert_alive(client, seed: int = 0) -> None:
    """The server answers a valid stream correctly (bit for bit as fq.quantize)."""
    batches = [_valid_batch(seed), _valid_batch(seed + 1)]
    chunks = exchange(client, b'{"bits": 4, "group_size": 32}', batches[0].schema, batches)
    assert len(chunks) == 2
    for i, (chunk, b) in enumerate(zip(chunks, batches, strict=False)):
        assert chunk.data.equals(fq.quantize(b, bits=4, group_size=32))
        assert json.loads(chunk.app_metadata.to_pybytes())["batch_index"] == i


def expect(command: bytes, batch: pa.RecordBatch):
    """What the server must do, from the in-process codec: an error, or these batches."""
    try:
        options = QuantOptions.from_json(command)
        codec.output_schema(batch.schema, options)
        out, _ = codec.process_batch(batch, options)
        return out
    except ValueError as exc:
        return exc


def check_against_codec(client, command: bytes, batch: pa.RecordBatch) -> str:
    """Run one case over the wire and compare with the in-process codec."""
    want = expect(command, batch)
    try:
        chunks = exchange(client, command, batch.schema, [batch])
    except Exception as exc:  # noqa: BLE001 - checked below
        assert_clean(exc)
        assert isinstance(want, ValueError), (
            f"the server refused a case the codec accepts: {type(exc).__name__}: {exc}"
        )
        assert isinstance(exc, pa.ArrowInvalid), f"{type(exc).__name__}: {exc}"
        return "invalid_argument"
    assert not isinstance(want, ValueError), f"the server accepted a case the codec refuses: {want}"
    assert len(chunks) == 1
    assert chunks[0].data.equals(want)
    return "ok"


# --------------------------------------------------------------------------- commands
_KNOWN_KEYS = ["op", "bits", "scheme", "group_size", "method", "clip", "columns", "stats"]
_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
_json_any = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_option_value = st.one_of(
    _json_any,
    st.sampled_from(
        [
            "quantize",
            "dequantize",
            "asymmetric",
            "symmetric",
            "ternary",
            "rtn",
            "mse",
            2,
            4,
            8,
            3,
            0,
            -1,
            1,
            32,
            128,
            2**31 - 1,
            2**31,
            6.0,
            0.0,
            -6.0,
            True,
            False,
            ["weights"],
            ["layer_name"],
            ["missing"],
            [],
            [1],
            "weights",
        ]
    ),
)
_commands = st.one_of(
    st.binary(max_size=40),
    _json_any.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(_KNOWN_KEYS + ["bit", "groupsize", "Bits", "", "threads"]),
        _option_value,
        max_size=5,
    ).map(lambda d: json.dumps(d).encode()),
    st.just(b""),
    st.just(b"\xff\xfe{}"),
    st.just(b"{" * 50000),  # deep nesting for the JSON parser
)


@FUZZ
@given(command=_commands)
def test_fuzz_commands(server, client, command):
    """Non-JSON, non-object, unknown keys, wrong types, out-of-range values."""
    outcome = check_against_codec(client, command, _valid_batch(1))
    CASES["commands:" + outcome] += 1
    assert_alive(client)


# --------------------------------------------------------------------------- data
_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
_f32_hostile = st.one_of(_f32, st.sampled_from([float("nan"), float("inf"), float("-inf")]))


@st.composite
def _data_cases(draw):
    kind = draw(
        st.sampled_from(
            [
                "f32",
                "f32_nonfinite",
                "f32_null_elements",
                "f16",
                "f64",
                "large",
                "fixed",
                "empty_lists",
                "int_list",
                "int",
                "string",
                "nested",
                "dictionary",
                "struct",
                "bool_list",
                "binary",
                "null_type",
            ]
        )
    )
    n = draw(st.integers(0, 4))
    rows_f = st.lists(_f32, max_size=40)
    null_rows = lambda strat: st.one_of(st.none(), strat)  # noqa: E731
    if kind == "f32":
        x = pa.array(
            draw(st.lists(null_rows(rows_f), min_size=n, max_size=n)), pa.list_(pa.float32())
        )
    elif kind == "f32_nonfinite":
        x = pa.array(
            draw(st.lists(st.lists(_f32_hostile, min_size=1, max_size=20), min_size=n, max_size=n)),
            pa.list_(pa.float32()),
        )
    elif kind == "f32_null_elements":
        x = pa.array(
            draw(
                st.lists(
                    st.lists(st.one_of(st.none(), _f32), min_size=1, max_size=10),
                    min_size=n,
                    max_size=n,
                )
            ),
            pa.list_(pa.float32()),
        )
    elif kind in ("f16", "f64", "large"):
        typ = {
            "f16": pa.list_(pa.float16()),
            "f64": pa.list_(pa.float64()),
            "large": pa.large_list(pa.float32()),
        }[kind]
        x = pa.array(draw(st.lists(null_rows(rows_f), min_size=n, max_size=n)), typ)
    elif kind == "fixed":
        size = draw(st.integers(0, 9))
        x = pa.array(
            draw(
                st.lists(
                    null_rows(st.lists(_f32, min_size=size, max_size=size)), min_size=n, max_size=n
                )
            ),
            pa.list_(pa.float32(), size),
        )
    elif kind == "empty_lists":
        x = pa.array([[] for _ in range(n)], pa.list_(pa.float32()))
    elif kind == "int_list":
        x = pa.array([[1, 2, 3]] * n, pa.list_(pa.int32()))
    elif kind == "int":
        x = pa.array(range(n), pa.int64())
    elif kind == "string":
        x = pa.array([f"s{i}" for i in range(n)])
    elif kind == "nested":
        x = pa.array([[[1.0, 2.0], [3.0]]] * n, pa.list_(pa.list_(pa.float32())))
    elif kind == "dictionary":
        x = pa.array(["a", "b"] * n, pa.string())[:n].dictionary_encode()
    elif kind == "struct":
        x = pa.array([{"a": 1.0, "b": [1.0]}] * n)
    elif kind == "bool_list":
        x = pa.array([[True, False]] * n, pa.list_(pa.bool_()))
    elif kind == "binary":
        x = pa.array([b"\x00\x01"] * n, pa.binary())
    else:
        x = pa.nulls(n)
    batch = pa.record_batch(
        {"layer_name": pa.array([f"t{i}" for i in range(n)], pa.string()), "x": x}
    )
    options = {
        "bits": draw(st.sampled_from([2, 4, 8])),
        "group_size": draw(st.sampled_from([1, 2, 3, 32, 128, 2**31 - 1, 0, -1, 2**31, 10**12])),
        "columns": draw(
            st.sampled_from([None, ["x"], ["x", "layer_name"], ["missing"], ["layer_name"]])
        ),
        "scheme": draw(st.sampled_from(["asymmetric", "symmetric", "ternary"])),
        "stats": draw(st.booleans()),
    }
    if options["scheme"] == "ternary":
        options["bits"] = 2
    return kind, batch, json.dumps(options).encode()


@FUZZ
@given(case=_data_cases())
def test_fuzz_data(server, client, case):
    """Wrong column types named in columns, nulls inside lists, NaN/Inf, empty/huge groups."""
    kind, batch, command = case
    outcome = check_against_codec(client, command, batch)
    CASES[f"data:{outcome}"] += 1
    CASES[f"data_kind:{kind}"] += 1
    assert_alive(client)


def test_nonfinite_error_names_the_place(client):
    batch = pa.record_batch(
        {
            "layer_name": pa.array(["blk.0", "blk.1"]),
            "w": pa.array([[1.0, 2.0], [3.0, float("nan"), 4.0]], pa.list_(pa.float32())),
        }
    )
    with pytest.raises(pa.ArrowInvalid) as info:
        exchange(client, b"{}", batch.schema, [batch])
    assert_clean(info.value)
    text = str(info.value)
    assert "blk.1" in text and "w" in text and "1" in text, text
    CASES["named:nonfinite"] += 1
    assert_alive(client)


# --------------------------------------------------------------------------- streams
def test_schema_change_mid_stream_pyarrow_writer_refuses(client):
    """The pyarrow writer itself refuses a second schema (the raw tests send one); the
    stream stays usable and the batch before is answered."""
    a, b = _valid_batch(0), pa.record_batch({"other": pa.array([1])})
    writer, reader = client.do_exchange(
        flight.FlightDescriptor.for_command(b"{}"), options=flight.FlightCallOptions(timeout=10)
    )
    writer.begin(a.schema)
    writer.write_batch(a)
    with pytest.raises((pa.ArrowInvalid, ValueError)):
        writer.write_batch(b)
    writer.done_writing()
    chunks = list(reader)
    writer.close()
    assert len(chunks) == 1 and chunks[0].data.equals(fq.quantize(a))
    CASES["stream:schema_change_writer"] += 1
    assert_alive(client)


def test_done_writing_without_data(client):
    chunks = exchange(client, b'{"bits": 8}', _valid_batch(0).schema, [])
    assert chunks == []
    CASES["stream:no_batches"] += 1
    assert_alive(client)


def test_writer_closed_without_begin(client):
    """The client opens DoExchange and closes it before sending a schema."""
    writer, reader = client.do_exchange(
        flight.FlightDescriptor.for_command(b"{}"), options=flight.FlightCallOptions(timeout=10)
    )
    try:
        writer.done_writing()
        reader.read_chunk()
    except StopIteration:
        pass
    except Exception as exc:  # noqa: BLE001
        assert_clean(exc)
    finally:
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001
            assert_clean(exc)
    CASES["stream:closed_before_schema"] += 1
    assert_alive(client)


@pytest.mark.parametrize("after", [0, 1, 3])
def test_client_cancels_mid_stream(server, client, after):
    batches = [_valid_batch(i) for i in range(5)]
    writer, reader = client.do_exchange(
        flight.FlightDescriptor.for_command(b"{}"), options=flight.FlightCallOptions(timeout=10)
    )
    writer.begin(batches[0].schema)
    for b in batches[:after]:
        writer.write_batch(b)
        reader.read_chunk()
    writer.write_batch(batches[after])  # one batch in flight
    reader.cancel()
    try:
        writer.close()
    except Exception as exc:  # noqa: BLE001
        assert_clean(exc)
    _wait_idle(server)
    CASES["stream:cancelled"] += 1
    assert_alive(client)


def test_over_size_batch_is_invalid_argument(server, client):
    big = np.zeros(server.max_batch_bytes // 4 + 1024, np.float32)
    batch = pa.record_batch(
        {
            "layer_name": pa.array(["big"]),
            "w": pa.ListArray.from_arrays(pa.array([0, big.size], pa.int32()), pa.array(big)),
        }
    )
    with pytest.raises(pa.ArrowInvalid) as info:
        exchange(client, b"{}", batch.schema, [batch])
    assert_clean(info.value)
    assert "max_batch_bytes" in str(info.value)
    CASES["limits:max_batch_bytes"] += 1
    assert_alive(client)


def test_over_max_streams_is_unavailable(server, client):
    held = []
    try:
        for _ in range(server.max_streams):
            w, r = client.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
            w.begin(_valid_batch(0).schema)
            w.write_batch(_valid_batch(0))
            r.read_chunk()  # the stream is really open on the server
            held.append((w, r))
        with pytest.raises(flight.FlightUnavailableError) as info:
            exchange(client, b"{}", _valid_batch(0).schema, [_valid_batch(0)])
        assert_clean(info.value)
        assert "max_streams" in str(info.value)
    finally:
        for w, _r in held:
            w.done_writing()
            w.close()
    _wait_idle(server)
    CASES["limits:max_streams"] += 1
    assert_alive(client)


def test_path_descriptor_and_unknown_action_and_unimplemented(client):
    b = _valid_batch(0)
    w, r = client.do_exchange(flight.FlightDescriptor.for_path("a", "b"))
    with pytest.raises(pa.ArrowInvalid) as info:
        try:
            w.begin(b.schema)
            w.write_batch(b)
            w.done_writing()
        except pa.ArrowInvalid:
            pass
        r.read_all()
    assert_clean(info.value)
    w_close_quietly(w)
    with pytest.raises(pa.ArrowInvalid) as info:
        list(client.do_action(flight.Action("no-such-action", b"")))
    assert_clean(info.value)
    # DoGet reads calibration sessions: any other ticket is INVALID_ARGUMENT
    with pytest.raises(pa.ArrowInvalid) as info:
        client.do_get(flight.Ticket(b"x")).read_all()
    assert_clean(info.value)
    calls = [
        lambda: client.get_flight_info(flight.FlightDescriptor.for_command(b"{}")),
        lambda: client.get_schema(flight.FlightDescriptor.for_command(b"{}")),
    ]
    for call in calls:
        with pytest.raises(pa.ArrowNotImplementedError) as info:
            call()
        assert_clean(info.value)
    pw, _ = client.do_put(flight.FlightDescriptor.for_command(b"{}"), b.schema)
    with pytest.raises(pa.ArrowNotImplementedError) as info:
        pw.write_batch(b)
        pw.close()
    assert_clean(info.value)
    CASES["rpc:misc"] += 6
    assert_alive(client)


def w_close_quietly(w) -> None:
    try:
        w.close()
    except Exception:  # noqa: BLE001 - the status was checked on the reader
        pass


def _wait_idle(server, timeout: float = 10.0) -> None:
    """Wait until the server has no stream running (a cancel ends it asynchronously)."""
    deadline = time.monotonic() + timeout
    while server.stats()["streams_active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.stats()["streams_active"] == 0, server.stats()


_KILLED_CLIENT = """
import os, signal, sys
import pyarrow as pa, pyarrow.flight as flight
port = int(sys.argv[1])
b = pa.record_batch({"layer_name": pa.array(["k"]), "w": pa.array([[1.0] * 64], pa.list_(pa.float32()))})
c = flight.connect(f"grpc://127.0.0.1:{port}")
w, r = c.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
w.begin(b.schema)
w.write_batch(b)
r.read_chunk()
w.write_batch(b)  # a second batch in flight, then die without closing anything
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_client_killed_mid_stream(server, client):
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", _KILLED_CLIENT, str(server.port)],
            timeout=60,
            capture_output=True,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        _wait_idle(server)
        CASES["stream:client_killed"] += 1
        assert_alive(client)


# --------------------------------------------------------------------------- raw protocol
RAW_CASES = [
    "schema_change_mid_stream",
    "schema_twice",
    "garbage_first_header",
    "garbage_second_header",
    "truncated_body",
    "empty_body",
    "batch_before_schema",
    "no_messages",
    "descriptor_only",
    "metadata_only",
    "not_protobuf",
    "bad_json_raw",
    "body_with_flipped_bytes",
]


def _raw_cases():
    good = _valid_batch(0)
    other = pa.record_batch({"y": pa.array(["a"])})
    sh, _ = msg_parts(good.schema)
    bh, bb = msg_parts(good)
    oh, _ = msg_parts(other.schema)
    obh, obb = msg_parts(other)
    cmd = b'{"bits": 4}'
    return {
        "schema_change_mid_stream": [
            flight_data(cmd=cmd, header=sh),
            flight_data(header=bh, body=bb),
            flight_data(header=oh),
            flight_data(header=obh, body=obb),
        ],
        "schema_twice": [
            flight_data(cmd=cmd, header=sh),
            flight_data(header=sh),
            flight_data(header=bh, body=bb),
        ],
        "garbage_first_header": [flight_data(cmd=cmd, header=b"\x00garbage" * 5)],
        "garbage_second_header": [
            flight_data(cmd=cmd, header=sh),
            flight_data(header=b"\x10\x00\x00\x00junk" * 5),
        ],
        "truncated_body": [
            flight_data(cmd=cmd, header=sh),
            flight_data(header=bh, body=bb[: len(bb) // 3]),
        ],
        "empty_body": [flight_data(cmd=cmd, header=sh), flight_data(header=bh)],
        "batch_before_schema": [flight_data(cmd=cmd, header=bh, body=bb)],
        "no_messages": [],
        "descriptor_only": [flight_data(cmd=cmd)],
        "metadata_only": [flight_data(cmd=cmd, header=sh), flight_data(app_metadata=b"hello")],
        "not_protobuf": [b"\xff\xff\xff\xff"],
        "bad_json_raw": [flight_data(cmd=b"{nope", header=sh), flight_data(header=bh, body=bb)],
        "body_with_flipped_bytes": [
            flight_data(cmd=cmd, header=sh),
            flight_data(header=bh, body=bytes(x ^ 0xFF for x in bb)),
        ],
    }


def _check_raw(server, client, messages) -> str:
    try:
        exchange_raw(server.port, messages)
        outcome = "ok"
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        common.no_traceback(details)
        if code == grpc.StatusCode.UNKNOWN and details.startswith(PYARROW_PRE_HANDLER):
            outcome = "pyarrow_pre_handler"
        else:
            assert code in CLEAN_CODES, f"{code}: {details}"
            outcome = code.name.lower()
    _wait_idle(server)
    assert_alive(client)
    return outcome


@pytest.mark.parametrize("name", RAW_CASES)
def test_raw_protocol(server, client, name):
    assert set(RAW_CASES) == set(_raw_cases())
    outcome = _check_raw(server, client, _raw_cases()[name])
    CASES[f"raw:{outcome}"] += 1


@FUZZ
@given(
    header=st.binary(max_size=300), body=st.binary(max_size=200), position=st.sampled_from([0, 1])
)
def test_fuzz_raw_ipc_messages(server, client, header, body, position):
    """Arbitrary bytes as the IPC header/body, as the first message or after the schema."""
    sh, _ = msg_parts(_valid_batch(0).schema)
    if position == 0:
        messages = [flight_data(cmd=b"{}", header=header, body=body)]
    else:
        messages = [flight_data(cmd=b"{}", header=sh), flight_data(header=header, body=body)]
    outcome = _check_raw(server, client, messages)
    CASES[f"raw_fuzz:{outcome}"] += 1


# --------------------------------------------------------------------------- raw gRPC client
# A hand-rolled Flight client (grpcio + a few lines of protobuf) that sends what the
# pyarrow client refuses to: a schema change mid-stream, garbage IPC headers, truncated
# bodies, a record batch before the schema, an empty stream.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb_bytes(num: int, data: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(data)) + data


def flight_data(
    *, cmd: bytes | None = None, header: bytes = b"", body: bytes = b"", app_metadata: bytes = b""
) -> bytes:
    """Serialize an arrow.flight.protocol.FlightData message."""
    out = b""
    if cmd is not None:  # FlightDescriptor{type = CMD (2), cmd = field 2}
        out += _pb_bytes(1, _varint((1 << 3) | 0) + _varint(2) + _pb_bytes(2, cmd))
    if header:
        out += _pb_bytes(2, header)
    if app_metadata:
        out += _pb_bytes(3, app_metadata)
    if body:
        out += _pb_bytes(1000, body)
    return out


def msg_parts(obj) -> tuple[bytes, bytes]:
    """(flatbuffer header, body) of the IPC message for a schema or a record batch."""
    m = pa.ipc.read_message(obj.serialize())
    return m.metadata.to_pybytes(), (m.body.to_pybytes() if m.body is not None else b"")


def exchange_raw(port: int, messages, timeout: float = 10) -> list[bytes]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            "/arrow.flight.protocol.FlightService/DoExchange",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        return list(call(iter(messages), timeout=timeout))


# --------------------------------------------------------------------------- decoder fuzz
def test_fuzz_decoder_in_subprocess():
    """Hostile quantized batches into codec.dequantize_batch / fq.dequantize: only
    ValueError-family errors, never a crash (the loop runs in a child process)."""
    n = int(os.environ.get("FQ_DECODER_FUZZ_CASES", "1500"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--fuzz-decoder", "20240", str(n)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, (
        f"the decoder fuzz process died with {proc.returncode} "
        f"(negative: killed by signal {-proc.returncode}): {proc.stderr[-3000:]}"
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    CASES["decoder_fuzz:cases"] += result["stats"]["cases"]
    CASES["decoder_fuzz:value_errors"] += result["stats"].get("codec_valueerror", 0)
    failures = result["failures"]
    assert not failures, json.dumps(failures[:10], indent=1)


def test_missing_format_version_is_an_error():
    """A codes column that lost flightquant.format_version must not be passed through
    as raw binary while its scales/zero-point/numel columns are dropped (silent loss)."""
    b = pa.record_batch(
        {"name": pa.array(["a"]), "w": pa.array([[1.0, 2.0, 3.0]], pa.list_(pa.float32()))}
    )
    q = fq.quantize(b, bits=4, group_size=2)
    i = q.schema.get_field_index("w")
    md = {k: v for k, v in q.schema.field(i).metadata.items() if k != b"flightquant.format_version"}
    bad = pa.RecordBatch.from_arrays(
        q.columns, schema=q.schema.set(i, q.schema.field(i).with_metadata(md))
    )
    with pytest.raises(ValueError, match="format_version"):
        codec.dequantize_batch(bad)


# --------------------------------------------------------------------------- report
@pytest.fixture(scope="module", autouse=True)
def report_case_count():
    """After the module: print (and optionally write) how many hostile cases ran."""
    yield
    hostile = sum(
        v
        for k, v in CASES.items()
        if not k.startswith(("soak", "status:", "data_kind:", "decoder_fuzz:value"))
    )
    report = {"hostile_cases": hostile, "by_kind": dict(sorted(CASES.items()))}
    print("\nrobustness cases:", json.dumps(report, indent=1))
    path = os.environ.get("FQ_ROBUSTNESS_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)


# --------------------------------------------------------------------------- decoder fuzz
# Runs in a subprocess (``python tests/test_robustness.py --fuzz-decoder SEED N``) so that a
# segfault in the codec or the kernels fails the test instead of killing pytest.

_REQUIRED_META = ("format_version", "bits", "scheme", "group_size", "dtype", "list_type")
_GARBAGE = [
    "",
    "x",
    "-1",
    "0",
    "3",
    "16",
    "99999999999999999999",
    "nan",
    "4.0",
    "\x00",
    "int8",
    "struct",
    "2",
    "-2147483648",
    "1e9",
    "\u00e9",
    "symmetric",
    "fixed_size_list",
]


def _fuzz_base_batches():
    import numpy as np
    import pyarrow as pa

    import flightquant as fq

    rng = np.random.default_rng(1234)

    def rows(n, lo=0, hi=40):
        out = []
        for i in range(n):
            if i % 5 == 3:
                out.append(None)
            else:
                out.append(rng.standard_normal(int(rng.integers(lo, hi))).tolist())
        return out

    n = 6
    batch = pa.record_batch(
        {
            "name": pa.array([f"layer.{i}" for i in range(n)]),
            "w": pa.array(rows(n), pa.list_(pa.float32())),
            "wl": pa.array(rows(n), pa.large_list(pa.float16())),
            "wf": pa.array(
                [None if i == 2 else rng.standard_normal(10).tolist() for i in range(n)],
                pa.list_(pa.float64(), 10),
            ),
            "extra": pa.array(range(n), pa.int32()),
        }
    )
    bases = []
    for bits, scheme, gs, stats in [
        (4, "asymmetric", 2, False),
        (2, "symmetric", 3, True),
        (2, "ternary", 7, False),
        (8, "asymmetric", 128, True),
        (4, "symmetric", 1, False),
        (8, "symmetric", 5, False),
    ]:
        q = fq.quantize(batch, bits=bits, scheme=scheme, group_size=gs, stats=stats)
        bases.append(q)
    return bases


def _fuzz_case(base, rng):
    """Return (batch, description, must_fail) for one hostile variant of ``base``."""
    import numpy as np
    import pyarrow as pa

    schema = base.schema
    qcols = [f.name for f in schema if (f.metadata or {}).get(b"flightquant.role") == b"codes"]
    col = qcols[int(rng.integers(len(qcols)))]
    field = schema.field(col)
    md = dict(field.metadata)
    fixed = md[b"flightquant.list_type"] == b"fixed_size_list"
    arr = base.column(col)

    def with_field(b, name, new_field=None, new_arr=None):
        idx = b.schema.get_field_index(name)
        f = new_field if new_field is not None else b.schema.field(idx)
        a = new_arr if new_arr is not None else b.column(idx)
        arrays = list(b.columns)
        fields = list(b.schema)
        arrays[idx], fields[idx] = a, f
        return pa.RecordBatch.from_arrays(
            arrays, schema=pa.schema(fields, metadata=b.schema.metadata)
        )

    def drop(b, name):
        idx = b.schema.get_field_index(name)
        return b.remove_column(idx) if idx >= 0 else b

    def numel_of(b):
        idx = b.schema.get_field_index(col + "_numel")
        if idx < 0:
            return None
        return b.column(idx).to_pylist()

    kinds = [
        "meta_delete",
        "meta_garbage",
        "codes_resize",
        "scales_short",
        "scales_type",
        "zp_drop",
        "numel_value",
        "numel_type",
        "numel_null",
        "codes_type",
        "bad_offsets",
        "scales_bad_offsets",
        "byte_flip",
        "derived_meta",
        "drop_scales",
        "numel_drop",
        "scales_long",
    ]  # (slicing is done by the caller, before these)
    kind = kinds[int(rng.integers(len(kinds)))]
    numel = numel_of(base)
    valid_rows = [i for i in range(base.num_rows) if arr[i].is_valid]
    nonempty = [i for i in valid_rows if ((numel[i] or 0) if numel is not None else 1) > 0]

    if kind == "meta_delete":
        # (without flightquant.role a column is not a codes column: it passes through)
        keys = [k for k in md if k != b"flightquant.role"]
        key = keys[int(rng.integers(len(keys)))]
        new_md = {k: v for k, v in md.items() if k != key}
        short = key.decode().removeprefix("flightquant.")
        must = short in _REQUIRED_META or (short == "list_size" and fixed)
        if short == "format_version":
            # without it the column is not recognised as codes at all; the named test
            # test_missing_format_version_is_an_error covers that on its own
            must = None
        return with_field(base, col, field.with_metadata(new_md)), f"{col}: delete {key!r}", must
    if kind == "meta_garbage":
        keys = [k for k in md if k != b"flightquant.role"]
        key = keys[int(rng.integers(len(keys)))]
        value = _GARBAGE[int(rng.integers(len(_GARBAGE)))]
        new_md = dict(md)
        new_md[key] = value.encode()
        return (
            with_field(base, col, field.with_metadata(new_md)),
            f"{col}: {key.decode()}={value!r}",
            None,
        )
    if kind in ("codes_resize", "byte_flip") and not fixed:
        vals = arr.to_pylist()
        if kind == "codes_resize":
            if not nonempty:
                return base, "noop", None
            r = nonempty[int(rng.integers(len(nonempty)))]
            b = vals[r]
            if rng.random() < 0.5 and len(b) > 0:
                vals[r] = b[: int(rng.integers(len(b)))]
                desc = f"{col}[{r}] codes truncated {len(b)}->{len(vals[r])} bytes"
            else:
                vals[r] = b + bytes(int(rng.integers(1, 9)))
                desc = f"{col}[{r}] codes extended {len(b)}->{len(vals[r])} bytes"
            return with_field(base, col, new_arr=pa.array(vals, arr.type)), desc, True
        data = bytearray(b"".join(v for v in vals if v))
        for _ in range(int(rng.integers(1, 6))):
            if data:
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        pos, out = 0, []
        for v in vals:
            if v is None:
                out.append(None)
            else:
                out.append(bytes(data[pos : pos + len(v)]))
                pos += len(v)
        return with_field(base, col, new_arr=pa.array(out, arr.type)), f"{col} byte flips", None
    if kind in ("codes_resize", "byte_flip") and fixed:
        width = arr.type.byte_width
        new_w = max(0, width + int(rng.choice([-2, -1, 1, 3])))
        vals = [
            None if v is None else (v[:new_w] + bytes(max(0, new_w - len(v))))
            for v in arr.to_pylist()
        ]
        return (
            with_field(
                base, col, field.with_type(pa.binary(new_w)), pa.array(vals, pa.binary(new_w))
            ),
            f"{col} fixed width {width}->{new_w}",
            True,
        )
    if kind in ("scales_short", "scales_long"):
        name = col + (
            "_scales"
            if rng.random() < 0.6 or md[b"flightquant.scheme"] != b"asymmetric"
            else "_zero_points"
        )
        sarr = base.column(name)
        vals = sarr.to_pylist()
        cand = [i for i, v in enumerate(vals) if v]
        if not cand:
            return base, "noop", None
        r = cand[int(rng.integers(len(cand)))]
        if kind == "scales_short":
            vals[r] = vals[r][: int(rng.integers(len(vals[r])))]
        else:
            vals[r] = vals[r] + [1.0] * int(rng.integers(1, 4))
        if fixed:  # a fixed list cannot change one row: change the list size
            size = sarr.type.list_size + (-1 if kind == "scales_short" else 1)
            if size < 0:
                return base, "noop", None
            vals = [None if v is None else (v + [0.0] * size)[:size] for v in sarr.to_pylist()]
            typ = pa.list_(pa.float32(), size)
        else:
            typ = sarr.type
        f = base.schema.field(name).with_type(typ)
        return (
            with_field(base, name, f, pa.array(vals, typ)),
            f"{name}[{r}] {kind}",
            (True if (kind == "scales_short" or not fixed) else None),
        )
    if kind == "scales_type":
        name = col + "_scales"
        sarr = base.column(name)
        typ = [
            pa.list_(pa.float64()),
            pa.list_(pa.int32()),
            pa.string(),
            pa.large_list(pa.float32()),
            pa.list_(pa.float16()),
        ][int(rng.integers(5))]
        try:
            new = (
                sarr.cast(typ)
                if not pa.types.is_string(typ)
                else pa.array([str(v) for v in sarr.to_pylist()])
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            new = pa.array([None] * len(sarr), typ)
        f = base.schema.field(name).with_type(new.type)
        return with_field(base, name, f, new), f"{name} as {new.type}", True
    if kind == "zp_drop":
        if md[b"flightquant.scheme"] != b"asymmetric":
            return base, "noop", None
        return drop(base, col + "_zero_points"), f"drop {col}_zero_points", True
    if kind == "drop_scales":
        return drop(base, col + "_scales"), f"drop {col}_scales", True
    if kind == "numel_drop":
        if numel is None:
            return base, "noop", None
        return drop(base, col + "_numel"), f"drop {col}_numel", True
    if kind == "numel_value":
        if numel is None or not valid_rows:
            return base, "noop", None
        r = valid_rows[int(rng.integers(len(valid_rows)))]
        value = int(rng.choice([-1, -(2**63), 2**62, 2**40 + 1, 2**31, 2**32 + 1, -(2**31)]))
        vals = list(numel)
        vals[r] = value
        return (
            with_field(base, col + "_numel", new_arr=pa.array(vals, pa.int64())),
            f"{col}_numel[{r}]={value}",
            True,
        )
    if kind == "numel_type":
        if numel is None:
            return base, "noop", None
        typ = [pa.int32(), pa.float64(), pa.string(), pa.uint64()][int(rng.integers(4))]
        new = pa.array(
            [None if v is None else (str(v) if typ == pa.string() else v) for v in numel], typ
        )
        f = base.schema.field(col + "_numel").with_type(typ)
        return with_field(base, col + "_numel", f, new), f"{col}_numel as {typ}", True
    if kind == "numel_null":
        if numel is None or not valid_rows:
            return base, "noop", None
        r = valid_rows[int(rng.integers(len(valid_rows)))]
        vals = list(numel)
        vals[r] = None
        return (
            with_field(base, col + "_numel", new_arr=pa.array(vals, pa.int64())),
            f"{col}_numel[{r}]=null",
            True,
        )
    if kind == "codes_type":
        n = base.num_rows
        new = [
            pa.array([f"s{i}" for i in range(n)]),
            pa.array(range(n), pa.int64()),
            pa.array([[1.0]] * n, pa.list_(pa.float32())),
            pa.array([b"x"] * n, pa.large_binary() if not fixed else pa.binary()),
            pa.array([{"a": 1}] * n),
        ][int(rng.integers(5))]
        return with_field(base, col, field.with_type(new.type), new), f"{col} as {new.type}", True
    if kind == "bad_offsets" and not fixed:
        bufs = arr.buffers()
        big = pa.types.is_large_binary(arr.type)
        odt = np.int64 if big else np.int32
        offs = np.frombuffer(bufs[1], odt)[arr.offset : arr.offset + len(arr) + 1].copy()
        choice = int(rng.integers(3))
        if choice == 0:
            offs[-1] += int(rng.integers(1, 1 << 20))  # past the end of the data
        elif choice == 1 and len(offs) > 2:
            offs[1], offs[2] = offs[2] + 5, offs[1]  # not monotonic
        else:
            offs[0] = -int(rng.integers(1, 100))  # negative
        new = pa.Array.from_buffers(
            arr.type,
            len(arr),
            [bufs[0], pa.py_buffer(offs), bufs[2]],
            arr.null_count,
            arr.offset * 0,
        )
        return with_field(base, col, new_arr=new), f"{col} raw offsets {offs.tolist()}", True
    if kind == "scales_bad_offsets" and not fixed:
        name = col + "_scales"
        sarr = base.column(name)
        offs = np.frombuffer(sarr.buffers()[1], np.int32)[
            sarr.offset : sarr.offset + len(sarr) + 1
        ].copy()
        offs[-1] += int(rng.integers(1, 1 << 16))
        new = pa.Array.from_buffers(
            sarr.type,
            len(sarr),
            [sarr.buffers()[0], pa.py_buffer(offs)],
            sarr.null_count,
            0,
            children=[sarr.values],
        )
        return with_field(base, name, new_arr=new), f"{name} offsets past child end", True
    if kind == "derived_meta":
        name = col + ("_scales", "_numel")[int(rng.integers(2))]
        idx = base.schema.get_field_index(name)
        if idx < 0:
            return base, "noop", None
        f = base.schema.field(idx)
        new_md = {b"flightquant.role": b"scales", b"flightquant.codes_column": b"nonexistent"}
        return (
            with_field(base, name, f.with_metadata(new_md)),
            f"{name} points at a missing column",
            None,
        )
    return base, "noop", None


def _fuzz_decoder(seed: int, cases: int, trace: bool = False) -> dict:
    import collections
    import sys
    import traceback

    import numpy as np
    import pyarrow as pa

    import flightquant as fq
    from flightquant import codec

    rng = np.random.default_rng(seed)
    bases = _fuzz_base_batches()
    stats = collections.Counter()
    failures = []
    for _ in range(cases):
        base = bases[int(rng.integers(len(bases)))]
        batch, desc = base, []
        must = False
        sliced = None
        if rng.random() < 0.3:  # a non-empty slice: the arrays now start at an offset
            a = int(rng.integers(base.num_rows))
            b = int(rng.integers(a + 1, base.num_rows + 1))
            batch, sliced = base.slice(a, b - a), a
            desc.append(f"slice[{a}:{b}]")
        for _ in range(
            int(
                rng.choice([0, 1, 1, 1, 2, 3])
                if sliced is not None
                else rng.choice([1, 1, 1, 2, 3])
            )
        ):
            try:
                batch, d, m = _fuzz_case(batch, rng)
            except Exception:  # noqa: BLE001 - a mutation that does not fit a mutated batch
                stats["mutations_skipped"] += 1
                continue
            desc.append(d)
            must = must or bool(m)
            if "offsets" in d:
                break  # the batch now holds an invalid array: pyarrow itself cannot touch it
        if any("delete b'flightquant.format_version'" in d for d in desc):
            must = False  # that column is plain binary now (see the named test)
        stats["cases"] += 1
        if trace:
            print(f"CASE {stats['cases']}: {desc}", file=sys.stderr, flush=True)
        for entry in ("codec", "api"):
            try:
                if entry == "codec":
                    out, _ = codec.dequantize_batch(batch)
                else:
                    out = fq.dequantize(pa.Table.from_batches([batch]))
                    out = out.combine_chunks().to_batches()[0] if out.num_rows else None
                if out is not None:
                    out.validate(full=True)
                    if out.num_rows != batch.num_rows:
                        raise AssertionError(f"{out.num_rows} rows out for {batch.num_rows} in")
                stats[f"{entry}_ok"] += 1
                if must:
                    failures.append({"entry": entry, "mutation": desc, "problem": "accepted"})
                if sliced is not None and len(desc) == 1 and entry == "codec":
                    full, _ = codec.dequantize_batch(base)
                    if not out.equals(full.slice(sliced, batch.num_rows)):
                        failures.append(
                            {"entry": entry, "mutation": desc, "problem": "slice differs"}
                        )
            except ValueError as exc:  # CodecError, OptionsError, ArrowInvalid: all ValueError
                stats[f"{entry}_valueerror"] += 1
                text = str(exc)
                if "Traceback" in text or not text.strip():
                    failures.append(
                        {"entry": entry, "mutation": desc, "problem": f"unclear message {text!r}"}
                    )
            except Exception as exc:  # noqa: BLE001 - every other type is a finding
                failures.append(
                    {
                        "entry": entry,
                        "mutation": desc,
                        "problem": f"{type(exc).__name__}: {exc}"[:300],
                        "where": traceback.format_exc().splitlines()[-3:],
                    }
                )
    return {"stats": dict(stats), "failures": failures}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--fuzz-decoder":
        print(json.dumps(_fuzz_decoder(int(sys.argv[2]), int(sys.argv[3]))))
        sys.exit(0)
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
