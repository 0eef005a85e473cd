"""The codec engine (``flightquant._engine``) against batches built independently from the
NumPy reference (``tests/common.py``): every list kind, dtype (float16 included), option
set, slice, alignment and thread count; errors with their messages; malformed input never
read outside a buffer.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from common import (
    LIST_TYPES,
    assert_same,
    expected_dequantize,
    expected_quantize,
    make_batch,
    unaligned,
)

import flightquant as fq
from flightquant import _engine, codec
from flightquant.errors import NonFiniteError
from flightquant.options import QuantOptions


def check(batch, options, threads=None):
    """Quantize and dequantize ``batch``; both equal the reference-built batches."""
    q, qi = codec.quantize_batch(batch, options, threads=threads)
    assert_same(q, expected_quantize(batch, options))
    d, di = codec.dequantize_batch(q, threads=threads)
    assert_same(d, expected_dequantize(q))
    return q, qi, d, di


OPTIONS = [
    {"bits": 4, "group_size": 128},
    {"bits": 8, "scheme": "symmetric", "group_size": 32},
    {"bits": 2, "scheme": "ternary", "group_size": 7},
    {"bits": 2, "group_size": 1},
    {"bits": 4, "group_size": 5, "clip": 1.5},
    {"bits": 4, "group_size": 16, "method": "mse"},
    {"bits": 4, "group_size": 32, "stats": True},
    {"bits": 8, "scheme": "symmetric", "group_size": 3, "stats": True, "clip": 0.8},
]


@pytest.mark.parametrize("kind", list(LIST_TYPES))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_batches_equal_the_reference(kind, dtype, opts):
    batch = make_batch(kind, dtype, nulls={2})
    options = QuantOptions.from_mapping(opts)
    q, qi, d, di = check(batch, options, threads=2)
    elements = sum(len(r) for r in batch.column("weights").to_pylist() if r is not None)
    assert (qi.rows, qi.elements, qi.input_bytes) == (
        batch.num_rows,
        elements,
        batch.get_total_buffer_size(),
    )
    assert qi.kernel_seconds > 0 and qi.output_bytes == q.get_total_buffer_size()
    assert d.schema.equals(batch.schema)
    assert (di.rows, di.elements) == (batch.num_rows, elements)
    if options.stats:
        assert qi.sse is not None and qi.max_abs_error is not None
        assert qi.sse == pytest.approx(
            sum(
                np.asarray(q.column("weights_mse").fill_null(0))
                * [len(r or []) for r in batch.column("weights").to_pylist()]
            )
        )


@pytest.mark.parametrize("kind", list(LIST_TYPES))
@pytest.mark.parametrize("start,stop", [(1, 5), (3, 6), (0, 0), (5, 6)])
def test_slices_nulls_and_odd_bit_offsets(kind, start, stop):
    # nulls at rows whose validity bits do not start on a byte once sliced
    batch = make_batch(kind, lengths=[40, 3, 0, 77, 9, 128, 1, 50, 33, 2], nulls={0, 4, 9})
    part = batch.slice(start, stop - start)
    options = QuantOptions.from_mapping({"bits": 4, "group_size": 8})
    q, _, _, _ = check(part, options)
    skip = 1 if q.num_rows > 1 else 0
    qs = q.slice(skip)  # a sliced quantized batch decodes as well
    d, _ = codec.dequantize_batch(qs)
    assert_same(d, expected_dequantize(qs))
    assert d.equals(fq.dequantize(q).slice(skip))


@pytest.mark.parametrize("kind", list(LIST_TYPES))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_unaligned_buffers(kind, dtype):
    batch = make_batch(kind, dtype, nulls={1})
    moved = unaligned(batch)
    assert moved.column("weights").values.buffers()[1].address % 2 != 0
    options = QuantOptions.from_mapping({"bits": 4, "group_size": 32})
    q, _, _, _ = check(moved, options)
    assert_same(q, codec.quantize_batch(batch, options)[0])
    qm = unaligned(q)
    scales = qm.column("weights_scales").values.buffers()[1]
    assert scales.address % 4 != 0
    d, _ = codec.dequantize_batch(qm)
    assert_same(d, expected_dequantize(q))


def test_many_columns_and_rows():
    rng = np.random.default_rng(3)
    cols = {"key": [f"k{i}" for i in range(300)]}
    for c in range(3):
        cols[f"w{c}"] = pa.array(
            [rng.standard_normal(rng.integers(0, 200)).astype(np.float32) for _ in range(300)],
            pa.list_(pa.float32()),
        )
        cols[f"extra{c}"] = pa.array(rng.integers(0, 9, 300))
    batch = pa.record_batch(cols)
    options = QuantOptions.from_mapping({"bits": 2, "group_size": 3})
    check(batch, options)


def test_empty_batches():
    batch = make_batch().slice(0, 0)
    q, qi, d, _ = check(batch, QuantOptions())
    assert q.num_rows == 0 and qi.elements == 0 and d.num_rows == 0


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
    assert held >= 4 * (1 << 16) * 4  # the restored floats, allocated by the engine
    assert left < 64 << 10  # ...and freed with the batch


# ---------------------------------------------------------------------------------------
# what the engine refuses: one status, one message


def test_errors_keep_their_messages():
    bad = make_batch()
    values = bad.column("weights").values.to_numpy().copy()
    values[300 + 5] = np.nan  # row 2, element 5 (row 1 is empty)
    col = pa.ListArray.from_arrays(bad.column("weights").offsets, pa.array(values))
    bad = bad.set_column(1, "weights", col)
    with pytest.raises(NonFiniteError, match=r"'weights', row 2 \('layer.2'\).*element 5"):
        fq.quantize(bad, bits=4)
    nulls = pa.ListArray.from_arrays(
        bad.column("weights").offsets,
        pa.array(values.tolist()[:305] + [None] + values.tolist()[306:], pa.float32()),
    )
    with pytest.raises(
        codec.CodecError,
        match=r"null element in column 'weights', row 2 "
        r"\('layer.2'\), element 5",
    ):
        fq.quantize(bad.set_column(1, "weights", nulls), bits=4)


def test_malformed_codes_never_read_outside_their_buffer(monkeypatch):
    # offsets that only full validation rejects: row 0 ends past the 6 data bytes
    q, _ = codec.quantize_batch(
        make_batch(lengths=[12, 12]), QuantOptions.from_mapping({"bits": 4})
    )
    codes = q.column("weights")
    bad_offsets = pa.py_buffer(np.array([0, 64, 12], np.int32).tobytes())
    forged = pa.Array.from_buffers(pa.binary(), 2, [None, bad_offsets, codes.buffers()[2]])
    forged_batch = q.set_column(1, q.schema.field("weights"), forged)
    with pytest.raises(codec.CodecError, match="not a valid Arrow array"):
        codec.dequantize_batch(forged_batch)


def test_zero_points_apart_from_scales():
    q, _ = codec.quantize_batch(make_batch(), QuantOptions())
    zps = q.column("weights_zero_points")
    # the same rows, stored after two leading values of padding
    values = pa.concat_arrays([pa.array([9.0, 9.0], pa.float32()), zps.values])
    moved = pa.ListArray.from_arrays(pa.array(np.asarray(zps.offsets) + 2), values)
    i = q.schema.get_field_index("weights_zero_points")
    q2 = q.set_column(i, q.schema.field(i), moved)
    d2, _ = codec.dequantize_batch(q2)
    assert_same(d2, codec.dequantize_batch(q)[0])
    assert_same(d2, expected_dequantize(q))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    batch = make_batch(lengths=[1000, 999, 1001, 64])
    want, _ = codec.quantize_batch(batch, QuantOptions(), threads=1)
    got, _ = codec.quantize_batch(batch, QuantOptions(), threads=threads)
    assert_same(got, want)
    assert_same(
        codec.dequantize_batch(got, threads=threads)[0], codec.dequantize_batch(want, threads=1)[0]
    )


def test_plans_are_built_once_per_schema():
    codec.quantize_batch(make_batch(), QuantOptions())
    plan = codec._quantize_plan(make_batch().schema, QuantOptions()).engine
    assert isinstance(plan, _engine.QuantizePlan)
    for seed in (1, 2):
        other = make_batch(seed=seed)
        codec.quantize_batch(other, QuantOptions())
        assert codec._quantize_plan(other.schema, QuantOptions()).engine is plan


def test_planning_many_columns_is_linear():
    import time

    n = 10_000
    schema = pa.schema([(f"w{i}", pa.list_(pa.float32())) for i in range(n)])
    t0 = time.process_time()
    codec._build_quantize_plan(schema, QuantOptions())
    # quadratic planning took ~25 s of CPU here; linear takes well under one
    assert time.process_time() - t0 < 5.0
