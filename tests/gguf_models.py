"""Tiny GGUF models written with gguf-py, for the recipe tests and the benchmark.

* :func:`write_llama`: a llama-architecture model with grouped-query attention (8 heads, 2 KV
  heads: ``n_gqa`` 4) and an untied output head, with a byte-level vocabulary llama.cpp loads.
* :func:`write_bert`: a BERT-like model with 384-wide rows (MiniLM's) and tied embeddings (no
  ``output.weight``), position and token-type embeddings and biases.

Weights are heavy-tailed (Student t, 4 degrees of freedom) with row scales spread over a
decade, as trained weights are, so a type's error depends on the tensor; the llama's
residual branches are scaled by 1/sqrt(2 n_layer) (GPT-2's initialisation), so a small change
of the weights makes a small change of the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, PoolingType


def _weights(rng, rows: int, cols: int, scale: float) -> np.ndarray:
    w = rng.standard_t(4, size=(rows, cols)).astype(np.float32)
    w *= np.exp(rng.uniform(-1.15, 1.15, size=(rows, 1))).astype(np.float32)
    return (w * (scale / np.sqrt(2.0))).astype(np.float32)


def llama_tensors(d: int, n_ff: int, n_layer: int, n_vocab: int, n_head_kv_dim: int):
    """(name, NumPy shape) of a llama model, in convert_hf_to_gguf's order."""
    out = [("token_embd.weight", (n_vocab, d))]
    for i in range(n_layer):
        out += [
            (f"blk.{i}.attn_norm.weight", (d,)),
            (f"blk.{i}.attn_q.weight", (d, d)),
            (f"blk.{i}.attn_k.weight", (n_head_kv_dim, d)),
            (f"blk.{i}.attn_v.weight", (n_head_kv_dim, d)),
            (f"blk.{i}.attn_output.weight", (d, d)),
            (f"blk.{i}.ffn_norm.weight", (d,)),
            (f"blk.{i}.ffn_gate.weight", (n_ff, d)),
            (f"blk.{i}.ffn_up.weight", (n_ff, d)),
            (f"blk.{i}.ffn_down.weight", (d, n_ff)),
        ]
    return out + [("output_norm.weight", (d,)), ("output.weight", (n_vocab, d))]


def write_llama(
    path: Path,
    *,
    d: int = 256,
    n_ff: int = 512,
    n_layer: int = 8,
    n_vocab: int = 320,
    n_head: int = 8,
    n_head_kv: int = 2,
    dtype=np.float16,
    seed: int = 0,
) -> None:
    """A llama model (GQA ``n_head/n_head_kv``, untied output) with a vocabulary llama.cpp
    tokenizes (``<unk> <s> </s>``, 256 byte tokens, then words)."""
    rng = np.random.default_rng(seed)
    head_dim = d // n_head
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1 if dtype == np.float16 else 0)
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
    for name, shape in llama_tensors(d, n_ff, n_layer, n_vocab, head_dim * n_head_kv):
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, np.float32))
            continue
        scale = 0.5 if name == "token_embd.weight" else 1.0 / np.sqrt(shape[1])
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            scale /= np.sqrt(2 * n_layer)  # GPT-2's residual scaling: a model, not chaos
        w.add_tensor(name, _weights(rng, *shape, scale).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_bert(
    path: Path,
    *,
    d: int = 384,
    n_ff: int = 768,
    n_layer: int = 6,
    n_vocab: int = 200,
    seed: int = 1,
) -> None:
    """A BERT-like embedding model: 384-wide rows, tied embeddings (no output head)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "bert")
    w.add_name("tiny-bert")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(6)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(PoolingType.MEAN)
    w.add_file_type(1)
    w.add_token_type_count(2)
    w.add_tokenizer_model("bert")
    w.add_token_list(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(n_vocab - 4)])
    w.add_token_types([3] * 4 + [1] * (n_vocab - 4))

    def mat(name, rows, cols, scale=None):
        s = 1.0 / np.sqrt(cols) if scale is None else scale
        w.add_tensor(name, _weights(rng, rows, cols, s).astype(np.float16))

    def vec(name, n, value=0.0):
        w.add_tensor(name, np.full(n, value, np.float32))

    mat("token_embd.weight", n_vocab, d, 0.5)
    mat("token_types.weight", 2, d, 0.1)
    mat("position_embd.weight", 64, d, 0.1)
    vec("token_embd_norm.weight", d, 1.0)
    vec("token_embd_norm.bias", d)
    for i in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            mat(f"blk.{i}.{t}.weight", d, d)
            vec(f"blk.{i}.{t}.bias", d)
        vec(f"blk.{i}.attn_output_norm.weight", d, 1.0)
        vec(f"blk.{i}.attn_output_norm.bias", d)
        mat(f"blk.{i}.ffn_up.weight", n_ff, d)
        vec(f"blk.{i}.ffn_up.bias", n_ff)
        mat(f"blk.{i}.ffn_down.weight", d, n_ff)
        vec(f"blk.{i}.ffn_down.bias", d)
        vec(f"blk.{i}.layer_output_norm.weight", d, 1.0)
        vec(f"blk.{i}.layer_output_norm.bias", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_imatrix(path: Path, model: Path, *, chunks: int = 4, chunk_size: int = 128,
                  seed: int = 2) -> None:  # fmt: skip
    """An importance matrix for ``model`` in llama-imatrix's GGUF layout: per matrix
    ``<name>.in_sum2`` (sums of squared activations, one per input column) and
    ``<name>.counts`` (tokens seen), ``imatrix.datasets/chunk_count/chunk_size``. The values
    are synthetic, a few columns much more important than the rest, as real activations are.
    """
    from gguf import GGUFReader

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["synthetic.txt"])
    w.add_uint32("imatrix.chunk_count", chunks)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    tokens = float(chunks * chunk_size)
    for t in GGUFReader(str(model)).tensors:
        ne = [int(d) for d in t.shape]
        if len(ne) < 2 or not t.name.endswith(".weight") or t.name in (
            "token_embd.weight", "token_types.weight", "position_embd.weight"
        ):  # fmt: skip
            continue
        mean_sq = rng.lognormal(0.0, 1.0, size=ne[0]).astype(np.float32)
        w.add_tensor(f"{t.name}.in_sum2", mean_sq * np.float32(tokens))
        w.add_tensor(f"{t.name}.counts", np.array([tokens], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
