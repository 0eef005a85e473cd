"""llama.cpp itself as the oracle of the GGUF job (``-m llama``; needs llama-cpp-python).

A tiny llama (vocabulary, two blocks) is written with gguf-py, quantized by
``llama_model_quantize`` (``--pure``: every tensor it quantizes gets the chosen type) and by
``flightquant quantize``; the two files must choose the same types, hold the same bytes
(``method="rtn"`` is ggml's reference quantizer, the one llama-quantize runs without an
importance matrix), and our file must load and run in llama.cpp.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from flightquant.cli import main

pytestmark = pytest.mark.llama
llama_cpp = pytest.importorskip("llama_cpp")

#: llama.h's llama_ftype of each type name, as llama-quantize maps them
FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q5_1": 9, "Q4_K": 15, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}


def tiny_llama(path: Path, d: int = 256, n_ff: int = 512, n_layer: int = 2, n_vocab: int = 300):
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(d // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581w{i}" for i in range(n_vocab - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def matrix(name, rows, cols, scale=0.05):
        w.add_tensor(name, (rng.standard_normal((rows, cols)) * scale).astype(np.float16))

    matrix("token_embd.weight", n_vocab, d, 0.5)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        matrix(f"blk.{i}.attn_q.weight", d, d)
        matrix(f"blk.{i}.attn_k.weight", d // 2, d)
        matrix(f"blk.{i}.attn_v.weight", d // 2, d)
        matrix(f"blk.{i}.attn_output.weight", d, d)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        matrix(f"blk.{i}.ffn_gate.weight", n_ff, d)
        matrix(f"blk.{i}.ffn_up.weight", n_ff, d)
        matrix(f"blk.{i}.ffn_down.weight", d, n_ff)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    matrix("output.weight", n_vocab, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def f16(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("llama") / "tiny-f16.gguf"
    tiny_llama(p)
    return p


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = 1
    assert (
        llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        == 0
    )


def logits(path: Path) -> np.ndarray:
    model = llama_cpp.Llama(model_path=str(path), vocab_only=False, verbose=False, n_ctx=64,
                            logits_all=True)  # fmt: skip
    tokens = model.tokenize(b"w1 w2 w3", add_bos=True)
    model.eval(tokens)
    out = np.array(model.scores[: len(tokens)], np.float64)
    model.close()
    return out


@pytest.mark.parametrize("typ", list(FTYPES))
def test_same_file_as_llama_quantize(f16, tmp_path, typ):
    ours, theirs = tmp_path / f"fq-{typ}.gguf", tmp_path / f"lc-{typ}.gguf"
    assert main(["quantize", str(f16), "-o", str(ours), "--format", typ, "--pure", "-q"]) == 0
    llama_quantize(f16, theirs, FTYPES[typ])
    a, b = GGUFReader(str(ours)), GGUFReader(str(theirs))
    # llama-quantize writes the tensors sorted by name; ours keeps the input's order
    assert [t.name for t in a.tensors] == [t.name for t in GGUFReader(str(f16)).tensors]
    theirs_by_name = {t.name: t for t in b.tensors}
    assert sorted(theirs_by_name) == sorted(t.name for t in a.tensors)
    for x in a.tensors:
        y = theirs_by_name[x.name]
        assert x.tensor_type == y.tensor_type, x.name
        assert x.data.tobytes() == y.data.tobytes(), x.name  # rtn is ggml's reference
    assert a.fields["general.file_type"].contents() == b.fields["general.file_type"].contents()
    # and llama.cpp loads and runs ours, with the logits its own file gives
    ref = logits(f16)
    got = logits(ours)
    np.testing.assert_allclose(got, logits(theirs), rtol=0, atol=1e-4)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9
