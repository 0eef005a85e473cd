"""Q2_K and Q3_K: the kernels against llama.cpp's C (when its library is installed),
gguf-py's decoder and the NumPy reference (flightquant/reference/ggml_k23.py)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flightquant import formats
from flightquant.kernels import dequantize_ggml, quantize_ggml
from flightquant.reference import ggml_k23 as ref
from flightquant.testing import llama_quantizer

TYPES = ("Q2_K", "Q3_K")
METHODS = ("rtn", "mse")
QK = 256


def _blocks(n: int, dist: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "gauss":
        return rng.standard_normal(n * QK).astype(np.float32)
    return rng.standard_t(3, n * QK).astype(np.float32)


def _edge_blocks() -> np.ndarray:
    """Blocks that walk the special cases: zeros, constants, one outlier, tiny values,
    values near the fp16 maximum and beyond it, one-signed blocks, flat sub-blocks."""
    rng = np.random.default_rng(7)
    g = rng.standard_normal(QK).astype(np.float32)
    rows = [
        np.zeros(QK),
        np.full(QK, 0.75),
        np.full(QK, -3.0),
        np.where(np.arange(QK) == 77, 1e4, 0.01 * g),
        np.where(np.arange(QK) == 3, -50.0, g),
        1e-30 * g,
        1e-7 * g,
        6.0e4 * np.clip(g, -1, 1),
        65504.0 * np.sign(g),
        1e6 * g,
        np.abs(g),
        -np.abs(g) - 1.0,
        np.repeat(rng.standard_normal(16), 16),  # every sub-block flat
        np.where(np.arange(QK) < 128, 0.0, g),
        np.where(np.arange(QK) % 16 == 0, 5.0, 0.0),
    ]
    return np.stack(rows).astype(np.float32)


def _data() -> dict[str, np.ndarray]:
    return {
        "gauss": _blocks(200, "gauss", 1),
        "t3": _blocks(200, "t3", 2),
        "edge": _edge_blocks().reshape(-1),
    }


DATA = _data()


# ---------------------------------------------------------------------------------------
# llama.cpp's C, through ctypes (skipped where llama-cpp-python is not installed)


LLAMA = llama_quantizer()


def llama_quantize(x: np.ndarray, name: str) -> np.ndarray:
    return LLAMA.quantize(x, name, n_per_row=QK)


needs_llama = pytest.mark.skipif(LLAMA is None, reason="llama.cpp's libggml-base not installed")


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("dist", ["gauss", "t3", "edge"])
@pytest.mark.parametrize("name", TYPES)
def test_rtn_bytes_match_llama_cpp(name, dist):
    x = DATA[dist]
    size = formats.get(name).type_size
    ours = quantize_ggml(x, name, "rtn").reshape(-1, size)
    theirs = llama_quantize(x, name).reshape(-1, size)
    same = (ours == theirs).all(axis=1)
    # the kernels do ggml's float32 operations in its order; libggml-base is built without
    # FMA contraction, so every block matches (the issue asks for >= 99%)
    assert same.all(), (
        f"{name} {dist}: {same.mean():.2%} equal; blocks {np.flatnonzero(~same)[:10]}"
    )


# ---------------------------------------------------------------------------------------
# decode: gguf-py, bit for bit


def _random_blocks(name: str, n: int, seed: int) -> np.ndarray:
    """Random bytes with finite fp16 super-scales (every code and scale pattern)."""
    rng = np.random.default_rng(seed)
    size = formats.get(name).type_size
    data = rng.integers(0, 256, (n, size), dtype=np.uint8)
    scales = rng.standard_normal((n, 2)) * 10.0 ** rng.integers(-6, 4, (n, 1))
    scales = scales.astype(np.float16)
    if name == "Q2_K":
        data[:, 80:84] = scales.view(np.uint8)
    else:
        data[:, 108:110] = scales[:, :1].view(np.uint8)
    return data.reshape(-1)


@pytest.mark.parametrize("name", TYPES)
def test_decode_matches_gguf_py(name):
    qtype = getattr(GGMLQuantizationType, name)
    for data in (
        _random_blocks(name, 300, 3),
        quantize_ggml(DATA["t3"], name, "mse"),
        quantize_ggml(DATA["edge"], name, "rtn"),
    ):
        ours = dequantize_ggml(data, name)
        with np.errstate(invalid="ignore", over="ignore"):  # the edge blocks' inf scales
            theirs = gguf_dequantize(data, qtype).reshape(-1)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
        back = ref.dequantize_blocks(data.reshape(-1, formats.get(name).type_size), name)
        np.testing.assert_array_equal(back.reshape(-1).view(np.uint32), ours.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_decode_unaligned_codes_and_dtypes(name):
    data = _random_blocks(name, 70, 4)
    buf = bytearray(data.size + 1)
    shifted = np.frombuffer(buf, np.uint8, count=data.size, offset=1)
    shifted[:] = data
    want = dequantize_ggml(data, name)
    np.testing.assert_array_equal(dequantize_ggml(shifted, name, threads=2), want)
    np.testing.assert_array_equal(dequantize_ggml(data, name, np.float64), want.astype(np.float64))
    with np.errstate(over="ignore"):  # some random scales pass the fp16 range
        want16 = want.astype(np.float16)
    np.testing.assert_array_equal(dequantize_ggml(data, name, np.float16), want16)


# ---------------------------------------------------------------------------------------
# kernels against the NumPy reference


@pytest.mark.parametrize("dist", ["gauss", "t3", "edge"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TYPES)
def test_kernel_matches_reference(name, method, dist):
    x = DATA[dist]
    size = formats.get(name).type_size
    ours = quantize_ggml(x, name, method).reshape(-1, size)
    want = ref.quantize_blocks(x.reshape(-1, QK), name, method)
    same = (ours == want).all(axis=1)
    assert same.all(), f"{name} {method} {dist}: blocks {np.flatnonzero(~same)[:10]} differ"


finite_block = st.tuples(
    st.integers(-40, 5),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["gauss", "t3", "sparse", "positive"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(finite_block)
def test_kernel_matches_reference_any_scale(params):
    exponent, seed, kind = params
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, 2 * QK) if kind == "t3" else rng.standard_normal(2 * QK)
    if kind == "sparse":
        x = np.where(rng.random(2 * QK) < 0.9, 0.0, x)
    if kind == "positive":
        x = np.abs(x)
    x = (x * 10.0**exponent).astype(np.float32)
    for name in TYPES:
        size = formats.get(name).type_size
        for method in METHODS:
            ours = quantize_ggml(x, name, method).reshape(-1, size)
            np.testing.assert_array_equal(
                ours, ref.quantize_blocks(x.reshape(-1, QK), name, method)
            )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TYPES)
def test_threads_unaligned_and_dtypes_give_the_same_bytes(name, method):
    x = _blocks(64 * 5 + 3, "t3", 5)  # several chunks of 64 blocks per thread
    want = quantize_ggml(x, name, method, threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(quantize_ggml(x, name, method, threads=threads), want)
    buf = bytearray(x.nbytes + 1)
    odd = np.frombuffer(buf, np.float32, count=x.size, offset=1)
    odd[:] = x
    assert odd.ctypes.data % 4 != 0
    np.testing.assert_array_equal(quantize_ggml(odd, name, method, threads=2), want)
    x16 = x[: 8 * QK].astype(np.float16)
    np.testing.assert_array_equal(
        quantize_ggml(x16, name, method), quantize_ggml(x16.astype(np.float32), name, method)
    )
    x64 = x[: 8 * QK].astype(np.float64) * (1 + 1e-9)
    np.testing.assert_array_equal(
        quantize_ggml(x64, name, method), quantize_ggml(x64.astype(np.float32), name, method)
    )


# ---------------------------------------------------------------------------------------
# mse: never worse than rtn on a block, better overall


def _snr(x: np.ndarray, sse: float) -> float:
    return 10 * np.log10(float(np.sum(x.astype(np.float64) ** 2)) / sse)


@pytest.mark.parametrize("dist", ["gauss", "t3", "edge"])
@pytest.mark.parametrize("name", TYPES)
def test_mse_never_worse_than_rtn(name, dist):
    x = DATA[dist]
    _, sse_rtn, _ = quantize_ggml(x, name, "rtn", stats=True)
    _, sse_mse, _ = quantize_ggml(x, name, "mse", stats=True)
    worse = np.flatnonzero(sse_mse > sse_rtn)
    assert worse.size == 0, f"{name} {dist}: mse worse on blocks {worse[:10]}"
    if dist != "edge":
        assert sse_mse.sum() < sse_rtn.sum()


@pytest.mark.parametrize("name", TYPES)
def test_mse_gain_on_heavy_tailed_data(name):
    x = _blocks(256, "t3", 11)
    _, sse_rtn, _ = quantize_ggml(x, name, "rtn", stats=True)
    _, sse_mse, _ = quantize_ggml(x, name, "mse", stats=True)
    assert _snr(x, sse_mse.sum()) >= _snr(x, sse_rtn.sum()) + 0.15


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TYPES)
def test_edge_blocks_decode_sensibly(name, method):
    edge = _edge_blocks()
    out = dequantize_ggml(quantize_ggml(edge.reshape(-1), name, method), name).reshape(edge.shape)
    np.testing.assert_array_equal(out[0], 0.0)  # zeros stay zeros
    assert np.isfinite(out[:9]).all()  # up to the fp16 range the scales stay finite
    for i in range(1, 9):
        err = np.abs(out[i] - edge[i]).max()
        assert err <= np.abs(edge[i]).max(), f"block {i}: error {err} larger than the block"
    # a block of one large outlier keeps its outlier close
    assert abs(out[3, 77] - 1e4) < 0.01 * 1e4


def test_reference_rejects_other_types():
    with pytest.raises(ValueError, match="Q2_K and Q3_K"):
        ref.quantize_blocks(np.zeros((1, QK), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="method"):
        ref.quantize_blocks(np.zeros((1, QK), np.float32), "Q2_K", "fast")
