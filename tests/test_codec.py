"""The Arrow codec and the in-process API (wire format v1)."""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import flightquant as fq
from flightquant import codec, kernels, reference
from flightquant.options import QuantOptions

SCHEMES_BITS = [
    ("asymmetric", 2),
    ("asymmetric", 4),
    ("asymmetric", 8),
    ("symmetric", 2),
    ("symmetric", 4),
    ("symmetric", 8),
    ("ternary", 2),
]


def layer_batch(lengths=(300, 0, 17, 1, 129), dtype=np.float32, seed=0, list_type=pa.list_):
    rng = np.random.default_rng(seed)
    tensors = [rng.standard_normal(n).astype(dtype) for n in lengths]
    arrow_t = pa.from_numpy_dtype(dtype)
    return pa.record_batch(
        {
            "layer_name": [f"layer.{i}.weight" for i in range(len(lengths))],
            "weights": pa.array(tensors, list_type(arrow_t)),
            "shape": pa.array([[n] for n in lengths], pa.list_(pa.int64())),
        }
    ), tensors


def as_lists(col):
    """Each row of a list column as a NumPy array of its own value type (None if null)."""
    return [col[i].values.to_numpy() if col[i].is_valid else None for i in range(len(col))]


def rtn_bound_ok(x, x_hat, scales, group_size):
    """|x - x_hat| <= scale/2 plus float32 slack, per element."""
    s = np.repeat(scales, group_size)[: x.size].astype(np.float64)
    slack = 8 * np.spacing(np.float32(np.abs(x).max(initial=0))).astype(np.float64)
    return np.all(np.abs(x.astype(np.float64) - x_hat.astype(np.float64)) <= s / 2 + slack)


@pytest.mark.parametrize("scheme,bits", SCHEMES_BITS)
@pytest.mark.parametrize("group_size", [1, 7, 32, 128, 1000])
def test_round_trip_seed_schema(scheme, bits, group_size):
    batch, tensors = layer_batch()
    q = fq.quantize(batch, bits=bits, scheme=scheme, group_size=group_size)
    q.validate(full=True)  # the batch is assembled from raw buffers: sizes must agree
    names = (
        ["layer_name", "weights", "weights_scales"]
        + (["weights_zero_points"] if scheme == "asymmetric" else [])
        + ["weights_numel", "shape"]
    )
    assert q.schema.names == names
    assert q.column("layer_name").equals(batch.column("layer_name"))
    assert q.column("shape").equals(batch.column("shape"))
    md = q.schema.field("weights").metadata
    assert md[b"flightquant.bits"] == str(bits).encode()
    assert md[b"flightquant.scheme"] == scheme.encode()
    for i, t in enumerate(tensors):
        assert len(q.column("weights")[i].as_py()) == -(-t.size * bits // 8)
        assert len(q.column("weights_scales")[i]) == -(-t.size // group_size)
    d = fq.dequantize(q)
    d.validate(full=True)
    assert d.schema.equals(batch.schema)
    for t, back, scales in zip(
        tensors, as_lists(d.column("weights")), as_lists(q.column("weights_scales"))
    ):
        assert back.dtype == np.float32 and back.shape == t.shape
        if scheme != "ternary":
            assert rtn_bound_ok(t, back, scales, group_size)


@pytest.mark.parametrize("scheme,bits", SCHEMES_BITS)
def test_codec_equals_reference(scheme, bits):
    batch, tensors = layer_batch(lengths=(1000, 33, 0, 64))
    q = fq.quantize(batch, bits=bits, scheme=scheme, group_size=32)
    flat = np.concatenate(tensors)
    lens = np.array([t.size for t in tensors])
    ref = reference.quantize_rows(
        flat, np.cumsum(lens) - lens, lens, bits=bits, scheme=scheme, group_size=32
    )
    codes = b"".join(q.column("weights")[i].as_py() for i in range(len(tensors)))
    assert codes == ref.codes.tobytes()
    assert np.array_equal(pc.list_flatten(q.column("weights_scales")).to_numpy(), ref.scales)
    if scheme == "asymmetric":
        assert np.array_equal(
            pc.list_flatten(q.column("weights_zero_points")).to_numpy(), ref.zero_points
        )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("list_type", [pa.list_, pa.large_list])
def test_dtype_and_list_type_round_trip(dtype, list_type):
    batch, tensors = layer_batch(dtype=dtype, list_type=list_type)
    q = fq.quantize(batch, bits=8)
    expected_codes = pa.large_binary() if list_type is pa.large_list else pa.binary()
    assert q.schema.field("weights").type == expected_codes
    d = fq.dequantize(q)
    assert d.schema.equals(batch.schema)
    for t, back in zip(tensors, as_lists(d.column("weights"))):
        assert back.dtype == dtype
        assert np.allclose(back, t, atol=0.05)


def test_fixed_size_list_with_null_rows():
    rng = np.random.default_rng(3)
    vals = rng.standard_normal((5, 40)).astype(np.float32)
    vals[1] = np.nan  # a null row's slot may hold anything
    arr = pa.FixedSizeListArray.from_arrays(
        pa.array(vals.reshape(-1)), 40, mask=pa.array([False, True, False, False, True])
    )
    batch = pa.record_batch({"emb": arr})
    q = fq.quantize(batch, bits=4, group_size=16)
    assert q.schema.field("emb").type == pa.binary(20)
    assert q.schema.field("emb_scales").type == pa.list_(pa.float32(), 3)
    assert "emb_numel" not in q.schema.names
    assert q.column("emb").null_count == 2 and q.column("emb_scales").null_count == 2
    q.validate(full=True)
    d = fq.dequantize(q)
    d.validate(full=True)
    assert d.schema.equals(batch.schema)
    out = d.column("emb").to_pylist()
    assert out[1] is None and out[4] is None
    for i in (0, 2, 3):
        assert np.abs(np.array(out[i]) - vals[i]).max() < 0.5


def test_null_rows_and_passthrough_columns():
    batch = pa.record_batch(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "name": ["a", None, "c"],
            "w": pa.array([[1.0, 2.0], None, [3.0]], pa.list_(pa.float32())),
            "ints": pa.array([[1], [2], [3]], pa.list_(pa.int32())),
            "nested": pa.array([{"x": 1}, {"x": 2}, {"x": 3}]),
        }
    )
    q = fq.quantize(batch)
    for name in ("id", "name", "ints", "nested"):
        assert q.column(name).equals(batch.column(name))
    assert q.schema.names == [
        "id",
        "name",
        "w",
        "w_scales",
        "w_zero_points",
        "w_numel",
        "ints",
        "nested",
    ]
    assert q.column("w").to_pylist()[1] is None
    assert q.column("w_numel").to_pylist() == [2, None, 1]
    q.validate(full=True)
    d = fq.dequantize(q)
    d.validate(full=True)
    assert d.equals(batch)  # 2 values per group of 128: codes 0 and 15 reconstruct the extremes


def test_sliced_batch_gives_the_slice_answer():
    batch, tensors = layer_batch(lengths=(50, 60, 70, 80, 90))
    whole = fq.quantize(batch, bits=4, group_size=16)
    part = fq.quantize(batch.slice(2, 2), bits=4, group_size=16)
    part.validate(full=True)
    assert part.column("weights").equals(whole.column("weights").slice(2, 2))
    assert (
        part.column("weights_scales").to_pylist()
        == whole.column("weights_scales").slice(2, 2).to_pylist()
    )
    d = fq.dequantize(part)
    assert (
        d.column("weights").to_pylist()
        == fq.dequantize(whole).column("weights").slice(2, 2).to_pylist()
    )


def test_sliced_child_values():
    values = pa.array(np.arange(100, dtype=np.float32)).slice(10)
    arr = pa.ListArray.from_arrays(pa.array([0, 30, 90], pa.int32()), values)
    q = fq.quantize(pa.record_batch({"w": arr}), bits=8, group_size=8)
    back = fq.dequantize(q).column("w").to_pylist()
    assert np.abs(np.array(back[0]) - np.arange(10, 40)).max() <= 0.02
    assert np.abs(np.array(back[1]) - np.arange(40, 100)).max() <= 0.02


def test_zero_points_stored_apart_from_scales_decode_the_same():
    """Another writer may lay out the zero points at other offsets than the scales (or
    slice them differently); the decoder must follow each column's own offsets."""
    batch, _ = layer_batch(lengths=(50, 0, 70, 9))
    q = fq.quantize(batch, bits=4, group_size=8)
    want = fq.dequantize(q).column("weights")
    i = q.schema.get_field_index("weights_zero_points")
    zp = q.column(i)
    child = pa.concat_arrays([pa.array([123.0, -5.0], pa.float32()), zp.values])
    moved = pa.ListArray.from_arrays(pa.array(zp.offsets.to_numpy() + 2, pa.int32()), child)
    q_moved = q.set_column(i, q.schema.field(i), moved)
    assert fq.dequantize(q_moved).column("weights").equals(want)
    # zero points whose child is shorter than the scales' child (sliced differently)
    scales_i = q.schema.get_field_index("weights_scales")
    s = q.column(scales_i)
    padded = pa.ListArray.from_arrays(
        s.offsets, pa.concat_arrays([s.values, pa.array([7.0] * 5, pa.float32())])
    )
    q_long = q.set_column(scales_i, q.schema.field(scales_i), padded)
    assert fq.dequantize(q_long).column("weights").equals(want)


def test_empty_batch_and_zero_length_tensors():
    batch, _ = layer_batch(lengths=())
    q = fq.quantize(batch)
    assert q.num_rows == 0 and "weights_scales" in q.schema.names
    assert fq.dequantize(q).schema.equals(batch.schema)
    batch, _ = layer_batch(lengths=(0, 0, 1))
    q = fq.quantize(batch, bits=2)
    assert q.column("weights").to_pylist() == [b"", b"", q.column("weights")[2].as_py()]
    assert q.column("weights_scales").to_pylist()[:2] == [[], []]
    back = fq.dequantize(q).column("weights").to_pylist()
    assert back[:2] == [[], []] and len(back[2]) == 1


def test_table_many_chunks_iterable_and_large_inputs():
    batches = [layer_batch(lengths=[64] * 120, seed=s)[0] for s in range(3)]
    table = pa.Table.from_batches(batches)
    q = fq.quantize(table, bits=4, group_size=32)
    assert isinstance(q, pa.Table) and q.num_rows == 360
    it = fq.quantize(iter(batches), bits=4, group_size=32)
    assert not isinstance(it, (list, pa.Table))
    assert pa.Table.from_batches(list(it)).equals(q)
    big, (t,) = layer_batch(lengths=(1 << 20,))
    d = fq.dequantize(fq.quantize(big, bits=8))
    assert np.abs(np.asarray(d.column("weights")[0].values) - t).max() < 0.05


def test_stats_columns():
    batch, tensors = layer_batch(lengths=(256, 0, 100))
    q = fq.quantize(batch, bits=4, group_size=64, stats=True)
    d = fq.dequantize(q)
    for t, back, mse, mx in zip(
        tensors,
        as_lists(d.column("weights")),
        q.column("weights_mse").to_pylist(),
        q.column("weights_max_abs_error").to_pylist(),
    ):
        err = back.astype(np.float64) - t
        assert mse == pytest.approx(float(np.mean(err**2)) if t.size else 0.0, rel=1e-9)
        assert mx == pytest.approx(float(np.abs(err).max(initial=0)), rel=1e-9)
    out, info = codec.quantize_batch(
        batch, QuantOptions.from_mapping({"stats": True, "group_size": 64})
    )
    assert info.sse == pytest.approx(
        sum(
            float(np.sum((b.astype(np.float64) - t) ** 2))
            for t, b in zip(tensors, as_lists(d.column("weights")))
        ),
        rel=1e-9,
    )
    assert info.elements == 356 and info.rows == 3 and info.output_bytes < info.input_bytes


def test_columns_option_and_clip():
    rng = np.random.default_rng(5)
    a = pa.array([rng.standard_normal(40).astype(np.float32) * 10], pa.list_(pa.float32()))
    batch = pa.record_batch({"a": a, "b": a})
    q = fq.quantize(batch, columns=["b"], clip=6.0, bits=8)
    assert q.column("a").equals(a) and q.schema.field("b").type == pa.binary()
    assert q.schema.field("b").metadata[b"flightquant.clip"] == b"6.0"
    back = np.array(fq.dequantize(q).column("b")[0].as_py())
    assert back.max() <= 6.0 + 1e-5 and back.min() >= -6.0 - 1e-5


# ---------------------------------------------------------------------------------------
# errors


def test_nan_names_column_row_key_and_element():
    batch, tensors = layer_batch(lengths=(10, 20, 30))
    vals = np.concatenate(tensors)
    vals[10 + 7] = np.inf
    arr = pa.ListArray.from_arrays(pa.array([0, 10, 30, 60], pa.int32()), pa.array(vals))
    batch = batch.set_column(1, "weights", arr)
    with pytest.raises(
        fq.NonFiniteError, match=r"'weights', row 1 \('layer\.1\.weight'\), element 7"
    ) as e:
        fq.quantize(batch)
    assert isinstance(e.value, ValueError) and e.value.row == 1 and e.value.element == 7


def test_null_element_inside_a_list_is_an_error():
    arr = pa.array([[1.0, None, 3.0]], pa.list_(pa.float32()))
    with pytest.raises(fq.CodecError, match=r"null element in column 'w', row 0, element 1"):
        fq.quantize(pa.record_batch({"w": arr}))


@pytest.mark.parametrize(
    "column,match",
    [
        ("ints", r"column 'ints' has type list<item: int32>.*float16, float32 or float64"),
        (
            "missing",
            r"column 'missing' named in 'columns' is not in the batch; its columns are: 'w', 'ints'",
        ),
    ],
)
def test_bad_columns(column, match):
    batch = pa.record_batch(
        {
            "w": pa.array([[1.0]], pa.list_(pa.float32())),
            "ints": pa.array([[1]], pa.list_(pa.int32())),
        }
    )
    with pytest.raises(fq.CodecError, match=match):
        fq.quantize(batch, columns=[column])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 3}, r"bits must be one of 2, 4, 8, got 3"),
        ({"scheme": "nf4"}, r"scheme must be one of 'asymmetric', 'symmetric', 'ternary'"),
        ({"group_size": 0}, r"group_size must be an integer from 1"),
        ({"method": "gptq"}, r"method must be one of 'rtn', 'mse'"),
        ({"clip": -1.0}, r"clip must be a positive finite number"),
        ({"scheme": "ternary", "bits": 4}, r"ternary codes .* always stored in 2 bits"),
        ({"stats": "yes"}, r"stats must be true or false"),
    ],
)
def test_bad_options_fail_before_any_work(kwargs, match):
    with pytest.raises(fq.OptionsError, match=match):
        fq.quantize(object(), **kwargs)  # validated before the data is even looked at


def test_unknown_option_and_json_errors():
    with pytest.raises(fq.OptionsError, match=r"unknown option\(s\) 'bitz'; valid options are"):
        QuantOptions.from_json(b'{"bitz": 4}')
    with pytest.raises(fq.OptionsError, match="must be a JSON object of options"):
        QuantOptions.from_json(b"bits=4")
    with pytest.raises(fq.OptionsError, match="must be a JSON object"):
        QuantOptions.from_json(b"[4]")
    assert QuantOptions.from_json(b"") == QuantOptions()
    opts = QuantOptions.from_mapping({"bits": 8, "columns": ["w"], "clip": 2})
    assert QuantOptions.from_json(opts.to_json()) == opts


def test_duplicate_output_column_is_refused():
    batch = pa.record_batch({"w": pa.array([[1.0]], pa.list_(pa.float32())), "w_scales": [1]})
    with pytest.raises(fq.CodecError, match="duplicate column"):
        fq.quantize(batch)


def test_wrong_container_type():
    with pytest.raises(TypeError, match="quantize_arrays"):
        fq.quantize({"w": np.zeros(3)})


# ---------------------------------------------------------------------------------------
# zero copy


class _TracedEngine:
    """An engine plan whose runs report the address each quantize kernel read from."""

    def __init__(self, engine, seen: list):
        self.engine, self.seen = engine, seen

    def run(self, batch, n_threads):
        return self.engine.run(batch, n_threads, self.seen)


def test_zero_copy_input(monkeypatch):
    batch, _ = layer_batch(lengths=[1 << 18] * 4)  # 4 MiB of float32
    seen = []
    real = kernels.quantize_rows
    real_plan = codec._quantize_plan

    def spy(values, *args, **kwargs):
        seen.append(values.__array_interface__["data"][0])
        return real(values, *args, **kwargs)

    def traced_plan(schema, options):
        plan = real_plan(schema, options)
        return dataclasses.replace(plan, engine=_TracedEngine(plan.engine, seen))

    monkeypatch.setattr(kernels, "quantize_rows", spy)
    monkeypatch.setattr(codec, "_quantize_plan", traced_plan)
    child = batch.column("weights").values
    fq.quantize(batch, bits=4)
    # one kernel call, on the Arrow buffer itself (the one-call path reports its address)
    assert seen == [child.buffers()[1].address]

    monkeypatch.setattr(kernels, "quantize_rows", real)
    monkeypatch.setattr(codec, "_quantize_plan", real_plan)
    fq.quantize(batch, bits=4)  # warm up lazy imports and caches
    tracemalloc.start()
    try:
        fq.quantize(batch, bits=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    input_bytes = 4 * (1 << 18) * 4
    # codes are 1/8 of the input, scales+zero points 1/64: nothing near a copy of the input
    assert peak < input_bytes // 4, peak


# ---------------------------------------------------------------------------------------
# dicts of arrays


def test_quantize_arrays_round_trip_shapes_and_dtypes():
    rng = np.random.default_rng(9)
    arrays = {
        "a": rng.standard_normal((32, 48)).astype(np.float32),
        "b": rng.standard_normal(100).astype(np.float16),
        "c": rng.standard_normal((4, 5, 6)).astype(np.float64)[:, ::2],  # non-contiguous
        "d": np.full((), 3.5, np.float32),
        "e": np.zeros((0, 3), np.float32),
    }
    res = fq.quantize_arrays(arrays, bits=8, group_size=32)
    assert list(res) == list(arrays)
    back = fq.dequantize_arrays(res)
    for k, v in arrays.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert np.allclose(back[k], v, atol=0.05), k
    assert res["a"].scales.shape == (48,) and res["a"].zero_points.shape == (48,)
    assert res["a"].nbytes < arrays["a"].nbytes
    assert fq.quantize_arrays({}) == {}


def test_quantize_arrays_errors_name_the_array():
    with pytest.raises(TypeError, match=r"array 'ids' has dtype int64.*astype\(numpy.float32\)"):
        fq.quantize_arrays({"ids": np.arange(3)})
    with pytest.raises(TypeError, match=r"array 'l' is a list, not a numpy.ndarray"):
        fq.quantize_arrays({"l": [1.0, 2.0]})
    x = np.ones(10, np.float32)
    x[4] = np.nan
    with pytest.raises(fq.NonFiniteError, match=r"in array 'bad' at index \(1, 4\), element 9"):
        fq.quantize_arrays({"ok": np.ones(3, np.float32), "bad": x.reshape(2, 5)[::-1]})


def test_quantize_arrays_equals_quantize():
    rng = np.random.default_rng(2)
    arrays = {f"l{i}": rng.standard_normal(300).astype(np.float32) for i in range(5)}
    res = fq.quantize_arrays(arrays, bits=4, scheme="symmetric", group_size=64)
    batch, _ = layer_batch(lengths=(300,), seed=0)
    for name, t in arrays.items():
        b = pa.record_batch(
            {"layer_name": [name], "weights": pa.array([t], pa.list_(pa.float32()))}
        )
        q = fq.quantize(b, bits=4, scheme="symmetric", group_size=64)
        assert q.column("weights")[0].as_py() == res[name].codes.tobytes()
        assert q.column("weights_scales")[0].values.to_numpy().tolist() == res[name].scales.tolist()


# ---------------------------------------------------------------------------------------
# damaged quantized batches are refused, never passed through silently


def _strip_key(batch, column, key):
    field = batch.schema.field(column)
    md = {k: v for k, v in field.metadata.items() if k != key}
    return batch.cast(
        batch.schema.set(batch.schema.get_field_index(column), field.with_metadata(md))
    )


@pytest.mark.parametrize(
    "key,match",
    [
        (b"flightquant.format_version", "lacks metadata key 'flightquant.format_version'"),
        (b"flightquant.role", "lacks flightquant.role='codes'"),
        (b"flightquant.bits", "lacks metadata key 'flightquant.bits'"),
    ],
)
def test_damaged_codes_metadata_is_an_error(key, match):
    q = fq.quantize(layer_batch()[0])
    with pytest.raises(fq.CodecError, match=match):
        fq.dequantize(_strip_key(q, "weights", key))


def test_orphan_derived_column_and_bad_nullable_are_errors():
    q = fq.quantize(layer_batch()[0])
    with pytest.raises(
        fq.CodecError,
        match="'weights_scales' holds flightquant scales of quantized column 'weights', which is not in the batch",
    ):
        fq.dequantize(q.drop_columns(["weights"]))
    field = q.schema.field("weights")
    bad = field.with_metadata({**field.metadata, b"flightquant.value_nullable": b"maybe"})
    with pytest.raises(fq.CodecError, match="value_nullable"):
        fq.dequantize(q.cast(q.schema.set(1, bad)))


def test_in_process_progress_rises_to_exactly_one_and_survives_a_failing_callback(caplog):
    batches = [layer_batch(lengths=(64, 3), seed=i)[0] for i in range(3)]
    table = pa.Table.from_batches(batches)
    seen = []
    fq.quantize(table, bits=4, progress=lambda label, f: seen.append((label, f)))
    assert [f for _, f in seen] == [i / 6 for i in range(1, 7)]  # one call per row
    keys = [k for b in batches for k in b.column(0).to_pylist()]
    assert [label for label, _ in seen] == keys  # each row's key
    seen.clear()
    list(fq.quantize(iter(batches), bits=4, progress=lambda label, f: seen.append(f)))
    assert seen == [None] * 6 + [1.0]  # unknown total: 1.0 once at the end
    seen.clear()
    fq.dequantize(fq.quantize(batches[0], bits=4), progress=lambda label, f: seen.append(f))
    assert seen == [0.5, 1.0]  # the batch's two rows
    seen.clear()
    arrays = {f"w{i}": np.ones((4, 8), np.float32) * i for i in range(3)}
    fq.quantize_arrays(arrays, bits=8, progress=lambda label, f: seen.append((label, f)))
    assert seen == [("w0", 1 / 3), ("w1", 2 / 3), ("w2", 1.0)]

    def broken(label, fraction):
        raise RuntimeError("callback bug")

    out = fq.quantize(table, bits=4, progress=broken)  # logged once, never breaks the work
    assert out.equals(fq.quantize(table, bits=4))
    assert "progress callback raised" in caplog.text
