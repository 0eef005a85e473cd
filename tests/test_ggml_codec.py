"""llama.cpp's ggml block formats through the codec, the in-process API and the server.

The codes of each row must be exactly ggml's bytes (the kernels', the NumPy reference's,
and for the types gguf-py implements, gguf-py's own quantizer's), decodable by gguf-py's
``quants.dequantize`` to what ``fq.dequantize`` gives, bit for bit, and the same through a
server driven by a plain pyarrow Flight client.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from common import (
    LIST_TYPES,
    assert_clean,
    assert_same,
    exchange,
    expected_dequantize,
    expected_quantize,
    unaligned,
)

import flightquant as fq
from flightquant import codec, formats, kernels
from flightquant.options import OptionsError, QuantOptions

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

TYPES = list(formats.GGML_TYPES)
#: the quantizers gguf-py implements bit-identically to llama.cpp
GGUF_QUANTIZES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0"]


def ggml_batch(
    t: formats.GgmlType,
    kind="list",
    dtype=np.float32,
    blocks=(3, 0, 1, 2),
    nulls=(),
    seed=0,
    heavy=True,
) -> pa.RecordBatch:
    """Rows of whole blocks of Student-t(3) weights (real weights are heavy-tailed)."""
    rng = np.random.default_rng(seed)
    if kind == "fixed_size_list":
        blocks = [max(blocks)] * len(blocks)
    rows = []
    for i, b in enumerate(blocks):
        n = b * t.block_size
        x = rng.standard_t(3, n) if heavy else rng.standard_normal(n)
        rows.append(None if i in nulls else (0.02 * x).astype(dtype))
    typ = LIST_TYPES[kind](pa.from_numpy_dtype(dtype), max(blocks) * t.block_size)
    return pa.record_batch(
        {
            "layer_name": [f"blk.{i}.weight" for i in range(len(blocks))],
            "weights": pa.array(rows, typ),
            "step": pa.array(np.arange(len(blocks), dtype=np.int64)),
        }
    )


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_codes_are_ggml_bytes_and_decode_as_gguf_py_decodes(name, method):
    t = formats.get(name)
    batch = ggml_batch(t, nulls={1})
    q = fq.quantize(batch, format=name, method=method)
    field = q.schema.field("weights")
    assert field.metadata[b"flightquant.format_version"] == b"2"
    assert field.metadata[b"flightquant.format"] == name.encode()
    assert q.schema.names == ["layer_name", "weights", "step"]  # no scale columns
    back = fq.dequantize(q)
    for i, row in enumerate(batch.column("weights").to_pylist()):
        codes = q.column("weights")[i].as_py()
        if row is None:
            assert codes is None and back.column("weights")[i].as_py() is None
            continue
        x = np.asarray(row, np.float32)
        assert len(codes) == t.row_bytes(x.size)
        # the kernels' one-row call gives the same bytes
        assert codes == kernels.quantize_ggml(x, name, method).tobytes()
        if method == "rtn" and name in GGUF_QUANTIZES and x.size:
            want = gguf_quantize(x.reshape(-1, t.block_size), gguf.GGMLQuantizationType[name])
            assert codes == want.tobytes()
        blocks = np.frombuffer(codes, np.uint8).reshape(-1, t.type_size)
        decoded = gguf_dequantize(blocks, gguf.GGMLQuantizationType[name]).reshape(-1)
        got = np.asarray(back.column("weights")[i].values, np.float32)
        np.testing.assert_array_equal(
            got.view(np.uint32), decoded.astype(np.float32).view(np.uint32)
        )


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q2_K", "TQ2_0", "Q5_1", "IQ4_NL"])
@pytest.mark.parametrize("kind", list(LIST_TYPES))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_batches_equal_the_reference(name, kind, dtype):
    t = formats.get(name)
    batch = ggml_batch(t, kind, dtype, nulls={2})
    for opts in (
        {"format": name},
        {"format": name, "method": "mse", "stats": True},
        {"format": name, "clip": 0.05},
        {"format": name, "clip": 0.03, "stats": True},
    ):
        options = QuantOptions.from_mapping(opts)
        q, info = codec.quantize_batch(batch, options, threads=2)
        assert_same(q, expected_quantize(batch, options))
        d, dinfo = codec.dequantize_batch(q, threads=2)
        assert_same(d, expected_dequantize(q))
        assert d.schema.equals(batch.schema)
        assert (
            info.elements
            == dinfo.elements
            == sum(len(r) for r in batch.column("weights").to_pylist() if r is not None)
        )
        if options.stats:
            assert info.sse > 0 and info.max_abs_error > 0


@pytest.mark.parametrize("name", ["Q4_0", "Q6_K", "Q3_K", "TQ1_0", "IQ4_XS"])
def test_unaligned_buffers_slices_and_threads(name):
    t = formats.get(name)
    batch = ggml_batch(t, blocks=[70, 1, 0, 65, 3], nulls={4})  # several chunks of 64 blocks
    want = fq.quantize(batch, format=name, threads=1)
    for threads in (2, 3):
        assert_same(fq.quantize(batch, format=name, threads=threads), want)
    moved = unaligned(batch)
    assert moved.column("weights").values.buffers()[1].address % 4 != 0
    assert_same(fq.quantize(moved, format=name), want)
    qm = unaligned(want)
    assert qm.column("weights").buffers()[2].address % 2 != 0
    assert_same(fq.dequantize(qm, threads=3), fq.dequantize(want, threads=1))
    part = batch.slice(1, 3)
    assert_same(fq.quantize(part, format=name), want.slice(1, 3))
    assert_same(fq.dequantize(want.slice(1, 3)), fq.dequantize(want).slice(1, 3))


def test_mse_is_never_worse_than_rtn_on_heavy_tailed_weights():
    for name in TYPES:
        t = formats.get(name)
        x = (0.02 * np.random.default_rng(5).standard_t(3, 64 * t.block_size)).astype(np.float32)
        err = {}
        for method in ("rtn", "mse"):
            back = kernels.dequantize_ggml(kernels.quantize_ggml(x, name, method), name)
            err[method] = float(np.sum((x.astype(np.float64) - back) ** 2))
        assert err["mse"] <= err["rtn"], name


def test_errors_name_the_row_and_the_valid_values():
    t = formats.get("Q4_K")
    bad = pa.record_batch(
        {
            "layer_name": ["a", "b"],
            "weights": pa.array(
                [np.ones(256, np.float32), np.ones(100, np.float32)], pa.list_(pa.float32())
            ),
        }
    )
    with pytest.raises(
        codec.CodecError,
        match=r"row 1 \('b'\): 100 elements is not a multiple of "
        r"Q4_K block size 256",
    ):
        fq.quantize(bad, format="Q4_K")
    fixed = pa.record_batch(
        {"w": pa.array([np.ones(100, np.float32)], pa.list_(pa.float32(), 100))}
    )
    with pytest.raises(codec.CodecError, match="not whole Q4_K blocks of 256"):
        fq.quantize(fixed, format="Q4_K")
    for extra in ({"bits": 4}, {"group_size": 32}, {"scheme": "symmetric"}):
        with pytest.raises(OptionsError, match="cannot be given with format='Q4_K'"):
            fq.quantize(bad.slice(0, 1), format="Q4_K", **extra)
    with pytest.raises(OptionsError, match=r"format must be one of 'native', 'Q4_0'.*got 'Q4_X'"):
        fq.quantize(bad, format="Q4_X")
    nan = np.ones(t.block_size, np.float32)
    nan[7] = np.nan
    with pytest.raises(fq.NonFiniteError, match=r"row 0 \('a'\), element 7"):
        fq.quantize(
            pa.record_batch(
                {"layer_name": ["a"], "weights": pa.array([nan], pa.list_(pa.float32()))}
            ),
            format="Q4_K",
        )
    # truncated codes: not a whole number of blocks
    q = fq.quantize(bad.slice(0, 1), format="Q4_K")
    codes = q.column("weights")
    cut = pa.Array.from_buffers(
        pa.binary(),
        1,
        [None, pa.py_buffer(np.array([0, 143], np.int32).tobytes()), codes.buffers()[2]],
    )
    with pytest.raises(
        codec.CodecError, match="143 code bytes is not a whole number of Q4_K blocks of 144"
    ):
        fq.dequantize(q.set_column(1, q.schema.field("weights"), cut))


def test_quantize_arrays_with_a_ggml_format():
    w = (0.02 * np.random.default_rng(1).standard_normal((8, 512))).astype(np.float32)
    res = fq.quantize_arrays({"w": w}, format="Q5_K", method="mse")
    r = res["w"]
    assert r.format == "Q5_K" and r.codes.size == 8 * 2 * 176 and r.numel == w.size
    back = r.dequantize()
    assert back.shape == w.shape
    blocks = r.codes.reshape(-1, 176)
    np.testing.assert_array_equal(
        back.reshape(-1), gguf_dequantize(blocks, gguf.GGMLQuantizationType.Q5_K).reshape(-1)
    )


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "TQ2_0", "IQ4_XS"])
def test_server_speaks_the_same_bytes_to_a_plain_flight_client(server, name):
    t = formats.get(name)
    s = server()
    batches = [ggml_batch(t, seed=i) for i in range(3)]
    command = flight.FlightDescriptor.for_command(
        json.dumps({"format": name, "method": "mse"}).encode()
    )
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(command)
        writer.begin(batches[0].schema)
        got = []
        for b in batches:
            writer.write_batch(b)
            chunk = reader.read_chunk()
            got.append(chunk.data)
            meta = json.loads(chunk.app_metadata.to_pybytes())
            assert meta["elements"] == sum(len(r) for r in b.column("weights").to_pylist())
        writer.done_writing()
        writer.close()
    for b, q in zip(batches, got):
        assert_same(q, fq.quantize(b, format=name, method="mse"))
    # and back through the server, decoded as gguf-py decodes
    with fq.Client(s.location) as c:
        back = c.dequantize(pa.Table.from_batches(got))
    assert back.equals(fq.dequantize(pa.Table.from_batches(got)))
    with flight.connect(s.location) as client:
        with pytest.raises(pa.ArrowInvalid, match="cannot be given with format") as info:
            exchange(
                client,
                json.dumps({"format": name, "bits": 4}).encode(),
                batches[0].schema,
                batches[:1],
            )
        assert_clean(info.value)
