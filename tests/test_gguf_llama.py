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
from gguf import GGUFReader
from gguf_models import write_llama

from flightquant.cli import main

pytestmark = pytest.mark.llama
llama_cpp = pytest.importorskip("llama_cpp")

#: llama.h's llama_ftype of each type name, as llama-quantize maps them
FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q5_1": 9, "Q4_K": 15, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}


def tiny_llama(path: Path) -> None:
    """A two-block llama (GQA 4/2, untied output) with an SPM vocabulary, written by gguf-py."""
    write_llama(path, d=256, n_ff=512, n_layer=2, n_vocab=300, n_head=4, n_head_kv=2)


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
