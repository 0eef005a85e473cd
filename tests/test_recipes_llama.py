"""llama-quantize itself as the oracle of the recipes (``-m llama``).

Both tiny models of :mod:`gguf_models` (a llama with GQA and an untied output; a BERT-like
model with 384-wide rows and tied embeddings) are quantized by llama.cpp's ``llama-quantize``
binary and by ``flightquant quantize`` with every recipe: every tensor must have the same type
and the same bytes (``--method rtn`` is ggml's own quantizer), and ``general.file_type`` must
be equal. The binary is ``$FLIGHTQUANT_LLAMA_QUANTIZE`` (``.ci/run`` builds it from
llama-cpp-python's source distribution); without it these tests skip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from gguf import GGUFReader
from gguf_models import write_bert, write_imatrix, write_llama

from flightquant.cli import main
from flightquant.modelfiles import gguf_policy
from flightquant.testing import llama_tool

pytestmark = pytest.mark.llama

LLAMA_QUANTIZE = llama_tool("llama-quantize")
if LLAMA_QUANTIZE is None:
    pytest.skip(
        "llama-quantize not found (set FLIGHTQUANT_LLAMA_QUANTIZE or put it on PATH)",
        allow_module_level=True,
    )

RECIPES = [r for r in gguf_policy.RECIPE_NAMES if r != "Q2_K_S"]
#: recipes checked with an importance matrix too (Q2_K_S needs one)
WITH_IMATRIX = ["Q4_K_M", "Q4_1", "Q2_K", "IQ4_XS", "Q2_K_S", "Q4_0"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("recipes")
    out = {"llama": d / "llama-f16.gguf", "bert": d / "bert-f16.gguf"}
    write_llama(out["llama"])
    write_bert(out["bert"])
    for name, path in list(out.items()):
        out[f"{name}.imatrix"] = d / f"{name}.imatrix.gguf"
        write_imatrix(out[f"{name}.imatrix"], path)
    return out


def llama_quantize(src: Path, dst: Path, recipe: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLAMA_QUANTIZE, *flags, str(src), str(dst), recipe, "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = GGUFReader(str(ours)), GGUFReader(str(theirs))
    by_name = {t.name: t for t in b.tensors}
    assert sorted(by_name) == sorted(t.name for t in a.tensors)
    for x in a.tensors:
        y = by_name[x.name]
        assert x.tensor_type.name == y.tensor_type.name, x.name
        assert x.data.tobytes() == y.data.tobytes(), (x.name, x.tensor_type.name)
    ft = "general.file_type"
    assert a.fields[ft].contents() == b.fields[ft].contents()


def both(models, tmp_path, model: str, recipe: str, *flags: str) -> tuple[Path, Path]:
    ours, theirs = tmp_path / f"fq-{recipe}.gguf", tmp_path / f"lc-{recipe}.gguf"
    done = llama_quantize(models[model], theirs, recipe, *flags)
    assert done.returncode == 0, done.stderr[-2000:]
    argv = ["quantize", str(models[model]), "-o", str(ours), "--format", recipe, "-q", *flags]
    assert main(argv) == 0
    return ours, theirs


@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_as_llama_quantize(models, tmp_path, model, recipe):
    assert_same_tensors(*both(models, tmp_path, model, recipe))


@pytest.mark.parametrize(
    "flags",
    [
        ["--pure"],
        ["--output-tensor-type", "q8_0", "--token-embedding-type", "q5_1"],
        ["--output-tensor-type", "q5_k"],
        ["--leave-output-tensor"],
        ["--tensor-type", "attn_v=q8_0", "--tensor-type", "ffn_down=q5_k"],
        ["--tensor-type", r"blk\.[0-3]\.ffn_(up|gate)=q6_k"],
    ],
    ids=["pure", "output-embedding", "output", "leave-output", "tensor-type", "tensor-type-regex"],
)
@pytest.mark.parametrize("model", ["llama", "bert"])
def test_flags_as_llama_quantize(models, tmp_path, model, flags):
    assert_same_tensors(*both(models, tmp_path, model, "Q4_K_M", *flags))


@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.parametrize("recipe", WITH_IMATRIX)
def test_with_an_imatrix_as_llama_quantize(models, tmp_path, model, recipe):
    imatrix = str(models[f"{model}.imatrix"])
    ours, theirs = both(models, tmp_path, model, recipe, "--imatrix", imatrix)
    assert_same_tensors(ours, theirs)
    a, b = GGUFReader(str(ours)), GGUFReader(str(theirs))
    for key in ("file", "dataset", "entries_count", "chunks_count"):
        k = f"quantize.imatrix.{key}"
        assert a.fields[k].contents() == b.fields[k].contents(), k


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_q2_k_s_needs_an_imatrix_as_in_llama_quantize(models, tmp_path, model, capsys):
    done = llama_quantize(models[model], tmp_path / "lc.gguf", "Q2_K_S")
    assert done.returncode != 0 and "requires an imatrix" in done.stderr
    argv = ["quantize", str(models[model]), "-o", str(tmp_path / "fq.gguf"), "--format", "Q2_K_S"]
    assert main(argv) != 0
    assert "needs an importance matrix" in capsys.readouterr().err
    assert not (tmp_path / "fq.gguf").exists()


def test_a_type_the_rows_do_not_fit_is_refused_as_in_llama_quantize(models, tmp_path, capsys):
    flags = ["--token-embedding-type", "q5_k"]  # 384-wide rows, 256-blocks, no fallback here
    done = llama_quantize(models["bert"], tmp_path / "lc.gguf", "Q4_K_M", *flags)
    assert done.returncode != 0
    argv = ["quantize", str(models["bert"]), "-o", str(tmp_path / "fq.gguf"), "--format",
            "Q4_K_M", *flags]  # fmt: skip
    assert main(argv) != 0
    assert "token_embd.weight" in capsys.readouterr().err


def next_token_probs(llama_cpp, path: Path, tokens: list[int]):
    import numpy as np

    m = llama_cpp.Llama(model_path=str(path), n_ctx=len(tokens) + 8, logits_all=True,
                        n_threads=2, verbose=False)  # fmt: skip
    m.eval(tokens)
    z = np.array(m.scores[: len(tokens)], np.float64)
    m.close()
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def test_a_size_target_is_closer_to_the_float_model_than_the_recipe(models, tmp_path):
    """Quality on the model, not only in the tensors' error: at llama-quantize's Q4_K_M file
    size, the size target's next-token distributions are closer to the F16 model's (KL) than
    the Q4_K_M recipe's, both with ``--method mse``."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    src = models["llama"]
    lc = tmp_path / "lc-Q4_K_M.gguf"
    assert llama_quantize(src, lc, "Q4_K_M").returncode == 0
    size = lc.stat().st_size
    recipe, target = tmp_path / "fq-Q4_K_M.gguf", tmp_path / "fq-target.gguf"
    common = ["--method", "mse", "-q"]
    assert main(["quantize", str(src), "-o", str(recipe), "--format", "Q4_K_M", *common]) == 0
    assert main(["quantize", str(src), "-o", str(target), "--target-size", str(size),
                 *common]) == 0  # fmt: skip
    assert target.stat().st_size <= size
    sequences = [[1, *np.random.default_rng(seed).integers(259, 320, 48).tolist()]
                 for seed in range(3)]  # fmt: skip
    refs = [next_token_probs(llama_cpp, src, tokens) for tokens in sequences]

    def kl(path):  # mean over the sequences' positions of KL(F16 || quantized)
        out = []
        for tokens, ref in zip(sequences, refs, strict=True):
            p = next_token_probs(llama_cpp, path, tokens)
            out.append(np.mean(np.sum(ref * (np.log(ref) - np.log(p)), axis=1)))
        return float(np.mean(out))

    # measured: Q4_K_M (mse) 0.61, the target (mse) 0.49; llama-quantize's Q4_K_M 0.63
    assert kl(target) < 0.9 * kl(recipe)
