"""``flightquant imatrix``: a tiny transformers model run over a text, in-process and through
a server, against the statistic of a plain torch forward; and a server session written out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flightquant.cli import main
from flightquant.modelfiles.imatrix import read_imatrix

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = "the quick brown fox jumps over the lazy dog, then sleeps. " * 4
CHUNK = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A two-block Llama with a character-level tokenizer, saved as transformers saves it
    (no download), and a text file."""
    root = tmp_path_factory.mktemp("tiny-llama")
    chars = "abcdefghijklmnopqrstuvwxyz .,"
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>"
    )
    fast.save_pretrained(root)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    text = root / "calib.txt"
    text.write_text(TEXT)
    return root, text


def torch_statistic(model_dir: Path, n_chunks: int) -> dict[str, tuple[np.ndarray, int]]:
    """What llama-imatrix computes, by hand: every Linear's inputs over chunks of CHUNK
    tokens whose first token is BOS, squared and summed per column in float64."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    inputs: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def keep(mod, args, name=name):
                inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).numpy())

            handles.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        for i in range(n_chunks):
            chunk = [tok.bos_token_id] + ids[i * CHUNK + 1 : (i + 1) * CHUNK]
            model(input_ids=torch.tensor([chunk]))
    for h in handles:
        h.remove()
    out = {}
    for name, xs in inputs.items():
        x = np.concatenate(xs).astype(np.float64)
        out[f"{name}.weight"] = ((x * x).sum(axis=0), x.shape[0])
    return out


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def expected(tiny):
    return torch_statistic(tiny[0], 3)


def check(imx, expected, names=None) -> None:
    names = names or {n: n for n in expected}
    assert sorted(imx.entries) == sorted(names.values())
    for hf, (ssum, count) in expected.items():
        e = imx.entries[names[hf]]
        assert e.counts.tolist() == [count]
        np.testing.assert_allclose(e.in_sum2[0], ssum, rtol=1e-5)


def test_in_process_equals_a_torch_forward(tiny, expected, tmp_path, capsys):
    model, text = tiny
    out = tmp_path / "tiny.imatrix.gguf"
    args = ["imatrix", model, "--text", text, "-o", out, "--chunk-size", CHUNK]
    assert run(*args, "--max-chunks", 3, "--threads", 1, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entries"] == 15 and summary["tokens"] == 3 * CHUNK
    assert summary["tokens_per_second"] > 0 and summary["where"] == "in-process"
    imx = read_imatrix(out)
    check(imx, expected)
    assert "model.layers.1.mlp.down_proj.weight" in imx.entries and "lm_head.weight" in imx.entries
    assert (imx.datasets, imx.chunk_count, imx.chunk_size) == ([str(text)], 3, CHUNK)


def test_gguf_names(tiny, expected, tmp_path):
    model, text = tiny
    out = tmp_path / "tiny.dat"
    args = ["imatrix", model, "--text", text, "-o", out, "--chunk-size", CHUNK]
    assert run(*args, "--max-chunks", 3, "--threads", 1, "--names", "gguf", "-q") == 0
    imx = read_imatrix(out)  # the legacy format, chosen by the suffix
    assert imx.chunk_size == 0  # (a .dat keeps no chunk size)
    names = {
        f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
        for i in range(2)
        for hf, g in [
            ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ]
    }  # fmt: skip
    names["lm_head.weight"] = "output.weight"
    assert sorted(imx.entries) == sorted(names.values())
    for hf, (ssum, count) in expected.items():
        # a .dat stores the mean times ceil(count / 512) calls
        np.testing.assert_allclose(imx.importance(names[hf]), ssum / count, rtol=1e-5)


def test_through_a_server_equals_in_process(tiny, expected, server, tmp_path, capsys):
    model, text = tiny
    s = server()
    out = tmp_path / "via.gguf"
    args = ["imatrix", model, "--text", text, "-o", out, "--chunk-size", CHUNK, "--threads", 1]
    assert run(*args, "--max-chunks", 3, "--server", s.location, "--json") == 0
    assert "on grpc://" in json.loads(capsys.readouterr().out)["where"]
    check(read_imatrix(out), expected)
    assert s.stats()["calibration"]["sessions"] == 0  # its own session, dropped after
    # a named session stays, and the session form writes it
    assert run(*args, "--max-chunks", 3, "--server", s.location, "--session", "keep", "-q") == 0
    assert s.stats()["calibration"]["sessions"] == 1
    again = tmp_path / "again.gguf"
    assert run("imatrix", "--server", s.location, "--session", "keep", "-o", again, "-q") == 0
    check(read_imatrix(again), expected)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["-o", "x.gguf"], "give MODEL_DIR --text FILE"),
        (["{model}", "-o", "x.gguf"], "needs --text"),
        (["{model}", "--text", "{text}", "-o", "x.gguf", "--chunk-size", "4096"], "fewer than one chunk"),
        (["{tmp}", "--text", "{text}", "-o", "x.gguf"], "no config.json"),
        (["{model}", "--text", "{text}", "-o", "x.gguf", "--session", "s"], "--session needs --server"),
    ],
)  # fmt: skip
def test_errors_are_one_line(tiny, tmp_path, capsys, argv, needle):
    model, text = tiny
    argv = [a.format(model=model, text=text, tmp=tmp_path) for a in argv]
    assert run("imatrix", *argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err
