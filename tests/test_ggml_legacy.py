"""ggml's legacy (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) and ternary (TQ1_0 TQ2_0) blocks: the kernels
against gguf-py, llama.cpp's C (when its library is installed) and the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flightquant import formats, kernels
from flightquant.errors import NonFiniteError
from flightquant.reference import ggml_legacy as ref
from flightquant.testing import llama_quantizer

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf import quants as gq  # noqa: E402

TYPES = ref.TYPES
F32 = np.float32


def _gtype(name):
    return GGMLQuantizationType[name]


def _data(dist: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "gauss":
        x = rng.standard_normal(n)
    elif dist == "t3":
        x = rng.standard_t(3, n)
    else:  # blocks of very different scales, some with an offset (the Q4_1/Q5_1 case)
        x = rng.standard_normal(n) * np.repeat(10.0 ** rng.uniform(-6, 3, n // 32 + 1), 32)[:n]
        x += np.repeat(rng.uniform(-2, 2, n // 32 + 1) * (rng.random(n // 32 + 1) < 0.3), 32)[:n]
    return x.astype(F32)


def _misaligned(a: np.ndarray) -> np.ndarray:
    """The same values in a buffer at an odd address (as Flight may hand them over)."""
    raw = bytearray(a.nbytes + 1)
    out = np.frombuffer(raw, a.dtype, count=a.size, offset=1)
    out[...] = a
    assert out.ctypes.data % 2 == 1
    return out


def _blocks(x, name):
    return x.reshape(-1, formats.get(name).block_size)


def _gguf_quant(x, name):
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return gq.quantize(_blocks(x, name), _gtype(name)).reshape(-1)


def _gguf_dequant(b, name):
    return gq.dequantize(b.reshape(-1, formats.get(name).type_size), _gtype(name)).reshape(-1)


def _block_sse(x, data, name):
    """Per-block float64 squared error of the decoded blocks, summed in index order."""
    xh = kernels.dequantize_ggml(data, name).astype(np.float64)
    e = (x.astype(np.float64) - xh).reshape(-1, formats.get(name).block_size)
    return np.add.accumulate(e * e, axis=1)[:, -1]


def _bits_equal(a, b):
    return np.array_equal(np.asarray(a, F32).view(np.uint32), np.asarray(b, F32).view(np.uint32))


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", TYPES)
def test_registry_matches_gguf(name):
    t = formats.get(name)
    assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[_gtype(name)]
    assert t.ggml_type == int(_gtype(name))


# --------------------------------------------------------------------------- rtn vs peers


@pytest.mark.parametrize("dist", ["gauss", "t3", "scales"])
@pytest.mark.parametrize("name", TYPES)
def test_rtn_bytes_equal_gguf_and_reference(name, dist):
    x = _data(dist, 256 * 64, seed=TYPES.index(name))
    got = kernels.quantize_ggml(x, name, method="rtn")
    np.testing.assert_array_equal(got, _gguf_quant(x, name))
    np.testing.assert_array_equal(got, ref.quantize_blocks(_blocks(x, name), name).reshape(-1))


LLAMA = llama_quantizer()


@pytest.mark.llama
@pytest.mark.skipif(
    LLAMA is None, reason="llama.cpp's libggml-base is not installed (llama-cpp-python)"
)
@pytest.mark.parametrize("name", TYPES)
def test_rtn_bytes_equal_llama_cpp(name):
    t = formats.get(name)
    x = np.concatenate([_data("t3", 256 * 32, 1), _data("scales", 256 * 32, 2)])
    # signed zeros at the extremes: both sides keep the first of equal extremes
    x[:32] = 0.0
    x[0] = -0.0
    x[256:288] = np.abs(x[256:288])
    x[256 + 5] = -0.0
    out = LLAMA.quantize(x, name, n_per_row=4096)
    assert t.row_bytes(x.size) == out.size
    np.testing.assert_array_equal(kernels.quantize_ggml(x, name, method="rtn"), out)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_signed_zero_extremes_follow_ggml(name):
    """Where gguf-py's NumPy min/argmax cannot say which of -0.0 / +0.0 is the extreme,
    ggml keeps the first: an all-zero Q4_0 block starting with -0.0 still has d = -0.0
    (max stays +0.0, d = max / -8), and Q4_1's min is the first zero."""
    x = np.zeros(32, F32)
    x[0] = -0.0
    b = kernels.quantize_ggml(x, name)
    d = b[:2].view("<u2")[0]
    if name in ("Q4_0", "Q5_0"):
        assert d == 0x8000
    else:
        assert b[2:4].view("<u2")[0] == 0x8000  # m = the first zero, -0.0
    np.testing.assert_array_equal(b, ref.quantize_blocks(x.reshape(1, 32), name).reshape(-1))


# --------------------------------------------------------------------------- decode


def _random_blocks(name, n_blocks, seed=0):
    """Arbitrary codes with finite float16 scales/mins in their fields."""
    t = formats.get(name)
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    scales = rng.standard_normal(n_blocks * 2).astype(np.float16).view(np.uint8).reshape(-1, 4)
    if name.startswith("TQ"):
        b[:, -2:] = scales[:, :2]
    else:
        b[:, :2] = scales[:, :2]
        if name in ("Q4_1", "Q5_1"):
            b[:, 2:4] = scales[:, 2:]
    return b


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_equals_gguf_and_reference(name):
    b = _random_blocks(name, 300)
    got = kernels.dequantize_ggml(b.reshape(-1), name)
    assert _bits_equal(got, _gguf_dequant(b, name))
    assert _bits_equal(got, ref.dequantize_blocks(b, name).reshape(-1))


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_unaligned_codes_and_dtypes(name):
    b = _random_blocks(name, 130, seed=3).reshape(-1)
    want = kernels.dequantize_ggml(b, name)
    assert _bits_equal(kernels.dequantize_ggml(_misaligned(b), name), want)
    np.testing.assert_array_equal(
        kernels.dequantize_ggml(b, name, np.float64), want.astype(np.float64)
    )
    np.testing.assert_array_equal(
        kernels.dequantize_ggml(b, name, np.float16).view(np.uint16),
        want.astype(np.float16).view(np.uint16),
    )


# --------------------------------------------------------------------------- mse


@pytest.mark.parametrize("dist", ["gauss", "t3", "scales"])
@pytest.mark.parametrize("name", TYPES)
def test_mse_kernel_equals_reference_and_gguf_decodes(name, dist):
    x = _data(dist, 256 * 64, seed=7)
    got = kernels.quantize_ggml(x, name, method="mse")
    np.testing.assert_array_equal(
        got, ref.quantize_blocks(_blocks(x, name), name, "mse").reshape(-1)
    )
    assert _bits_equal(kernels.dequantize_ggml(got, name), _gguf_dequant(got, name))


#: least SNR gain (dB) of mse over rtn on 64K weights (measured: >= 2x these)
MIN_GAIN = {"Q4_0": 0.15, "Q5_0": 0.1, "Q8_0": 0.2, "Q4_1": 0.4, "Q5_1": 0.3,
            "TQ1_0": 1.0, "TQ2_0": 1.0}  # fmt: skip


@pytest.mark.parametrize("dist", ["gauss", "t3"])
@pytest.mark.parametrize("name", TYPES)
def test_mse_never_worse_per_block_and_better_overall(name, dist):
    x = _data(dist, 256 * 256, seed=11)
    r, r_sse, _ = kernels.quantize_ggml(x, name, method="rtn", stats=True)
    m, m_sse, _ = kernels.quantize_ggml(x, name, method="mse", stats=True)
    np.testing.assert_array_equal(r_sse, _block_sse(x, r, name))  # stats = sequential float64
    np.testing.assert_array_equal(m_sse, _block_sse(x, m, name))
    assert (m_sse <= r_sse).all()
    gain = 10 * np.log10(r_sse.sum() / m_sse.sum())
    assert gain > MIN_GAIN[name], f"{name} {dist}: mse gains only {gain:.3f} dB"


# --------------------------------------------------------------------------- edge blocks


def _edge_cases(block):
    rng = np.random.default_rng(5)
    g = rng.standard_normal(block).astype(F32)
    cases = {
        "zeros": np.zeros(block, F32),
        "constant": np.full(block, 0.3, F32),
        "negative constant": np.full(block, -7.0, F32),
        "outlier": np.where(np.arange(block) == block // 3, F32(1e4), g * F32(0.01)),
        "tiny": g * F32(1e-30),
        "subnormal": g * F32(1e-40),
        "near fp16 max": np.clip(g, -1, 1) * F32(65000),
        "fp16 max positive": np.abs(g) / np.abs(g).max() * F32(65504),
        "two levels": np.where(g > 0, F32(1), F32(-1)),
        "tie of extremes": np.where(np.arange(block) % 2 == 0, F32(2), F32(-2)) * (g > -9),
        "ramp": np.linspace(-1, 1, block, dtype=F32),
        "shifted": g + F32(100),
    }
    return cases


@pytest.mark.parametrize("name", TYPES)
def test_edge_blocks(name):
    t = formats.get(name)
    cases = _edge_cases(t.block_size)
    x = np.concatenate(list(cases.values())).astype(F32)
    want = _gguf_quant(x, name)
    rtn, r_sse, _ = kernels.quantize_ggml(x, name, stats=True)
    mse, m_sse, _ = kernels.quantize_ggml(x, name, method="mse", stats=True)
    for i, case in enumerate(cases):
        s = slice(i * t.type_size, (i + 1) * t.type_size)
        np.testing.assert_array_equal(rtn[s], want[s], err_msg=f"rtn {case}")
        with np.errstate(all="ignore"):
            ok = not (m_sse[i] > r_sse[i])  # NaN stats (an inf fp16 scale) compare False
        assert ok, f"mse worse than rtn on {case}: {m_sse[i]} > {r_sse[i]}"
    with np.errstate(all="ignore"):
        for method, got in (("rtn", rtn), ("mse", mse)):
            np.testing.assert_array_equal(
                got, ref.quantize_blocks(_blocks(x, name), name, method).reshape(-1), method
            )
        # exact cases stay exact, and mse finds a finite scale where rtn's overflows fp16
        dec = kernels.dequantize_ggml(mse, name).reshape(len(cases), -1)
    keys = list(cases)
    np.testing.assert_array_equal(dec[keys.index("zeros")], 0.0)
    if name.startswith("TQ"):
        np.testing.assert_array_equal(dec[keys.index("two levels")], cases["two levels"])
    if name in ("Q4_1", "Q5_1"):
        # the stored min is -7.0 exactly, so a constant block decodes exactly
        np.testing.assert_array_equal(dec[keys.index("negative constant")], F32(-7.0))


@pytest.mark.parametrize("name", TYPES)
def test_non_finite_input_is_an_error(name):
    n = formats.get(name).block_size * 3
    for pos, bad in ((0, -np.inf), (40, np.inf), (n - 1, np.nan)):
        for dtype in (F32, np.float64, np.float16):
            x = _data("gauss", n).astype(dtype)
            x[pos] = bad
            with pytest.raises(NonFiniteError) as err:
                kernels.quantize_ggml(x, name, method="mse")
            assert err.value.element == pos


# --------------------------------------------------------------------------- driver paths


@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("name", TYPES)
def test_threads_unaligned_and_dtypes(name, method):
    t = formats.get(name)
    n_blocks = 64 * 5 + 7 if t.block_size == 32 else 64 * 2 + 5  # several chunks of 64 blocks
    x = _data("t3", n_blocks * t.block_size, seed=13)
    one = kernels.quantize_ggml(x, name, method=method, threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(
            kernels.quantize_ggml(x, name, method=method, threads=threads), one
        )
    np.testing.assert_array_equal(kernels.quantize_ggml(_misaligned(x), name, method=method), one)
    dec1 = kernels.dequantize_ggml(one, name, threads=1)
    assert _bits_equal(kernels.dequantize_ggml(one, name, threads=3), dec1)
    # float16 widens exactly; float64 rounds to float32 as the kernel reads it
    h = x.astype(np.float16)
    np.testing.assert_array_equal(
        kernels.quantize_ggml(h, name, method=method),
        kernels.quantize_ggml(h.astype(F32), name, method=method),
    )
    np.testing.assert_array_equal(
        kernels.quantize_ggml(_misaligned(h), name, method=method),
        kernels.quantize_ggml(h.astype(F32), name, method=method),
    )
    w = x.astype(np.float64) * (1 + 1e-9)
    np.testing.assert_array_equal(
        kernels.quantize_ggml(w, name, method=method),
        kernels.quantize_ggml(w.astype(F32), name, method=method),
    )


# --------------------------------------------------------------------------- properties

_finite = st.floats(-3e4, 3e4, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(TYPES),
    data=st.data(),
)
def test_property_kernel_equals_reference_and_gguf(name, data):
    bs = formats.get(name).block_size
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e2]))
    vals = data.draw(st.lists(_finite, min_size=bs, max_size=bs))
    x = (np.array(vals, F32) * F32(scale)).astype(F32) + F32(0.0)  # no -0.0 (see docs)
    np.testing.assert_array_equal(kernels.quantize_ggml(x, name), _gguf_quant(x, name))
    for method in ("rtn", "mse"):
        np.testing.assert_array_equal(
            kernels.quantize_ggml(x, name, method=method),
            ref.quantize_blocks(x.reshape(1, bs), name, method).reshape(-1),
        )
    r = kernels.quantize_ggml(x, name, stats=True)[1]
    m = kernels.quantize_ggml(x, name, method="mse", stats=True)[1]
    assert not (m > r).any()
