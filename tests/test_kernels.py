"""The Cython kernels against the NumPy reference (bit for bit), plus properties and edges.

Run: ``python -m pytest tests/test_kernels.py -q``
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from common import mse_isas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightquant import _kernels, kernels, reference
from flightquant.errors import NonFiniteError
from flightquant.layout import make_layout

F32 = np.float32
SCHEME_BITS = [
    ("asymmetric", 2),
    ("asymmetric", 4),
    ("asymmetric", 8),
    ("symmetric", 2),
    ("symmetric", 4),
    ("symmetric", 8),
    ("ternary", 2),
]
# rows of varied lengths: empty, single element, tails around 32/128, and a few longer ones
RTN_LENS = [0, 1, 2, 5, 31, 32, 33, 127, 128, 129, 300, 0, 1000, 7, 64, 515, 3, 0, 250]
MSE_LENS = [0, 1, 5, 33, 129, 70, 3]  # the reference's mse is slow Python: keep it small
BIG_GROUP = 5000  # larger than every row above: one group per row


def _rows(lens, seed=0, scale=3.0, dtype=F32, gap=0):
    """Values for rows of the given lengths (``gap`` junk elements between rows)."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(lens, np.int64)
    starts = np.zeros(lens.size, np.int64)
    pos = gap
    for r, n in enumerate(lens.tolist()):
        starts[r] = pos
        pos += n + gap
    x = (rng.standard_normal(pos) * scale).astype(dtype)
    # a few exact repeats and zeros so ties and constant groups of 1-3 elements occur
    idx = np.arange(0, max(x.size - 1, 0), 17)
    x[idx] = x[idx + 1]
    x[5::101] = 0
    return x, starts, lens


def _assert_same(got, want, stats=False):
    assert got.layout.n_groups == want.layout.n_groups
    assert got.codes.dtype == np.uint8 and got.codes.tobytes() == want.codes.tobytes()
    assert got.scales.dtype == F32 and got.scales.tobytes() == want.scales.tobytes()
    if want.zero_points is None:
        assert got.zero_points is None
    else:
        assert got.zero_points.tobytes() == want.zero_points.tobytes()
    if stats:
        np.testing.assert_array_equal(got.group_sse, want.group_sse)
        np.testing.assert_array_equal(got.group_max_err, want.group_max_err)
    else:
        assert got.group_sse is None and got.group_max_err is None


def _roundtrip_same(q, scheme, **kw):
    got = kernels.dequantize_rows(q.codes, q.layout, q.scales, q.zero_points, scheme=scheme, **kw)
    want = reference.dequantize_rows(
        q.codes,
        q.layout,
        q.scales,
        q.zero_points,
        scheme=scheme,
        out_starts=kw.get("out_starts"),
        out_size=kw.get("out_size"),
    )
    assert got.dtype == F32 and got.tobytes() == want.tobytes()
    return got


# ---------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("group_size", [1, 3, 7, 32, 128, BIG_GROUP])
@pytest.mark.parametrize("scheme,bits", SCHEME_BITS)
def test_parity_rtn(scheme, bits, group_size, threads):
    x, starts, lens = _rows(RTN_LENS, seed=bits + group_size)
    kw = dict(bits=bits, scheme=scheme, group_size=group_size)
    got = kernels.quantize_rows(x, starts, lens, threads=threads, **kw)
    assert got.layout.n_blocks >= 2 * threads  # every thread really gets blocks
    _assert_same(got, reference.quantize_rows(x, starts, lens, **kw))
    _roundtrip_same(got, scheme, threads=threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("group_size", [1, 3, 7, 32, 128, BIG_GROUP])
@pytest.mark.parametrize("scheme,bits", SCHEME_BITS)
def test_parity_mse(scheme, bits, group_size, threads):
    x, starts, lens = _rows(MSE_LENS, seed=7 * bits + group_size)
    kw = dict(bits=bits, scheme=scheme, group_size=group_size, method="mse")
    got = kernels.quantize_rows(x, starts, lens, threads=threads, **kw)
    _assert_same(got, reference.quantize_rows(x, starts, lens, **kw))
    _roundtrip_same(got, scheme, threads=threads)


def test_mse_isa_default_is_the_best_available():
    names = mse_isas()
    assert "portable" in names
    assert _kernels.mse_isa() == names[-1]
    with pytest.raises(ValueError, match="mse_isa must be one of"):
        _kernels.mse_isa("avx9000")


@pytest.mark.parametrize(
    "clip,stats,dtype",
    [(None, False, np.float32), (1.5, True, np.float32), (None, True, np.float64)],
)
@pytest.mark.parametrize("group_size", [3, 33, 128, 1100])
@pytest.mark.parametrize("scheme,bits", SCHEME_BITS)
def test_parity_mse_every_isa(mse_isa, scheme, bits, group_size, clip, stats, dtype):
    # a 1100-element group is staged in three chunks (512, 512, 76) by the search
    x, starts, lens = _rows([1100, 33, 129, 5, 0, 64], seed=bits + group_size, dtype=dtype)
    if dtype == np.float64:  # values that do not round-trip through float32
        x = x + np.random.default_rng(2).standard_normal(x.size) * 1e-9
    kw = dict(bits=bits, scheme=scheme, group_size=group_size, method="mse", clip=clip, stats=stats)
    got = kernels.quantize_rows(x, starts, lens, threads=2, **kw)
    _assert_same(got, reference.quantize_rows(x, starts, lens, **kw), stats=stats)


@pytest.mark.parametrize(
    "scheme,bits,group_size",
    [("asymmetric", 4, 128), ("asymmetric", 2, 32), ("symmetric", 8, 64), ("ternary", 2, 64)],
)
def test_mse_isas_agree_on_heavy_tails(scheme, bits, group_size):
    # many groups of heavy-tailed data, with exact zeros and repeats: every isa, 1 and 2
    # threads, give the same bytes (the reference is too slow for this size)
    rng = np.random.default_rng(17)
    x = (rng.standard_t(2, 1 << 16) * np.exp(rng.uniform(-8, 8, 1 << 16))).astype(F32)
    x[::9] = 0
    x[1::13] = x[2::13]
    starts, lens = np.array([0, 1000]), np.array([1000, x.size - 1000])
    kw = dict(bits=bits, scheme=scheme, group_size=group_size, method="mse", stats=True)
    previous = _kernels.mse_isa()
    try:
        results = []
        for name in mse_isas():
            _kernels.mse_isa(name)
            results += [kernels.quantize_rows(x, starts, lens, threads=t, **kw) for t in (1, 2)]
    finally:
        _kernels.mse_isa(previous)
    for other in results[1:]:
        _assert_same(other, results[0], stats=True)
    rtn = kernels.quantize_rows(
        x, starts, lens, bits=bits, scheme=scheme, group_size=group_size, stats=True
    )
    assert (results[0].scales != rtn.scales).mean() > 0.3  # the search did move most groups


@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("group_size", [3, 32])
@pytest.mark.parametrize(
    "scheme,bits", [("asymmetric", 4), ("symmetric", 8), ("ternary", 2), ("asymmetric", 2)]
)
def test_parity_clip_and_stats(scheme, bits, group_size, clip, method):
    lens = MSE_LENS if method == "mse" else RTN_LENS
    x, starts, lens = _rows(lens, seed=3)
    kw = dict(bits=bits, scheme=scheme, group_size=group_size, method=method, clip=clip, stats=True)
    got = kernels.quantize_rows(x, starts, lens, threads=2, **kw)
    _assert_same(got, reference.quantize_rows(x, starts, lens, **kw), stats=True)
    plain = dict(kw, stats=False)
    _assert_same(
        kernels.quantize_rows(x, starts, lens, threads=2, **plain),
        reference.quantize_rows(x, starts, lens, **plain),
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("scheme,bits", [("asymmetric", 4), ("symmetric", 2), ("ternary", 2)])
def test_parity_input_dtypes(dtype, scheme, bits):
    x, starts, lens = _rows(RTN_LENS, seed=11, dtype=dtype, gap=3)
    if dtype == np.float64:  # values that do not round-trip through float32
        x = x + np.random.default_rng(1).standard_normal(x.size) * 1e-9
    kw = dict(bits=bits, scheme=scheme, group_size=32, stats=True)
    got = kernels.quantize_rows(x, starts, lens, threads=2, **kw)
    _assert_same(got, reference.quantize_rows(x, starts, lens, **kw), stats=True)


@pytest.mark.parametrize("dtype,itemsize", [(np.float32, 4), (np.float64, 8)])
@pytest.mark.parametrize("readonly", [False, True])
def test_unaligned_and_readonly_input(dtype, itemsize, readonly):
    x, starts, lens = _rows(RTN_LENS, seed=5, dtype=dtype)
    raw = bytearray(x.nbytes + 1)
    raw[1:] = x.tobytes()
    buf = bytes(raw) if readonly else raw
    view = np.frombuffer(buf, dtype, offset=1)  # at an odd byte address
    assert not view.flags.aligned and view.flags.writeable == (not readonly)
    kw = dict(bits=4, scheme="asymmetric", group_size=7, stats=True)
    got = kernels.quantize_rows(view, starts, lens, threads=2, **kw)
    _assert_same(got, reference.quantize_rows(x, starts, lens, **kw), stats=True)
    ro = x.copy()
    ro.flags.writeable = False
    _assert_same(
        kernels.quantize_rows(ro, starts, lens, **kw),
        reference.quantize_rows(x, starts, lens, **kw),
        stats=True,
    )


def test_non_contiguous_input():
    x, starts, lens = _rows(RTN_LENS, seed=6)
    strided = np.repeat(x, 2)[::2]
    assert not strided.flags.c_contiguous
    kw = dict(bits=8, scheme="symmetric", group_size=32)
    _assert_same(
        kernels.quantize_rows(strided, starts, lens, **kw),
        reference.quantize_rows(x, starts, lens, **kw),
    )


@pytest.mark.parametrize(
    "scheme,bits", [("asymmetric", 4), ("symmetric", 2), ("ternary", 2), ("asymmetric", 8)]
)
@pytest.mark.parametrize("group_size", [3, 32])
def test_parity_fixed_row_len(scheme, bits, group_size):
    L = 77
    lens = np.array([L, 0, L, L, 0, 0, L, L], np.int64)  # 0 = null row
    rng = np.random.default_rng(9)
    x = rng.standard_normal(L * lens.size).astype(F32)
    starts = np.arange(lens.size, dtype=np.int64) * L
    kw = dict(bits=bits, scheme=scheme, group_size=group_size, fixed_row_len=L, stats=True)
    got = kernels.quantize_rows(x, starts, lens, threads=2, **kw)
    _assert_same(got, reference.quantize_rows(x, starts, lens, **kw), stats=True)
    lay = got.layout
    for r in np.flatnonzero(lens == 0):  # null rows keep zeroed slots
        assert not got.codes[lay.code_offsets[r] : lay.code_offsets[r + 1]].any()
        assert not got.scales[lay.group_offsets[r] : lay.group_offsets[r + 1]].any()
    # dequantize into the fixed-stride output
    out_starts = np.arange(lens.size, dtype=np.int64) * L
    out = _roundtrip_same(got, scheme, out_starts=out_starts, out_size=L * lens.size)
    assert not out.reshape(lens.size, L)[lens == 0].any()


def test_threads_agnostic_large_input():
    rng = np.random.default_rng(42)
    lens = rng.integers(0, 3000, size=400).astype(np.int64)
    lens[::37] = 0
    lens[5] = 20000  # longer than one scratch chunk of codes
    x = (rng.standard_normal(int(lens.sum())) * rng.uniform(0.01, 100)).astype(F32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    for scheme, bits, gs in [
        ("asymmetric", 4, 128),
        ("symmetric", 2, 7),
        ("ternary", 2, 3),
        ("asymmetric", 8, 2**31 - 1),
    ]:
        kw = dict(bits=bits, scheme=scheme, group_size=gs, stats=True, clip=50.0)
        results = [kernels.quantize_rows(x, starts, lens, threads=t, **kw) for t in (1, 2, 3)]
        for other in results[1:]:
            _assert_same(other, results[0], stats=True)
        q = results[0]
        outs = [
            kernels.dequantize_rows(
                q.codes, q.layout, q.scales, q.zero_points, scheme=scheme, threads=t
            ).tobytes()
            for t in (1, 2, 3)
        ]
        assert outs[0] == outs[1] == outs[2]
    kw = dict(bits=4, scheme="asymmetric", group_size=128)
    _assert_same(
        kernels.quantize_rows(x, starts, lens, threads=2, **kw),
        reference.quantize_rows(x, starts, lens, **kw),
    )


@pytest.mark.parametrize("group_size", [128, 2**31 - 1])
def test_huge_row(group_size):
    n = 4 * 2**20 + 3
    x = np.random.default_rng(0).standard_normal(n).astype(F32)
    kw = dict(bits=4, scheme="asymmetric", group_size=group_size)
    got = kernels.quantize_rows(x, [0], [n], threads=2, **kw)
    _assert_same(got, reference.quantize_rows(x, [0], [n], **kw))
    out = kernels.dequantize_rows(
        got.codes, got.layout, got.scales, got.zero_points, scheme="asymmetric", threads=2
    )
    # (reference.dequantize_rows repeats scales group_size times: 8 GiB for 2**31-1)
    q = reference.unpack_codes(got.codes, 4, n).astype(F32)
    g = np.arange(n) // group_size
    want = (q - got.zero_points[g]) * got.scales[g]
    assert out.tobytes() == want.tobytes()


def test_empty_inputs():
    for lens in ([], [0, 0, 0]):
        q = kernels.quantize_rows(
            np.zeros(0, F32),
            [0] * len(lens),
            lens,
            bits=4,
            scheme="asymmetric",
            group_size=32,
            stats=True,
        )
        assert q.codes.size == 0 and q.scales.size == 0 and q.group_sse.size == 0
        out = kernels.dequantize_rows(
            q.codes, q.layout, q.scales, q.zero_points, scheme="asymmetric"
        )
        assert out.size == 0


@pytest.mark.parametrize("out_dtype", [np.float16, np.float32, np.float64])
def test_dequantize_out_dtype(out_dtype):
    x, starts, lens = _rows(RTN_LENS, seed=2)
    q = kernels.quantize_rows(x, starts, lens, bits=4, scheme="symmetric", group_size=32)
    f32 = kernels.dequantize_rows(q.codes, q.layout, q.scales, None, scheme="symmetric")
    out = kernels.dequantize_rows(
        q.codes, q.layout, q.scales, None, scheme="symmetric", out_dtype=out_dtype, threads=2
    )
    assert out.dtype == out_dtype and out.size == lens.sum()
    np.testing.assert_array_equal(out, f32.astype(out_dtype))


# ---------------------------------------------------------------------------------------
# properties

LIM = float(F32(1e30))
finite32 = st.floats(
    min_value=-LIM,
    max_value=LIM,
    width=32,
    allow_nan=False,
    allow_infinity=False,
    allow_subnormal=True,
)
rows_strategy = st.lists(st.lists(finite32, max_size=70), min_size=1, max_size=5)


def _flatten(rows):
    lens = np.array([len(r) for r in rows], np.int64)
    x = np.array([v for r in rows for v in r], F32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return x, starts, lens


def _unpack_rows(q):
    lay = q.layout
    out = []
    for r, n in enumerate(lay.row_lens.tolist()):
        nbytes = -(-n * lay.bits // 8)
        packed = q.codes[lay.code_offsets[r] : lay.code_offsets[r] + nbytes]
        codes = reference.unpack_codes(packed, lay.bits, n)
        # padding bits of the last byte are zero
        if n * lay.bits % 8:
            assert packed[-1] >> (n * lay.bits % 8) == 0
        out.append(codes)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=rows_strategy,
    bits=st.sampled_from([2, 4, 8]),
    scheme=st.sampled_from(["asymmetric", "symmetric"]),
    group_size=st.integers(1, 40),
    clip=st.one_of(st.none(), st.floats(1e-3, 1e3)),
    threads=st.sampled_from([1, 2]),
)
def test_property_rtn_error_bound(rows, bits, scheme, group_size, clip, threads):
    x, starts, lens = _flatten(rows)
    q = kernels.quantize_rows(
        x, starts, lens, bits=bits, scheme=scheme, group_size=group_size, clip=clip, threads=threads
    )
    x_hat = kernels.dequantize_rows(
        q.codes, q.layout, q.scales, q.zero_points, scheme=scheme, threads=threads
    )
    assert x_hat.size == x.size and x_hat.dtype == F32
    xc = x if clip is None else np.clip(x, -F32(clip), F32(clip))
    lay = q.layout
    for r, (s, n) in enumerate(zip(starts.tolist(), lens.tolist(), strict=True)):
        for g0 in range(0, n, group_size):
            sl = slice(s + g0, s + min(n, g0 + group_size))
            grp, orig, rec = xc[sl], x[sl], x_hat[sl]
            scale = float(q.scales[lay.group_offsets[r] + g0 // group_size])
            big = max(float(np.abs(grp).max()), float(np.abs(rec).max()))
            tol = scale / 2 + 8 * float(np.spacing(F32(big)))
            keep = grp == orig  # clipped elements are excluded
            err = np.abs(rec.astype(np.float64) - grp.astype(np.float64))
            assert (err[keep] <= tol).all(), (grp, rec, scale)


@settings(max_examples=100, deadline=None)
@given(
    rows=rows_strategy,
    scheme_bits=st.sampled_from(SCHEME_BITS),
    group_size=st.integers(1, 40),
    method=st.sampled_from(["rtn", "mse"]),
)
def test_property_codes_in_range_and_lengths(rows, scheme_bits, group_size, method):
    scheme, bits = scheme_bits
    x, starts, lens = _flatten(rows)
    q = kernels.quantize_rows(
        x, starts, lens, bits=bits, scheme=scheme, group_size=group_size, method=method, threads=2
    )
    lay = q.layout
    assert q.codes.size == int(np.sum(-(-lens * bits // 8)))
    assert q.scales.size == int(np.sum(-(-lens // group_size)))
    assert (q.scales >= 0).all() and np.isfinite(q.scales).all()
    for codes in _unpack_rows(q):
        if scheme == "asymmetric":
            assert codes.max(initial=0) <= 2**bits - 1
        elif scheme == "symmetric":
            assert codes.min(initial=1) >= 1  # the code 0 (-2**(b-1)) is never used
        else:
            assert codes.max(initial=0) <= 2
    out = kernels.dequantize_rows(q.codes, lay, q.scales, q.zero_points, scheme=scheme)
    assert out.size == lens.sum() and np.isfinite(out).all()


@settings(max_examples=100, deadline=None)
@given(
    value=finite32 | st.sampled_from([0.0, -0.0, 1e-45, -1e-45]),
    lens=st.lists(st.integers(0, 90), min_size=1, max_size=4),
    scheme_bits=st.sampled_from(SCHEME_BITS),
    group_size=st.integers(1, 50),
    method=st.sampled_from(["rtn", "mse"]),
)
def test_property_constant_groups_exact(value, lens, scheme_bits, group_size, method):
    scheme, bits = scheme_bits
    lens = np.array(lens, np.int64)
    x = np.full(int(lens.sum()), value, F32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    q = kernels.quantize_rows(
        x, starts, lens, bits=bits, scheme=scheme, group_size=group_size, method=method, stats=True
    )
    out = kernels.dequantize_rows(q.codes, q.layout, q.scales, q.zero_points, scheme=scheme)
    np.testing.assert_array_equal(out, x)  # -0.0 may come back as 0.0, which compares equal
    assert not q.group_sse.any() and not q.group_max_err.any()


# ---------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_non_finite_is_located(bad, dtype, threads):
    x, starts, lens = _rows(RTN_LENS, seed=4, dtype=dtype, gap=2)
    r1, e1, r2, e2 = 12, 700, 15, 3  # row 12 element 700 comes first
    x[starts[r2] + e2] = bad
    x[starts[r1] + e1] = bad
    x[starts[r1] + e1 + 5] = -bad
    x[starts[4] - 1] = np.nan  # in a gap between rows: never read
    for clip in (None, 1.0):  # the clamp must not hide an infinity
        with pytest.raises(NonFiniteError) as info:
            kernels.quantize_rows(
                x,
                starts,
                lens,
                bits=4,
                scheme="asymmetric",
                group_size=32,
                clip=clip,
                threads=threads,
            )
        assert (info.value.row, info.value.element) == (r1, e1)
        assert np.isnan(info.value.value) if np.isnan(bad) else info.value.value == bad


def test_float64_overflowing_float32_is_non_finite():
    x, starts, lens = _rows(RTN_LENS, seed=4, dtype=np.float64)
    x[starts[9] + 100] = 1e300
    x[starts[9] + 120] = -1e39
    with pytest.raises(NonFiniteError) as info:
        kernels.quantize_rows(x, starts, lens, bits=8, scheme="symmetric", group_size=128)
    assert (info.value.row, info.value.element, info.value.value) == (9, 100, 1e300)
    x[starts[9] + 100] = 3e38  # large but a float32
    with pytest.raises(NonFiniteError) as info:
        kernels.quantize_rows(x, starts, lens, bits=8, scheme="symmetric", group_size=128)
    assert (info.value.row, info.value.element, info.value.value) == (9, 120, -1e39)


def test_nan_outside_rows_is_ignored():
    x, starts, lens = _rows([5, 0, 9], gap=4)
    mask = np.ones(x.size, bool)
    for s, n in zip(starts, lens, strict=True):
        mask[s : s + n] = False
    x[mask] = np.nan
    kw = dict(bits=4, scheme="asymmetric", group_size=4)
    _assert_same(
        kernels.quantize_rows(x, starts, lens, **kw), reference.quantize_rows(x, starts, lens, **kw)
    )


def test_bad_arguments():
    x = np.ones(10, F32)
    with pytest.raises(ValueError, match="outside"):
        kernels.quantize_rows(x, [5], [6], bits=4, scheme="asymmetric", group_size=4)
    with pytest.raises(ValueError, match="outside"):
        kernels.quantize_rows(x, [-1], [2], bits=4, scheme="asymmetric", group_size=4)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantize_rows(x, [0], [4], bits=3, scheme="asymmetric", group_size=4)
    with pytest.raises(ValueError, match="scheme"):
        kernels.quantize_rows(x, [0], [4], bits=4, scheme="nf4", group_size=4)
    with pytest.raises(ValueError, match="method"):
        kernels.quantize_rows(x, [0], [4], bits=4, scheme="asymmetric", group_size=4, method="gptq")
    with pytest.raises(ValueError, match="group_size"):
        kernels.quantize_rows(x, [0], [4], bits=4, scheme="asymmetric", group_size=0)
    with pytest.raises(TypeError, match="float"):
        kernels.quantize_rows(
            np.ones(4, np.int32), [0], [4], bits=4, scheme="asymmetric", group_size=4
        )
    q = kernels.quantize_rows(x, [0], [10], bits=4, scheme="asymmetric", group_size=4)
    with pytest.raises(ValueError, match="zero_points"):
        kernels.dequantize_rows(q.codes, q.layout, q.scales, None, scheme="asymmetric")
    with pytest.raises(ValueError, match="outside"):
        kernels.dequantize_rows(
            q.codes,
            q.layout,
            q.scales,
            q.zero_points,
            scheme="asymmetric",
            out_starts=[3],
            out_size=12,
        )
    with pytest.raises(ValueError, match="codes"):
        kernels.dequantize_rows(q.codes[:2], q.layout, q.scales, q.zero_points, scheme="asymmetric")


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.5, "2"])
def test_resolve_threads_rejects(bad):
    with pytest.raises(ValueError, match="threads"):
        kernels.resolve_threads(bad)


def test_resolve_threads_values():
    assert kernels.resolve_threads(None) == len(os.sched_getaffinity(0))
    assert kernels.resolve_threads(3) == 3
    assert kernels.resolve_threads(np.int64(2)) == 2
    with pytest.raises(ValueError):
        kernels.quantize_rows(
            np.ones(4, F32), [0], [4], bits=4, scheme="asymmetric", group_size=4, threads=0
        )


def test_build_info_reports_the_build():
    from flightquant import _kernels

    info = kernels.build_info()
    assert info["backend"] == "cython" and isinstance(info["version"], str)
    assert info["max_threads"] >= 1
    with open(_kernels.__file__, "rb") as f:
        binary = f.read()
    linked_openmp = b"GOMP_parallel" in binary or b"__kmpc_fork_call" in binary
    assert info["openmp"] is linked_openmp
    if os.environ.get("FLIGHTQUANT_NO_OPENMP", "") == "1":
        assert info["openmp"] is False and info["max_threads"] == 1


def test_layout_blocks_start_on_bytes():
    # the kernels' thread safety rests on this: no two blocks share a byte
    for bits in (2, 4, 8):
        for gs in (1, 3, 5, 7, 32, 33):
            lay = make_layout(np.array([0, 1, 100, 33]), bits, gs)
            assert (gs * lay.groups_per_block * bits) % 8 == 0


@pytest.mark.parametrize("group_size", [4, 64, 300])
def test_signed_zero_minimum(group_size):
    # a minimum that ties +0.0 and -0.0 counts as +0.0 in both implementations (NumPy's own
    # min picks by SIMD lane in long arrays), so the zero point's bits agree at any length
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal(1200)).astype(F32)
    x[::7] = F32(-0.0)
    x[3::7] = F32(0.0)
    kw = dict(bits=4, scheme="asymmetric", group_size=group_size)
    got = kernels.quantize_rows(x, [0], [x.size], threads=2, **kw)
    _assert_same(got, reference.quantize_rows(x, [0], [x.size], **kw))  # byte-exact


def test_dequantize_unaligned_read_only_buffers():
    # Arrow buffers received over Flight may be unaligned and are read-only
    x, starts, lens = _rows(RTN_LENS, seed=8)
    q = kernels.quantize_rows(x, starts, lens, bits=2, scheme="asymmetric", group_size=3)

    def unaligned(a):
        raw = bytes(1) + a.tobytes()
        v = np.frombuffer(raw, a.dtype, offset=1)
        assert not v.flags.aligned and not v.flags.writeable
        return v

    codes = np.frombuffer(q.codes.tobytes(), np.uint8)  # read-only
    got = kernels.dequantize_rows(
        codes,
        q.layout,
        unaligned(q.scales),
        unaligned(q.zero_points),
        scheme="asymmetric",
        threads=2,
    )
    want = reference.dequantize_rows(
        q.codes, q.layout, q.scales, q.zero_points, scheme="asymmetric"
    )
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method,stats", [("rtn", False), ("rtn", True), ("mse", False)])
def test_misaligned_input_is_staged_not_copied_and_exact(dtype, method, stats):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(3000).astype(dtype)
    view = np.frombuffer(bytes(3) + x.tobytes(), dtype, offset=3)  # odd address, read-only
    assert not view.flags.aligned
    kw = dict(bits=4, scheme="asymmetric", group_size=37, method=method, stats=stats)
    starts, lens = [0, 1000, 1500], [1000, 0, 1500]
    got = kernels.quantize_rows(view, starts, lens, threads=2, **kw)
    _assert_same(got, kernels.quantize_rows(x, starts, lens, threads=1, **kw), stats=stats)


def test_misaligned_input_costs_no_copy_of_the_input():
    import tracemalloc

    x = np.random.default_rng(12).standard_normal(1 << 20).astype(F32)  # 4 MiB
    view = np.frombuffer(bytes(1) + x.tobytes(), F32, offset=1)
    kw = dict(bits=4, scheme="asymmetric", group_size=128, threads=2)
    kernels.quantize_rows(view, [0], [x.size], **kw)
    tracemalloc.start()
    try:
        kernels.quantize_rows(view, [0], [x.size], **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 4, peak  # outputs are 1/8 + 1/64 of the input; no 4 MiB copy


# --------------------------------------------------------------------------- stored scales


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("bits", [4, 8])
def test_scale_dtype_matches_the_reference(scale_dtype, scheme, method, bits):
    """scale_dtype: codes against the scale as stored, integer zero points; the kernels
    equal the reference bit for bit at 1 and 3 threads (stats included), scales are exact
    in the dtype, and groups of every kind (constant, all positive, zero, tiny) agree."""
    import ml_dtypes

    rng = np.random.default_rng(bits + 7 * len(scale_dtype))
    n = 6 * 256
    x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e-7], n)).astype(np.float32)
    x[:128] = np.abs(x[:128]) + 0.5  # all positive
    x[128:256] = 0.25  # constant
    x[256:384] = 0.0
    x[384:512] = -np.abs(x[384:512]) * 1e-30  # scales that underflow float16 / bfloat16
    starts, lens = np.arange(6) * 256, np.full(6, 256)
    imp = None
    if method == "mse":
        imp = [(rng.random(256) + 0.1).astype(np.float32), None, None, None, None, None]
    args = dict(bits=bits, scheme=scheme, group_size=128, method=method, stats=True)
    want = reference.quantize_rows(x, starts, lens, scale_dtype=scale_dtype, importance=imp, **args)
    for threads in (1, 3):
        got = kernels.quantize_rows(
            x, starts, lens, scale_dtype=scale_dtype, importance=imp, threads=threads, **args
        )
        assert np.array_equal(got.codes, want.codes)
        assert np.array_equal(got.scales.view(np.uint32), want.scales.view(np.uint32))
        assert np.array_equal(got.group_sse, want.group_sse)
        if scheme == "asymmetric":
            assert np.array_equal(got.zero_points, want.zero_points)
            assert np.array_equal(np.rint(got.zero_points), got.zero_points)
    dt = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
    assert np.array_equal(got.scales.astype(dt[scale_dtype]).astype(np.float32), got.scales)
    plain = kernels.quantize_rows(x, starts, lens, importance=imp, **args)
    # the option changes the scales (float32 symmetric: nothing to round, no zero point)
    same = scale_dtype == "float32" and scheme == "symmetric"
    assert np.array_equal(plain.scales, got.scales) == same


def test_scale_dtype_is_checked():
    import flightquant as fq

    with pytest.raises(fq.OptionsError, match="scale_dtype must be one of"):
        fq.quantize_arrays({"w": np.ones((2, 8), np.float32)}, scale_dtype="float8")
    with pytest.raises(fq.OptionsError, match="scale_dtype applies to format='native'"):
        fq.quantize_arrays(
            {"w": np.ones((2, 32), np.float32)}, format="Q8_0", scale_dtype="float16"
        )
    with pytest.raises(fq.OptionsError, match="scale_dtype applies"):
        fq.quantize_arrays(
            {"w": np.ones((2, 8), np.float32)}, scheme="ternary", scale_dtype="float16"
        )
