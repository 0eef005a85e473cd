"""Helpers shared by the test modules: one batch builder, one misalignment helper, and the
expected output of the codec built independently of it from the NumPy reference."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from flightquant import reference, wire
from flightquant.options import QuantOptions
from flightquant.reference import ggml as ggml_reference

SEED_SCHEMA = pa.schema(
    [
        ("layer_name", pa.string()),
        ("weights", pa.list_(pa.float32())),
        ("shape", pa.list_(pa.int64())),
    ]
)


def make_layer_batch(
    start: int = 0, rows: int = 3, elements: int = 300, seed: int | None = None
) -> pa.RecordBatch:
    """A batch of the seed layer schema: rows named ``layer.<i>``, float32 weights."""
    rng = np.random.default_rng(start if seed is None else seed)
    names, lists, shapes = [], [], []
    for i in range(start, start + rows):
        n = elements + (i % 5) * 7  # ragged rows, tail groups
        names.append(f"layer.{i}")
        lists.append(rng.standard_normal(n).astype(np.float32))
        shapes.append([n])
    offsets = np.zeros(rows + 1, np.int32)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.concatenate(lists) if lists else np.zeros(0, np.float32)
    weights = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))
    return pa.RecordBatch.from_arrays(
        [pa.array(names, pa.string()), weights, pa.array(shapes, pa.list_(pa.int64()))],
        schema=SEED_SCHEMA,
    )


LIST_TYPES = {
    "list": lambda t, n: pa.list_(t),
    "large_list": lambda t, n: pa.large_list(t),
    "fixed_size_list": lambda t, n: pa.list_(t, n),
}


def make_batch(
    kind="list", dtype=np.float32, lengths=(300, 0, 17, 1, 129, 64), nulls=(), seed=0, scale=1.0
):
    """``layer_name``, ``weights`` (float tensors, rows in ``nulls`` null) and ``step``.

    Fixed-size lists take ``max(lengths)`` elements per row."""
    rng = np.random.default_rng(seed)
    if kind == "fixed_size_list":
        lengths = [max(lengths)] * len(lengths)
    rows = [
        None if i in nulls else (scale * rng.standard_normal(n)).astype(dtype)
        for i, n in enumerate(lengths)
    ]
    t = LIST_TYPES[kind](pa.from_numpy_dtype(dtype), max(lengths))
    return pa.record_batch(
        {
            "layer_name": [f"layer.{i}" for i in range(len(lengths))],
            "weights": pa.array(rows, t),
            "step": pa.array(np.arange(len(lengths), dtype=np.int64)),
        }
    )


def unaligned(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` read back from IPC bytes that start one byte past an aligned address, so
    every buffer sits at an odd address (as a Flight message body may)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    data = sink.getvalue()
    shifted = pa.py_buffer(b"\0" + data.to_pybytes())[1:]
    return pa.ipc.open_stream(shifted).read_next_batch()


def _rows(col: pa.Array) -> list[np.ndarray | None]:
    """Each row as a float32/float64 array (float16 widened to float32), None if null."""
    out = []
    for i in range(len(col)):
        if not col[i].is_valid:
            out.append(None)
            continue
        v = col[i].values.to_numpy(zero_copy_only=False)
        out.append(v.astype(np.float32) if v.dtype == np.float16 else v)
    return out


def expected_quantize(batch: pa.RecordBatch, options: QuantOptions) -> pa.RecordBatch:
    """What ``codec.quantize_batch`` must give, built row by row from the NumPy reference
    (``flightquant.reference``) with plain pyarrow constructors."""
    fields, arrays = [], []
    picked = options.columns
    for f, col in zip(batch.schema, batch.columns):
        if not wire.is_float_list(f.type) or (picked is not None and f.name not in picked):
            fields.append(f)
            arrays.append(col)
            continue
        new = wire.codes_fields(f, options)
        fields.extend(new)
        rows = _rows(col)
        mask = np.array([r is None for r in rows], bool)
        t = options.ggml
        codes, scales, zps, numel, mse, mx = [], [], [], [], [], []
        for r in rows:
            x = np.zeros(0, np.float32) if r is None else r
            if t is not None:
                x32 = x.astype(np.float32)
                if options.clip is not None:
                    c = np.float32(options.clip)
                    x32 = np.clip(x32, -c, c)
                blocks = x32.reshape(-1, t.block_size)
                data = ggml_reference.quantize_blocks(blocks, t.name, options.method)
                codes.append(data.tobytes())
                back = ggml_reference.dequantize_blocks(data, t.name).reshape(-1)
                x_in = x.astype(np.float32)  # stats measure against the input before clip
                err = x_in.astype(np.float64) - back.astype(np.float64)
                sse = _seq_block_sse(err, t.block_size)
                mse.append(sse / x.size if x.size else 0.0)
                mx.append(float(np.abs(x_in - back).max(initial=0.0)))
                continue
            q = reference.quantize_rows(
                x,
                np.zeros(1, np.int64),
                np.array([x.size], np.int64),
                bits=options.bits,
                scheme=options.scheme,
                group_size=options.group_size,
                method=options.method,
                clip=options.clip,
                stats=True,
            )
            codes.append(q.codes.tobytes())
            scales.append(q.scales)
            zps.append(q.zero_points)
            numel.append(x.size)
            sse = float(q.row_sse()[0]) if x.size else 0.0
            mse.append(sse / x.size if x.size else 0.0)
            mx.append(float(q.row_max_abs_error()[0]) if x.size else 0.0)
        by_name = dict(zip(ROLE_ORDER, (scales, zps, numel, mse, mx)))
        for nf in new:
            role = (nf.metadata or {}).get(wire.K_ROLE, b"").decode()
            if role == "codes":
                arrays.append(pa.array([None if m else c for c, m in zip(codes, mask)], nf.type))
            elif role in ("scales", "zero_points"):
                arrays.append(
                    pa.array([None if m else v for v, m in zip(by_name[role], mask)], nf.type)
                )
            else:
                arrays.append(
                    pa.array(np.array(by_name[role], nf.type.to_pandas_dtype()), nf.type, mask=mask)
                )
    return pa.RecordBatch.from_arrays(
        arrays, schema=pa.schema(fields, metadata=batch.schema.metadata)
    )


ROLE_ORDER = ("scales", "zero_points", "numel", "mse", "max_abs_error")


def _seq_block_sse(err: np.ndarray, block: int) -> float:
    """Sum of squares per block in element order, then blocks in order (the engine's)."""
    total = 0.0
    for b in range(0, err.size, block):
        s = 0.0
        for e in err[b : b + block].tolist():
            s += e * e
        total += s
    return total


def expected_dequantize(q: pa.RecordBatch) -> pa.RecordBatch:
    """What ``codec.dequantize_batch`` must give for ``q``, from the NumPy reference."""
    fields, arrays = [], []
    derived = {f.name for f in q.schema if wire.role_of(f) is not None}
    for f, col in zip(q.schema, q.columns):
        if f.name in derived:
            continue
        if not wire.is_quantized_field(f):
            fields.append(f)
            arrays.append(col)
            continue
        m = wire.parse_codes_field(f)
        out_type = m.decoded_type()
        fields.append(pa.field(f.name, out_type, f.nullable, wire.stripped_metadata(f)))
        rows = []
        for i in range(len(col)):
            if not col[i].is_valid:
                rows.append(None)
                continue
            data = np.frombuffer(col[i].as_py(), np.uint8)
            if m.ggml is not None:
                x = ggml_reference.dequantize_blocks(
                    data.reshape(-1, m.ggml.type_size), m.format
                ).reshape(-1)
            else:
                n = (
                    m.list_size
                    if m.kind == "fixed_size_list"
                    else q.column(f"{f.name}_numel")[i].as_py()
                )
                sc = np.asarray(q.column(f"{f.name}_scales")[i].values, np.float32)
                zp = (
                    np.asarray(q.column(f"{f.name}_zero_points")[i].values, np.float32)
                    if m.scheme == "asymmetric"
                    else None
                )
                from flightquant.layout import make_layout

                lay = make_layout(np.array([n]), m.bits, m.group_size)
                x = reference.dequantize_rows(
                    data[: lay.n_code_bytes],
                    lay,
                    sc[: lay.n_groups],
                    None if zp is None else zp[: lay.n_groups],
                    scheme=m.scheme,
                )
            rows.append(x.astype(m.dtype))
        arrays.append(pa.array(rows, out_type))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=q.schema.metadata))


def assert_same(a: pa.RecordBatch, b: pa.RecordBatch):
    a.validate(full=True)
    assert a.schema.equals(b.schema, check_metadata=True), (a.schema, b.schema)
    assert a.equals(b)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition"):
    """Poll ``condition`` until true or fail after ``timeout`` seconds (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# The statuses a client may see for hostile input, as the pyarrow client raises them.
CLEAN = (
    pa.ArrowInvalid,  # INVALID_ARGUMENT
    flight.FlightUnavailableError,  # UNAVAILABLE
    flight.FlightCancelledError,  # CANCELLED
    pa.ArrowNotImplementedError,  # UNIMPLEMENTED
)
CLEAN_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNIMPLEMENTED,
}
# Statuses pyarrow's C++ Flight layer returns by itself before any Python handler runs
# (the server cannot change them): an empty stream or a first message that is not a
# schema. Checked by message so that nothing else slips through as UNKNOWN.
PYARROW_PRE_HANDLER = (
    "Stream finished before first message sent",
    "Expected IPC message of type schema",
    "Invalid flatbuffers message",
    "Old metadata version not supported",
    "Message not large enough",
)


def no_traceback(text: str) -> None:
    assert "Traceback (most recent call last)" not in text, text
    assert 'File "' not in text, text


def assert_clean(exc: BaseException) -> None:
    """A status a person can act on: one of CLEAN, without a traceback."""
    assert isinstance(exc, CLEAN), f"{type(exc).__name__}: {exc}"
    no_traceback(str(exc))


def exchange(client, command: bytes, schema: pa.Schema, batches, timeout: float = 30):
    """Send batches through DoExchange; return the answer chunks, or raise the status."""
    writer, reader = client.do_exchange(
        flight.FlightDescriptor.for_command(command),
        options=flight.FlightCallOptions(timeout=timeout),
    )
    chunks = []
    try:
        try:
            writer.begin(schema)
            for b in batches:
                writer.write_batch(b)
            writer.done_writing()
        except (pa.ArrowException, OSError):
            # a failed call shows on the write side too; the reader has the status
            try:
                writer.done_writing()
            except (pa.ArrowException, OSError):
                pass
        while True:
            try:
                chunks.append(reader.read_chunk())
            except StopIteration:
                break
    finally:
        try:
            writer.close()
        except (pa.ArrowException, OSError):
            pass
    return chunks


# --------------------------------------------------------------------------- IPC editing
def _u32(b, p):
    return struct.unpack_from("<I", b, p)[0]


def _field_pos(b, table: int, index: int) -> int | None:
    vtable = table - struct.unpack_from("<i", b, table)[0]
    if 4 + 2 * index >= struct.unpack_from("<H", b, vtable)[0]:
        return None
    off = struct.unpack_from("<H", b, vtable + 4 + 2 * index)[0]
    return None if off == 0 else table + off


def ipc_layout(meta: bytes) -> tuple[int, list[int], list[int]]:
    """(position of RecordBatch.length, positions of FieldNode structs, of Buffer structs)
    in a RecordBatch message's flatbuffer (Message.header = RecordBatch {length, nodes,
    buffers}; FieldNode = {length, null_count}, Buffer = {offset, length}: two int64)."""
    root = _u32(meta, 0)
    header = _field_pos(meta, root, 2)
    rb = header + _u32(meta, header)
    length = _field_pos(meta, rb, 0)
    out = []
    for index in (1, 2):
        f = _field_pos(meta, rb, index)
        vec = f + _u32(meta, f)
        out.append([vec + 4 + 16 * i for i in range(_u32(meta, vec))])
    return length, out[0], out[1]


# --------------------------------------------------------------------------- child processes
def run_isolated(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Python ``code`` in a child process (tests/ and this tree first on the path)."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )


def mse_isas() -> list[str]:
    """The native mse search's vector loops this CPU runs (portable everywhere, sse2/avx2)."""
    from flightquant import _kernels

    names = []
    for name in ("portable", "sse2", "avx2"):
        try:
            previous = _kernels.mse_isa(name)
        except ValueError:
            continue
        _kernels.mse_isa(previous)
        names.append(name)
    return names
