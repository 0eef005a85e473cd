"""llama.cpp's imatrix files: GGUF and legacy .dat read and written exactly, the GGUF layout
llama-imatrix writes (tools/imatrix/imatrix.cpp, ``save_imatrix``), and hostile files."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from flightquant.modelfiles import ModelIOError
from flightquant.modelfiles.imatrix import (
    Imatrix,
    ImatrixEntry,
    read_imatrix,
    write_imatrix,
)

PEAK_LIMIT = 32 << 20
TIME_LIMIT = 5.0


def sample(seed: int = 0, *, datasets=("wiki.train.raw",), in_sum: bool = False) -> Imatrix:
    """A dense weight, a second dense weight and a MoE weight with one unused expert."""
    rng = np.random.default_rng(seed)

    def entry(name, n_mat, k, counts):
        s2 = (rng.random((n_mat, k)) * 50).astype(np.float32)
        s1 = rng.standard_normal((n_mat, k)).astype(np.float32) if in_sum else None
        return ImatrixEntry(name, s2, np.asarray(counts, np.float32), s1)

    entries = [
        entry("blk.0.attn_q.weight", 1, 64, [1024]),
        entry("blk.0.ffn_down.weight", 1, 96, [1024]),
        entry("blk.0.ffn_up_exps.weight", 4, 32, [300, 0, 500, 224]),
    ]
    return Imatrix({e.name: e for e in entries}, list(datasets), 2, 512)


def assert_same(a: Imatrix, b: Imatrix) -> None:
    assert list(a.entries) == list(b.entries)
    for name, e in a.entries.items():
        f = b.entries[name]
        np.testing.assert_array_equal(e.in_sum2, f.in_sum2)
        np.testing.assert_array_equal(e.counts, f.counts)
        if e.in_sum is None:
            assert f.in_sum is None
        else:
            np.testing.assert_array_equal(e.in_sum, f.in_sum)
    assert (a.datasets, a.chunk_count, a.chunk_size) == (b.datasets, b.chunk_count, b.chunk_size)


# --------------------------------------------------------------------------- GGUF


def write_with_gguf_py(path: Path, imx: Imatrix, *, extra_tensor: bool = False) -> None:
    """The file as llama-imatrix lays it out, written by gguf-py alone (an independent
    writer): in_sum2 ``ne=[k, n_mat]``, counts ``ne=[1, n_mat]``, 1-D when n_mat is 1."""
    w = gguf.GGUFWriter(path, "unused")
    w.kv_data = [{}]
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", imx.datasets)
    w.add_uint32("imatrix.chunk_count", imx.chunk_count)
    w.add_uint32("imatrix.chunk_size", imx.chunk_size)
    for name, e in sorted(imx.entries.items()):
        dense = e.n_mat == 1
        w.add_tensor(f"{name}.in_sum2", e.in_sum2.reshape(-1) if dense else e.in_sum2)
        w.add_tensor(f"{name}.counts", e.counts if dense else e.counts.reshape(-1, 1))
        if e.in_sum is not None:
            w.add_tensor(f"{name}.in_sum", e.in_sum.reshape(-1) if dense else e.in_sum)
    if extra_tensor:  # llama.cpp ignores tensors with other names
        w.add_tensor("something.else", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("in_sum", [False, True])
def test_reads_a_gguf_py_file_exactly(tmp_path, in_sum):
    imx = sample(in_sum=in_sum)
    path = tmp_path / "a.imatrix.gguf"
    write_with_gguf_py(path, imx, extra_tensor=True)
    got = read_imatrix(path)
    assert_same(imx, got)
    assert got.path == os.fspath(path)


@pytest.mark.parametrize("datasets", [["a.txt", "b.txt"], []])
def test_gguf_round_trip(tmp_path, datasets):
    imx = sample(3, datasets=datasets, in_sum=True)
    path = tmp_path / "r.imatrix.gguf"
    write_imatrix(path, imx)
    assert_same(imx, read_imatrix(path))
    assert [p.name for p in tmp_path.iterdir()] == ["r.imatrix.gguf"]  # no temporary left


def test_gguf_layout_is_llama_imatrix(tmp_path):
    """Keys, their types and order, tensor order, names, ne and types as llama-imatrix's
    save_imatrix writes them (and as common_imatrix_load, which llama-quantize uses,
    requires: all three imatrix.* keys present, F32 tensors), checked with gguf-py."""
    imx = sample(datasets=[])
    path = tmp_path / "l.imatrix.gguf"
    write_imatrix(path, imx)
    r = gguf.GGUFReader(path)
    fields = [(f.name, [t.name for t in f.types]) for f in r.fields.values()]
    # (gguf-py lists no element type for an empty array: read it from the bytes)
    datasets = r.fields["imatrix.datasets"]
    assert gguf.GGUFValueType(int(datasets.parts[3][0])).name == "STRING"
    assert int(datasets.parts[4][0]) == 0
    assert fields[3:] == [
        ("general.type", ["STRING"]),
        ("imatrix.datasets", ["ARRAY"]),
        ("imatrix.chunk_count", ["UINT32"]),
        ("imatrix.chunk_size", ["UINT32"]),
    ]
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == []  # present although empty
    assert r.fields["imatrix.chunk_size"].contents() == 512
    got = [(t.name, [int(n) for n in t.shape], t.tensor_type.name) for t in r.tensors]
    assert got == [
        ("blk.0.attn_q.weight.in_sum2", [64], "F32"),
        ("blk.0.attn_q.weight.counts", [1], "F32"),
        ("blk.0.ffn_down.weight.in_sum2", [96], "F32"),
        ("blk.0.ffn_down.weight.counts", [1], "F32"),
        ("blk.0.ffn_up_exps.weight.in_sum2", [32, 4], "F32"),
        ("blk.0.ffn_up_exps.weight.counts", [1, 4], "F32"),
    ]
    moe = imx.entries["blk.0.ffn_up_exps.weight"]
    np.testing.assert_array_equal(r.tensors[4].data, moe.in_sum2)
    np.testing.assert_array_equal(r.tensors[5].data.reshape(-1), moe.counts)
    assert r.alignment == 32


def test_importance():
    imx = sample()
    q = imx.entries["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(imx.importance(q.name), q.in_sum2[0] / np.float32(1024))
    assert imx.importance(q.name).shape == (64,)
    moe = imx.importance("blk.0.ffn_up_exps.weight")
    assert moe.shape == (4, 32) and moe.dtype == np.float32
    np.testing.assert_array_equal(moe[1], np.ones(32, np.float32))  # unused expert: ones
    e = imx.entries["blk.0.ffn_up_exps.weight"]
    np.testing.assert_array_equal(moe[2], e.in_sum2[2] / np.float32(500))
    assert imx.importance("no.such.weight") is None


# --------------------------------------------------------------------------- .dat


def dat_bytes(entries, chunk_count=7, dataset=b"calib.txt") -> bytes:
    """A legacy file laid out as save_imatrix_legacy writes it, built byte by byte."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values))
        out += np.asarray(values, "<f4").tobytes()
    if chunk_count is not None:
        out += struct.pack("<i", chunk_count)
        if dataset is not None:
            out += struct.pack("<i", len(dataset)) + dataset
    return out


def test_reads_a_legacy_dat_exactly(tmp_path):
    values = np.arange(1, 17, dtype=np.float32) * 0.25
    path = tmp_path / "legacy.dat"
    path.write_bytes(dat_bytes([("blk.1.attn_k.weight", 4, values), ("output.weight", 0, [2.0])]))
    imx = read_imatrix(path)
    assert list(imx.entries) == ["blk.1.attn_k.weight", "output.weight"]
    assert (imx.datasets, imx.chunk_count) == (["calib.txt"], 7)
    np.testing.assert_array_equal(imx.importance("blk.1.attn_k.weight"), values / np.float32(4))
    # ncall 0: llama-quantize takes the values as they are
    np.testing.assert_array_equal(imx.importance("output.weight"), [2.0])
    # the trailer is optional
    path.write_bytes(dat_bytes([("w", 1, [1.0])], chunk_count=None))
    assert read_imatrix(path).chunk_count == 0


def test_dat_round_trip(tmp_path):
    imx = sample(5)
    path = tmp_path / "r.dat"
    write_imatrix(path, imx, format="dat")
    raw = path.read_bytes()
    back = read_imatrix(path)
    assert list(back.entries) == sorted(imx.entries)
    assert (back.datasets, back.chunk_count) == (imx.datasets[-1:], imx.chunk_count)
    for name, e in imx.entries.items():
        f = back.entries[name]
        # ncall = ceil(max count / chunk size), as save_imatrix_legacy computes it
        ncall = -(-int(e.counts.max()) // imx.chunk_size)
        assert f.counts.tolist() == [ncall]
        want = imx.importance(name).reshape(-1)
        np.testing.assert_allclose(back.importance(name), want, rtol=2e-7)
    # the entry count leads the file; the dataset name ends it
    assert struct.unpack_from("<i", raw)[0] == 3 and raw.endswith(b"wiki.train.raw")
    # what was read writes back to the same importance (a .dat keeps calls, not tokens)
    again = tmp_path / "again.dat"
    write_imatrix(again, back, format="dat")
    twice = read_imatrix(again)
    for name in imx.entries:
        assert twice.entries[name].counts.tolist() == back.entries[name].counts.tolist()
        np.testing.assert_allclose(twice.importance(name), back.importance(name), rtol=2e-7)


def test_dat_to_gguf_and_back(tmp_path):
    path = tmp_path / "a.dat"
    path.write_bytes(dat_bytes([("blk.0.ffn_up.weight", 3, [3.0, 6.0, 9.0])]))
    write_imatrix(tmp_path / "a.gguf", read_imatrix(path))
    np.testing.assert_array_equal(
        read_imatrix(tmp_path / "a.gguf").importance("blk.0.ffn_up.weight"), [1.0, 2.0, 3.0]
    )


# --------------------------------------------------------------------------- writer errors


def test_writer_refuses(tmp_path):
    imx = sample()
    with pytest.raises(ModelIOError, match="format"):
        write_imatrix(tmp_path / "x", imx, format="npz")
    long = ImatrixEntry("m." + "x" * 60 + ".weight", np.ones((1, 4)), [1.0])
    with pytest.raises(ModelIOError, match="63 bytes"):
        write_imatrix(tmp_path / "x.gguf", Imatrix({long.name: long}))
    write_imatrix(tmp_path / "x.dat", Imatrix({long.name: long}), format="dat")  # no limit
    nan = ImatrixEntry("w", np.array([[1.0, np.nan]]), [1.0])
    with pytest.raises(ModelIOError, match="'w'.*element 1"):
        write_imatrix(tmp_path / "y.gguf", Imatrix({"w": nan}))
    with pytest.raises(ModelIOError, match="at least one entry"):
        write_imatrix(tmp_path / "y.gguf", Imatrix())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dat"]  # nothing half-written


# --------------------------------------------------------------------------- hostile files


def attempt(path: Path) -> str | None:
    """Read ``path``: a valid result (None) or one ModelIOError line naming the file;
    bounded in memory and time."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        read_imatrix(path)
        err = None
    except ModelIOError as exc:
        err = str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, peak
    assert time.perf_counter() - t0 < TIME_LIMIT
    if err is not None:
        assert "\n" not in err and path.name in err, err
    return err


def good_gguf(tmp_path: Path, in_sum: bool = True) -> bytes:
    path = tmp_path / "good.gguf"
    write_imatrix(path, sample(in_sum=in_sum))
    return path.read_bytes()


def good_dat() -> bytes:
    return dat_bytes([("blk.0.a.weight", 2, np.ones(16)), ("blk.0.b.weight", 2, np.ones(8))])


DAT_CASES = {
    "entry count 2**31-1": (struct.pack("<i", 2**31 - 1) + good_dat()[4:], "entries"),
    "negative entry count": (struct.pack("<i", -5) + good_dat()[4:], "entries"),
    "name length 2**31-1": (dat_bytes([("w", 1, [1.0])]).replace(b"\x01\x00\x00\x00w", struct.pack("<i", 2**31 - 1) + b"w", 1), "claims"),
    "value count 2**30": (
        struct.pack("<i", 1) + struct.pack("<i", 1) + b"w" + struct.pack("<ii", 1, 2**30)
        + b"\0" * 64,
        "claims",
    ),
    "negative value count": (dat_bytes([("w", 1, [])]) + b"\0" * 16, "values"),
    "negative value": (dat_bytes([("w", 1, [1.0, -2.0])]), "non-negative"),
    "NaN value": (dat_bytes([("w", 1, [np.nan])]), "finite"),
    "bad UTF-8 name": (dat_bytes([("w", 1, [1.0])]).replace(b"w", b"\xff", 1), "UTF-8"),
    "duplicate entry": (dat_bytes([("w", 1, [1.0]), ("w", 1, [1.0])]), "twice"),
    "trailing bytes": (good_dat() + b"xyz", "after"),
    "empty": (b"", "not an imatrix"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAT_CASES))
def test_crafted_dat(case, tmp_path):
    content, needle = DAT_CASES[case]
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    err = attempt(path)
    assert err is not None and needle in err, err


def test_crafted_gguf(tmp_path):
    good = good_gguf(tmp_path, in_sum=False)
    tensors = gguf.GGUFReader(tmp_path / "good.gguf").tensors
    first = tensors[0].data_offset  # attn_q.in_sum2
    last = tensors[-1].data_offset + 12  # the MoE weight's fourth count
    cases = {
        "not an imatrix": (good.replace(b"imatrix", b"modelxx", 1), "type 'modelxx'"),
        "negative sum": (
            good[:first] + struct.pack("<f", -1.0) + good[first + 4 :],
            "in_sum2 element 0 is -1.0",
        ),
        "negative count": (
            good[:last] + struct.pack("<f", -1.0) + good[last + 4 :],
            "count 3 is -1.0",
        ),
        "infinite count": (
            good.replace(struct.pack("<f", 1024.0), struct.pack("<f", np.inf), 1),
            "finite",
        ),
        "counts missing": (good.replace(b"attn_q.weight.counts", b"attn_q.weight.county"), "not both"),
    }  # fmt: skip
    for case, (content, needle) in cases.items():
        path = tmp_path / "bad.gguf"
        path.write_bytes(content)
        err = attempt(path)
        assert err is not None and needle in err, (case, err)
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(model, "llama")
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "no imatrix entries" in attempt(model)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert "not a regular file" in attempt(fifo)  # and does not block
    assert "is a directory, not a file" in attempt(tmp_path)
    with pytest.raises(ModelIOError, match="missing"):
        read_imatrix(tmp_path / "missing.gguf")


def _mutate(rng: np.random.Generator, content: bytes) -> bytes:
    b = bytearray(content)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 4))
        pos = int(rng.integers(0, len(b) or 1))
        if kind == 0:
            b[pos : pos + 1] = bytes([b[pos] ^ int(rng.integers(1, 256))]) if pos < len(b) else b""
        elif kind == 1:
            values = [2**64 - 1, 2**63, 2**40, 2**32, 2**31, 0]
            b[pos : pos + 8] = struct.pack("<Q", values[int(rng.integers(len(values)))])
        elif kind == 2:
            values = [2**31 - 1, 2**31, 2**32 - 1, 0, 1000]
            b[pos : pos + 4] = struct.pack("<I", values[int(rng.integers(len(values)))])
        else:
            del b[int(rng.integers(0, len(b) or 1)) :]
    return bytes(b)


@pytest.mark.parametrize("kind", ["gguf", "dat"])
def test_fuzz(kind, tmp_path):
    """Truncations at every length, then seeded mutations (byte flips, absurd counts):
    each read is a valid result or one clean error, bounded in memory and time."""
    content = good_gguf(tmp_path) if kind == "gguf" else good_dat()
    path = tmp_path / f"fuzz.{kind}"
    # a .dat's trailer (chunk count, dataset name) is optional: cutting it off is valid
    trailer = len(b"calib.txt") + 8
    valid = {len(content) - trailer, len(content) - trailer + 4} if kind == "dat" else set()
    # every cut inside the header, every 16th inside the data
    data = gguf.GGUFReader(tmp_path / "good.gguf").data_offset if kind == "gguf" else 0
    for cut in [*range(data), *range(data, len(content), 16 if data else 1)]:
        path.write_bytes(content[:cut])
        assert (attempt(path) is None) == (cut in valid), cut
    rng = np.random.default_rng(2126)
    outcomes = [attempt(_write(path, _mutate(rng, content))) for _ in range(200)]
    assert sum(o is not None for o in outcomes) > 60


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path
