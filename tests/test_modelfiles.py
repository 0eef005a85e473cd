"""Readers and writers of model files (no kernels, no network)."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from flightquant import modelfiles
from flightquant.modelfiles import ModelIOError, TensorInfo


@pytest.fixture
def st_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.bf16": rng.standard_normal((33, 7)).astype(ml_dtypes.bfloat16),
        "b.f16": rng.standard_normal((5,)).astype(np.float16),
        "c.f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "d.f64": rng.standard_normal((9,)),
        "e.ids": np.arange(10, dtype=np.int64),
        "f.mask": np.array([True, False, True]),
        "g.scalar": np.array(3.5, np.float32),
        "h.empty": np.zeros((0, 4), np.float32),
        "i.f8": rng.standard_normal(16).astype(ml_dtypes.float8_e4m3fn),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_safetensors_headers_without_data(st_file):
    path, tensors = st_file
    f = modelfiles.open_input(path)
    assert f.kind == "tensors" and f.format == "safetensors"
    infos = {i.name: i for i in f.infos}
    assert set(infos) == set(tensors)
    assert infos["a.bf16"] == TensorInfo("a.bf16", (33, 7), "bfloat16")
    assert infos["i.f8"].dtype == "float8_e4m3fn" and infos["i.f8"].is_float
    assert not infos["e.ids"].is_float and infos["e.ids"].nbytes == 80
    assert infos["g.scalar"].shape == () and infos["g.scalar"].numel == 1
    assert f.metadata == {"format": "pt"}
    assert f.nbytes == sum(t.nbytes for t in tensors.values())


def test_widening_to_float32_is_exact(st_file):
    path, tensors = st_file
    f = modelfiles.open_input(path)
    for info, arr in f:
        if not info.is_float:
            continue
        flat = modelfiles.to_float32(arr, info.dtype, info.name)
        assert flat.dtype == np.float32 and flat.shape == (info.numel,)
        if info.dtype != "float64":
            # the widening is exact, so narrowing gives the stored bits back
            np.testing.assert_array_equal(
                modelfiles.from_float32(flat, info.dtype).view(np.uint8),
                np.ascontiguousarray(tensors[info.name]).reshape(-1).view(np.uint8),
            )
    bf = np.array([1.0, -2.5, 3.1415], ml_dtypes.bfloat16)
    np.testing.assert_array_equal(modelfiles.to_float32(bf, "bfloat16"), bf.astype(np.float32))


def test_float64_beyond_float32_is_refused():
    with pytest.raises(ModelIOError, match="beyond the float32 range"):
        modelfiles.to_float32(np.array([1.0, 1e300]), "float64", "big")


def test_tensor_batches_layout_and_split(st_file):
    path, tensors = st_file
    f = modelfiles.open_input(path)
    seen: list[list[str]] = []
    batches = list(
        modelfiles.tensor_batches(
            f, max_batch_bytes=200, on_batch=lambda infos, _: seen.append([i.name for i in infos])
        )
    )
    assert len(batches) > 1
    assert all(b.schema == modelfiles.TENSOR_SCHEMA for b in batches)
    assert [b.column("layer_name").to_pylist() for b in batches] == seen
    names = [n for b in batches for n in b.column("layer_name").to_pylist()]
    assert names == [i.name for i in f.infos]
    back = dict(kv for b in batches for kv in modelfiles.tensors_from_batch(b))
    for name, x in tensors.items():
        y = back[name]
        assert y.dtype == x.dtype and y.shape == x.shape, name
        if x.dtype != np.float64:
            np.testing.assert_array_equal(
                y.reshape(-1).view(np.uint8), x.reshape(-1).view(np.uint8)
            )
    rows = {r["layer_name"]: r for b in batches for r in b.to_pylist()}
    assert rows["e.ids"]["weights"] is None and rows["e.ids"]["raw"] == np.arange(10).tobytes()
    assert rows["a.bf16"]["raw"] is None and rows["a.bf16"]["dtype"] == "bfloat16"
    assert rows["h.empty"]["weights"] == [] and rows["h.empty"]["shape"] == [0, 4]


def test_npz_and_npy(tmp_path):
    arrays = {"w": np.ones((3, 4), np.float16), "ids": np.arange(5, dtype=np.int32)}
    np.savez(tmp_path / "m.npz", **arrays)
    f = modelfiles.open_input(tmp_path / "m.npz")
    assert [(i.name, i.shape, i.dtype) for i in f.infos] == [
        ("w", (3, 4), "float16"),
        ("ids", (5,), "int32"),
    ]
    for info, arr in f:
        np.testing.assert_array_equal(arr, arrays[info.name])
    np.save(tmp_path / "emb.npy", np.zeros((6, 2), np.float64))
    g = modelfiles.open_input(tmp_path / "emb.npy")
    assert g.infos == [TensorInfo("emb", (6, 2), "float64")]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("x.safetensors", b"\xff" * 4, "not a valid safetensors"),
        ("x.safetensors", struct.pack("<Q", 10) + b"{}", "not a valid safetensors"),
        ("x.npz", b"PK not a zip", "not a valid npz"),
        ("x.npy", b"\x93NUMPY garbage", "not a valid .npy"),
        ("x.arrow", b"ARROW1 nope", "not a valid Arrow IPC"),
        ("x.parquet", b"PAR1 nope PAR1", "not a valid Parquet"),
        ("x.bin", b"", "unsupported input extension"),
    ],
)
def test_corrupt_files(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ModelIOError, match=match):
        modelfiles.open_input(p)


def test_unsupported_dtype_and_missing(tmp_path):
    np.savez(tmp_path / "c.npz", z=np.ones(2, np.complex128))
    with pytest.raises(ModelIOError, match="'z' has dtype complex128"):
        modelfiles.open_input(tmp_path / "c.npz")
    with pytest.raises(ModelIOError, match="no such file"):
        modelfiles.open_input(tmp_path / "none.safetensors")
    with pytest.raises(ModelIOError, match="unsupported output extension"):
        modelfiles.output_format(tmp_path / "o.npz", ("arrow", "parquet"))


def test_safetensors_writer_streams_a_valid_file(tmp_path):
    arrays = {
        "x": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
        "y": np.arange(3, dtype=np.int64),
        "z": np.ones((4, 1), np.float16),
    }
    infos = [TensorInfo(k, v.shape, modelfiles.dtype_name(v.dtype)) for k, v in arrays.items()]
    path = tmp_path / "o.safetensors"
    w = modelfiles.SafetensorsWriter(path, infos, {"format": "pt"})
    for k, v in arrays.items():
        w.write(k, v)
    w.close()
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in arrays.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype
            np.testing.assert_array_equal(got, v)
    w = modelfiles.SafetensorsWriter(tmp_path / "p.safetensors", infos)
    with pytest.raises(ModelIOError, match="expected tensor 'x'"):
        w.write("y", arrays["y"])
    with pytest.raises(ModelIOError, match="never written"):
        w.close()


def test_npz_writer(tmp_path):
    w = modelfiles.NpzWriter(tmp_path / "o.npz")
    w.write("a.weight", np.ones((2, 2), np.float16))
    w.write("ids", np.arange(3))
    w.close()
    z = np.load(tmp_path / "o.npz")
    assert z["a.weight"].dtype == np.float16 and z["ids"].tolist() == [0, 1, 2]


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.arrow"
    with pytest.raises(RuntimeError):
        with modelfiles.atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.exists()
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with modelfiles.atomic_output(target) as tmp:
        tmp.write_bytes(b"done")
    assert [p.name for p in tmp_path.iterdir()] == ["out.arrow"]
    assert target.read_bytes() == b"done"


def test_table_files_rechunk_and_formats(tmp_path):
    table = pa.table(
        {
            "layer_name": [f"l{i}" for i in range(50)],
            "weights": pa.array(
                [np.full(100, i, np.float32) for i in range(50)], pa.list_(pa.float32())
            ),
        }
    )
    paths = {}
    paths["file"] = tmp_path / "a.arrow"
    with ipc.new_file(str(paths["file"]), table.schema) as w:
        w.write_table(table)
    paths["stream"] = tmp_path / "b.arrow"
    with ipc.new_stream(str(paths["stream"]), table.schema) as w:
        w.write_table(table)
    paths["parquet"] = tmp_path / "c.parquet"
    pq.write_table(table, str(paths["parquet"]), row_group_size=20)
    for kind, p in paths.items():
        f = modelfiles.open_input(p)
        assert f.kind == "table" and modelfiles.is_tensor_layout(f.schema), kind
        batches = list(f.iter_batches(max_batch_bytes=4096))
        assert len(batches) > 3 and all(b.num_rows >= 1 for b in batches), kind
        assert pa.Table.from_batches(batches).equals(table), kind
        assert f.read_columns(["layer_name"]).column(0).to_pylist() == table.column(0).to_pylist()


def test_table_writer_refuses_mixed_field_metadata(tmp_path):
    s1 = pa.schema([pa.field("w", pa.binary(), metadata={"flightquant.bits": "4"})])
    s2 = pa.schema([pa.field("w", pa.binary(), metadata={"flightquant.bits": "8"})])
    w = modelfiles.TableWriter(tmp_path / "o.arrow", "arrow", s1)
    w.write(pa.RecordBatch.from_pylist([{"w": b"x"}], schema=s1))
    with pytest.raises(ModelIOError, match="differs"):
        w.write(pa.RecordBatch.from_pylist([{"w": b"y"}], schema=s2))
    w.close()


def test_dtype_names():
    assert modelfiles.dtype_name(np.dtype(ml_dtypes.bfloat16)) == "bfloat16"
    assert modelfiles.dtype_name(np.dtype("<f2")) == "float16"
    assert modelfiles.numpy_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(ModelIOError):
        modelfiles.dtype_name(np.dtype("U3"))
    assert json.dumps(modelfiles.ST_TO_DTYPE)  # a plain mapping
