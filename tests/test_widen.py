"""The widening kernel (``flightquant._widen``) and the tensor batches built on it, against
NumPy: widened values bit for bit, the sum of squares equal to its definition
(``modelfiles.tensors.signal_reference``) at every thread count, any alignment."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest
from safetensors.numpy import save_file

from flightquant import _widen, modelfiles
from flightquant.cli.common import read_ahead
from flightquant.modelfiles import tensors as tmod
from flightquant.modelfiles.tensors import BufferPool, signal_reference, widen_into

CHUNK = _widen.chunk_elements()
KINDS = {0: np.float32, 1: ml_dtypes.bfloat16, 2: np.float16}
SIZES = [0, 1, 7, 8, 9, 100, CHUNK - 1, CHUNK, CHUNK + 5, 3 * CHUNK + 13]
THREADS = [1, 2, 3, 7]


def _at(a: np.ndarray, shift: int) -> np.ndarray:
    """The bytes of ``a`` starting ``shift`` bytes past an aligned address."""
    raw = np.zeros(a.nbytes + 16, np.uint8)
    base = -raw.ctypes.data % 16
    out = raw[base + shift : base + shift + a.nbytes]
    out[:] = a.reshape(-1).view(np.uint8)
    return out


def _values(kind: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(4, n) * 0.05).astype(np.float32)
    return x.astype(KINDS[kind])


def _widen_np(src: np.ndarray, kind: int, shift: int = 0, threads: int = 1):
    dst = _at(np.zeros(src.size, np.float32), shift)
    s = _widen.widen(_at(src, shift + 1), kind, dst, threads)
    return dst.copy().view(np.float32), s


def test_float16_every_bit_pattern_widens_as_numpy():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got, _ = _widen_np(bits.view(np.float16), 2)
    want = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_bfloat16_every_bit_pattern_widens_as_numpy():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got, _ = _widen_np(bits.view(ml_dtypes.bfloat16), 1)
    want = bits.astype(np.uint32) << 16  # NaN payloads kept, as the top half of a float32
    np.testing.assert_array_equal(got.view(np.uint32), want)
    finite = np.isfinite(got)
    np.testing.assert_array_equal(
        got[finite], bits.view(ml_dtypes.bfloat16)[finite].astype(np.float32)
    )


def test_float32_is_copied_bit_for_bit():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 32, 5000, dtype=np.uint64).astype(np.uint32)  # NaNs included
    got, _ = _widen_np(bits.view(np.float32), 0, shift=3)
    np.testing.assert_array_equal(got.view(np.uint32), bits)


@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("n", SIZES)
def test_signal_is_the_defined_sum_at_every_thread_count_and_alignment(kind, n):
    src = _values(kind, n, seed=n + kind)
    want_values = src.astype(np.float32)
    want = signal_reference(want_values)
    for threads in THREADS:
        for shift in (0, 1, 2, 3):
            got_values, got = _widen_np(src, kind, shift, threads)
            assert got == want, (threads, shift)  # the same bits, not merely close
            np.testing.assert_array_equal(got_values.view(np.uint32), want_values.view(np.uint32))
    if n:  # and the definition is a sum of squares
        exact = math.fsum(float(v) ** 2 for v in want_values.astype(np.float64))
        assert want == pytest.approx(exact, rel=1e-12)


def test_default_threads_give_the_same_bits():
    src = _values(1, 5 * CHUNK + 3, seed=9)
    dst = np.zeros(src.size, np.float32)
    a = _widen.widen(src.view(np.uint8), 1, dst.view(np.uint8))
    b = _widen.widen(src.view(np.uint8), 1, dst.view(np.uint8), 1)
    assert a == b == signal_reference(src.astype(np.float32))


def test_pieces_of_whole_chunks_chain_to_one_call():
    src = _values(2, 4 * CHUNK + 77, seed=4)
    dst = np.zeros(src.size, np.float32)
    s = 0.0
    for lo in range(0, src.size, 2 * CHUNK):
        piece = src[lo : lo + 2 * CHUNK]
        s = _widen.widen(piece.view(np.uint8), 2, dst[lo : lo + piece.size].view(np.uint8), 2, s)
    assert s == signal_reference(src.astype(np.float32))
    np.testing.assert_array_equal(dst, src.astype(np.float32))


def test_float32_in_place():
    x = _values(0, 2 * CHUNK + 1, seed=5)
    buf = x.copy().view(np.uint8)
    s = _widen.widen(buf, 0, buf, 2)
    assert s == signal_reference(x)
    np.testing.assert_array_equal(buf.view(np.float32), x)


def test_bad_arguments_are_refused():
    b = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="kind"):
        _widen.widen(b, 3, np.zeros(16, np.uint8))
    with pytest.raises(ValueError, match="whole values"):
        _widen.widen(b[:7], 1, np.zeros(12, np.uint8))
    with pytest.raises(ValueError, match="dst holds"):
        _widen.widen(b, 1, np.zeros(15, np.uint8))
    assert _widen.widen(b[:0], 1, np.zeros(0, np.uint8), 1, 2.5) == 2.5


@pytest.mark.parametrize(
    "dtype", [">f2", ">f4", "<f8", "float8_e4m3fn", "float8_e5m2", "<f2", "bfloat16"]
)
def test_widen_into_every_float_dtype(dtype):
    ml = dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
    np_dtype = modelfiles.numpy_dtype(dtype) if ml else np.dtype(dtype)
    arr = _values(0, 3 * CHUNK + 1, seed=6).reshape(-1, 1).astype(np_dtype)
    name = dtype if ml else np_dtype.name
    dst = np.zeros(arr.size * 4, np.uint8)
    s = widen_into(arr, name, dst[:], "t", threads=3)
    want = modelfiles.to_float32(arr, name)
    np.testing.assert_array_equal(dst.view(np.float32), want)
    assert s == signal_reference(want)


# --------------------------------------------------------------------------- batches


@pytest.fixture
def model(tmp_path):
    rng = np.random.default_rng(7)
    tensors = {
        "a.bf16": rng.standard_normal((33, 700)).astype(ml_dtypes.bfloat16),
        "b.f16": rng.standard_normal((3, CHUNK + 5)).astype(np.float16),
        "c.f32": rng.standard_normal((2, 3000)).astype(np.float32),
        "d.f64": rng.standard_normal(50),
        "e.ids": np.arange(10, dtype=np.int64),
        "f.empty": np.zeros((0, 4), np.float32),
        "g.bf16": rng.standard_normal((300, 900)).astype(ml_dtypes.bfloat16),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("max_bytes", [1, 20_000, 1 << 30])
def test_file_spans_equal_arrays_and_signals_equal_the_definition(model, monkeypatch, max_bytes):
    path, tensors = model
    monkeypatch.setattr(tmod._SpanReader, "PIECE", 2 * 2 * CHUNK)  # several pieces per tensor
    src = modelfiles.open_input(path)
    seen: list = []
    spans = list(
        modelfiles.tensor_batches(
            src, max_batch_bytes=max_bytes, on_batch=lambda i, s: seen.append((i, s)), threads=2
        )
    )
    plain = list(modelfiles.tensor_batches(iter(list(src)), max_batch_bytes=max_bytes))
    assert len(spans) == len(plain) == len(seen)
    for a, b in zip(spans, plain, strict=True):
        a.validate(full=True)
        assert a.equals(b)
    for infos, signal in seen:
        for info, s in zip(infos, signal, strict=True):
            if info.is_float:
                want = modelfiles.to_float32(tensors[info.name], info.dtype)
                assert s == signal_reference(want), info.name
            else:
                assert np.isnan(s)
    if max_bytes == 1:  # one tensor per batch; a batch never exceeds the limit otherwise
        assert [b.num_rows for b in spans] == [1] * len(tensors)
    for b in spans:
        assert b.num_rows == 1 or b.column("weights").values.nbytes <= max_bytes


def test_a_file_truncated_after_opening_is_one_clear_error(model):
    path, _ = model
    src = modelfiles.open_input(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(modelfiles.ModelIOError, match="cannot read tensor .*truncated"):
        list(modelfiles.tensor_batches(src))


def test_batches_held_by_the_consumer_are_never_overwritten(model):
    path, tensors = model
    src = modelfiles.open_input(path)
    # every batch kept: the pool must not recycle a buffer a live batch still uses
    batches = list(modelfiles.tensor_batches(src, max_batch_bytes=1))
    back = dict(kv for b in batches for kv in modelfiles.tensors_from_batch(b))
    for name, x in tensors.items():
        if x.dtype == np.float64:  # narrowed to float32 on the way
            np.testing.assert_array_equal(back[name], x.astype(np.float32))
        else:
            np.testing.assert_array_equal(back[name].view(np.uint8), x.view(np.uint8))


def test_buffer_pool_reuses_free_buffers_only():
    pool = BufferPool(keep=2, wait=0.0)
    a = pool.take(1000)
    a_id = id(a.base)  # an id, not a reference: a reference would keep the buffer busy
    b = pool.take(1000)
    assert id(b.base) != a_id
    del a
    c = pool.take(500)  # a's buffer is free again
    assert id(c.base) == a_id and c.size == 500
    held = pa.py_buffer(c)  # held through Arrow only, as a batch holds it
    del c
    d = pool.take(500)  # both kept buffers busy (b, held): one the pool does not keep
    assert id(d.base) not in (a_id, id(b.base))
    assert len(pool._bufs) == 2
    del held, d, b
    e = pool.take(4000)  # bigger than any free one: a kept buffer is replaced
    assert e.size == 4000 and len(pool._bufs) == 2
    assert np.frombuffer(e, np.uint8).flags.writeable


def test_read_ahead_keeps_at_most_depth_plus_one_alive():
    made: list[int] = []
    alive = {"n": 0, "max": 0}

    class Item:
        def __init__(self, i):
            made.append(i)
            alive["n"] += 1
            alive["max"] = max(alive["max"], alive["n"])

        def __del__(self):
            alive["n"] -= 1

    def items():
        for i in range(20):
            yield Item(i)

    import time

    for item in read_ahead(items(), depth=1):
        time.sleep(0.005)  # a slow consumer: the producer would run ahead if it could
        del item
    assert made == list(range(20))
    assert alive["max"] <= 2


# --------------------------------------------------------------------------- narrowing


@pytest.mark.parametrize("threads", THREADS)
def test_narrow_bf16_equals_ml_dtypes_on_any_bits_and_alignment(threads):
    rng = np.random.default_rng(threads)
    bits = rng.integers(0, 1 << 32, 3 * CHUNK + 11, dtype=np.uint64).astype(np.uint32)
    bits[:6] = [0x7F800000, 0xFF800000, 0x7F800001, 0xFFC12345, 0x7F7FFFFF, 0x00008000]
    x = bits.view(np.float32)
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    for shift in (0, 1, 3):
        out = _at(np.zeros(x.size, np.uint16), shift)
        _widen.narrow_bf16(_at(x, shift + 1), out, threads)
        np.testing.assert_array_equal(out.view(np.uint16), want)


def test_narrow_bf16_refuses_bad_sizes():
    with pytest.raises(ValueError, match="whole float32"):
        _widen.narrow_bf16(np.zeros(6, np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="dst holds"):
        _widen.narrow_bf16(np.zeros(8, np.uint8), np.zeros(3, np.uint8))


def test_safetensors_writer_narrows_float32_as_astype(tmp_path, monkeypatch):
    monkeypatch.setattr(modelfiles.SafetensorsWriter, "PIECE", 1000)  # several pieces
    rng = np.random.default_rng(8)
    x = rng.standard_normal((7, 1001)).astype(np.float32)
    info = modelfiles.TensorInfo("w", x.shape, "bfloat16")
    path = tmp_path / "o.safetensors"
    path.write_bytes(b"")  # as atomic_output leaves it: appended to, not truncated
    assert modelfiles.write_mode(path) == "ab"
    w = modelfiles.SafetensorsWriter(path, [info])
    w.write("w", x)
    w.close()
    src = modelfiles.open_input(path)
    got = src.read(src.infos[0])
    np.testing.assert_array_equal(got.view(np.uint16), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert modelfiles.write_mode(path) == "wb"  # a file with contents is truncated
