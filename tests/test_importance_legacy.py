"""Importance (an imatrix's per-column weights) for ggml's legacy types: rtn is llama.cpp's
``quantize_row_*_impl`` byte for byte, mse minimises the importance-weighted squared error
and is never worse than it on any block; Q8_0 and the ternary types ignore importance, as
llama.cpp does. The kernels against the NumPy reference and against llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flightquant import formats, kernels
from flightquant.reference import ggml as ref
from flightquant.reference import ggml_legacy
from flightquant.testing import llama_quantizer

F32 = np.float32
WEIGHTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
IGNORED = ("Q8_0", "TQ1_0", "TQ2_0")
assert set(WEIGHTED + IGNORED) == set(ggml_legacy.TYPES)


def realistic(rows: int, k: int, seed: int = 0, sigma: float = 1.5):
    """Heavy-tailed weights (Student-t, 4 degrees of freedom) with lognormal row scales, and
    lognormal importance over the k columns with about 5% zeros (dead columns)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, (rows, k)) * rng.lognormal(0, 1, (rows, 1)) * 0.02
    imp = rng.lognormal(0, sigma, k)
    imp[rng.random(k) < 0.05] = 0
    return x.astype(F32).reshape(-1), imp.astype(F32)


def _misaligned(a: np.ndarray) -> np.ndarray:
    raw = bytearray(a.nbytes + 1)
    out = np.frombuffer(raw, a.dtype, count=a.size, offset=1)
    out[...] = a
    return out


def weighted_block_error(x, data, name, imp):
    """Per block: sum of imp * (x - x_hat)**2 in float64, added in index order."""
    bs = formats.get(name).block_size
    xh = kernels.dequantize_ggml(data, name).astype(np.float64)
    w = np.tile(imp.astype(np.float64), x.size // imp.size)
    e = w * (x.astype(np.float64) - xh) ** 2
    return np.add.accumulate(e.reshape(-1, bs), axis=1)[:, -1]


def weighted_snr(x, data, name, imp):
    w = np.tile(imp.astype(np.float64), x.size // imp.size)
    signal = (w * x.astype(np.float64) ** 2).sum()
    return 10 * np.log10(signal / weighted_block_error(x, data, name, imp).sum())


# --------------------------------------------------------------------------- kernels == reference


def _edge_rows(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of k values holding the blocks that take the unusual branches."""
    rng = np.random.default_rng(9)
    g = rng.standard_normal(k).astype(F32)
    rows = [
        np.zeros(k, F32),
        g * F32(1e-17),  # every block below ggml's 1e-15 "all zero"
        np.abs(g) + F32(0.5),  # positive blocks: Q4_1's min is clipped to 0
        -np.abs(g) - F32(3),  # negative blocks
        np.full(k, 0.3, F32),  # constant
        np.where(np.arange(k) % 32 == 5, F32(300), g * F32(0.01)),  # an outlier a block
        np.clip(g, -1, 1) * F32(65000),  # scales near the float16 limit
        g * F32(3e19),  # x*x overflows: ggml's weights are inf
    ]
    imp = rng.lognormal(0, 2, k).astype(F32)
    imp[::7] = 0
    imp[32:64] = 0  # a block of no importance at all
    return np.concatenate(rows), imp


@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("name", WEIGHTED + IGNORED)
def test_kernels_equal_reference(name, method):
    k = 512 if name.startswith("TQ") else 256
    x, imp = realistic(26, k, seed=3)  # > 3 chunks of 64 blocks
    got = kernels.quantize_ggml(x, name, method, importance=imp, threads=1)
    np.testing.assert_array_equal(got, ref.quantize_row(x, name, method, importance=imp))
    np.testing.assert_array_equal(
        kernels.quantize_ggml(x, name, method, importance=imp, threads=2), got
    )
    xe, ie = _edge_rows(k)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(
            kernels.quantize_ggml(xe, name, method, importance=ie, threads=2),
            ref.quantize_row(xe, name, method, importance=ie),
        )


@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("name", WEIGHTED)
def test_unaligned_and_dtypes(name, method):
    x, imp = realistic(12, 256, seed=4)
    want = kernels.quantize_ggml(x, name, method, importance=imp)
    got = kernels.quantize_ggml(_misaligned(x), name, method, importance=_misaligned(imp))
    np.testing.assert_array_equal(got, want)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(
        kernels.quantize_ggml(_misaligned(h), name, method, importance=imp),
        kernels.quantize_ggml(h.astype(F32), name, method, importance=imp),
    )
    d = x.astype(np.float64) * (1 + 1e-9)
    np.testing.assert_array_equal(
        kernels.quantize_ggml(d, name, method, importance=imp.astype(np.float64)),
        kernels.quantize_ggml(d.astype(F32), name, method, importance=imp),
    )


@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("name", IGNORED)
def test_types_without_an_importance_path_ignore_it(name, method):
    x, imp = realistic(4, 1024, seed=5)
    np.testing.assert_array_equal(
        kernels.quantize_ggml(x, name, method, importance=imp),
        kernels.quantize_ggml(x, name, method),
    )


def test_importance_changes_the_weighted_types():
    x, imp = realistic(4, 1024, seed=5)
    for name in WEIGHTED:
        assert not np.array_equal(
            kernels.quantize_ggml(x, name, importance=imp), kernels.quantize_ggml(x, name)
        ), name


_value = st.floats(-3e4, 3e4, allow_nan=False, width=32)
_weight = st.one_of(st.just(0.0), st.floats(2.0**-20, 2.0**20, width=32))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(WEIGHTED), data=st.data())
def test_property_kernel_equals_reference(name, data):
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e2]))
    x = np.array(data.draw(st.lists(_value, min_size=64, max_size=64)), F32) * F32(scale)
    imp = np.array(data.draw(st.lists(_weight, min_size=64, max_size=64)), F32)
    for method in ("rtn", "mse"):
        np.testing.assert_array_equal(
            kernels.quantize_ggml(x, name, method, importance=imp),
            ref.quantize_row(x, name, method, importance=imp),
        )


# --------------------------------------------------------------------------- mse's promise

#: least gain (dB) of mse+importance over rtn+importance (llama.cpp's importance path) in
#: importance-weighted SNR on ``realistic`` weights (measured 0.3-0.55 dB on 512K weights)
MIN_GAIN = 0.15


@pytest.mark.parametrize("name", WEIGHTED)
def test_mse_never_worse_per_block_and_better_overall(name):
    x, imp = realistic(64, 2048, seed=6)
    r = kernels.quantize_ggml(x, name, "rtn", importance=imp)
    m = kernels.quantize_ggml(x, name, "mse", importance=imp)
    er = weighted_block_error(x, r, name, imp)
    em = weighted_block_error(x, m, name, imp)
    assert (em <= er).all()
    assert (em < er).mean() > 0.3  # the search finds better bytes on many blocks
    gain = weighted_snr(x, m, name, imp) - weighted_snr(x, r, name, imp)
    assert gain > MIN_GAIN, f"{name}: mse+importance gains only {gain:.3f} dB"


@pytest.mark.parametrize("name", WEIGHTED)
def test_mse_uses_importance(name):
    """Under its own objective, mse with importance beats mse without it."""
    x, imp = realistic(32, 1024, seed=8)
    with_imp = kernels.quantize_ggml(x, name, "mse", importance=imp)
    without = kernels.quantize_ggml(x, name, "mse")
    assert weighted_snr(x, with_imp, name, imp) > weighted_snr(x, without, name, imp) + 0.5


# --------------------------------------------------------------------------- llama.cpp

LLAMA = llama_quantizer()


@pytest.mark.llama
@pytest.mark.skipif(
    LLAMA is None, reason="llama.cpp's libggml-base is not installed (llama-cpp-python)"
)
@pytest.mark.parametrize("k, rows", [(256, 32), (512, 16), (4096, 8)])
@pytest.mark.parametrize("name", WEIGHTED + IGNORED)
def test_rtn_importance_bytes_equal_llama_cpp(name, k, rows):
    x, imp = realistic(rows, k, seed=k)
    x[: k // 2] *= F32(1e3)  # a row far louder than the rest
    want = LLAMA.quantize(x, name, importance=imp)
    for threads in (1, 2):
        np.testing.assert_array_equal(
            kernels.quantize_ggml(x, name, importance=imp, threads=threads), want
        )
    np.testing.assert_array_equal(
        kernels.quantize_ggml(_misaligned(x), name, importance=_misaligned(imp)), want
    )
