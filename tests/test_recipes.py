"""llama-quantize's recipes: the type each tensor gets, on the two models of :mod:`gguf_models`.

The expected tables are worked out by hand from llama.cpp's ``llama_tensor_get_type`` (the
oracle itself runs in tests/test_recipes_llama.py): ``use_more_bits(i, n)`` is true for
``i < n/8``, ``i >= 7n/8`` and ``(i - n/8) % 3 == 2``, i.e. layers 0, 3, 6, 7 of 8 and layers
2, 5 of 6.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from gguf import GGUFReader
from gguf_models import llama_tensors, write_bert, write_llama

from flightquant.cli import main
from flightquant.modelfiles import GGUFFile, ModelIOError
from flightquant.modelfiles.gguf_policy import ModelParams, choose, recipe

LLAMA = ModelParams("llama", n_layer=8, n_head=8, n_head_kv=2)  # n_gqa 4
BERT = ModelParams("bert", n_layer=6, n_head=6, n_head_kv=6)


def llama_model(n_layer=8):
    return [(name, tuple(reversed(shape)), "F16" if len(shape) > 1 else "F32")
            for name, shape in llama_tensors(256, 512, n_layer, 320, 64)]  # fmt: skip


def bert_model():
    out = [("token_embd.weight", (384, 200), "F16"), ("token_types.weight", (384, 2), "F16"),
           ("position_embd.weight", (384, 64), "F16"), ("token_embd_norm.weight", (384,), "F32")]  # fmt: skip
    for i in range(6):
        out += [(f"blk.{i}.{t}.weight", (384, 384), "F16")
                for t in ("attn_q", "attn_k", "attn_v", "attn_output")]  # fmt: skip
        out += [(f"blk.{i}.attn_q.bias", (384,), "F32"),
                (f"blk.{i}.ffn_up.weight", (384, 768), "F16"),
                (f"blk.{i}.ffn_down.weight", (768, 384), "F16")]  # fmt: skip
    return out


def types(choices, part: str) -> list[str]:
    """The types of the tensors ``blk.<i>.<part>.weight``, by layer."""
    by = {c.name: c.dst for c in choices if c.name.endswith(f".{part}.weight")}
    return [by[n] for n in sorted(by, key=lambda n: int(n.split(".")[1]))]


def dst(choices, name: str) -> str:
    return next(c.dst for c in choices if c.name == name)


MORE = [0, 3, 6, 7]  # use_more_bits of 8 layers


def by_layer(more: str, other: str, layers=MORE, n=8) -> list[str]:
    return [more if i in layers else other for i in range(n)]


def test_q4_k_m_on_a_gqa_llama():
    c = choose(llama_model(), "Q4_K_M", LLAMA)
    assert dst(c, "output.weight") == "Q6_K" and dst(c, "token_embd.weight") == "Q4_K"
    assert types(c, "attn_v") == by_layer("Q6_K", "Q4_K")  # half of them: use_more_bits
    assert types(c, "ffn_down") == by_layer("Q6_K", "Q4_K")
    for part in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(types(c, part)) == {"Q4_K"}, part
    assert dst(c, "blk.0.attn_norm.weight") == "F32"
    assert choose(llama_model(), "Q4_K", LLAMA) == c  # the alias


@pytest.mark.parametrize(
    "name, expect",
    [
        ("Q2_K", {"attn_v": ["Q4_K"] * 8, "ffn_down": ["Q3_K"] * 8,
                  "attn_output": ["Q3_K"] * 8, "attn_q": ["Q2_K"] * 8}),  # n_gqa >= 4
        ("Q3_K_S", {"attn_v": ["Q3_K"] * 8, "ffn_down": ["Q3_K"] * 8}),
        ("Q3_K_M", {"attn_v": ["Q5_K"] * 2 + ["Q4_K"] * 6, "ffn_down": ["Q4_K"] * 8,
                    "attn_output": ["Q4_K"] * 8, "ffn_up": ["Q3_K"] * 8}),
        ("Q3_K_L", {"attn_v": ["Q5_K"] * 8, "ffn_down": ["Q5_K"] * 8,
                    "attn_output": ["Q5_K"] * 8}),
        ("Q4_K_S", {"attn_v": ["Q5_K"] * 4 + ["Q4_K"] * 4, "ffn_down": ["Q5_K"] + ["Q4_K"] * 7}),
        ("Q5_K_S", {"attn_v": ["Q5_K"] * 8, "ffn_down": ["Q5_K"] * 8}),
        ("Q5_K_M", {"attn_v": by_layer("Q6_K", "Q5_K"), "ffn_down": by_layer("Q6_K", "Q5_K")}),
        ("IQ4_XS", {"attn_v": ["Q5_K"] * 8, "ffn_down": ["Q5_K"] + ["IQ4_XS"] * 7}),
        ("IQ4_NL", {"attn_v": ["Q5_K"] * 8, "ffn_down": ["Q5_K"] + ["IQ4_NL"] * 7}),
        ("Q4_0", {"attn_v": ["Q4_0"] * 8, "ffn_down": ["Q4_0"] * 8}),
        ("TQ1_0", {"attn_v": ["TQ1_0"] * 8}),
        ("F16", {"attn_v": ["F16"] * 8, "ffn_down": ["F16"] * 8}),
    ],
)  # fmt: skip
def test_the_mixes_on_a_gqa_llama(name, expect):
    c = choose(llama_model(), name, LLAMA)
    for part, want in expect.items():
        assert types(c, part) == want, part
    output = {"Q4_0": "Q6_K", "TQ1_0": "Q6_K", "F16": "F16"}.get(name, "Q6_K")
    assert dst(c, "output.weight") == output
    assert dst(c, "token_embd.weight") == {"TQ1_0": "Q4_K"}.get(name, recipe(name).default)


def test_an_imatrix_changes_the_first_ffn_down():
    # IQ4_*: Q5_K on the first eighth only without one; Q4_0/Q5_0: Q4_1/Q5_1 only with one
    iq4 = choose(llama_model(), "IQ4_XS", LLAMA, has_imatrix=True)
    assert types(iq4, "ffn_down") == ["IQ4_XS"] * 8
    q40 = choose(llama_model(), "Q4_0", LLAMA, has_imatrix=True)
    assert types(q40, "ffn_down") == ["Q4_1"] + ["Q4_0"] * 7
    q50 = choose(llama_model(), "Q5_0", LLAMA, has_imatrix=True)
    assert types(q50, "ffn_down") == ["Q5_1"] + ["Q5_0"] * 7


def test_q4_k_m_on_a_tied_bert_with_384_wide_rows():
    c = choose(bert_model(), "Q4_K_M", BERT)
    # tied embeddings get the output head's rule: 384 does not fit 256-blocks -> Q8_0
    assert dst(c, "token_embd.weight") == "Q8_0"
    # use_more_bits of 6 layers: 2 and 5 -> Q6_K, which 384-wide rows turn into Q8_0;
    # the others Q4_K -> Q5_0
    assert types(c, "attn_v") == ["Q5_0", "Q5_0", "Q8_0", "Q5_0", "Q5_0", "Q8_0"]
    assert types(c, "ffn_down") == ["Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K"]  # 768 wide
    assert set(types(c, "ffn_up")) == {"Q5_0"} and set(types(c, "attn_q")) == {"Q5_0"}
    fallback = next(x for x in c if x.name == "blk.2.attn_v.weight")
    assert "Q6_K -> Q8_0" in fallback.note
    for kept in ("token_types.weight", "position_embd.weight", "token_embd_norm.weight"):
        assert dst(c, kept) == dict((n, t) for n, _, t in bert_model())[kept]


def test_q2_k_s_requires_an_imatrix_where_llama_cpp_does():
    c = choose(bert_model(), "Q2_K_S", BERT)
    needs = {x.name for x in c if x.requires_imatrix}
    # Q2_K where the rows fit (768-wide ffn_down, from layer 1: the first eighth gets Q4_K)...
    assert needs == {f"blk.{i}.ffn_down.weight" for i in range(6)}
    # ...not the 384-wide tensors that fall back to Q4_0, nor the embeddings and the head
    assert not any(x.requires_imatrix for x in choose(llama_model(), "Q2_K_S", LLAMA)
                   if x.name in ("output.weight", "token_embd.weight"))  # fmt: skip


def test_layers_are_counted_in_llama_cpps_order():
    # by block number (blk.10 after blk.9, not after blk.1), whatever the file's order: with
    # 12 layers use_more_bits picks 0, 3, 6, 9, 10, 11
    tensors = llama_model(12)
    random.Random(0).shuffle(tensors)
    c = choose(tensors, "Q4_K_M", ModelParams("llama", 12, 8, 2))
    assert types(c, "attn_v") == by_layer("Q6_K", "Q4_K", [0, 3, 6, 9, 10, 11], 12)
    assert [x.name for x in c] == [t[0] for t in tensors]  # the output keeps the input's order


def test_flags():
    m = llama_model()
    c = choose(m, "Q4_K_M", LLAMA, pure=True)
    assert {x.dst for x in c if x.quantize} == {"Q4_K"}
    c = choose(m, "Q4_K_M", LLAMA, output_type="Q8_0", token_embd_type="Q5_K")
    assert dst(c, "output.weight") == "Q8_0" and dst(c, "token_embd.weight") == "Q5_K"
    c = choose(m, "Q4_K_M", LLAMA, leave_output=True)
    assert dst(c, "output.weight") == "F16"
    # --tensor-type: the pattern is searched in the name (as llama-quantize's std::regex),
    # or matches the whole name as a glob; the first match wins; it bypasses the mix, and
    # a tensor it names does not advance the mix's layer counter
    c = choose(m, "Q4_K_M", LLAMA, types=[("BLK\\.0\\.attn_v", "Q8_0"), ("*.ffn_down.*", "Q5_K")])
    assert types(c, "attn_v") == ["Q8_0"] + by_layer("Q6_K", "Q4_K", [0, 3, 6], 7)
    assert types(c, "ffn_down") == ["Q5_K"] * 8
    with pytest.raises(ModelIOError, match="matches no tensor"):
        choose(m, "Q4_K_M", LLAMA, types=[("nothing", "Q8_0")])
    with pytest.raises(ModelIOError, match="not a GGUF recipe"):
        choose(m, "Q4_K_X", LLAMA)
    bert = bert_model()
    with pytest.raises(ModelIOError, match="token_embd.weight.*do not fit Q5_K"):
        choose(bert, "Q4_K_M", BERT, token_embd_type="Q5_K")
    # the tied output type reaches the embedding through the mix, with its fallback
    assert dst(choose(bert, "Q4_K_M", BERT, output_type="Q5_K"), "token_embd.weight") == "Q5_1"


def test_model_params_from_the_file(tmp_path):
    p = tmp_path / "m.gguf"
    write_llama(p, n_layer=2, d=64, n_ff=128, n_vocab=300, n_head=4, n_head_kv=1)
    f = GGUFFile(p)
    m = ModelParams.from_gguf(f.value)
    assert (m.arch, m.n_layer, m.n_head, m.n_head_kv, m.n_gqa) == ("llama", 2, 4, 1, 4)
    assert not m.is_70b and ModelParams("llama", 80, 64, 8).is_70b
    assert not ModelParams("llama", 80, 64, 64).is_70b


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("bert") / "bert-f16.gguf"
    write_bert(p)
    return p


def test_cli_writes_the_recipe_and_inspect_shows_it(bert_file, tmp_path, capsys):
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(bert_file), "-o", str(out), "--format", "q4_k", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "Q4_K_M"
    r = GGUFReader(str(out))
    assert int(r.fields["general.file_type"].contents()) == 15
    got = {t.name: t.tensor_type.name for t in r.tensors}
    want = {c.name: c.dst for c in choose(bert_model(), "Q4_K_M", BERT)}
    assert {k: got[k] for k in want} == want
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recipe"] == "Q4_K_M"
    per = info["per_type"]
    assert per["Q8_0"]["tensors"] == 3 and per["Q6_K"]["tensors"] == 2  # embd + 2 attn_v
    assert per["Q4_K"]["bits_per_weight"] == 4.5
    assert sum(d["bytes"] for d in per.values()) == info["bytes"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llama-quantize Q4_K_M" in text and "share" in text


def test_cli_refuses_q2_k_s_without_an_imatrix(bert_file, tmp_path, capsys):
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(bert_file), "-o", str(out), "--format", "Q2_K_S"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an importance matrix" in err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["Q4_K_M", "Q2_K", "IQ4_XS", "F16", "Q8_0"])
def test_estimate_works_for_every_recipe(bert_file, fmt, capsys):
    assert main(["inspect", str(bert_file), "--estimate", "--format", fmt, "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    want = {c.name: c.dst for c in choose(bert_model(), fmt, BERT)}
    got = {t["name"]: t["type_out"] for t in est["per_tensor"]}
    assert {k: got[k] for k in want} == want and est["format"] == fmt


# --------------------------------------------------------------------------- size target


def test_the_knapsack_takes_the_most_error_removed_per_byte():
    from flightquant.modelfiles.gguf_target import Option, hull, parse_size, solve

    a = [Option("Q2_K", 10, 100.0), Option("Q4_K", 20, 10.0), Option("Q8_0", 40, 1.0)]
    b = [Option("Q2_K", 10, 50.0), Option("Q3_K", 15, 49.0), Option("Q4_K", 20, 5.0)]
    assert [o.type for o in hull(b)] == ["Q2_K", "Q4_K"]  # Q3_K lies above the chord
    assert {k: o.type for k, o in solve({"a": a, "b": b}, 30).items()} == {"a": "Q4_K",
                                                                            "b": "Q2_K"}  # fmt: skip
    assert {k: o.type for k, o in solve({"a": a, "b": b}, 40).items()} == {"a": "Q4_K",
                                                                            "b": "Q4_K"}  # fmt: skip
    # a budget between hull points is spent on the best single move that still fits
    assert solve({"a": a, "b": b}, 35)["b"].type == "Q3_K"
    with pytest.raises(ModelIOError, match="below"):
        solve({"a": a, "b": b}, 19)
    assert parse_size("2M") == 2 << 20 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("123") == 123 and parse_size("4 KiB") == 4096
    with pytest.raises(ModelIOError, match="expected bytes"):
        parse_size("big")


def test_a_size_target_beats_the_recipe_at_its_size(bert_file, tmp_path, capsys):
    recipe_out, target_out = tmp_path / "recipe.gguf", tmp_path / "target.gguf"
    assert main(["quantize", str(bert_file), "-o", str(recipe_out), "--format", "Q4_K_M",
                 "--json"]) == 0  # fmt: skip
    ref = json.loads(capsys.readouterr().out)
    size = recipe_out.stat().st_size
    assert main(["quantize", str(bert_file), "-o", str(target_out), "--target-size", str(size),
                 "--json"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert target_out.stat().st_size <= size
    t = got["target"]
    assert t["bytes"] <= t["budget_bytes"] and t["tensors_chosen"] == 6 * 6 + 1
    # per tensor: the type chosen among those measured, predicted and achieved error
    per = {p["name"]: p for p in got["per_tensor"]}
    emb = per["token_embd.weight"]
    assert emb["type_out"] in emb["options"] and "Q4_K" not in emb["options"]  # 384 wide
    assert emb["predicted_error"] == pytest.approx(emb["achieved_error"], rel=0.05)
    # the least total error: below the recipe's, over the same tensors (by default each
    # tensor's error relative to its mean square, times its size)
    assert t["error"] == "relative" and t["achieved_error"] < _total_sse(ref, per)
    # --target-error absolute minimises the plain sum: the pooled SNR beats the recipe's
    absolute = tmp_path / "absolute.gguf"
    assert main(["quantize", str(bert_file), "-o", str(absolute), "--target-size", str(size),
                 "--target-error", "absolute", "--json"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert got["target"]["error"] == "absolute" and got["snr_db"] > ref["snr_db"]
    assert absolute.stat().st_size <= size


def _total_sse(ref: dict, chosen: dict) -> float:
    """The recipe's squared error over the tensors the target chose, as the target measured
    each type's error on them."""
    total = 0.0
    for p in ref["per_tensor"]:
        if p["name"] in chosen and "options" in chosen[p["name"]]:
            total += chosen[p["name"]]["options"][p["type_out"]][1]
    return total


def test_target_bpw_and_estimate(bert_file, capsys):
    argv = ["inspect", str(bert_file), "--estimate", "--target-bpw", "5.5", "--json"]
    assert main(argv) == 0
    est = json.loads(capsys.readouterr().out)
    numel = sum(p["bytes_in"] // 2 for p in est["per_tensor"] if p["type_in"] == "F16")
    numel += sum(p["bytes_in"] // 4 for p in est["per_tensor"] if p["type_in"] == "F32")
    assert est["bytes_out"] <= 5.5 * numel / 8 and est["bits_per_weight"] <= 5.5
    assert est["target"]["predicted_error"] > 0 and est["format"] in ("Q5_K_M", "Q5_0", "Q5_1",
                                                                      "Q6_K", "Q4_K_M", "Q8_0")  # fmt: skip
    with pytest.raises(SystemExit):
        main(["inspect", str(bert_file), "--estimate", "--target-bpw", "x"])
    capsys.readouterr()
    assert main(["inspect", str(bert_file), "--estimate", "--target-bpw", "1"]) == 1
    assert "below" in capsys.readouterr().err


# --------------------------------------------------------------------------- imatrix


def test_imatrix_vectors_and_keys_as_llama_quantize(bert_file, tmp_path):
    from gguf import GGUFValueType
    from gguf_models import write_imatrix

    from flightquant.cli import gguf_imatrix
    from flightquant.cli.common import JobError
    from flightquant.modelfiles.imatrix import read_imatrix

    path = tmp_path / "bert.imatrix.gguf"
    write_imatrix(path, bert_file)
    imatrix = read_imatrix(path)
    choices = choose(bert_model(), "Q4_K_M", BERT, has_imatrix=True)
    vecs = gguf_imatrix.vectors(imatrix, choices)
    # every matrix quantized but the token embedding (llama-imatrix records no entry for it)
    assert set(vecs) == {c.name for c in choices if c.quantize} - {"token_embd.weight"}
    v = vecs["blk.0.attn_q.weight"]
    assert v.dtype == np.float32 and v.shape == (384,)
    np.testing.assert_array_equal(v, imatrix.importance("blk.0.attn_q.weight"))
    keys = gguf_imatrix.metadata(str(path), imatrix)
    assert list(keys) == ["quantize.imatrix.file", "quantize.imatrix.dataset",
                          "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"]  # fmt: skip
    assert keys["quantize.imatrix.entries_count"] == (GGUFValueType.UINT32, len(imatrix.entries))
    assert keys["quantize.imatrix.chunks_count"] == (GGUFValueType.UINT32, 4)
    long = "/" + "x" * 200 + ".gguf"
    assert len(gguf_imatrix.metadata(long, imatrix)["quantize.imatrix.file"][1]) == 127
    # Q2_K_S: a tensor that needs one and has no entry is an error, as llama-quantize's
    need = choose(bert_model(), "Q2_K_S", BERT, has_imatrix=True)
    del imatrix.entries["blk.3.ffn_down.weight"]
    with pytest.raises(JobError, match="no entry for 'blk.3.ffn_down.weight'"):
        gguf_imatrix.vectors(imatrix, need)
    # an entry of the wrong length is an error (but for token_embd, which llama.cpp ignores)
    e = imatrix.entries["blk.0.attn_k.weight"]
    imatrix.entries["blk.0.attn_k.weight"] = type(e)(e.name, e.in_sum2[:, :128], e.counts)
    with pytest.raises(JobError, match="'blk.0.attn_k.weight' has 128 values"):
        gguf_imatrix.vectors(imatrix, choices)
