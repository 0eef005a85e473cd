"""llama.cpp's own tools as the oracle of the imatrix files (``-m llama``).

``llama-imatrix`` writes a file for a tiny GGUF llama; flightquant reads it and writes it
back byte for byte. ``llama-quantize --imatrix`` loads the files flightquant writes (GGUF and
.dat), with IQ2_XXS, a type it refuses to make without an importance matrix. The binaries
are found by ``flightquant.testing.llama_tool`` (``FLIGHTQUANT_LLAMA_QUANTIZE``, llama-imatrix
beside it, or ``PATH``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from flightquant.modelfiles.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from flightquant.testing import llama_tool

pytestmark = pytest.mark.llama

QUANTIZE = Path(llama_tool("llama-quantize") or "llama-quantize")
IMATRIX = Path(llama_tool("llama-imatrix") or "llama-imatrix")
D, N_FF, N_LAYER, N_VOCAB = 256, 512, 2, 300
MATRICES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def need(binary: Path) -> Path:
    if not binary.is_file():
        pytest.skip(f"{binary.name} not found (set FLIGHTQUANT_LLAMA_QUANTIZE or put it on PATH)")
    return binary


def tiny_llama(path: Path) -> None:
    """A two-block llama with an SPM vocabulary, written by gguf-py."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(D // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    w.add_vocab_size(N_VOCAB)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581w{i}" for i in range(N_VOCAB - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * N_VOCAB)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (N_VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def matrix(name, rows, cols, scale=0.05):
        w.add_tensor(name, (rng.standard_normal((rows, cols)) * scale).astype(np.float16))

    matrix("token_embd.weight", N_VOCAB, D, 0.5)
    shapes = {"attn_q": (D, D), "attn_k": (D // 2, D), "attn_v": (D // 2, D)}
    shapes |= {"attn_output": (D, D), "ffn_gate": (N_FF, D), "ffn_up": (N_FF, D)}
    shapes["ffn_down"] = (D, N_FF)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        for m in MATRICES[:4]:
            matrix(f"blk.{i}.{m}.weight", *shapes[m])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        for m in MATRICES[4:]:
            matrix(f"blk.{i}.{m}.weight", *shapes[m])
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    matrix("output.weight", N_VOCAB, D)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llama-imatrix")
    tiny_llama(root / "tiny.gguf")
    words = " ".join(f"w{i}" for i in range(40))
    (root / "text.txt").write_text((words + " ") * 20)
    return root / "tiny.gguf"


def llama_imatrix(model: Path, out: Path, *extra: str) -> None:
    subprocess.run(
        [str(need(IMATRIX)), "-m", str(model), "-f", str(model.with_name("text.txt")),
         "-o", str(out), "-c", "32", "-b", "32", "--chunks", "3", "-t", "1", "--no-ppl", *extra],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def test_reads_llama_imatrix_files_and_writes_them_back_byte_for_byte(model, tmp_path):
    theirs = tmp_path / "theirs.imatrix.gguf"
    llama_imatrix(model, theirs)
    imx = read_imatrix(theirs)
    assert sorted(imx.entries) == sorted(f"blk.{i}.{m}.weight" for i in range(2) for m in MATRICES)
    assert (imx.chunk_count, imx.chunk_size) == (3, 32)
    assert imx.datasets == [str(model.with_name("text.txt"))]
    assert imx.entries["blk.0.ffn_down.weight"].in_sum2.shape == (1, N_FF)
    assert all(e.counts.tolist() == [96] for e in imx.entries.values())  # 3 chunks of 32
    ours = tmp_path / "ours.imatrix.gguf"
    write_imatrix(ours, imx)
    assert ours.read_bytes() == theirs.read_bytes()
    # the legacy .dat of the same run: the same importance
    dat = tmp_path / "theirs.dat"
    llama_imatrix(model, dat, "--output-format", "dat")
    legacy = read_imatrix(dat)
    assert sorted(legacy.entries) == sorted(imx.entries) and legacy.chunk_count == 3
    for name in imx.entries:
        np.testing.assert_allclose(legacy.importance(name), imx.importance(name), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_accepts_our_imatrix(model, tmp_path, fmt):
    rng = np.random.default_rng(1)
    entries = {}
    for i in range(N_LAYER):
        for m in MATRICES:
            k = N_FF if m == "ffn_down" else D
            name = f"blk.{i}.{m}.weight"
            entries[name] = ImatrixEntry(name, rng.random((1, k)) * 100 + 1, [500.0])
    path = tmp_path / f"ours.imatrix.{fmt}"
    write_imatrix(path, Imatrix(entries, ["calib.txt"], 1, 512), format=fmt)
    out = tmp_path / "tiny-IQ2_XXS.gguf"
    run = subprocess.run(
        [str(need(QUANTIZE)), "--imatrix", str(path), str(model), str(out), "IQ2_XXS", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-2000:]
    assert f"loaded {len(entries)} importance matrix entries" in log
    fields = GGUFReader(str(out)).fields
    assert fields["quantize.imatrix.entries_count"].contents() == len(entries)
    assert fields["quantize.imatrix.file"].contents() == str(path)
