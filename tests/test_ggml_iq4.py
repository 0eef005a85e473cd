"""IQ4_NL and IQ4_XS: the kernels against llama.cpp's C, gguf-py and the NumPy reference.

gguf-py has no IQ4 quantizer, so rtn's bytes (with and without importance) are held to
llama.cpp's own C (``ggml_quantize_chunk`` through ctypes; those tests are marked
``llama`` and skip without the library) and, always, to the NumPy reference. Decoding is
held to gguf-py.

Run: ``python -m pytest tests/test_ggml_iq4.py -q``
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import flightquant as fq
from flightquant import formats
from flightquant.kernels import dequantize_ggml, quantize_ggml
from flightquant.reference import ggml as ref_ggml
from flightquant.reference import ggml_iq4 as ref
from flightquant.testing import llama_quantizer

F32 = np.float32
TYPES = ("IQ4_NL", "IQ4_XS")
METHODS = ("rtn", "mse")
LLAMA = llama_quantizer()
needs_llama = pytest.mark.skipif(LLAMA is None, reason="llama.cpp's libggml-base not found")


def weights(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Realistic weights: heavy-tailed (Student-t 3), each row with its own scale."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0, 1, (rows, 1)) * 0.02
    return (rng.standard_t(3, (rows, k)) * scale).astype(F32)


def importance(k: int, seed: int = 1) -> np.ndarray:
    """Lognormal importance with some zeros (unused channels)."""
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0, 1.5, k).astype(F32)
    w[rng.random(k) < 0.05] = 0
    return w


def edge_blocks() -> dict[str, np.ndarray]:
    """256-value blocks that take the unusual paths: zero and flat sub-blocks, outliers,
    values below GROUP_MAX_EPS, subnormals, ranges that overflow float16 / float32."""
    rng = np.random.default_rng(7)
    g = rng.standard_normal(256)
    i = np.arange(256)
    b = {
        "zeros": np.zeros(256),
        "constant+": np.full(256, 0.75),
        "constant-": np.full(256, -1.5),
        "outlier": np.where(i == 37, 1e4, g),
        "tiny 1e-16": g * 1e-16,
        "tiny 1e-30": g * 1e-30,
        "subnormal": g * 1e-43,
        "fp16 max": rng.uniform(-65504, 65504, 256),
        "big 1e10": g * 1e10,
        "big 1e30": g * 1e30,
        "one sub-block": np.where(i < 32, g, 0),
        "flat sub-block": np.where((i >= 32) & (i < 64), 5.0, g),
        "offset +100": g + 100,
        "sparse": np.where(rng.random(256) < 0.05, g, 0),
        "mixed scales": g * np.repeat(10.0 ** np.arange(-4, 4), 32),
    }
    return {k: v.astype(F32) for k, v in b.items()}


def block_err(x, data, name, e=None) -> np.ndarray:
    """Each block's (weighted) squared error, float64."""
    t = formats.get(name)
    xh = dequantize_ggml(data, name).astype(np.float64).reshape(-1, t.block_size)
    d2 = (xh - x.astype(np.float64).reshape(-1, t.block_size)) ** 2
    if e is not None:
        d2 = d2 * np.tile(e.astype(np.float64), x.size // e.size).reshape(d2.shape)
    return d2.sum(axis=1)


def gguf_decode(data: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]).reshape(-1)


# ---------------------------------------------------------------------------------------
# rtn bytes == llama.cpp


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("k", [256, 512, 4096])
@pytest.mark.parametrize("with_importance", [False, True])
def test_rtn_bytes_equal_llama_cpp(name, k, with_importance):
    x = weights(24 if k < 4096 else 6, k, seed=k).reshape(-1)
    w = importance(k, seed=k + 1) if with_importance else None
    want = LLAMA.quantize(x, name, n_per_row=k, importance=w)
    for threads in (1, 2):
        assert np.array_equal(quantize_ggml(x, name, "rtn", importance=w, threads=threads), want)
    buf = bytearray(x.nbytes + 1)  # unaligned input
    odd = np.frombuffer(buf, np.uint8, x.nbytes, 1).view(F32)
    odd[:] = x.reshape(-1)
    assert np.array_equal(quantize_ggml(odd, name, "rtn", importance=w), want)
    assert np.array_equal(ref_ggml.quantize_row(x, name, "rtn", importance=w), want)


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("name", TYPES)
def test_rtn_edge_blocks_equal_llama_cpp(name):
    rng = np.random.default_rng(3)
    imps = {
        "none": None,
        "lognormal": importance(256, seed=4),
        "zeros": np.zeros(256, F32),
        "one hot": np.where(np.arange(256) == 5, 1.0, 0.0).astype(F32),
        "huge": (rng.lognormal(0, 1, 256) * 1e30).astype(F32),
    }
    for label, x in edge_blocks().items():
        for ilabel, w in imps.items():
            with np.errstate(all="ignore"):
                want = LLAMA.quantize(x, name, n_per_row=256, importance=w)
                assert np.array_equal(quantize_ggml(x, name, "rtn", importance=w), want), (
                    label,
                    ilabel,
                )
                got = ref_ggml.quantize_row(x, name, "rtn", importance=w)
            assert np.array_equal(got, want), (label, ilabel, "reference")


# ---------------------------------------------------------------------------------------
# kernels == reference


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_importance", [False, True])
def test_kernel_equals_reference(name, method, with_importance):
    x = np.concatenate([weights(6, 256, seed=2).reshape(-1), *edge_blocks().values()])
    w = importance(256, seed=5) if with_importance else None
    with np.errstate(all="ignore"):
        want = ref_ggml.quantize_row(x, name, method, importance=w)
    for threads in (1, 2):
        got = quantize_ggml(x, name, method, importance=w, threads=threads)
        assert np.array_equal(got, want), threads


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_threads_do_not_change_bytes(name, method):
    k = 512
    x = weights(64 * 5 // (k // 256) + 1, k, seed=5).reshape(-1)  # several chunks of 64 blocks
    w = importance(k, seed=6)
    for imp in (None, w):
        one = quantize_ggml(x, name, method, importance=imp, threads=1)
        for t in (2, 3):
            assert np.array_equal(quantize_ggml(x, name, method, importance=imp, threads=t), one)


@pytest.mark.parametrize("name", TYPES)
def test_unaligned_and_other_dtypes(name):
    x = weights(4, 512, seed=6).reshape(-1)
    w = importance(512, seed=7)
    for imp in (None, w):
        want = quantize_ggml(x, name, "mse", importance=imp)
        assert np.array_equal(want, ref_ggml.quantize_row(x, name, "mse", importance=imp))
        buf = bytearray(x.nbytes + 1)
        odd = np.frombuffer(buf, np.uint8, x.nbytes, 1).view(F32)
        odd[:] = x
        assert odd.ctypes.data % 4 != 0
        assert np.array_equal(quantize_ggml(odd, name, "mse", importance=imp), want)
        x16 = x.astype(np.float16)
        assert np.array_equal(
            quantize_ggml(x16, name, "mse", importance=imp),
            ref_ggml.quantize_row(x16.astype(F32), name, "mse", importance=imp),
        )
        x64 = x.astype(np.float64) * (1 + 1e-12)
        assert np.array_equal(
            quantize_ggml(x64, name, "rtn", importance=imp),
            ref_ggml.quantize_row(x64.astype(F32), name, "rtn", importance=imp),
        )


def test_best_index_is_ggmls_binary_search():
    """The midpoint count equals best_index_int8 (binary search, ties up) at and around
    every midpoint and for values outside the table."""

    def binary(v):
        k = ref.KVALUES
        if v <= k[0]:
            return 0
        if v >= k[15]:
            return 15
        lo, hi = 0, 15
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if v < k[mid]:
                hi = mid
            else:
                lo = mid
        return hi - 1 if F32(v - k[hi - 1]) < F32(k[hi] - v) else hi

    vals = [F32(-1e30), F32(-130), F32(0), F32(-0.0), F32(200), F32(np.inf), F32(-np.inf)]
    for m in ref.MIDPOINTS:
        a = b = m
        vals.append(m)
        for _ in range(50):
            a = np.nextafter(a, F32(-np.inf), dtype=F32)
            b = np.nextafter(b, F32(np.inf), dtype=F32)
            vals += [a, b]
    v = np.array(vals, F32)
    assert ref.best_index(v).tolist() == [binary(u) for u in v]
    assert ref.best_index(np.array([np.nan], F32)).tolist() == [15]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_importance_through_the_api_and_codec(name, method):
    """Per-tensor importance reaches the IQ4 block functions through the engine: the bytes
    of the reference's importance path, and a tensor without importance as before."""
    x = weights(6, 512, seed=13)
    w = importance(512, seed=14)
    got = fq.quantize_arrays({"a": x, "b": x}, format=name, method=method, importance={"a": w})
    want = ref_ggml.quantize_row(x, name, method, importance=w)
    assert got["a"].codes.tobytes() == want.tobytes()
    assert got["b"].codes.tobytes() == ref_ggml.quantize_row(x, name, method).tobytes()
    assert got["a"].codes.tobytes() != got["b"].codes.tobytes()
    assert got["a"].dequantize().shape == (6, 512)


# ---------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_decode_equals_gguf_py(name, method):
    x = np.concatenate([weights(4, 256, seed=8).reshape(-1), *edge_blocks().values()])
    with np.errstate(all="ignore"):
        data = quantize_ggml(x, name, method)
        g = gguf_decode(data, name)
    assert dequantize_ggml(data, name).tobytes() == g.astype(F32).tobytes()
    r = ref.dequantize_blocks(data.reshape(-1, formats.get(name).type_size), name)
    assert r.tobytes() == g.astype(F32).tobytes()


@pytest.mark.parametrize("name", TYPES)
def test_decode_random_bytes_and_unaligned_codes(name):
    t = formats.get(name)
    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, 70 * t.type_size, dtype=np.uint8)
    d = data.reshape(-1, t.type_size)[:, 0:2].copy().view(np.float16)
    d[~np.isfinite(d)] = 1.0  # keep the scale finite so the comparison is by value
    data.reshape(-1, t.type_size)[:, 0:2] = d.view(np.uint8)
    g = gguf_decode(data, name).astype(F32)
    buf = bytearray(data.size + 3)
    odd = np.frombuffer(buf, np.uint8, data.size, 3)
    odd[:] = data
    assert dequantize_ggml(odd, name).tobytes() == g.tobytes()
    assert ref.dequantize_blocks(data, name).reshape(-1).tobytes() == g.tobytes()
    assert dequantize_ggml(data, name, dtype=np.float64).tobytes() == g.astype(np.float64).tobytes()
    with np.errstate(over="ignore"):
        g16 = g.astype(np.float16)
    assert dequantize_ggml(data, name, dtype=np.float16).tobytes() == g16.tobytes()


# ---------------------------------------------------------------------------------------
# mse


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("with_importance", [False, True])
def test_mse_never_worse_and_lower_overall(name, with_importance):
    k = 1024
    x = weights(16, k, seed=10).reshape(-1)
    w = importance(k, seed=11) if with_importance else None
    e_rtn = block_err(x, quantize_ggml(x, name, "rtn", importance=w), name, w)
    e_mse = block_err(x, quantize_ggml(x, name, "mse", importance=w), name, w)
    assert (e_mse <= e_rtn).all()
    # a few percent lower (importance: ~10%), well clear of noise
    assert e_mse.sum() < e_rtn.sum() * (0.9 if with_importance else 0.95)


@pytest.mark.parametrize("name", TYPES)
def test_mse_edge_blocks_never_worse(name):
    w = importance(256, seed=12)
    for label, x in edge_blocks().items():
        for imp in (None, w, np.zeros(256, F32)):
            with np.errstate(all="ignore"):
                e_rtn = block_err(x, quantize_ggml(x, name, "rtn", importance=imp), name, imp)
                e_mse = block_err(x, quantize_ggml(x, name, "mse", importance=imp), name, imp)
            assert not (e_mse > e_rtn).any(), label


@pytest.mark.parametrize("name", TYPES)
def test_constant_and_zero_blocks_decode_close(name):
    for v in (0.0, 0.75, -1.5):
        x = np.full(256, v, F32)
        for method in METHODS:
            xh = dequantize_ggml(quantize_ggml(x, name, method), name)
            assert np.abs(xh - x).max() <= abs(v) * 0.01, (v, method)
