"""compressed-tensors output: the packing against compressed-tensors' own, the writer's
checks, and transformers loading what it wrote (skipped where torch, transformers or
compressed-tensors is not installed: the ``[hf]`` extra)."""

from __future__ import annotations

import doctest
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from flightquant.modelfiles import compressed_tensors as ct
from flightquant.modelfiles.compressed_tensors import (
    CompressedTensorsError,
    PackedWeight,
    dequantize_weight,
    pack_codes,
    quantize_weight,
    unpack_codes,
    write_compressed_tensors,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_docstring_examples():
    result = doctest.testmod(ct, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 9, 32, 100])
def test_pack_unpack_round_trip(bits, cols):
    rng = np.random.default_rng(cols)
    codes = rng.integers(0, 2**bits, (5, cols), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.int32
    assert packed.shape == (5, math.ceil(cols * bits / 32))
    assert np.array_equal(unpack_codes(packed, bits, cols), codes)


def test_pack_is_low_bits_first():
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 15, 9]], np.uint8)
    words = pack_codes(codes, 4).view(np.uint32)
    assert words.tolist() == [[0xF7654321, 0x9]]  # the tail word padded with zero codes
    assert pack_codes(np.array([[1, 2, 3, 250]], np.uint8), 8).view(np.uint32).tolist() == [
        [0xFA030201]
    ]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_packing_matches_compressed_tensors(bits, packed_dim):
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    rng = np.random.default_rng(bits)
    offset = 2 ** (bits - 1)
    codes = rng.integers(0, 2**bits, (13, 20), dtype=np.uint8)  # neither dim fills a word
    signed = torch.from_numpy(codes.astype(np.int16) - offset).to(torch.int8)
    theirs = helpers.pack_to_int32(signed, bits, packed_dim=packed_dim).numpy()
    ours = pack_codes(codes, bits) if packed_dim == 1 else pack_codes(codes.T, bits).T
    assert np.array_equal(ours, theirs)
    back = helpers.unpack_from_int32(
        torch.from_numpy(np.ascontiguousarray(ours)),
        bits,
        torch.Size(codes.shape),
        packed_dim=packed_dim,
    )
    assert np.array_equal(back.numpy().astype(np.int16) + offset, codes)


# --------------------------------------------------------------------------- one matrix


def _codes(p: PackedWeight) -> np.ndarray:
    out_f, in_f = p.weight_shape.tolist()
    return unpack_codes(p.weight_packed, p.bits, in_f).astype(np.int32) - 2 ** (p.bits - 1)


def _zero_points(p: PackedWeight) -> np.ndarray:
    out_f = int(p.weight_shape[0])
    z = unpack_codes(np.ascontiguousarray(p.weight_zero_point.T), p.bits, out_f).T
    return z.astype(np.int32) - 2 ** (p.bits - 1)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32)])
@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_codes_use_the_scale_as_stored(dtype, bits):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((24, 64)) * 0.05).astype(dtype)
    p = quantize_weight(w, bits=bits, group_size=16, scheme="symmetric", threads=1)
    assert p.weight_scale.dtype == dtype and p.weight_scale.shape == (24, 4)
    assert p.weight_zero_point is None
    s = p.weight_scale.astype(np.float32)
    x = w.astype(np.float32).reshape(24, 4, 16)
    qmax = 2 ** (bits - 1) - 1
    want = np.clip(np.rint(x / s[..., None]), -qmax - 1, qmax).reshape(24, 64)
    assert np.array_equal(_codes(p), want)
    deq = dequantize_weight(p)
    assert deq.dtype == dtype
    # half a step of the stored scale, plus the rounding of the product to the dtype
    ulp = np.abs(deq.astype(np.float32)) * float(ml_dtypes.finfo(dtype).eps)
    bound = (s[..., None] / 2).repeat(16, -1).reshape(24, 64) + ulp
    assert np.all(np.abs(deq.astype(np.float32) - w.astype(np.float32)) <= bound)


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_zero_points(bits):
    rng = np.random.default_rng(3)
    w = rng.uniform(0.5, 2.0, (16, 32)).astype(BF16)  # all positive: the range widens to 0
    w[0, :8] = 0
    w[1] = rng.uniform(-3.0, -1.0, 32).astype(BF16)  # all negative
    p = quantize_weight(w, bits=bits, group_size=8, scheme="asymmetric")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    z = _zero_points(p)
    assert p.weight_zero_point.shape == (math.ceil(16 * bits / 32), 4)
    assert z.shape == (16, 4) and z.min() >= qmin and z.max() <= qmax
    s = p.weight_scale.astype(np.float32)
    x = w.astype(np.float32).reshape(16, 4, 8)
    with np.errstate(invalid="ignore"):
        want = np.clip(np.rint(x / s[..., None] + z[..., None]), qmin, qmax)
    want = np.where(s[..., None] > 0, want, z[..., None]).reshape(16, 32)  # zero scale: q = z
    assert s[0, 0] == 0 and np.array_equal(_codes(p), want)
    deq = dequantize_weight(p).astype(np.float32)
    assert np.all(deq[0, :8] == 0)  # zero is exact
    err = np.abs(deq - w.astype(np.float32)).reshape(16, 4, 8)
    assert np.all(err <= s[..., None] * 0.5 + np.abs(x) * 2**-8)
    assert p.snr_db > (20 if bits == 4 else 40)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_zero_group_stores_zero_scale_and_reconstructs_zero(scheme):
    w = np.zeros((2, 8), np.float16)
    w[1] = 1.0
    w[1, 3] = 1e-9  # rounds to 0 in float16: the stored reconstruction says so
    p = quantize_weight(w, bits=4, group_size=8, scheme=scheme)
    assert p.weight_scale[0, 0] == 0
    deq = dequantize_weight(p)
    assert np.array_equal(deq[0], np.zeros(8, np.float16))
    assert np.isfinite(deq).all() and np.abs(deq[1] - w[1]).max() < 0.07


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_codes_are_the_engines_native_codes(dtype, scheme, method):
    """The packed words are the engine's LSB-first code bytes read as little-endian int32,
    and the engine's result with scale_dtype is the NumPy reference's, bit for bit."""
    import flightquant as fq
    from flightquant import reference

    rng = np.random.default_rng(11)
    w = (rng.standard_normal((12, 96)) * 0.03).astype(ml_dtypes.finfo(dtype).dtype)
    w[0, :32] = 0.25  # a constant group
    w[1, 32:64] = np.abs(w[1, 32:64]) + 0.1  # an all-positive group
    imp = (rng.random(96) + 0.1).astype(np.float32) if method == "mse" else None
    p = quantize_weight(w, bits=4, group_size=32, scheme=scheme, method=method, importance=imp)
    x = w.astype(np.float32)
    ref = reference.quantize_rows(
        x.reshape(-1), [0], [x.size], bits=4, scheme=scheme, group_size=32, method=method,
        scale_dtype=dtype, importance=None if imp is None else [imp],
    )  # fmt: skip
    assert p.weight_packed.tobytes() == ref.codes.tobytes()
    assert np.array_equal(p.weight_scale.astype(np.float32).reshape(-1), ref.scales)
    got = fq.quantize_arrays(
        {"w": x},
        bits=4,
        group_size=32,
        scheme=scheme,
        method=method,
        scale_dtype=dtype,
        importance=None if imp is None else {"w": imp},
    )
    assert got["w"].codes.tobytes() == ref.codes.tobytes()  # fmt: skip
    if scheme == "asymmetric":
        z = unpack_codes(np.ascontiguousarray(p.weight_zero_point.T), 4, 12).T
        assert np.array_equal(z.reshape(-1).astype(np.float32), ref.zero_points)
    # what compressed-tensors reconstructs is what flightquant dequantizes
    deq = got["w"].dequantize().astype(np.float32)
    assert np.array_equal(dequantize_weight(p), deq.astype(p.weight_scale.dtype))


def test_threads_do_not_change_the_result():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 64)).astype(BF16)
    one = quantize_weight(w, bits=4, group_size=32, scheme="asymmetric", threads=1)
    many = quantize_weight(w, bits=4, group_size=32, scheme="asymmetric", threads=3)
    for name in ("weight_packed", "weight_scale", "weight_zero_point"):
        assert np.array_equal(getattr(one, name).view(np.uint8), getattr(many, name).view(np.uint8))
    assert one.sse == pytest.approx(many.sse) and one.energy == pytest.approx(many.energy)


def test_bad_arguments_are_named():
    w = np.ones((4, 96), np.float32)
    with pytest.raises(CompressedTensorsError, match=r"layer\.x.*96 input features.*group_size 64"):
        quantize_weight(w, group_size=64, name="layer.x")
    with pytest.raises(CompressedTensorsError, match="bits must be 4 or 8"):
        quantize_weight(w, bits=3, group_size=32)
    with pytest.raises(CompressedTensorsError, match="scheme"):
        quantize_weight(w, group_size=32, scheme="ternary")
    w[2, 5] = np.nan
    with pytest.raises(CompressedTensorsError, match=r"non-finite.*\[2, 5\]"):
        quantize_weight(w, group_size=32)


# --------------------------------------------------------------------------- the writer

HIDDEN, FFN, VOCAB = 64, 128, 96


def _numpy_model(folder: Path, dtype=np.float16, shards: int = 1) -> dict[str, np.ndarray]:
    """A small Llama-shaped model folder written with safetensors' NumPy writer."""
    rng = np.random.default_rng(1)
    t = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN))}
    for i in range(2):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN)
        t[p + "self_attn.q_proj.weight"] = rng.standard_normal((HIDDEN, HIDDEN))
        t[p + "self_attn.q_proj.bias"] = rng.standard_normal(HIDDEN)
        t[p + "mlp.down_proj.weight"] = rng.standard_normal((HIDDEN, FFN))
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((FFN, HIDDEN))
    t["model.norm.weight"] = np.ones(HIDDEN)
    t["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN))
    t = {k: (v * 0.05).astype(dtype) for k, v in t.items()}
    t["model.layers.0.step"] = np.array([3], np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(t)
    if shards == 1:
        save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: t[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "pytorch_model.bin").write_bytes(b"not copied")
    return t


def _read_folder(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="numpy") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def _packed_from(tensors: dict, prefix: str, bits: int, group_size: int) -> PackedWeight:
    return PackedWeight(
        tensors[prefix + ".weight_packed"],
        tensors[prefix + ".weight_scale"],
        tensors.get(prefix + ".weight_zero_point"),
        tensors[prefix + ".weight_shape"],
        bits,
        group_size,
    )


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_writer_layout_config_and_copies(tmp_path, scheme):
    src = tmp_path / "src"
    original = _numpy_model(src)
    seen = []
    res = write_compressed_tensors(
        src,
        tmp_path / "out",
        bits=4,
        group_size=32,
        scheme=scheme,
        progress=lambda label, f: seen.append((label, f)),
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed"
    weights = q["config_groups"]["group_0"]["weights"]
    assert q["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert weights == {
        "num_bits": 4,
        "type": "int",
        "symmetric": scheme == "symmetric",
        "strategy": "group",
        "group_size": 32,
        "dynamic": False,
    }
    assert sorted(q["ignore"]) == ["lm_head", "model.embed_tokens"] == sorted(res.ignore)

    got = _read_folder(out)
    for name, value in original.items():
        if name.endswith("proj.weight"):
            prefix = name[: -len(".weight")]
            assert name not in got
            p = _packed_from(got, prefix, 4, 32)
            assert p.weight_shape.tolist() == list(value.shape)
            assert p.weight_scale.dtype == np.float16
            assert (p.weight_zero_point is None) == (scheme == "symmetric")
            mine = quantize_weight(value, bits=4, group_size=32, scheme=scheme)
            assert np.array_equal(dequantize_weight(p), dequantize_weight(mine))
        else:  # norms, biases, embeddings, the head and the int tensor: untouched
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value)
    assert {r.name for r in res.quantized} == {n for n in original if n.endswith("proj.weight")}
    assert all(r.snr_db > 15 for r in res.quantized)
    assert res.bytes_out < res.bytes_in
    fractions = [f for _, f in seen]
    assert len(seen) == len(original) and fractions == sorted(fractions) and fractions[-1] == 1.0


def test_writer_bfloat16_sharded_in_and_out(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 64)) * 0.02).astype(BF16)
    # safetensors' NumPy writer has no bfloat16: write the file by hand
    header = {"a.q_proj.weight": {"dtype": "BF16", "shape": [64, 64], "data_offsets": [0, 8192]}}
    blob = json.dumps(header).encode()
    src.mkdir()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + w.tobytes())
    (src / "config.json").write_text("{}")
    res = write_compressed_tensors(
        src / "model.safetensors", tmp_path / "o1", bits=8, group_size=64
    )
    raw = (tmp_path / "o1" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0 and header["__metadata__"]["format"] == "pt"
    entry = header["a.q_proj.weight_scale"]
    assert entry["dtype"] == "BF16" and entry["shape"] == [64, 1]
    start, end = entry["data_offsets"]
    scale = np.frombuffer(raw[8 + n + start : 8 + n + end], BF16)
    amax = np.abs(w.astype(np.float32)).max(axis=1)
    assert np.array_equal(scale, (amax / np.float32(127)).astype(BF16))
    assert res.quantized[0].snr_db > 40

    src2 = tmp_path / "src2"
    original = _numpy_model(src2, np.float32, shards=3)
    res = write_compressed_tensors(
        src2, tmp_path / "o2", bits=8, group_size=64, max_shard_bytes=40_000
    )
    names = sorted(p.name for p in (tmp_path / "o2").iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in names
    index = json.loads((tmp_path / "o2" / "model.safetensors.index.json").read_text())
    got = _read_folder(tmp_path / "o2")
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in got.values())
    assert np.array_equal(got["model.norm.weight"], original["model.norm.weight"])
    assert res.files[: len(shards)] == shards


def test_keep_and_only(tmp_path):
    src = tmp_path / "src"
    _numpy_model(src)
    res = write_compressed_tensors(
        src, tmp_path / "a", group_size=32, keep=["*.mlp.down_proj.weight"]
    )
    assert "model.layers.0.mlp.down_proj" in res.ignore
    assert not any("down_proj" in r.name for r in res.quantized)
    res = write_compressed_tensors(
        src, tmp_path / "b", group_size=32, only=["lm_head.weight", "model.layers.1.*"]
    )
    assert {r.name for r in res.quantized} == {
        "lm_head.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    }
    assert "lm_head" not in res.ignore and "model.layers.0.self_attn.q_proj" in res.ignore
    with pytest.raises(CompressedTensorsError, match="--only 'model.embed_tokens.weight'"):
        write_compressed_tensors(
            src, tmp_path / "c", group_size=32, only=["model.embed_tokens.weight"]
        )


def test_bad_inputs_leave_nothing_behind(tmp_path):
    src = tmp_path / "src"
    _numpy_model(src)
    with pytest.raises(
        CompressedTensorsError,
        match=r"model\.layers\.0\.mlp\.down_proj\.weight"
        r".*128 input features.*group_size 96",
    ):
        write_compressed_tensors(src, tmp_path / "o", group_size=96, keep=["*q_proj*", "*up*"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(CompressedTensorsError, match="busy: exists and is not an empty folder"):
        write_compressed_tensors(src, tmp_path / "busy", group_size=32)
    with pytest.raises(CompressedTensorsError, match="does not exist"):
        write_compressed_tensors(src, tmp_path / "no" / "such", group_size=32)

    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    (nocfg / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(CompressedTensorsError, match="config.json: missing"):
        write_compressed_tensors(nocfg / "model.safetensors", tmp_path / "o", group_size=32)
    with pytest.raises(CompressedTensorsError, match="no model.safetensors"):
        write_compressed_tensors(tmp_path / "busy", tmp_path / "o", group_size=32)

    (tmp_path / "empty").mkdir()  # an empty output folder is fine, and is replaced
    write_compressed_tensors(src, tmp_path / "empty", group_size=32)
    with pytest.raises(CompressedTensorsError, match="already quantized"):
        write_compressed_tensors(tmp_path / "empty", tmp_path / "o", group_size=32)

    # a failure halfway (a NaN in the last matrix) removes the temporary folder
    t = _numpy_model(tmp_path / "nan")
    t["lm_head.weight"][3, 4] = np.nan
    save_file(t, str(tmp_path / "nan" / "model.safetensors"))
    with pytest.raises(CompressedTensorsError, match=r"lm_head\.weight: non-finite"):
        write_compressed_tensors(tmp_path / "nan", tmp_path / "o", group_size=32, only=["*"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "nan", "nocfg", "src"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "header claims"),
        (lambda raw: raw[: len(raw) - 100], "truncated"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "not JSON"),
        (lambda raw: raw[:4], "too short"),
    ],
)
def test_hostile_safetensors_is_one_clear_error(tmp_path, mutate, message):
    src = tmp_path / "src"
    _numpy_model(src)
    f = src / "model.safetensors"
    f.write_bytes(mutate(f.read_bytes()))
    with pytest.raises(CompressedTensorsError, match=message):
        write_compressed_tensors(src, tmp_path / "o", group_size=32)
    assert not (tmp_path / "o").exists()


def test_hostile_shape_is_refused_before_allocation(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    header = {"x.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}
    blob = json.dumps(header).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(16))
    (src / "config.json").write_text("{}")
    with pytest.raises(
        CompressedTensorsError, match=r"16 bytes do not hold shape \[1099511627776, 1099511627776\]"
    ):
        write_compressed_tensors(src, tmp_path / "o")


def test_callback_errors_are_ignored(tmp_path, caplog):
    src = tmp_path / "src"
    _numpy_model(src)

    def broken(label, fraction):
        raise RuntimeError("bar broke")

    write_compressed_tensors(src, tmp_path / "o", group_size=32, progress=broken)
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert "progress callback failed" in caplog.text


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    return torch, transformers


def _tiny_llama(hf, folder: Path, tie: bool):
    """A random bfloat16 Llama saved to ``folder``, and as transformers loads it back
    (loading keeps the rotary buffers in float32, unlike ``.to(bfloat16)``)."""
    torch, transformers = hf
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _torch_bf16(torch, a: np.ndarray):
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)


def _relative_error(a, b) -> float:
    return float((a - b).float().norm() / a.float().norm())


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize(
    "bits, scheme, tie",
    [
        (8, "symmetric", False),
        (4, "symmetric", True),
        (4, "asymmetric", False),
        (8, "asymmetric", True),
    ],
)
def test_transformers_loads_the_output(hf, tmp_path, bits, scheme, tie):
    torch, transformers = hf
    model = _tiny_llama(hf, tmp_path / "src", tie)
    res = write_compressed_tensors(
        tmp_path / "src",
        tmp_path / "out",
        bits=bits,
        group_size=64,
        scheme=scheme,
        max_shard_bytes=200_000 if tie else 10**9,
    )
    if tie:  # the head has no tensor of its own; sharded output goes through the index
        assert "lm_head" in res.ignore and "model.safetensors.index.json" in res.files
    # transformers' compressed route (decompress on first forward) sizes an asymmetric
    # layer's weight_zero_point unpacked ([out, G]) in compressed-tensors 0.20, so it
    # refuses packed zero points from any writer; dequantize=True decompresses them.
    kwargs = {}
    if scheme == "asymmetric":
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", **kwargs).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = loaded(ids).logits  # the first forward also decompresses (compressed route)
        want = model(ids).logits

    written = _read_torch_folder(torch, tmp_path / "out")
    reference = dict(model.state_dict())
    n = 0
    for name, module in loaded.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        p = _packed_from(written, name, bits, 64)
        mine = dequantize_weight(p)
        assert torch.equal(module.weight.data, _torch_bf16(torch, mine)), name
        reference[name + ".weight"] = _torch_bf16(torch, mine)
        n += 1
    assert n == 14
    # the float model with flightquant's dequantized weights computes the same logits
    model.load_state_dict(reference)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, got)
    rel = _relative_error(want, got)
    cos = float(
        torch.nn.functional.cosine_similarity(want.float().flatten(), got.float().flatten(), dim=0)
    )
    print(f"bits={bits} {scheme} tie={tie}: logits relative error {rel:.4f}, cosine {cos:.5f}")
    if bits == 8:
        assert rel < 0.05 and cos > 0.999
    else:
        assert rel < 0.4 and cos > 0.95


def _read_torch_folder(torch, folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the output, bfloat16 ones as ml_dtypes arrays."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if t.dtype == torch.bfloat16:
                    out[k] = t.view(torch.int16).numpy().view(BF16)
                else:
                    out[k] = t.numpy()
    return out


def _weighted_error(torch, written: dict, source: dict, importance: dict, bits: int) -> float:
    """sum over the Linear weights of sum_j w_j * (W - W_hat)[:, j]**2 (float64)."""
    total = 0.0
    for name, w in importance.items():
        prefix = name[: -len(".weight")]
        deq = dequantize_weight(_packed_from(written, prefix, bits, 32)).astype(np.float64)
        x = source[name].float().numpy().astype(np.float64)
        total += float((((deq - x) ** 2) * w.astype(np.float64)[None, :]).sum())
    return total


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_cli_mse_server_and_imatrix(hf, tmp_path, server, scheme):
    """`quantize MODEL_DIR --format compressed-tensors --method mse`: transformers loads it,
    every Linear weight is flightquant's dequantized weight bit for bit, the logits are
    closer to the float model's than rtn's; --server writes the same bytes; --imatrix
    changes the codes and lowers the importance-weighted error."""
    import flightquant as fq
    from flightquant.cli import main
    from flightquant.modelfiles.imatrix import Imatrix, ImatrixEntry, write_imatrix

    torch, transformers = hf
    model = _tiny_llama(hf, tmp_path / "src", False)
    source = dict(model.state_dict())
    linear = sorted(
        n + ".weight"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    argv = ["--format", "compressed-tensors", "--bits", "4", "--group-size", "32"]
    argv += ["--scheme", scheme, "-q"]

    def quantize(out: str, *extra: str) -> Path:
        rc = main(["quantize", str(tmp_path / "src"), "-o", str(tmp_path / out), *argv, *extra])
        assert rc == 0
        return tmp_path / out

    rtn = quantize("rtn")
    mse = quantize("mse", "--method", "mse")
    remote = quantize("remote", "--method", "mse", "--server", server().location)
    for name in ("model.safetensors", "config.json"):
        assert (mse / name).read_bytes() == (remote / name).read_bytes(), name
    assert (mse / "model.safetensors").read_bytes() != (rtn / "model.safetensors").read_bytes()

    kwargs = {}
    if scheme == "asymmetric":  # see test_transformers_loads_the_output
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    errors = {}
    for out in (rtn, mse):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, **kwargs).eval()
        with torch.no_grad():
            errors[out.name] = _relative_error(want, loaded(ids).logits)
        if out is mse:  # every Linear weight: the engine's mse result, dequantized
            modules = dict(loaded.named_modules())
            arrays = {n: source[n].float().numpy() for n in linear}
            theirs = fq.quantize_arrays(
                arrays, bits=4, group_size=32, scheme=scheme, method="mse",
                scale_dtype="bfloat16",
            )  # fmt: skip
            for n in linear:
                mine = theirs[n].dequantize().astype(BF16)
                got = modules[n[: -len(".weight")]].weight.data
                assert torch.equal(got, _torch_bf16(torch, mine)), n
    print(f"{scheme}: logits relative error rtn {errors['rtn']:.4f}, mse {errors['mse']:.4f}")
    assert errors["mse"] < errors["rtn"]

    rng = np.random.default_rng(4)
    entries = {}
    for n in linear:
        k = source[n].shape[1]
        sums = np.exp(2.0 * rng.standard_normal(k)).astype(np.float32)
        entries[n] = ImatrixEntry(n, sums.reshape(1, k), np.array([1.0], np.float32))
    imx = Imatrix(entries, chunk_count=1)
    write_imatrix(tmp_path / "m.imatrix.gguf", imx)
    weighted = quantize("imx", "--method", "mse", "--imatrix", str(tmp_path / "m.imatrix.gguf"))
    assert (weighted / "model.safetensors").read_bytes() != (mse / "model.safetensors").read_bytes()
    importance = {n: imx.importance(n) for n in linear}
    plain = _weighted_error(torch, _read_torch_folder(torch, mse), source, importance, 4)
    imp = _weighted_error(torch, _read_torch_folder(torch, weighted), source, importance, 4)
    print(f"{scheme}: importance-weighted error mse {plain:.6g}, mse + imatrix {imp:.6g}")
    assert imp < plain


def test_one_reader_for_model_folders(tmp_path):
    """SafetensorsFolder: the shards of the index as one source (the quantize job,
    inspect and this writer read through it); shards outside the folder, a tensor in two
    shards and a bad index are one clear error."""
    from flightquant.modelfiles import SafetensorsFolder, open_input

    original = _numpy_model(tmp_path / "m", np.float32, shards=3)
    src = open_input(tmp_path / "m")
    assert isinstance(src, SafetensorsFolder) and len(src.shards) == 3
    assert {i.name for i in src.infos} == set(original)
    for info in src.infos:
        assert np.array_equal(src.read(info), original[info.name])
        offset, nbytes = src.span(info)
        raw = src.path_of(info).read_bytes()[offset : offset + nbytes]
        assert raw == np.ascontiguousarray(original[info.name]).tobytes()
    index = tmp_path / "m" / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    (tmp_path / "outside.safetensors").write_bytes(
        (tmp_path / "m" / "model-00001-of-00003.safetensors").read_bytes()
    )
    for bad, message in (
        ({**weight_map, "x": "../outside.safetensors"}, "is not a file in"),
        ({**weight_map, "x": "missing.safetensors"}, "is not a file in"),
        ([1, 2], "not a safetensors index"),
    ):
        index.write_text(json.dumps({"weight_map": bad}))
        with pytest.raises(CompressedTensorsError, match=message):
            SafetensorsFolder(tmp_path / "m")
    link = tmp_path / "m" / "model-00004-of-00003.safetensors"
    link.symlink_to(tmp_path / "outside.safetensors")
    index.write_text(json.dumps({"weight_map": {**weight_map, "y": link.name}}))
    with pytest.raises(CompressedTensorsError, match="outside|symbolic link|inside"):
        SafetensorsFolder(tmp_path / "m")
    link.unlink()
    (tmp_path / "m" / link.name).write_bytes((tmp_path / "outside.safetensors").read_bytes())
    with pytest.raises(CompressedTensorsError, match="is in both"):
        SafetensorsFolder(tmp_path / "m")
