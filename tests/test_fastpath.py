"""The codec's one-call path (``flightquant._fastpath``) against its general path.

The one-call path must give the same batches as the general path in ``codec.py`` (which
the rest of the codec tests hold to the reference), take every plain valid batch itself,
and hand everything else back: errors keep their messages, malformed input never makes it
read outside a buffer.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

import flightquant as fq
from flightquant import codec, kernels
from flightquant.errors import NonFiniteError
from flightquant.options import QuantOptions

LIST_TYPES = {
    "list": lambda t, n: pa.list_(t),
    "large_list": lambda t, n: pa.large_list(t),
    "fixed_size_list": lambda t, n: pa.list_(t, n),
}


def make_batch(kind="list", dtype=np.float32, lengths=(300, 0, 17, 1, 129, 64), nulls=(),
               seed=0):
    """``layer_name``, ``weights`` (float tensors, rows in ``nulls`` null) and ``step``.

    Fixed-size lists take ``max(lengths)`` elements per row."""
    rng = np.random.default_rng(seed)
    if kind == "fixed_size_list":
        lengths = [max(lengths)] * len(lengths)
    rows = [None if i in nulls else rng.standard_normal(n).astype(dtype)
            for i, n in enumerate(lengths)]
    t = LIST_TYPES[kind](pa.from_numpy_dtype(dtype), max(lengths))
    return pa.record_batch({
        "layer_name": [f"layer.{i}" for i in range(len(lengths))],
        "weights": pa.array(rows, t),
        "step": pa.array(np.arange(len(lengths), dtype=np.int64)),
    })


def unaligned(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` read back from IPC bytes that start one byte past an aligned address, so
    every buffer sits at an odd address (as a Flight message body may)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    data = sink.getvalue()
    shifted = pa.py_buffer(b"\0" + data.to_pybytes())[1:]
    return pa.ipc.open_stream(shifted).read_next_batch()


@pytest.fixture
def general_calls(monkeypatch):
    """How often the general path ran a kernel (the one-call path never does)."""
    calls = []
    for name in ("quantize_rows", "dequantize_rows"):
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return calls


def both_paths(fn, monkeypatch):
    """``fn()`` on the one-call path and on the general path."""
    monkeypatch.setattr(codec, "use_fastpath", True)
    fast = fn()
    monkeypatch.setattr(codec, "use_fastpath", False)
    general = fn()
    monkeypatch.setattr(codec, "use_fastpath", True)
    return fast, general


def assert_same(a: pa.RecordBatch, b: pa.RecordBatch):
    a.validate(full=True)
    assert a.schema.equals(b.schema, check_metadata=True)
    assert a.equals(b)


OPTIONS = [
    {"bits": 4, "group_size": 128},
    {"bits": 8, "scheme": "symmetric", "group_size": 32},
    {"bits": 2, "scheme": "ternary", "group_size": 7},
    {"bits": 2, "group_size": 1},
    {"bits": 4, "group_size": 5, "clip": 1.5},
    {"bits": 4, "group_size": 16, "method": "mse"},
]


@pytest.mark.parametrize("kind", list(LIST_TYPES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_same_batches_as_the_general_path(kind, dtype, opts, monkeypatch, general_calls):
    batch = make_batch(kind, dtype, nulls={2})
    options = QuantOptions.from_mapping(opts)
    (q, qi), (q2, qi2) = both_paths(lambda: codec.quantize_batch(batch, options, threads=2), monkeypatch)
    assert general_calls == ["quantize_rows"]  # the general path's call only
    assert_same(q, q2)
    assert (qi.rows, qi.elements, qi.input_bytes) == (qi2.rows, qi2.elements, qi2.input_bytes)
    assert qi.kernel_seconds > 0 and qi.output_bytes > 0
    general_calls.clear()
    (d, di), (d2, di2) = both_paths(lambda: codec.dequantize_batch(q, threads=2), monkeypatch)
    assert general_calls == ["dequantize_rows"]
    assert_same(d, d2)
    assert d.schema.equals(batch.schema)
    assert (di.rows, di.elements) == (di2.rows, di2.elements) == (batch.num_rows, qi.elements)


@pytest.mark.parametrize("kind", list(LIST_TYPES))
@pytest.mark.parametrize("start,stop", [(1, 5), (3, 6), (0, 0), (5, 6)])
def test_slices_nulls_and_odd_bit_offsets(kind, start, stop, monkeypatch, general_calls):
    # nulls at rows whose validity bits do not start on a byte once sliced
    batch = make_batch(kind, lengths=[40, 3, 0, 77, 9, 128, 1, 50, 33, 2], nulls={0, 4, 9})
    part = batch.slice(start, stop - start)
    options = QuantOptions.from_mapping({"bits": 4, "group_size": 8})
    (q, _), (q2, _) = both_paths(lambda: codec.quantize_batch(part, options), monkeypatch)
    assert_same(q, q2)
    skip = 1 if q.num_rows > 1 else 0
    qs = q.slice(skip)  # a sliced quantized batch decodes as well
    (d, _), (d2, _) = both_paths(lambda: codec.dequantize_batch(qs), monkeypatch)
    assert_same(d, d2)
    assert d.equals(fq.dequantize(q2).slice(skip))
    assert general_calls == ["quantize_rows", "dequantize_rows"]


@pytest.mark.parametrize("kind", list(LIST_TYPES))
def test_unaligned_buffers(kind, monkeypatch, general_calls):
    batch = make_batch(kind, nulls={1})
    moved = unaligned(batch)
    assert moved.column("weights").values.buffers()[1].address % 4 != 0
    options = QuantOptions.from_mapping({"bits": 4, "group_size": 32})
    (q, _), (q2, _) = both_paths(lambda: codec.quantize_batch(moved, options), monkeypatch)
    assert_same(q, q2)
    assert_same(q, codec.quantize_batch(batch, options)[0])
    qm = unaligned(q)
    scales = qm.column("weights_scales").values.buffers()[1]
    assert scales.address % 4 != 0
    (d, _), (d2, _) = both_paths(lambda: codec.dequantize_batch(qm), monkeypatch)
    assert_same(d, d2)
    assert general_calls == ["quantize_rows", "dequantize_rows"]


def test_many_columns_and_rows(monkeypatch, general_calls):
    rng = np.random.default_rng(3)
    cols = {"key": [f"k{i}" for i in range(300)]}
    for c in range(3):
        cols[f"w{c}"] = pa.array([rng.standard_normal(rng.integers(0, 200)).astype(np.float32)
                                  for _ in range(300)], pa.list_(pa.float32()))
        cols[f"extra{c}"] = pa.array(rng.integers(0, 9, 300))
    batch = pa.record_batch(cols)
    options = QuantOptions.from_mapping({"bits": 2, "group_size": 3})
    (q, _), (q2, _) = both_paths(lambda: codec.quantize_batch(batch, options), monkeypatch)
    assert_same(q, q2)
    (d, _), (d2, _) = both_paths(lambda: codec.dequantize_batch(q), monkeypatch)
    assert_same(d, d2)
    assert general_calls.count("quantize_rows") == 3 and general_calls.count("dequantize_rows") == 3


def test_empty_batches(monkeypatch, general_calls):
    batch = make_batch().slice(0, 0)
    (q, qi), (q2, _) = both_paths(lambda: codec.quantize_batch(batch, QuantOptions()), monkeypatch)
    assert_same(q, q2)
    assert q.num_rows == 0 and qi.elements == 0
    (d, _), (d2, _) = both_paths(lambda: codec.dequantize_batch(q), monkeypatch)
    assert_same(d, d2)


def test_output_outlives_the_input_and_frees_its_memory():
    batch = make_batch(lengths=[1 << 16] * 4)
    gc.collect()
    tracemalloc.start()
    try:
        q, _ = codec.quantize_batch(batch, QuantOptions())
        del batch
        d, _ = codec.dequantize_batch(q)
        del q
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        assert d.column("layer_name").to_pylist() == [f"layer.{i}" for i in range(4)]
        assert len(d.column("weights")[3]) == 1 << 16
        del d
        gc.collect()
        left, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held >= 4 * (1 << 16) * 4  # the restored floats, allocated by the one-call path
    assert left < 64 << 10  # ...and freed with the batch


# ---------------------------------------------------------------------------------------
# what the one-call path hands back to the general path


def test_declines_float16_and_stats(general_calls):
    half = make_batch(dtype=np.float16)
    q, _ = codec.quantize_batch(half, QuantOptions())
    codec.dequantize_batch(q)
    assert general_calls == ["quantize_rows", "dequantize_rows"]
    general_calls.clear()
    _, info = codec.quantize_batch(make_batch(), QuantOptions.from_mapping({"stats": True}))
    assert general_calls == ["quantize_rows"] and info.sse is not None


def test_errors_keep_their_messages(general_calls):
    bad = make_batch()
    values = bad.column("weights").values.to_numpy().copy()
    values[300 + 5] = np.nan  # row 2, element 5 (row 1 is empty)
    col = pa.ListArray.from_arrays(bad.column("weights").offsets, pa.array(values))
    bad = bad.set_column(1, "weights", col)
    with pytest.raises(NonFiniteError, match=r"'weights', row 2 \('layer.2'\).*element 5"):
        fq.quantize(bad, bits=4)
    assert general_calls == ["quantize_rows"]


def test_malformed_codes_never_read_outside_their_buffer(monkeypatch):
    # offsets that only full validation rejects: row 0 ends past the 6 data bytes
    q, _ = codec.quantize_batch(make_batch(lengths=[12, 12]), QuantOptions.from_mapping({"bits": 4}))
    codes = q.column("weights")
    bad_offsets = pa.py_buffer(np.array([0, 64, 12], np.int32).tobytes())
    forged = pa.Array.from_buffers(pa.binary(), 2, [None, bad_offsets, codes.buffers()[2]])
    forged_batch = q.set_column(1, q.schema.field("weights"), forged)
    with pytest.raises(codec.CodecError, match="not a valid Arrow array"):
        codec.dequantize_batch(forged_batch)


def test_zero_points_apart_from_scales_take_the_general_path(general_calls):
    q, _ = codec.quantize_batch(make_batch(), QuantOptions())
    zps = q.column("weights_zero_points")
    # the same rows, stored after two leading values of padding
    values = pa.concat_arrays([pa.array([9.0, 9.0], pa.float32()), zps.values])
    moved = pa.ListArray.from_arrays(pa.array(np.asarray(zps.offsets) + 2), values)
    i = q.schema.get_field_index("weights_zero_points")
    q2 = q.set_column(i, q.schema.field(i), moved)
    d2, _ = codec.dequantize_batch(q2)
    assert general_calls == ["dequantize_rows"]
    assert_same(d2, codec.dequantize_batch(q)[0])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    batch = make_batch(lengths=[1000, 999, 1001, 64])
    want, _ = codec.quantize_batch(batch, QuantOptions(), threads=1)
    got, _ = codec.quantize_batch(batch, QuantOptions(), threads=threads)
    assert_same(got, want)
    assert_same(codec.dequantize_batch(got, threads=threads)[0], codec.dequantize_batch(want, threads=1)[0])


def test_plans_are_built_once_per_schema():
    codec.quantize_batch(make_batch(), QuantOptions())
    plan = codec._quantize_plan(make_batch().schema, QuantOptions())[2]
    assert isinstance(plan, codec._fastpath.QuantizePlan)
    for seed in (1, 2):
        other = make_batch(seed=seed)
        codec.quantize_batch(other, QuantOptions())
        assert codec._quantize_plan(other.schema, QuantOptions())[2] is plan


@pytest.mark.parametrize("value,expected", [("0", False), ("1", True), (None, True)])
def test_environment_switch(value, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FLIGHTQUANT_FASTPATH"}
    if value is not None:
        env["FLIGHTQUANT_FASTPATH"] = value
    out = subprocess.run([sys.executable, "-c", "from flightquant import codec; print(codec.use_fastpath)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)
