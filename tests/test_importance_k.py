"""K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) with an importance vector.

rtn with importance is llama.cpp's ``quantize_row_q*_K_impl`` byte for byte (held to
llama.cpp's C through ``ggml_quantize_chunk`` with an imatrix when the library is there);
mse with importance minimises sum(qw * (x - x_hat)^2) from that block, never worse per
block. The kernels equal the NumPy reference bit for bit (threads, alignment, dtypes).

Run: ``python -m pytest tests/test_importance_k.py -q``
"""

from __future__ import annotations

import numpy as np
import pytest

from flightquant.kernels import dequantize_ggml, quantize_ggml
from flightquant.reference import ggml as ref
from flightquant.testing import llama_quantizer

F32 = np.float32
TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LLAMA = llama_quantizer()
needs_llama = pytest.mark.skipif(LLAMA is None, reason="llama.cpp's libggml-base not found")


def realistic(rows: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed row-scaled weights (student-t, lognormal row scales) and a lognormal
    importance vector with some zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=(rows, k)) * rng.lognormal(0, 0.7, size=(rows, 1))
    w = rng.lognormal(0, 1.5, size=k)
    w[rng.random(k) < 0.05] = 0
    return x.astype(F32).reshape(-1), w.astype(F32)


def odd_blocks(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Blocks down the unusual paths: all-zero, constant, one outlier, tiny and huge ranges,
    a block of zero importance and sub-blocks of zero importance (one row of k = 256)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(256)
    blocks = [
        np.zeros(256),
        np.full(256, 0.75),
        np.full(256, -1.5),
        np.where(np.arange(256) == 37, 1e4, g),
        g * 1e-30,
        g * 1e20,
        np.abs(g),
        -np.abs(g),
        g,
        g,
    ]
    x = np.concatenate(blocks).astype(F32)
    w = rng.lognormal(0, 1, 256).astype(F32)
    w[32:64] = 0
    w[200:216] = 0
    return x, w


def weighted_block_err(x, xh, w, name):
    """sum(w * (x - x_hat)^2) per block, float64."""
    e = np.tile(w.astype(np.float64), x.size // w.size) * (x.astype(np.float64) - xh) ** 2
    return e.reshape(-1, 256).sum(axis=1)


def wsnr(x, xh, w):
    ww = np.tile(w.astype(np.float64), x.size // w.size)
    x = x.astype(np.float64)
    return 10 * np.log10((ww * x * x).sum() / (ww * (x - xh) ** 2).sum())


def kernel(x, name, method, w, threads=1):
    out = quantize_ggml(x, name, method, importance=w, threads=threads)
    return np.asarray(out).view(np.uint8).reshape(-1)


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,k", [(16, 256), (8, 512), (4, 4096), (2, 2816)])
def test_rtn_with_importance_equals_llama_cpp(name, rows, k):
    x, w = realistic(rows, k, seed=k)
    want = np.frombuffer(bytes(LLAMA.quantize(x, name, importance=w)), np.uint8)
    for threads in (1, 2):
        assert np.array_equal(kernel(x, name, "rtn", w, threads), want)
    # unaligned input gives the same bytes
    buf = np.empty(x.size + 1, F32)
    buf[1:] = x
    assert np.array_equal(kernel(buf[1:], name, "rtn", w, threads=2), want)


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("name", TYPES)
def test_rtn_with_importance_odd_blocks_equal_llama_cpp(name):
    x, w = odd_blocks()
    want = np.frombuffer(bytes(LLAMA.quantize(x, name, importance=w)), np.uint8)
    assert np.array_equal(kernel(x, name, "rtn", w), want)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_kernel_equals_reference_with_importance(name, method):
    x, w = realistic(6, 512, seed=11)
    want = ref.quantize_row(x, name, method, importance=w)
    assert np.array_equal(kernel(x, name, method, w, threads=1), want)
    assert np.array_equal(kernel(x, name, method, w, threads=2), want)
    xo, wo = odd_blocks()
    assert np.array_equal(
        kernel(xo, name, method, wo), ref.quantize_row(xo, name, method, importance=wo)
    )


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_unaligned_and_other_dtypes_with_importance(name, method):
    x, w = realistic(4, 256, seed=5)
    want = kernel(x, name, method, w)
    buf = np.empty(x.size + 1, F32)
    buf[1:] = x
    assert np.array_equal(kernel(buf[1:], name, method, w), want)
    x16 = x.astype(np.float16)
    assert np.array_equal(kernel(x16, name, method, w), kernel(x16.astype(F32), name, method, w))
    x64 = x.astype(np.float64) * (1 + 1e-12)
    assert np.array_equal(kernel(x64, name, method, w), kernel(x64.astype(F32), name, method, w))


@pytest.mark.parametrize("name", TYPES)
def test_mse_with_importance_never_worse_per_block_and_gains(name):
    x, w = realistic(32, 1024, seed=21)
    rtn = dequantize_ggml(kernel(x, name, "rtn", w), name).astype(np.float64)
    mse = dequantize_ggml(kernel(x, name, "mse", w), name).astype(np.float64)
    e_rtn = weighted_block_err(x, rtn, w, name)
    e_mse = weighted_block_err(x, mse, w, name)
    assert np.all(e_mse <= e_rtn * (1 + 1e-9))
    # the target: at least 0.15 dB of weighted SNR over llama.cpp's imatrix path
    assert wsnr(x, mse, w) >= wsnr(x, rtn, w) + 0.15
    xo, wo = odd_blocks()
    ro = dequantize_ggml(kernel(xo, name, "rtn", wo), name).astype(np.float64)
    mo = dequantize_ggml(kernel(xo, name, "mse", wo), name).astype(np.float64)
    e_rtn = weighted_block_err(xo, ro, wo, name)
    fin = np.isfinite(e_rtn)  # (a block past float16's range decodes to inf either way)
    assert fin.sum() >= 8
    assert np.all(weighted_block_err(xo, mo, wo, name)[fin] <= e_rtn[fin] * (1 + 1e-9))


@pytest.mark.parametrize("name", TYPES)
def test_importance_changes_the_result(name):
    x, w = realistic(4, 256, seed=9)
    plain = np.asarray(quantize_ggml(x, name, "rtn")).view(np.uint8).reshape(-1)
    assert not np.array_equal(kernel(x, name, "rtn", w), plain)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_lane_widths_and_scales_with_importance(name, method):
    """The lanes give the same bytes at every width, over a wide range of magnitudes."""
    from flightquant import _ggml

    x, w = realistic(2, 512, seed=13)
    x = np.concatenate([x * F32(1e-6), x * F32(1e5)])
    want = ref.quantize_row(x, name, method, importance=w)
    old = _ggml._k456_lane_width()
    try:
        for width in (4, 8):
            _ggml._k456_lane_width(width)
            assert np.array_equal(kernel(x, name, method, w), want)
    finally:
        _ggml._k456_lane_width(old)
