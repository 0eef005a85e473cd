"""GGUF in, GGUF out: the job of llama.cpp's ``llama-quantize``.

The input files are written here with gguf-py's ``GGUFWriter`` (a small llama/BERT-shaped
tensor set); outputs are read back with gguf-py's own ``GGUFReader`` and decoded with
``gguf.quants.dequantize``, the oracle every CI machine has.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants
from gguf.gguf_writer import GGUFValue

import flightquant as fq
from flightquant.cli import main
from flightquant.modelfiles import GGUFFile, GGUFOutput, ModelIOError, OutTensor, gguf_policy
from flightquant.modelfiles.gguf_files import _Raw, _Writer
from flightquant.modelfiles.gguf_policy import choose, llama_quantizes, n_dims

#: name -> (NumPy shape, i.e. GGUF ne reversed, storage type)
TENSORS = {
    "token_embd.weight": ((64, 256), "F16"),
    "position_embd.weight": ((32, 256), "F16"),
    "token_types.weight": ((2, 256), "F16"),
    "token_embd_norm.weight": ((256,), "F32"),
    "blk.0.attn_norm.weight": ((256,), "F32"),
    "blk.0.attn_q.weight": ((256, 256), "F16"),
    "blk.0.attn_q.bias": ((256,), "F32"),
    "blk.0.attn_k.weight": ((64, 256), "BF16"),
    "blk.0.attn_v.weight": ((64, 256), "F32"),
    "blk.0.attn_output.weight": ((256, 256), "F16"),
    "blk.0.ffn_norm.weight": ((256,), "F32"),
    "blk.0.ffn_gate.weight": ((384, 256), "F16"),
    "blk.0.ffn_up.weight": ((384, 256), "F16"),
    "blk.0.ffn_down.weight": ((256, 384), "F16"),  # 384-wide rows: Q4_K falls back to Q5_0
    "blk.0.ffn_gate_inp.weight": ((4, 256), "F32"),  # an MoE router: never quantized
    "blk.0.col.weight": ((1, 256), "F32"),  # ne = (256, 1): one dimension for ggml
    "output_norm.weight": ((256,), "F32"),
    "output.weight": ((64, 256), "F16"),
    "rope_freqs.weight": ((64,), "F32"),
    "token_ids": ((8,), "I32"),
}
QUANTIZED = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
             "blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight",
             "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "output.weight"]  # fmt: skip
#: the 384-wide ffn_down falls back (llama.cpp's tensor_type_fallback)
FALLBACK = {"Q4_K": "Q5_0", "Q2_K": "Q4_0", "IQ4_XS": "IQ4_NL"}
#: relative error bound of each target (4.5-5.5 and 2.6-4.5 bits/weight)
ERROR = {"Q4_K": 0.02, "Q2_K": 0.25, "IQ4_XS": 0.02}


def expected(target: str) -> dict[str, str]:
    out = dict.fromkeys(QUANTIZED, target)
    out["blk.0.ffn_down.weight"] = FALLBACK[target]
    return out


EXPECT_Q4_K = expected("Q4_K")


def _array(rng, shape, typ) -> np.ndarray:
    x = rng.standard_normal(shape) * 0.05
    if typ == "I32":
        return np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    if typ == "BF16":
        return x.astype(ml_dtypes.bfloat16).view(np.uint16)
    return x.astype({"F16": np.float16, "F32": np.float32}[typ])


def write_gguf(path: Path, tensors=TENSORS, alignment: int | None = None, seed: int = 0) -> dict:
    """A GGUF with metadata of every kind and ``tensors``; returns name -> array."""
    rng = np.random.default_rng(seed)
    w = _Writer(str(path), "llama")  # GGUFWriter, plus raw values for what it refuses
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.context_length", 32)
    w.add_uint32("llama.embedding_length", 256)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("general.name", "tiny")
    w.add_uint32("general.file_type", 1)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(64)])
    w.add_array("tokenizer.ggml.scores", [float(-i) for i in range(64)])
    w.add_array("tokenizer.ggml.token_type", [1] * 64)
    # an empty array, which GGUFWriter itself cannot write but llama.cpp files may hold
    w.kv_data[0]["x.empty"] = GGUFValue(_Raw(struct.pack("<IQ", 5, 0)), GGUFValueType.ARRAY)
    if alignment:
        w.add_custom_alignment(alignment)
        w.data_alignment = alignment
    out = {}
    for name, (shape, typ) in tensors.items():
        a = _array(rng, shape, typ)
        out[name] = a
        raw = None if typ != "BF16" else GGMLQuantizationType.BF16
        w.add_tensor(name, a, raw_shape=shape if raw else None, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def floats_of(a: np.ndarray, typ: str) -> np.ndarray:
    if typ == "BF16":
        return (a.reshape(-1).astype(np.uint32) << 16).view(np.float32)
    return a.reshape(-1).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, dict]:
    p = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    return p, write_gguf(p)


def run(*argv) -> int:
    return main([str(a) for a in argv])


def fields(path: Path) -> dict:
    """key -> (types, decoded value) read by gguf-py's own reader, in file order."""
    r = GGUFReader(str(path))
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


# --------------------------------------------------------------------------- reader/writer


def test_reader_agrees_with_gguf_py(model):
    path, arrays = model
    f = GGUFFile(path)
    r = GGUFReader(str(path))
    assert [t.name for t in f.tensors] == [t.name for t in r.tensors]
    for ours, theirs in zip(f.tensors, r.tensors, strict=True):
        assert ours.ne == tuple(int(d) for d in theirs.shape), ours.name
        assert ours.type == theirs.tensor_type.name and ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes
        assert f.data(ours).tobytes() == theirs.data.tobytes()
    assert f.keys == [k for k in r.fields if not k.startswith("GGUF.")]
    assert f.value("tokenizer.ggml.tokens") == [f"tok{i}" for i in range(64)]
    assert f.value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert f.value("x.empty") == [] and f.architecture == "llama"
    for name, (_, typ) in TENSORS.items():
        if typ in ("F16", "F32", "BF16"):
            t = next(t for t in f.tensors if t.name == name)
            np.testing.assert_array_equal(f.floats(t), floats_of(arrays[name], typ))


@pytest.mark.parametrize("alignment", [None, 64])
def test_copy_is_byte_identical(tmp_path, alignment):
    src = tmp_path / "a.gguf"
    write_gguf(src, alignment=alignment)
    f = GGUFFile(src)
    assert f.alignment == (alignment or 32)
    out = tmp_path / "b.gguf"
    w = GGUFOutput(out, f, [OutTensor(t.name, t.ne, t.type) for t in f.tensors])
    for t in f.tensors:
        w.write(t.name, f.data(t))
    w.close()
    assert out.read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------- policy


def test_which_tensors_llama_cpp_quantizes():
    assert llama_quantizes("blk.3.attn_q.weight", (256, 256))
    assert llama_quantizes("output.weight", (256, 64)) and llama_quantizes(
        "token_embd.weight", (4, 2)
    )
    for name in ("position_embd.weight", "token_types.weight", "blk.0.attn_norm.weight",
                 "blk.0.ffn_gate_inp.weight", "blk.1.ssm_conv1d.weight", "v.position_embd.weight",
                 "blk.0.attn_q.bias", "enc.blk.0.attn_rel_b.weight"):  # fmt: skip
        assert not llama_quantizes(name, (256, 256)), name
    assert not llama_quantizes("blk.0.x.weight", (256, 1)) and n_dims((256, 1, 1)) == 1
    assert n_dims((256, 4, 1)) == 2 and llama_quantizes("blk.0.ffn_up_exps.weight", (256, 8, 4))


@pytest.mark.parametrize(
    "target, ne0, expected",
    [
        ("Q4_K", 384, "Q5_0"), ("Q5_K", 384, "Q5_1"), ("Q6_K", 96, "Q8_0"),
        ("Q2_K", 384, "Q4_0"), ("Q3_K", 384, "Q4_0"), ("TQ1_0", 160, "Q4_0"),
        ("TQ2_0", 32, "Q4_0"), ("Q4_K", 48, "F16"), ("Q4_K", 512, "Q4_K"), ("Q8_0", 96, "Q8_0"),
        ("IQ4_XS", 384, "IQ4_NL"), ("IQ4_XS", 48, "F16"),
        ("Q8_0", 48, "F16"), ("Q4_1", 80, "F16"),  # a 32-block type that does not fit: F16
    ],
)  # fmt: skip
def test_fallback_table(target, ne0, expected):
    # --pure: the recipe's own type, then the fallback (the mixes are tests/test_recipes.py's)
    (c,) = choose([("blk.0.ffn_down.weight", (ne0, 8), "F32")], target, pure=True)
    assert c.dst == expected
    assert (f"{target} -> {expected}" in c.note) == (expected != target)


def test_refusals():
    q = [("blk.0.attn_q.weight", (256, 4), "Q8_0"), ("ids.weight", (256, 4), "I32")]
    assert [c.dst for c in choose(q, "Q4_K")] == ["Q8_0", "I32"]  # pass through
    assert "already Q8_0" in choose(q, "Q4_K")[0].note
    with pytest.raises(ModelIOError, match="--allow-requantize"):
        choose(q, "Q4_K", types=[("blk.*", "Q4_K")])
    assert choose(q, "Q4_K", allow_requantize=True)[0].dst == "Q4_K"
    with pytest.raises(ModelIOError, match="I32, not a float"):
        choose(q, "Q4_K", only=["ids.*"])
    with pytest.raises(ModelIOError, match="matches no tensor"):
        choose(q, "Q4_K", keep=["nope"])
    with pytest.raises(ModelIOError, match="PATTERN=TYPE"):
        gguf_policy.parse_type_overrides(["Q6_K"])
    with pytest.raises(ModelIOError, match="unknown type 'IQ2_XXS'"):
        gguf_policy.parse_type_overrides(["x=IQ2_XXS"])


def test_file_types_are_llama_cpps():
    # llama.h's llama_ftype values, as llama-quantize writes them for each TYPE name
    expected = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
                "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "TQ1_0": 36, "TQ2_0": 37, "Q2_K_S": 21,
                "Q3_K_S": 11, "Q3_K_L": 13, "Q4_K_S": 14, "Q5_K_S": 16, "IQ4_NL": 25,
                "IQ4_XS": 30, "F32": 0, "F16": 1, "BF16": 32}  # fmt: skip
    got = {k: int(gguf_policy.recipe(k).file_type) for k in gguf_policy.RECIPE_NAMES}
    assert {k: got[k] for k in expected} == expected
    assert gguf_policy.recipe("q4_k").name == "Q4_K_M" and gguf_policy.recipe("15").name == "Q4_K_M"
    assert set(fq.formats.GGML_TYPES) <= {r.default for r in gguf_policy.RECIPES.values()}
    for t in fq.formats.GGML_TYPES.values():  # the registry agrees with gguf-py
        assert (t.block_size, t.type_size) == quants.GGML_QUANT_SIZES[
            GGMLQuantizationType(t.ggml_type)
        ]


# --------------------------------------------------------------------------- the job


def _quantize(model, tmp_path, *extra, name="out.gguf", target="Q4_K", pure=True) -> Path:
    """``--pure`` (every tensor the recipe's type): what these tests check; the mixes are
    tests/test_recipes.py's."""
    src, _ = model
    out = tmp_path / name
    flags = ("--pure",) if pure else ()
    assert run("quantize", src, "-o", out, "--format", target, "--json", *flags, *extra) == 0
    return out


def test_metadata_order_and_types_as_llama_cpp(model, tmp_path, capsys):
    src, arrays = model
    out = _quantize(model, tmp_path)
    summary = json.loads(capsys.readouterr().out)
    before, after = fields(src), fields(out)
    # every key in its place (general.file_type updated where it was), one key added
    assert list(after) == list(before) + ["general.quantization_version"]
    for k, (types, value) in before.items():
        if k != "general.file_type":
            assert after[k] == (types, value), k
    assert after["general.file_type"][1] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M, as llama-quantize
    assert after["general.quantization_version"][1] == 2
    r = GGUFReader(str(out))
    assert [t.name for t in r.tensors] == list(TENSORS)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    for name, (_, typ) in TENSORS.items():
        assert types[name] == EXPECT_Q4_K.get(name, typ), name
    assert all(t.data_offset % 32 == 0 for t in r.tensors)
    # kept tensors are byte for byte the input's
    for t in r.tensors:
        if t.name not in EXPECT_Q4_K:
            assert t.data.tobytes() == arrays[t.name].tobytes(), t.name
    per = {t["name"]: t for t in summary["per_tensor"]}
    assert "Q4_K -> Q5_0" in per["blk.0.ffn_down.weight"]["note"] and summary["fallbacks"] == 1
    assert summary["bytes_out"] == sum(t.n_bytes for t in r.tensors)


@pytest.mark.parametrize("target", ["Q4_K", "Q2_K", "IQ4_XS"])
def test_values_decode_as_gguf_py_decodes_them(model, tmp_path, target, capsys):
    src, arrays = model
    out = _quantize(model, tmp_path, "-q", target=target)
    r = GGUFReader(str(out))
    assert {t.name: t.tensor_type.name for t in r.tensors if t.name in QUANTIZED} == expected(
        target
    )
    for t in r.tensors:
        if t.name not in QUANTIZED:
            continue
        x = floats_of(arrays[t.name], TENSORS[t.name][1])
        theirs = quants.dequantize(t.data, t.tensor_type).reshape(-1)
        # flightquant's own codec gives the same bytes for the same row, and decodes them
        # exactly as gguf-py does
        row = pa.table({"w": pa.array([x], pa.list_(pa.float32()))})
        q = fq.quantize(row, format=t.tensor_type.name)
        assert q.column("w")[0].as_py() == t.data.tobytes(), t.name
        ours = np.asarray(fq.dequantize(q).column("w")[0].as_py(), np.float32)
        np.testing.assert_array_equal(ours, theirs, err_msg=t.name)
        err = float(np.mean((theirs - x) ** 2)) / float(np.mean(x**2))
        assert err < ERROR[target], (t.name, err)


def test_legacy_types_equal_gguf_py_quantizer(model, tmp_path, capsys):
    """Q8_0 (rtn) is ggml's reference quantizer, which gguf-py implements: same bytes."""
    src, arrays = model
    out = tmp_path / "q8.gguf"
    assert run("quantize", src, "-o", out, "--format", "Q8_0", "--pure", "-q") == 0
    r = GGUFReader(str(out))
    n = 0
    for t in r.tensors:
        if t.tensor_type.name == "Q8_0":
            x = floats_of(arrays[t.name], TENSORS[t.name][1]).reshape(tuple(reversed(t.shape)))
            assert quants.quantize(x, GGMLQuantizationType.Q8_0).tobytes() == t.data.tobytes()
            n += 1
    assert n == len(QUANTIZED) and fields(out)["general.file_type"][1] == 7


@pytest.mark.parametrize("target", ["Q4_K", "Q2_K"])
def test_through_a_server_is_byte_identical(model, tmp_path, target, capsys):
    local = _quantize(model, tmp_path, "-q", name="local.gguf", target=target)
    with fq.Server("grpc://127.0.0.1:0") as s:
        argv = ["-q", "--server", s.location, "--max-batch-bytes", "100000"]  # several calls
        remote = _quantize(model, tmp_path, *argv, name="remote.gguf", target=target)
    assert local.read_bytes() == remote.read_bytes()


def test_overrides_type_keep_only(model, tmp_path, capsys):
    out = _quantize(
        model,
        tmp_path,
        "-q",
        "--type", "output.weight=Q6_K", "--type", "blk.0.attn_v.*=f16",
        "--keep", "token_embd.weight",
        "--type", "position_embd.weight=Q8_0",
    )  # fmt: skip
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_v.weight"] == "F16"
    assert types["token_embd.weight"] == "F16" and types["position_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    only = _quantize(model, tmp_path, "-q", "--only", "blk.0.attn_*.weight", name="only.gguf")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(only)).tensors}
    changed = {k for k, v in types.items() if v != TENSORS[k][1]}
    assert changed == {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                       "blk.0.attn_output.weight", "blk.0.attn_norm.weight"}  # fmt: skip


def test_estimate_and_inspect(model, tmp_path, capsys):
    src, _ = model
    assert run("inspect", src, "--estimate", "--format", "Q4_K", "--pure", "--json") == 0
    est = json.loads(capsys.readouterr().out)
    out = _quantize(model, tmp_path, "-q")
    assert run("inspect", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert est["bytes_out"] == info["bytes"]
    assert [t["type_out"] for t in est["per_tensor"]] == [t["type"] for t in info["per_tensor"]]
    assert info["file_type"] == "MOSTLY_Q4_K_M" and info["types"]["Q4_K"] == 8
    q4k = next(t for t in info["per_tensor"] if t["name"] == "blk.0.attn_q.weight")
    assert q4k["bits_per_weight"] == 4.5
    assert run("quantize", src, "--estimate", "--format", "Q4_K", "--pure") == 0
    text = capsys.readouterr().out
    assert "Q4_K -> Q5_0" in text and "bits/weight" in text


def test_requantize_needs_the_flag(tmp_path, capsys):
    src = tmp_path / "q8.gguf"
    arrays = write_gguf(src, {"blk.0.attn_q.weight": ((64, 256), "F16")})
    # make the input Q8_0 with gguf-py, then quantize it again
    q8 = tmp_path / "in-q8.gguf"
    w = GGUFWriter(str(q8), "llama")
    x = arrays["blk.0.attn_q.weight"].astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", quants.quantize(x, GGMLQuantizationType.Q8_0),
                 raw_dtype=GGMLQuantizationType.Q8_0)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "o.gguf"
    assert run("quantize", q8, "-o", out, "--format", "Q4_K", "-q") == 0
    assert GGUFReader(str(out)).tensors[0].tensor_type.name == "Q8_0"  # passes through
    assert run("quantize", q8, "-o", out, "--format", "Q4_K", "-q", "--only", "*") == 1
    assert "--allow-requantize" in capsys.readouterr().err
    assert run("quantize", q8, "-o", out, "--format", "Q4_K", "-q", "--allow-requantize") == 0
    assert GGUFReader(str(out)).tensors[0].tensor_type.name == "Q4_K"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["-o", "{tmp}/o.gguf"], "needs --format"),
        (["-o", "{tmp}/o.arrow", "--format", "Q4_K"], "unsupported output extension"),
        (["-o", "{tmp}/o.gguf", "--format", "Q4_K", "--bits", "4"], "implied by --format"),
        (["-o", "{tmp}/o.gguf", "--format", "Q9_K"], "not a GGUF recipe"),
        (["-o", "{tmp}/o.gguf", "--format", "Q4_K", "--type", "zz=Q4_K"], "matches no tensor"),
    ],
)
def test_errors_are_one_line(model, tmp_path, argv, needle, capsys):
    src, _ = model
    assert run("quantize", src, *[a.format(tmp=tmp_path) for a in argv]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []
