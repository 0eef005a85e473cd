"""Q4_K, Q5_K and Q6_K: the kernels against llama.cpp's C, gguf-py and the NumPy reference.

gguf 0.19 has no K-quant quantizer, so rtn's bytes are held to llama.cpp's own C
(``ggml_quantize_chunk`` through ctypes; those tests skip when llama-cpp-python is not
installed) and, always, to the NumPy reference, which matches llama.cpp's C on every block
(checked here too when the library is there). Decoding is held to gguf-py.

Run: ``python -m pytest tests/test_ggml_k456.py -q``
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from flightquant import _ggml, formats
from flightquant.kernels import dequantize_ggml, quantize_ggml
from flightquant.reference import ggml_k456 as ref
from flightquant.testing import llama_quantizer

F32 = np.float32
TYPES = ("Q4_K", "Q5_K", "Q6_K")
METHODS = ("rtn", "mse")


LLAMA = llama_quantizer()


def llama_quantize(x: np.ndarray, name: str) -> np.ndarray:
    """llama.cpp's reference quantizer (quantize_row_*_ref, no imatrix) on one row."""
    return LLAMA.quantize(x, name, n_per_row=np.asarray(x).size)


def gguf_decode(data: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]).reshape(-1)


def sample(kind: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = n_blocks * 256
    if kind == "gauss":
        return rng.standard_normal(n).astype(F32)
    if kind == "t3":
        return rng.standard_t(3, n).astype(F32)
    raise ValueError(kind)


def edge_blocks() -> dict[str, np.ndarray]:
    """Blocks that take the unusual paths: flat and all-zero sub-blocks, outliers, ranges
    that underflow (the lanes hand those to the scalar path) or overflow float16 / float32."""
    rng = np.random.default_rng(7)
    g = rng.standard_normal(256)
    b = {
        "zeros": np.zeros(256),
        "constant+": np.full(256, 0.75),
        "constant-": np.full(256, -1.5),
        "outlier": np.where(np.arange(256) == 37, 1e4, g),
        "tiny 1e-30": g * 1e-30,
        "tiny 1e-38": g * 1e-38,
        "subnormal": g * 1e-43,
        "fp16 max": rng.uniform(-65504, 65504, 256),
        "big 1e30": g * 1e30,
        "float32 max": np.where(g < 0, -3.4e38, 3.4e38),
        "one sub-block": np.where(np.arange(256) < 32, g, 0),
        "flat sub-block": np.where((np.arange(256) >= 32) & (np.arange(256) < 64), 5.0, g),
        "offset +100": g + 100,
        "offset -100": -np.abs(g) - 100,
        "sparse": np.where(rng.random(256) < 0.05, g, 0),
    }
    return {k: v.astype(F32) for k, v in b.items()}


def block_sse(x: np.ndarray, data: np.ndarray, name: str) -> np.ndarray:
    xh = dequantize_ggml(data, name).astype(np.float64).reshape(-1, 256)
    return ((xh - x.astype(np.float64).reshape(-1, 256)) ** 2).sum(axis=1)


# ---------------------------------------------------------------------------------------
# bytes


@pytest.mark.llama
@pytest.mark.skipif(LLAMA is None, reason="llama-cpp-python's libggml-base not found")
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["gauss", "t3"])
def test_rtn_bytes_equal_llama_cpp(name, kind):
    x = sample(kind, 300, seed=1)
    c = llama_quantize(x, name)
    assert np.array_equal(quantize_ggml(x, name, "rtn"), c)
    t = formats.get(name)
    assert np.array_equal(ref.quantize_blocks(x.reshape(-1, 256), name).reshape(-1), c)
    assert c.size == 300 * t.type_size


@pytest.mark.llama
@pytest.mark.skipif(LLAMA is None, reason="llama-cpp-python's libggml-base not found")
@pytest.mark.parametrize("name", TYPES)
def test_rtn_edge_blocks_equal_llama_cpp(name):
    for label, x in edge_blocks().items():
        with np.errstate(all="ignore"):
            c = llama_quantize(x, name)
        assert np.array_equal(quantize_ggml(x, name, "rtn"), c), label


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_kernel_equals_reference(name, method):
    x = np.concatenate(
        [sample("t3", 120, seed=2), sample("gauss", 60, seed=3) * 0.02, *edge_blocks().values()]
    )
    with np.errstate(all="ignore"):
        want = ref.quantize_blocks(x.reshape(-1, 256), name, method).reshape(-1)
    assert np.array_equal(quantize_ggml(x, name, method), want)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_lane_widths_give_the_same_bytes(name, method):
    x = sample("t3", 150, seed=4)
    old = _ggml._k456_lane_width()
    try:
        got = {}
        for w in (4, 8):
            got[_ggml._k456_lane_width(w)] = quantize_ggml(x, name, method)
    finally:
        _ggml._k456_lane_width(old)
    assert len({g.tobytes() for g in got.values()}) == 1, sorted(got)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_threads_do_not_change_bytes(name, method):
    x = sample("t3", 64 * 5 + 7, seed=5)  # several chunks of 64 blocks
    one = quantize_ggml(x, name, method, threads=1)
    for t in (2, 3):
        assert np.array_equal(quantize_ggml(x, name, method, threads=t), one)


@pytest.mark.parametrize("name", TYPES)
def test_unaligned_and_other_dtypes(name):
    x = sample("t3", 40, seed=6)
    want = quantize_ggml(x, name, "mse")
    buf = bytearray(x.nbytes + 1)
    odd = np.frombuffer(buf, np.uint8, x.nbytes, 1).view(F32)
    odd[:] = x
    assert odd.ctypes.data % 4 != 0
    assert np.array_equal(quantize_ggml(odd, name, "mse"), want)
    x16 = x.astype(np.float16)
    assert np.array_equal(
        quantize_ggml(x16, name, "rtn"), quantize_ggml(x16.astype(F32), name, "rtn")
    )
    x64 = x.astype(np.float64) * (1 + 1e-12)
    assert np.array_equal(
        quantize_ggml(x64, name, "mse"), quantize_ggml(x64.astype(F32), name, "mse")
    )


# ---------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_decode_equals_gguf_py(name, method):
    x = np.concatenate([sample("t3", 50, seed=8), *edge_blocks().values()])
    with np.errstate(all="ignore"):
        data = quantize_ggml(x, name, method)
        g = gguf_decode(data, name)
    ours = dequantize_ggml(data, name)
    assert ours.tobytes() == g.astype(F32).tobytes()
    r = ref.dequantize_blocks(data.reshape(-1, formats.get(name).type_size), name)
    assert r.tobytes() == g.astype(F32).tobytes()


@pytest.mark.parametrize("name", TYPES)
def test_decode_random_bytes_and_unaligned_codes(name):
    t = formats.get(name)
    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, 70 * t.type_size, dtype=np.uint8)
    # keep the float16 fields finite so the comparison is by value
    for off in (0, 2) if name != "Q6_K" else (208,):
        f = data.reshape(-1, t.type_size)[:, off : off + 2].copy().view(np.float16)
        f[~np.isfinite(f)] = 1.0
        data.reshape(-1, t.type_size)[:, off : off + 2] = f.view(np.uint8)
    g = gguf_decode(data, name).astype(F32)
    buf = bytearray(data.size + 3)
    odd = np.frombuffer(buf, np.uint8, data.size, 3)
    odd[:] = data
    assert dequantize_ggml(odd, name).tobytes() == g.tobytes()
    assert dequantize_ggml(data, name, dtype=np.float64).tobytes() == g.astype(np.float64).tobytes()
    with np.errstate(over="ignore"):
        g16 = g.astype(np.float16)
    assert dequantize_ggml(data, name, dtype=np.float16).tobytes() == g16.tobytes()


# ---------------------------------------------------------------------------------------
# mse


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["gauss", "t3"])
def test_mse_never_worse_and_lower_overall(name, kind):
    x = sample(kind, 400, seed=10)
    e_rtn = block_sse(x, quantize_ggml(x, name, "rtn"), name)
    e_mse = block_sse(x, quantize_ggml(x, name, "mse"), name)
    assert (e_mse <= e_rtn).all()
    assert e_mse.sum() < e_rtn.sum() * 0.97  # a few percent lower, well clear of noise


@pytest.mark.parametrize("name", TYPES)
def test_mse_edge_blocks_never_worse(name):
    for label, x in edge_blocks().items():
        with np.errstate(all="ignore"):
            e_rtn = block_sse(x, quantize_ggml(x, name, "rtn"), name)
            e_mse = block_sse(x, quantize_ggml(x, name, "mse"), name)
        assert not (e_mse > e_rtn).any(), label


@pytest.mark.parametrize("name", TYPES)
def test_constant_and_zero_blocks_decode_close(name):
    for v in (0.0, 0.75, -1.5):
        x = np.full(256, v, F32)
        for method in METHODS:
            xh = dequantize_ggml(quantize_ggml(x, name, method), name)
            assert np.abs(xh - x).max() <= abs(v) * 0.01, (v, method)
