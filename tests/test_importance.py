"""Importance (issue 19) through the codec, the Python API and Flight: a column
``c_importance`` (one float32 vector of k weights per row) is validated by the engine,
consumed (never in the output) and weighs the quantization of ``c``'s rows of k."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest
from common import unaligned

import flightquant as fq
from flightquant import budget, codec, kernels, reference
from flightquant.client import Client
from flightquant.options import OptionsError, QuantOptions


def _realistic(rows: int, n: int, seed: int) -> np.ndarray:
    """Heavy-tailed (student-t) weights, each row scaled differently."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, (rows, n)) * rng.lognormal(-3, 0.5, (rows, 1))
    return x.astype(np.float32)


def _importance(k: int, seed: int, zeros: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0, 1.5, k).astype(np.float32)
    w[rng.choice(k, zeros, replace=False)] = 0
    return w


def _batch(xs, ws, kind="list", imp_type=None) -> pa.RecordBatch:
    n = max(len(x) for x in xs if x is not None)
    t = {
        "list": pa.list_(pa.float32()),
        "large_list": pa.large_list(pa.float32()),
        "fixed_size_list": pa.list_(pa.float32(), n),
    }[kind]
    kmax = max((len(w) for w in ws if w is not None), default=1)
    it = (
        imp_type
        or {
            "list": pa.list_(pa.float32()),
            "large_list": pa.large_list(pa.float32()),
            "fixed_size_list": pa.list_(pa.float32(), kmax),
        }[kind]
    )
    return pa.record_batch(
        {
            "layer_name": [f"blk.{i}.ffn_up.weight" for i in range(len(xs))],
            "w": pa.array(xs, t),
            "step": pa.array(np.arange(len(xs), dtype=np.int64)),
            "w_importance": pa.array(ws, it),
        }
    )


def _q(batch, **opts):
    return codec.quantize_batch(batch, QuantOptions.from_mapping(opts), threads=2)[0]


# --------------------------------------------------------------------------- native kernel


@pytest.mark.parametrize("scheme,bits", [("asymmetric", 4), ("asymmetric", 2), ("symmetric", 8),
                                         ("symmetric", 4), ("ternary", 2)])  # fmt: skip
@pytest.mark.parametrize("group_size", [7, 64, 600])
def test_weighted_mse_kernel_equals_reference(scheme, bits, group_size, mse_isa):
    k = 24
    lens = [240, 0, 48, 1200]
    rng = np.random.default_rng(group_size)
    vals = (rng.standard_t(3, sum(lens)) * 0.1).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    imps = [_importance(k, 1), None, np.zeros(k, np.float32), _importance(k, 2, zeros=0)]
    want = reference.quantize_rows(
        vals, starts, lens, bits=bits, scheme=scheme, group_size=group_size, method="mse",
        importance=imps,
    )  # fmt: skip
    for threads in (1, 2):
        got = kernels.quantize_rows(
            vals, starts, lens, bits=bits, scheme=scheme, group_size=group_size, method="mse",
            importance=imps, threads=threads,
        )  # fmt: skip
        assert got.codes.tobytes() == want.codes.tobytes()
        assert got.scales.tobytes() == want.scales.tobytes()
        if scheme == "asymmetric":
            assert got.zero_points.tobytes() == want.zero_points.tobytes()
    plain = reference.quantize_rows(
        vals, starts, lens, bits=bits, scheme=scheme, group_size=group_size, method="mse"
    )
    # the weights change the search; rows without importance are plain mse
    assert plain.codes.tobytes() != want.codes.tobytes()


def _weighted_sse(x, x_hat, w):
    d = (x_hat.astype(np.float64) - x.astype(np.float64)).reshape(-1)
    return float((np.tile(w, x.size // w.size).astype(np.float64) * d * d).sum())


@pytest.mark.parametrize("scheme,bits,group_size", [("asymmetric", 4, 128),
                                                    ("asymmetric", 2, 32),
                                                    ("symmetric", 4, 64)])  # fmt: skip
def test_weighted_mse_lowers_the_weighted_error(scheme, bits, group_size):
    k = 512
    x = _realistic(16, k, seed=3)
    w = _importance(k, 4, zeros=0)
    opts = {"bits": bits, "scheme": scheme, "group_size": group_size}
    plain = fq.quantize_arrays({"x": x}, method="mse", **opts)["x"].dequantize()
    rtn = fq.quantize_arrays({"x": x}, **opts)["x"].dequantize()
    weighted = fq.quantize_arrays({"x": x}, importance={"x": w}, method="mse", **opts)["x"]
    xw = weighted.dequantize()
    e_plain, e_rtn, e_w = (_weighted_sse(x, y, w) for y in (plain, rtn, xw))
    assert e_w < e_plain < e_rtn
    assert 10 * np.log10(e_plain / e_w) > 0.3  # dB: a real gain, not noise
    # never worse than rtn on any group, in the weighted error
    gs = group_size
    d_w = ((xw - x).astype(np.float64) ** 2 * w).reshape(-1, gs).sum(1)
    d_r = ((rtn - x).astype(np.float64) ** 2 * w).reshape(-1, gs).sum(1)
    assert (d_w <= d_r * (1 + 1e-12)).all()


# --------------------------------------------------------------------------- the codec


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K", "TQ2_0"])
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_ggml_engine_passes_importance_per_row(fmt, method):
    k = 512
    x = _realistic(4, 2 * k, seed=5)
    ws = [_importance(k, 6), None, _importance(k, 7), _importance(k, 8)]
    xs = list(x)
    xs[3] = None  # a null tensor row with importance: stays null
    for kind in ("list", "large_list", "fixed_size_list"):
        b = _batch(xs, ws, kind)
        for batch in (b, unaligned(b)):
            out = _q(batch, format=fmt, method=method)
            assert out.schema.names == ["layer_name", "w", "step"]
            for r in range(3):
                want = kernels.quantize_ggml(x[r], fmt, method, importance=ws[r], threads=1)
                assert out.column("w")[r].as_py() == want.tobytes(), (kind, r)
            assert not out.column("w")[3].is_valid


@pytest.mark.parametrize("kind", ["list", "large_list", "fixed_size_list"])
def test_native_engine_weighs_mse_per_row(kind):
    k = 64
    x = _realistic(3, 4 * k, seed=9)
    ws = [_importance(k, 10), None, _importance(k, 11)]
    b = _batch(list(x), ws, kind)
    lens = [x.shape[1]] * 3
    starts = np.arange(3) * x.shape[1]
    want = reference.quantize_rows(
        x.ravel(), starts, lens, bits=4, group_size=32, method="mse", importance=ws
    )
    for batch in (b, unaligned(b)):
        out = _q(batch, bits=4, group_size=32, method="mse")
        assert "w_importance" not in out.schema.names
        codes = b"".join(out.column("w")[r].as_py() for r in range(3))
        scales = np.concatenate([out.column("w_scales")[r].values.to_numpy() for r in range(3)])
        assert codes == want.codes.tobytes()
        assert scales.tobytes() == want.scales.tobytes()


@pytest.mark.parametrize("kind", ["list", "large_list", "fixed_size_list"])
def test_sliced_batches_read_their_own_importance_rows(kind):
    x = _realistic(4, 512, seed=13)
    b = _batch(list(x), [_importance(512, i) for i in range(4)], kind)
    for opts in ({"format": "Q4_K"}, {"method": "mse"}):
        assert _q(b.slice(1, 2), **opts).equals(_q(b, **opts).slice(1, 2))


@pytest.mark.parametrize("opts", [{"format": "Q4_K"}, {"format": "Q4_0", "method": "mse"},
                                  {"method": "mse", "bits": 2, "group_size": 16}])  # fmt: skip
def test_null_importance_is_no_importance(opts):
    x = _realistic(2, 512, seed=12)
    with_col = _batch(list(x), [None, None])
    without = with_col.drop_columns(["w_importance"])
    assert _q(with_col, **opts).equals(_q(without, **opts))


def test_importance_column_is_never_quantized_nor_passed():
    x = _realistic(1, 256, seed=1)
    b = _batch(list(x), [_importance(256, 1)])
    out = _q(b, format="Q4_0")
    assert out.schema.names == ["layer_name", "w", "step"]
    with pytest.raises(fq.CodecError, match="importance of column 'w'"):
        _q(b, format="Q4_0", columns=["w", "w_importance"])
    # a tensor left out by 'columns' leaves its importance column as it is
    out = _q(b.append_column("v", pa.array([[1.0] * 4], pa.list_(pa.float32()))), columns=["v"])
    assert out.column("w_importance").equals(b.column("w_importance"))


def _error(batch, **opts) -> str:
    with pytest.raises((fq.CodecError, OptionsError)) as info:
        _q(batch, **opts)
    return str(info.value)


def test_bad_importance_is_an_error_naming_the_row_and_its_key():
    x = list(_realistic(2, 512, seed=2))
    good = _importance(256, 3)
    for opts in ({"format": "Q4_K"}, {"method": "mse"}):
        neg = good.copy()
        neg[7] = -1
        m = _error(_batch(x, [good, neg]), **opts)
        assert "row 1 ('blk.1.ffn_up.weight')" in m and "-1.0 at element 7" in m
        nan = good.copy()
        nan[9] = np.nan
        assert "nan at element 9" in _error(_batch(x, [nan, good]), **opts)
        m = _error(_batch(x, [good, np.ones(100, np.float32)]), **opts)
        assert "row 1" in m and "100 weights" in m and "512 elements" in m
        m = _error(_batch(x, [np.zeros(0, np.float32), good]), **opts)
        assert "row 0" in m and "0 weights" in m
        holes = pa.array([good.tolist(), [1.0] * 5 + [None] + [1.0] * 250], pa.list_(pa.float32()))
        m = _error(_batch(x, [good, good]).set_column(3, "w_importance", holes), **opts)
        assert "a null at element 5" in m and "blk.1" in m
        m = _error(_batch(x, [good, good], imp_type=pa.list_(pa.float64())), **opts)
        assert "'w_importance'" in m and "float32" in m
    # ggml: k a multiple of the block size
    m = _error(_batch(x, [np.ones(128, np.float32), good]), format="Q4_K")
    assert "block size 256" in m
    # native rtn has no weighted form
    m = _error(_batch(x, [good, good]))
    assert "method='mse'" in m and "'w'" in m


def test_output_bound_counts_the_importance_column_as_read_in_place():
    x = list(_realistic(4, 4096, seed=2))
    b = _batch(x, [_importance(4096, 1)] * 4)
    opts = QuantOptions.from_mapping({"format": "Q4_K"})
    with_imp = budget.output_bound(b, opts)
    without = budget.output_bound(b.drop_columns(["w_importance"]), opts)
    # more than nothing, far less than quantizing it (its data is 64 KiB)
    assert without < with_imp <= without + 4 * 4 * 4096 + 4 * 64


# --------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize("opts", [{"format": "Q4_K"}, {"format": "Q5_0", "method": "mse"},
                                  {"method": "mse", "group_size": 64}])  # fmt: skip
def test_quantize_arrays_importance_2d(opts):
    x = _realistic(8, 256, seed=4)
    w = _importance(256, 5)
    arrays = {"a": x, "b": x[:2].copy()}
    got = fq.quantize_arrays(arrays, importance={"a": w}, **opts)
    plain = fq.quantize_arrays(arrays, **opts)
    assert got["b"].codes.tobytes() == plain["b"].codes.tobytes()  # no importance: as before
    fmt = opts.get("format")
    if fmt:
        want = kernels.quantize_ggml(x.ravel(), fmt, opts.get("method", "rtn"), importance=w)
        assert got["a"].codes.tobytes() == want.tobytes()
    else:
        want = reference.quantize_rows(
            x.ravel(), [0], [x.size], group_size=64, method="mse", importance=[w]
        )
        assert got["a"].codes.tobytes() == want.codes.tobytes()
        assert got["a"].scales.tobytes() == want.scales.tobytes()
        assert got["a"].codes.tobytes() != plain["a"].codes.tobytes()
    assert got["a"].dequantize().shape == (8, 256)


def test_quantize_arrays_bad_importance_names_the_array():
    x = {"blk.3.attn_q.weight": _realistic(2, 256, seed=1)}
    name = "blk.3.attn_q.weight"
    for bad, what in (
        (np.ones(128, np.float32), "128 weights"),
        (np.full(256, -1.0, np.float32), "non-negative"),
        (np.full(256, np.nan, np.float32), "non-negative"),
        (np.ones((2, 256), np.float32), "1-D"),
        ("heavy", "1-D"),
    ):
        with pytest.raises(ValueError, match=what) as info:
            fq.quantize_arrays(x, importance={name: bad}, format="Q4_K")
        assert name in str(info.value)
    with pytest.raises(ValueError, match="not in arrays: 'other'"):
        fq.quantize_arrays(x, importance={"other": np.ones(256)}, format="Q4_K")
    with pytest.raises(OptionsError, match="method='mse'"):
        fq.quantize_arrays(x, importance={name: np.ones(256)})


def test_quantize_table_importance_dict_equals_column():
    x = _realistic(3, 512, seed=6)
    ws = [_importance(512, 1), None, _importance(256, 2)]
    with_col = _batch(list(x), ws)
    table = pa.Table.from_batches([with_col.drop_columns(["w_importance"])])
    by_key = {f"blk.{i}.ffn_up.weight": w for i, w in enumerate(ws) if w is not None}
    for opts in ({"format": "Q4_K"}, {"method": "mse"}):
        got = fq.quantize(table, importance=by_key, **opts)
        want = fq.quantize(pa.Table.from_batches([with_col]), **opts)
        assert got.equals(want)
    with pytest.raises(ValueError, match="not in the data's column 'layer_name': 'nope'"):
        fq.quantize(table, importance={"nope": np.ones(512)}, format="Q4_K")
    with pytest.raises(ValueError, match="not both"):
        fq.quantize(pa.Table.from_batches([with_col]), importance=by_key, format="Q4_K")


# --------------------------------------------------------------------------- over Flight


def test_importance_through_a_server_equals_in_process(server):
    s = server()
    arrays = {"a": _realistic(4, 512, seed=7), "b": _realistic(2, 256, seed=8)}
    imp = {"a": _importance(512, 9)}
    x = _realistic(3, 512, seed=10)
    ws = [_importance(512, 11), None, _importance(256, 12)]
    batch = _batch(list(x), ws)
    with Client(s.location) as client:
        for opts in ({"format": "Q4_K"}, {"format": "Q4_0", "method": "mse"},
                     {"method": "mse", "bits": 4, "group_size": 32}):  # fmt: skip
            got = client.quantize_arrays(arrays, importance=imp, **opts)
            want = fq.quantize_arrays(arrays, importance=imp, **opts)
            for name in arrays:
                assert got[name].codes.tobytes() == want[name].codes.tobytes()
                assert got[name].scales.tobytes() == want[name].scales.tobytes()
            out = client.quantize(batch, **opts)
            assert "w_importance" not in out.schema.names
            assert out.equals(fq.quantize(batch, **opts))
            table = pa.Table.from_batches([batch.drop_columns(["w_importance"])])
            keyed = {f"blk.{i}.ffn_up.weight": w for i, w in enumerate(ws) if w is not None}
            assert client.quantize(table, importance=keyed, **opts).equals(
                fq.quantize(pa.Table.from_batches([batch]), **opts)
            )


def test_bad_importance_over_flight_is_invalid_argument_naming_the_tensor(server):
    s = server()
    x = _realistic(2, 512, seed=1)
    bad = _importance(512, 2)
    bad[11] = -3.0
    batch = _batch(list(x), [None, bad])
    with Client(s.location) as client:
        for opts in ({"format": "Q4_K"}, {"method": "mse"}):
            with pytest.raises(pa.ArrowInvalid) as info:
                client.quantize(batch, **opts)
            message = str(info.value)
            assert "blk.1.ffn_up.weight" in message and "element 11" in message
            assert "Traceback" not in message
        with pytest.raises(pa.ArrowInvalid, match="method='mse'"):
            client.quantize(batch.set_column(3, "w_importance", pa.array([None, None],
                                                                          pa.list_(pa.float32()))))  # fmt: skip
        with pytest.raises(ValueError, match="'blk.9'"):
            client.quantize_arrays({"blk.9": x}, importance={"blk.9": bad}, format="Q4_K")
    # a stream is counted when its handler ends, which may be just after the client saw
    # the error
    deadline = time.monotonic() + 10
    while s.stats()["errors"]["invalid_argument"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.stats()["errors"]["invalid_argument"] >= 3
