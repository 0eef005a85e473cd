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
from gguf import GGUFReader
from gguf_models import write_llama

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
    """A two-block llama (GQA 4/2, untied output) with an SPM vocabulary, written by gguf-py."""
    write_llama(path, d=D, n_ff=N_FF, n_layer=N_LAYER, n_vocab=N_VOCAB, n_head=4, n_head_kv=2)


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
