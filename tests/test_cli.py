"""End-to-end tests of ``flightquant quantize|dequantize|inspect`` on model files.

Most run ``flightquant.cli.main`` in-process (fast); a few go through ``python -m
flightquant`` to prove the entry point. The models are made here, with realistic shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import flightquant as fq
from flightquant import cli
from flightquant.cli.summary import estimate_bytes

REPO = Path(__file__).resolve().parents[1]
F32_EPS = float(np.finfo(np.float32).eps)
#: relative rounding of the final cast back to each dtype (half an ulp)
CAST_EPS = {"float32": 0.0, "float64": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def make_model(dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A small transformer-shaped model: embeddings, projections, norms, a bias, ids."""
    rng = np.random.default_rng(seed)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    shapes = {
        "model.embed_tokens.weight": (1000, 64),
        "model.layers.0.self_attn.q_proj.weight": (256, 512),
        "model.layers.0.self_attn.k_proj.weight": (64, 512),
        "model.layers.0.input_layernorm.weight": (512,),
        "model.layers.0.mlp.down_proj.weight": (512, 96),
        "model.layers.1.self_attn.q_proj.weight": (256, 512),
        "model.layers.1.mlp.up_proj.bias": (333,),
        "model.norm.weight": (64,),
        "lm_head.weight": (1000, 64),
    }
    out: dict[str, np.ndarray] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        scale = 0.02 if "proj" in name else 1.0
        x = rng.standard_normal(shape) * scale + (0.5 if i % 3 == 0 else 0.0)
        out[name] = x.astype(np_dtype)
    out["model.position_ids"] = np.arange(2048, dtype=np.int64).reshape(1, 2048)
    out["model.attention_mask"] = rng.random((4, 16)) > 0.5
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    paths = {}
    for dtype in ("float32", "float16", "bfloat16"):
        p = d / f"model-{dtype}.safetensors"
        save_file(make_model(dtype), str(p), metadata={"format": "pt", "note": dtype})
        paths[dtype] = p
    return paths


def run_cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def element_scales(qfile: Path) -> dict[str, np.ndarray]:
    """Each tensor's scale, repeated per element, from a quantized file."""
    table = ipc.open_file(str(qfile)).read_all()
    gs = int(table.schema.field("weights").metadata[b"flightquant.group_size"])
    out = {}
    for row in table.select(["layer_name", "weights_scales", "weights_numel"]).to_pylist():
        if row["weights_scales"] is None:
            continue
        s = np.repeat(np.asarray(row["weights_scales"], np.float64), gs)[: row["weights_numel"]]
        out[row["layer_name"]] = s
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("flightquant: error: "), err
    assert "Traceback" not in err
    return lines[0]


def leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if name in p.name)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_within_rtn_bound(models, tmp_path, dtype, capsys):
    src = models[dtype]
    q = tmp_path / "q.arrow"
    back = tmp_path / "back.safetensors"
    assert run_cli("quantize", src, "-o", q, "--bits", "4", "--group-size", "64") == 0
    assert run_cli("dequantize", q, "-o", back) == 0
    capsys.readouterr()
    orig, rest = read_safetensors(src), read_safetensors(back)
    assert list(rest) == list(orig)
    scales = element_scales(q)
    for name, x in orig.items():
        y = rest[name]
        assert y.dtype == x.dtype and y.shape == x.shape, name
        if x.dtype.kind in "bi" or x.ndim < 2:  # ints, bools, norms, biases: kept as they are
            assert y.tobytes() == x.tobytes(), name
            assert name not in scales
            continue
        x64 = x.astype(np.float64).ravel()
        y64 = y.astype(np.float64).ravel()
        bound = scales[name] / 2 + 4 * F32_EPS * np.abs(x64) + CAST_EPS[dtype] * np.abs(y64) + 1e-30
        excess = np.abs(x64 - y64) - bound
        assert excess.max() <= 0, (name, float(excess.max()))
    with safe_open(str(back), framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "note": dtype}  # header metadata restored


def test_passthrough_bytes_identical_and_file_layout(models, tmp_path, capsys):
    q = tmp_path / "q.arrow"
    assert run_cli("quantize", models["bfloat16"], "-o", q, "-q") == 0
    table = ipc.open_file(str(q)).read_all()
    rows = {
        r["layer_name"]: r
        for r in table.select(["layer_name", "dtype", "raw", "shape"]).to_pylist()
    }
    ids = rows["model.position_ids"]
    assert ids["dtype"] == "int64" and ids["shape"] == [1, 2048]
    assert ids["raw"] == np.arange(2048, dtype="<i8").tobytes()
    assert rows["model.attention_mask"]["dtype"] == "bool"
    assert rows["model.embed_tokens.weight"]["dtype"] == "bfloat16"
    assert rows["model.embed_tokens.weight"]["raw"] is None
    assert table.schema.field("weights").type == pa.binary()
    assert table.schema.field("weights").metadata[b"flightquant.bits"] == b"4"
    assert capsys.readouterr().out == ""  # --quiet


def test_summary_numbers(models, tmp_path, capsys):
    q = tmp_path / "q.arrow"
    assert run_cli("quantize", models["float32"], "-o", q, "--json", "--bits", "8") == 0
    s = json.loads(capsys.readouterr().out)
    model = make_model("float32")
    kept = [k for k, a in model.items() if a.dtype.kind in "bi" or a.ndim < 2]
    assert s["tensors"] == len(model) and s["passthrough"] == len(kept) == 5
    assert s["bytes_in"] == sum(a.nbytes for a in model.values())
    expected_out = sum(
        a.nbytes if k in kept else estimate_bytes(a.size, 8, 128, "asymmetric")
        for k, a in model.items()
    )
    assert s["bytes_out"] == expected_out
    assert s["ratio"] == pytest.approx(s["bytes_in"] / s["bytes_out"])
    assert s["file_bytes"] == q.stat().st_size
    # SNR from the kernels' stats agrees with one computed from the dequantized tensors
    back = tmp_path / "back.npz"
    assert run_cli("dequantize", q, "-o", back, "-q") == 0
    rest = np.load(back)
    sig = err = 0.0
    for t in s["per_tensor"]:
        if t["passthrough"]:
            assert t["snr_db"] is None and t["bytes_out"] == t["bytes_in"]
            continue
        x = model[t["name"]].astype(np.float64)
        e = float(((x - rest[t["name"]].astype(np.float64)) ** 2).sum())
        sig += float((x**2).sum())
        err += e
        assert t["snr_db"] == pytest.approx(10 * np.log10((x**2).sum() / e), abs=0.01)
    assert s["snr_db"] == pytest.approx(10 * np.log10(sig / err), abs=0.01)
    assert s["snr_db"] > 35  # 8-bit


def test_summary_table_text(models, tmp_path, capsys):
    assert run_cli("quantize", models["bfloat16"], "-o", tmp_path / "q.parquet") == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in out
    assert "SNR dB" in out and "dB overall" in out
    assert "11 (6 quantized, 5 kept as they are)" in out
    assert "ratio" in out and "M weights/s" in out


def _quantized_names(qfile: Path) -> set[str]:
    t = ipc.open_file(str(qfile)).read_all().select(["layer_name", "weights"]).to_pylist()
    return {r["layer_name"] for r in t if r["weights"] is not None}


def test_only_and_keep_choose_tensors(models, tmp_path, capsys):
    model = make_model("bfloat16")
    matrices = {k for k, a in model.items() if a.dtype.kind not in "bi" and a.ndim >= 2}
    q = tmp_path / "keep.arrow"
    argv = ["quantize", models["bfloat16"], "-o", q, "--json"]
    assert run_cli(*argv, "--keep", "lm_head.*", "--keep", "*.k_proj.*") == 0
    s = json.loads(capsys.readouterr().out)
    expected = matrices - {"lm_head.weight", "model.layers.0.self_attn.k_proj.weight"}
    assert _quantized_names(q) == expected and s["quantized"] == len(expected)
    back = tmp_path / "keep.safetensors"
    assert run_cli("dequantize", q, "-o", back, "-q") == 0
    rest = read_safetensors(back)
    assert rest["lm_head.weight"].tobytes() == model["lm_head.weight"].tobytes()
    # --only forces exactly its matches, 1-D tensors included; --keep still wins
    q2 = tmp_path / "only.arrow"
    assert run_cli(*argv[:3], q2, "-q", "--only", "*norm*", "--keep", "model.norm.*") == 0
    assert _quantized_names(q2) == {"model.layers.0.input_layernorm.weight"}
    # the estimate follows the same choice
    assert (
        run_cli("inspect", models["bfloat16"], "--estimate", "--json", "--keep", "lm_head.*") == 0
    )
    est = json.loads(capsys.readouterr().out)
    assert est["quantized"] == len(matrices) - 1


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--only", "nope.*"], "--only 'nope.*' matches no tensor"),
        (["--keep", "lm_head"], "--keep 'lm_head' matches no tensor"),
    ],
)
def test_selection_pattern_errors(models, tmp_path, extra, needle, capsys):
    assert run_cli("quantize", models["float16"], "-o", tmp_path / "o.arrow", *extra) == 1
    assert needle in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_selection_needs_a_tensor_file(tmp_path, capsys):
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"w": [[1.0, 2.0]]}), str(src))
    assert run_cli("quantize", src, "-o", tmp_path / "o.arrow", "--only", "w") == 1
    assert "--column" in one_error_line(capsys)


# --------------------------------------------------------------------------- formats


def _tensors_table(model: dict[str, np.ndarray]) -> pa.Table:
    floats = {k: v for k, v in model.items() if v.dtype.kind == "f"}
    return pa.Table.from_batches(list(fq.api.arrays_to_batches(floats)))


@pytest.mark.parametrize("fmt", ["npz", "npy", "arrow", "feather", "parquet", "arrow-stream"])
def test_input_formats(tmp_path, fmt, capsys):
    model = {k: v for k, v in make_model("float32").items() if k != "model.attention_mask"}
    if fmt == "npz":
        src = tmp_path / "m.npz"
        np.savez(src, **model)
    elif fmt == "npy":
        src = tmp_path / "embed.npy"
        model = {"embed": model["model.embed_tokens.weight"]}
        np.save(src, model["embed"])
    else:
        table = _tensors_table(model)
        model = {k: v for k, v in model.items() if v.dtype.kind == "f"}
        if fmt == "arrow":
            src = tmp_path / "m.arrow"
            with ipc.new_file(str(src), table.schema) as w:
                w.write_table(table)
        elif fmt == "arrow-stream":
            src = tmp_path / "m.arrow"
            with ipc.new_stream(str(src), table.schema) as w:
                w.write_table(table)
        elif fmt == "feather":
            src = tmp_path / "m.feather"
            feather.write_feather(table, str(src), compression="uncompressed")
        else:
            src = tmp_path / "m.parquet"
            pq.write_table(table, str(src))
    q = tmp_path / "q.arrow"
    assert run_cli("quantize", src, "-o", q, "-q") == 0
    qt = ipc.open_file(str(q)).read_all()
    assert fq.codec.is_quantized_schema(qt.schema)
    assert qt.column("layer_name").to_pylist() == list(model)
    # the codes equal fq.quantize of each float32 tensor: the matrices of a tensor file,
    # every row of a table file's list column
    tensor_file = fmt in ("npz", "npy")
    ref = fq.quantize_arrays(
        {
            k: v.astype(np.float32)
            for k, v in model.items()
            if v.dtype.kind == "f" and (v.ndim >= 2 or not tensor_file)
        }
    )
    codes = dict(
        zip(qt.column("layer_name").to_pylist(), qt.column("weights").to_pylist(), strict=True)
    )
    for name, r in ref.items():
        assert codes[name] == r.codes.tobytes(), name
    back = tmp_path / "back.npz"
    assert run_cli("dequantize", q, "-o", back, "-q") == 0
    rest = np.load(back)
    for name, x in model.items():
        assert rest[name].shape == x.shape and rest[name].dtype == x.dtype
        if x.dtype.kind == "i":
            np.testing.assert_array_equal(rest[name], x)
    capsys.readouterr()


def test_table_input_keeps_its_layout(tmp_path, capsys):
    """An Arrow table of embeddings (not the tensor layout) is quantized in place."""
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((300, 96)).astype(np.float16)
    table = pa.table(
        {
            "id": pa.array(np.arange(300)),
            "text": pa.array([f"doc {i}" for i in range(300)]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 96),
        }
    )
    src = tmp_path / "emb.parquet"
    pq.write_table(table, str(src), row_group_size=100)
    q = tmp_path / "emb.q.parquet"
    assert run_cli("quantize", src, "-o", q, "--bits", "8", "--group-size", "32", "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tensors"] == 300 and s["bytes_in"] == emb.nbytes
    qt = pq.read_table(str(q))
    assert qt.column("embedding").type == pa.binary(96)
    assert qt.column("id").to_pylist() == list(range(300))
    expected = fq.quantize(table, bits=8, group_size=32, stats=True)
    assert qt.select(expected.schema.names).equals(expected.combine_chunks())
    back = tmp_path / "emb.back.arrow"
    assert run_cli("dequantize", q, "-o", back, "-q") == 0
    bt = ipc.open_file(str(back)).read_all()
    assert bt.schema.field("embedding").type == table.schema.field("embedding").type
    assert bt.column("text").equals(table.column("text"))


def test_dequantize_to_arrow_keeps_dtype_column(models, tmp_path, capsys):
    q = tmp_path / "q.arrow"
    back = tmp_path / "back.arrow"
    assert run_cli("quantize", models["float16"], "-o", q, "-q") == 0
    assert run_cli("dequantize", q, "-o", back, "-q") == 0
    t = ipc.open_file(str(back)).read_all()
    assert t.schema.field("weights").type == pa.list_(pa.float32())
    assert set(t.column("dtype").to_pylist()) == {"float16", "int64", "bool"}


# --------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server():
    with fq.Server("grpc://127.0.0.1:0") as s:
        yield s


@pytest.mark.parametrize("ext", ["arrow", "parquet"])
def test_server_output_is_byte_identical(models, server, tmp_path, ext, capsys):
    local = tmp_path / f"local.{ext}"
    remote = tmp_path / f"remote.{ext}"
    common = [
        "--bits",
        "2",
        "--scheme",
        "symmetric",
        "--group-size",
        "32",
        "--max-batch-bytes",
        "200000",
        "-q",
    ]  # several batches
    assert run_cli("quantize", models["bfloat16"], "-o", local, *common) == 0
    assert (
        run_cli("quantize", models["bfloat16"], "-o", remote, *common, "--server", server.location)
        == 0
    )
    assert local.read_bytes() == remote.read_bytes()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_cli("dequantize", local, "-o", a, "-q") == 0
    assert run_cli("dequantize", remote, "-o", b, "-q", "--server", server.location) == 0
    assert a.read_bytes() == b.read_bytes()
    capsys.readouterr()


def test_server_token(models, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    out = tmp_path / "q.arrow"
    with fq.Server("grpc://127.0.0.1:0", auth_token="s3cret") as s:
        assert (
            run_cli(
                "quantize",
                models["float16"],
                "-o",
                out,
                "-q",
                "--server",
                s.location,
                "--token-file",
                token_file,
            )
            == 0
        )
        out.unlink()
        assert run_cli("quantize", models["float16"], "-o", out, "-q", "--server", s.location) == 1
    line = one_error_line(capsys)
    assert "token" in line.lower() or "unauthenticated" in line.lower()
    assert leftovers(tmp_path, "q.arrow") == []


# --------------------------------------------------------------------------- errors


def test_nan_in_third_tensor_leaves_nothing(tmp_path, capsys):
    rng = np.random.default_rng(1)
    model = {
        f"layer.{i}.weight": rng.standard_normal((256, 256)).astype(np.float32) for i in range(6)
    }
    model["layer.2.weight"][7, 9] = np.nan
    src = tmp_path / "m.safetensors"
    save_file(model, str(src))
    out = tmp_path / "q.arrow"
    # one tensor per batch: two batches are written before the third fails
    assert run_cli("quantize", src, "-o", out, "--max-batch-bytes", "1000") == 1
    line = one_error_line(capsys)
    assert "layer.2.weight" in line and "nan" in line.lower()
    assert leftovers(tmp_path, "q.arrow") == []
    out.write_bytes(b"old")  # an existing OUTPUT survives a failed job unchanged
    assert run_cli("quantize", src, "-o", out, "--max-batch-bytes", "1000") == 1
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path, "q.arrow") == ["q.arrow"]
    capsys.readouterr()


def _corrupt(tmp_path: Path) -> Path:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return p


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["quantize", "{tmp}/missing.safetensors", "-o", "{tmp}/o.arrow"], "no such file"),
        (["quantize", "{corrupt}", "-o", "{tmp}/o.arrow"], "not a valid safetensors"),
        (["quantize", "{tmp}/m.txt", "-o", "{tmp}/o.arrow"], "unsupported input extension"),
        (["quantize", "{model}", "-o", "{tmp}/o.safetensors"], "unsupported output extension"),
        (
            ["quantize", "{model}", "-o", "{tmp}/o.arrow", "--bits", "3"],
            "bits must be one of 2, 4, 8",
        ),
        (
            ["quantize", "{model}", "-o", "{tmp}/o.arrow", "--scheme", "nf4"],
            "scheme must be one of",
        ),
        (["quantize", "{model}", "-o", "{tmp}/o.arrow", "--group-size", "0"], "group_size"),
        (["quantize", "{model}", "-o", "{tmp}/o.arrow", "--bits", "four"], "invalid int value"),
        (["quantize", "{model}", "-o", "{tmp}/o.arrow", "--nope"], "unrecognized arguments"),
        (["quantize", "{model}"], "needs -o OUTPUT"),
        (["quantize", "{complex}", "-o", "{tmp}/o.arrow"], "complex64"),
        (["dequantize", "{model}", "-o", "{tmp}/o.safetensors"], "nothing to dequantize"),
        (["quantize", "{quantized}", "-o", "{tmp}/o.arrow"], "already quantized"),
        (["inspect", "{quantized}", "--estimate"], "already quantized"),
        (["dequantize", "{tmp}/missing.arrow", "-o", "{tmp}/o.npz"], "no such file"),
        (["inspect", "{tmp}/garbage.parquet"], "not a valid Parquet file"),
        (["quantize", "{model}", "-o", "{tmp}/nodir/o.arrow"], "does not exist"),
        (
            ["quantize", "{model}", "-o", "{tmp}/o.arrow", "--token-file", "{tmp}/none"],
            "--token-file",
        ),
    ],
)
def test_bad_input_one_line(models, tmp_path, argv, needle, capsys):
    (tmp_path / "m.txt").write_text("hello")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 garbage")
    np.savez(tmp_path / "c.npz", z=np.ones(4, np.complex64))
    quantized = tmp_path / "q.parquet"
    pq.write_table(fq.quantize(pa.table({"w": [[1.0, 2.0]]})), str(quantized))
    subs = {
        "quantized": quantized,
        "tmp": tmp_path,
        "corrupt": _corrupt(tmp_path),
        "model": models["float16"],
        "complex": tmp_path / "c.npz",
    }
    argv = [a.format(**subs) for a in argv]
    try:
        rc = run_cli(*argv)
    except SystemExit as exc:  # argparse errors exit
        rc = exc.code
    assert rc != 0
    line = one_error_line(capsys)
    assert needle.lower() in line.lower(), line
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o.", ".o."))]


def test_unreachable_server(models, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = run_cli(
        "quantize",
        models["float16"],
        "-o",
        tmp_path / "o.arrow",
        "-q",
        "--server",
        f"grpc://127.0.0.1:{port}",
    )
    assert rc == 1
    one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- inspect / estimate


def test_estimate_matches_the_real_run(models, tmp_path, capsys):
    opts = ["--bits", "2", "--group-size", "32", "--scheme", "asymmetric"]
    assert run_cli("inspect", models["bfloat16"], "--estimate", "--json", *opts) == 0
    est = json.loads(capsys.readouterr().out)
    assert run_cli("quantize", models["bfloat16"], "--estimate", "--json", *opts) == 0
    assert json.loads(capsys.readouterr().out) == est
    assert run_cli("quantize", models["bfloat16"], "-o", tmp_path / "q.arrow", "--json", *opts) == 0
    real = json.loads(capsys.readouterr().out)
    assert est["bytes_out"] == real["bytes_out"] and est["bytes_in"] == real["bytes_in"]
    assert [t["bytes_out"] for t in est["per_tensor"]] == [
        t["bytes_out"] for t in real["per_tensor"]
    ]
    # 2 bits + two float32 per 32 weights = 4 bits/weight
    assert est["bits_per_weight"] == pytest.approx(4.0, abs=0.01)
    assert run_cli("inspect", models["bfloat16"], "--estimate", *opts) == 0
    text = capsys.readouterr().out
    assert f"{est['bytes_out']:,}" in text and "bits/weight" in text


def test_inspect_plain_and_quantized(models, tmp_path, capsys):
    model = make_model("bfloat16")
    assert run_cli("inspect", models["bfloat16"], "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors"] == len(model) and info["quantized"] is False
    assert info["bytes"] == sum(a.nbytes for a in model.values())
    assert info["dtypes"] == {"bfloat16": 9, "int64": 1, "bool": 1}
    by_name = {t["name"]: t for t in info["per_tensor"]}
    assert by_name["model.embed_tokens.weight"]["shape"] == [1000, 64]

    q = tmp_path / "q.arrow"
    assert (
        run_cli(
            "quantize",
            models["bfloat16"],
            "-o",
            q,
            "-q",
            "--bits",
            "8",
            "--group-size",
            "256",
            "--scheme",
            "symmetric",
        )
        == 0
    )
    assert run_cli("inspect", q, "--json") == 0
    qi = json.loads(capsys.readouterr().out)
    assert qi["quantized"] is True and qi["tensors"] == len(model)
    assert qi["columns"]["weights"]["bits"] == "8"
    assert qi["columns"]["weights"]["scheme"] == "symmetric"
    assert qi["columns"]["weights"]["group_size"] == "256"
    assert qi["original_bytes"] == info["bytes"]
    t = {t["name"]: t for t in qi["per_tensor"]}["model.layers.0.self_attn.q_proj.weight"]
    assert t["dtype"] == "bfloat16" and t["shape"] == [256, 512] and t["bits"] == 8
    assert t["bytes"] == estimate_bytes(256 * 512, 8, 256, "symmetric")
    assert run_cli("inspect", q) == 0
    text = capsys.readouterr().out
    assert "8-bit symmetric" in text and "group size 256" in text
    assert "model.position_ids" in text


# --------------------------------------------------------------------------- entry point


def _python_m(*argv, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "flightquant", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_entry_point_round_trip(models, tmp_path):
    q = tmp_path / "q.parquet"
    r = _python_m("quantize", models["float16"], "-o", q)
    assert r.returncode == 0, r.stderr
    assert "dB overall" in r.stdout
    assert r.stderr == ""  # not a TTY: no progress bar
    r = _python_m("dequantize", q, "-o", tmp_path / "back.safetensors")
    assert r.returncode == 0, r.stderr
    assert read_safetensors(tmp_path / "back.safetensors")["model.position_ids"].dtype == np.int64


def test_entry_point_error_is_one_line(tmp_path):
    r = _python_m("quantize", tmp_path / "nope.npz", "-o", tmp_path / "o.arrow", "--bits", "4")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("flightquant: error: ")
    assert "Traceback" not in r.stderr
    r = _python_m("quantize", tmp_path / "nope.npz", "-o", tmp_path / "o.arrow", "--bits", "3")
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr


# --------------------------------------------------------------------------- interruption, progress


def test_interrupt_midway_leaves_nothing(models, tmp_path, monkeypatch, capsys):
    from flightquant import modelfiles

    calls = []
    real_write = modelfiles.TableWriter.write

    def write(self, batch):
        calls.append(batch.num_rows)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(self, batch)

    monkeypatch.setattr(modelfiles.TableWriter, "write", write)
    rc = run_cli(
        "quantize", models["float32"], "-o", tmp_path / "q.arrow", "--max-batch-bytes", "100000"
    )
    assert rc == 130 and len(calls) == 2
    assert one_error_line(capsys) == "flightquant: error: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_only_on_a_terminal(models, tmp_path, monkeypatch, capsys):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    fake = Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    assert (
        run_cli(
            "quantize", models["float32"], "-o", tmp_path / "a.arrow", "--max-batch-bytes", "100000"
        )
        == 0
    )
    assert "quantize" in fake.getvalue() and "%" in fake.getvalue()
    fake.truncate(0)
    fake.seek(0)
    assert run_cli("quantize", models["float32"], "-o", tmp_path / "b.arrow", "-q") == 0
    assert fake.getvalue() == ""


def test_failover_warning_after_success(models, server, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"grpc://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "q.arrow"
    # each run starts at the first location, the dead one, and fails over
    for _ in range(2):
        assert (
            run_cli(
                "quantize",
                models["float16"],
                "-o",
                out,
                "--server",
                dead,
                "--server",
                server.location,
                "--json",
            )
            == 0
        )
        captured = capsys.readouterr()
        assert json.loads(captured.out)["tensors"] == 11
        lines = captured.err.splitlines()
        assert lines and all(ln.startswith("flightquant: warning: ") for ln in lines), lines
        assert dead in captured.err
    assert run_cli("quantize", models["float16"], "-o", tmp_path / "local.arrow", "-q") == 0
    assert out.read_bytes() == (tmp_path / "local.arrow").read_bytes()


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["serve", "--port", "x"], ["quantize"]])
def test_usage_errors_are_one_line(argv, capsys):
    from flightquant import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flightquant: error:"), err


# --------------------------------------------------------------------------- compressed-tensors


def _hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    rng = np.random.default_rng(5)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((100, 64)),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((64, 64)) * 0.02,
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((64, 128)) * 0.02,
        "model.layers.0.input_layernorm.weight": np.ones(64),
        "lm_head.weight": rng.standard_normal((100, 64)) * 0.02,
    }
    save_file(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_compressed_tensors_output(tmp_path, capsys):
    from flightquant.modelfiles.compressed_tensors import write_compressed_tensors

    src = _hf_folder(tmp_path)
    out = tmp_path / "w4"
    argv = ["--bits", "4", "--group-size", "32", "--scheme", "asymmetric"]
    assert (
        run_cli("quantize", src, "-o", out, "--format", "compressed-tensors", "--json", *argv) == 0
    )
    s = json.loads(capsys.readouterr().out)
    assert s["quantized"] == 2 and "lm_head" in s["ignore"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    group = next(iter(qc["config_groups"].values()))["weights"]
    assert (group["num_bits"], group["group_size"], group["symmetric"]) == (4, 32, False)
    assert (out / "tokenizer.json").exists()
    # the CLI only wires the writer: the same call gives the same bytes
    ref = tmp_path / "ref"
    write_compressed_tensors(src, ref, bits=4, group_size=32, scheme="asymmetric")
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    # --keep reaches the writer; the output folder must be new
    kept = tmp_path / "kept"
    assert (
        run_cli(
            "quantize", src / "model.safetensors", "-o", kept, "--format", "compressed-tensors",
            "-q", "--keep", "*.down_proj.*", "--group-size", "64",
        )
        == 0
    )  # fmt: skip
    ignore = json.loads((kept / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.mlp.down_proj" in ignore
    assert run_cli("quantize", src, "-o", kept, "--format", "compressed-tensors") == 1
    assert "not an empty folder" in one_error_line(capsys)
    assert run_cli("quantize", src, "-o", tmp_path / "x", "--format", "compressed-tensors",
                   "--estimate") == 1  # fmt: skip
    assert "--estimate does not apply" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()
    # a model folder is one safetensors source for the other jobs too
    assert run_cli("inspect", src, "--json") == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 5
    folder_out, file_out = tmp_path / "folder.arrow", tmp_path / "file.arrow"
    assert run_cli("quantize", src, "-o", folder_out, "-q") == 0
    assert run_cli("quantize", src / "model.safetensors", "-o", file_out, "-q") == 0
    assert folder_out.read_bytes() == file_out.read_bytes()


def test_ggml_format_to_arrow(models, tmp_path, capsys):
    q = tmp_path / "q8.arrow"
    assert run_cli("quantize", models["bfloat16"], "-o", q, "--format", "q8_0", "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["options"]["format"] == "Q8_0" and s["bits_per_weight"] == pytest.approx(8.5)
    assert run_cli("quantize", models["bfloat16"], "--estimate", "--json", "--format", "Q8_0") == 0
    est = json.loads(capsys.readouterr().out)
    assert est["bytes_out"] == s["bytes_out"]
    t = ipc.open_file(str(q)).read_all()
    assert t.schema.field("weights").metadata[b"flightquant.format"] == b"Q8_0"
    assert "weights_scales" not in t.schema.names  # the scales live inside ggml's blocks
    assert run_cli("inspect", q, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    per = {p["name"]: p for p in info["per_tensor"]}
    assert per["lm_head.weight"]["format"] == "Q8_0"
    assert per["lm_head.weight"]["bytes"] == 1000 * 64 // 32 * 34
    assert run_cli("inspect", q) == 0
    assert "Q8_0" in capsys.readouterr().out
    # a ggml block must fit every tensor quantized, named up front
    argv = ["quantize", models["bfloat16"], "-o", tmp_path / "x.arrow", "--format", "Q8_0"]
    assert run_cli(*argv, "--only", "*.bias") == 1
    assert "'model.layers.1.mlp.up_proj.bias' has 333 values" in one_error_line(capsys)
    assert run_cli(*argv, "--group-size", "64") == 1
    assert "implied by --format Q8_0" in one_error_line(capsys)
