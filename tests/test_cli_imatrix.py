"""``flightquant quantize --imatrix FILE``: each tensor weighed by its importance from a
llama.cpp imatrix (written here with gguf-py, as llama-imatrix writes one), byte for byte
what ``quantize_arrays(importance=...)`` gives; tensors the file lacks are listed."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from safetensors.numpy import save_file

import flightquant as fq
from flightquant import cli

MISSING = "model.layers.0.mlp.down_proj.weight"


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (64, 512),
        "model.layers.0.self_attn.k_proj.weight": (16, 512),
        MISSING: (512, 256),
        "model.layers.0.input_layernorm.weight": (512,),
    }
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_t(4, shape) * rng.lognormal(-3, 0.5, shape[:-1] + (1,))
        out[name] = x.astype(np.float32)
    return out


def _write_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, float]) -> None:
    """A GGUF imatrix as llama-imatrix writes it: ``<name>.in_sum2`` F32 [k] and
    ``<name>.counts`` F32 [1] per weight, general.type = imatrix."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["test.txt"])
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 512)
    for name in sorted(sums):
        w.add_tensor(name + ".in_sum2", sums[name].astype(np.float32))
        w.add_tensor(name + ".counts", np.array([counts[name]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix")
    model = _model()
    save_file(model, str(d / "m.safetensors"))
    np.savez(d / "m.npz", **model)
    rng = np.random.default_rng(1)
    sums, counts = {}, {}
    for name, x in model.items():
        if x.ndim == 2 and name != MISSING:
            sums[name] = rng.lognormal(0, 1.5, x.shape[-1]) * 2048
            counts[name] = 2048.0
    _write_imatrix(d / "imatrix.gguf", sums, counts)
    importance = {n: (sums[n] / counts[n]).astype(np.float32) for n in sums}
    return d, model, importance


def _run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def _codes(path: Path) -> dict[str, bytes]:
    t = ipc.open_file(str(path)).read_all()
    assert "weights_importance" not in t.column_names
    return {
        r["layer_name"]: r["weights"]
        for r in t.select(["layer_name", "weights"]).to_pylist()
        if r["weights"] is not None
    }


@pytest.mark.parametrize("src", ["m.safetensors", "m.npz"])
@pytest.mark.parametrize("opts", [["--format", "Q4_K"], ["--format", "Q4_0", "--method", "mse"],
                                  ["--method", "mse", "--bits", "4"]])  # fmt: skip
def test_imatrix_weighs_each_tensor_by_name(files, tmp_path, capsys, src, opts):
    d, model, importance = files
    out = tmp_path / "q.arrow"
    assert (
        _run("quantize", d / src, "-o", out, "--imatrix", d / "imatrix.gguf", "--json", *opts) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["importance"]["tensors"] == 2
    assert summary["importance"]["without"] == [MISSING]
    got = _codes(out)
    kw = {opts[i].lstrip("-"): opts[i + 1] for i in range(0, len(opts), 2)}
    kw = {k: int(v) if k == "bits" else v for k, v in kw.items()}
    quantized = {n: x for n, x in model.items() if x.ndim == 2}
    want = fq.quantize_arrays(quantized, importance=importance, **kw)
    for name in quantized:
        assert got[name] == want[name].codes.tobytes(), name
    plain = fq.quantize_arrays({MISSING: model[MISSING]}, **kw)
    assert got[MISSING] == plain[MISSING].codes.tobytes()


def test_imatrix_text_summary_lists_the_tensors_without(files, tmp_path, capsys):
    d, _, _ = files
    out = tmp_path / "q.arrow"
    assert _run("quantize", d / "m.safetensors", "-o", out, "--imatrix", d / "imatrix.gguf",
                "--format", "Q6_K") == 0  # fmt: skip
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("importance"))
    assert "2 tensors weighed by" in line and "1 not in it" in line and MISSING in line


def test_imatrix_through_a_server_equals_in_process(files, tmp_path, server, capsys):
    d, _, _ = files
    s = server()
    a, b = tmp_path / "a.arrow", tmp_path / "b.arrow"
    args = ["--imatrix", d / "imatrix.gguf", "--format", "Q4_K", "-q"]
    assert _run("quantize", d / "m.safetensors", "-o", a, *args) == 0
    assert _run("quantize", d / "m.safetensors", "-o", b, *args, "--server", s.location) == 0
    assert _codes(a) == _codes(b)


def test_imatrix_table_input_by_row_key(files, tmp_path, capsys):
    d, model, importance = files
    names = [n for n, x in model.items() if x.ndim == 2]
    table = pa.table(
        {
            "name": names,
            "w": pa.array([model[n].ravel() for n in names], pa.list_(pa.float32())),
        }
    )
    src, out = tmp_path / "t.arrow", tmp_path / "q.arrow"
    with ipc.new_file(str(src), table.schema) as f:
        f.write_table(table)
    assert _run("quantize", src, "-o", out, "--imatrix", d / "imatrix.gguf", "--format", "Q4_K",
                "--json") == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["importance"]["without"] == [MISSING]
    got = ipc.open_file(str(out)).read_all()
    assert got.column_names == ["name", "w", "w_mse", "w_max_abs_error"]  # the job's stats
    keyed = {n: importance[n] for n in names if n in importance}
    want = fq.quantize(table, importance=keyed, format="Q4_K")
    assert got.column("w").to_pylist() == want.column("w").to_pylist()


def test_imatrix_errors_are_one_line(files, tmp_path, capsys):
    d, model, _ = files
    out = tmp_path / "q.arrow"
    # native rtn cannot use importance
    assert _run("quantize", d / "m.safetensors", "-o", out, "--imatrix", d / "imatrix.gguf") == 1
    assert "method='mse'" in capsys.readouterr().err
    # an imatrix for another model: rows of another length
    other = tmp_path / "other.gguf"
    name = "model.layers.0.self_attn.q_proj.weight"
    _write_imatrix(other, {name: np.ones(256)}, {name: 1.0})
    assert _run("quantize", d / "m.safetensors", "-o", out, "--imatrix", other, "--format",
                "Q4_K") == 1  # fmt: skip
    err = capsys.readouterr().err
    assert name in err and "256 importance weights" in err and "512" in err
    assert not out.exists()


def test_table_input_with_its_own_importance_column(files, tmp_path, capsys):
    d, model, importance = files
    names = [n for n in importance]
    table = pa.table(
        {
            "name": names,
            "w": pa.array([model[n].ravel() for n in names], pa.list_(pa.float32())),
            "w_importance": pa.array([importance[n] for n in names], pa.list_(pa.float32())),
        }
    )
    src, out = tmp_path / "t.arrow", tmp_path / "q.arrow"
    with ipc.new_file(str(src), table.schema) as f:
        f.write_table(table)
    assert _run("quantize", src, "-o", out, "--method", "mse", "-q") == 0
    got = ipc.open_file(str(out)).read_all()
    assert "w_importance" not in got.column_names
    want = fq.quantize(table, method="mse")
    assert got.column("w").to_pylist() == want.column("w").to_pylist()
    assert got.column("w_scales").to_pylist() == want.column("w_scales").to_pylist()
