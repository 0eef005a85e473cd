"""flightquant's GGUF recipes against llama.cpp's ``llama-quantize`` on the same file.

Writes (once, cached in --workdir) a llama-architecture F16 GGUF with gguf-py: GQA, heavy-tailed
row-scaled weights, a vocabulary llama.cpp loads (tests/gguf_models.py; ~0.67 GB by default).
Then, per recipe, whole processes with the same thread count:

* ``llama-quantize IN OUT RECIPE THREADS`` (and with ``--imatrix``),
* ``flightquant quantize IN -o OUT --format RECIPE --method rtn|mse --threads THREADS``
  (and with ``--imatrix``),
* ``flightquant quantize IN -o OUT --target-size <llama-quantize's Q4_K_M file size>``,

printing the median seconds of --runs runs, the file size, the tensors' SNR against the F16
input (every --sample-th row decoded by gguf-py; importance-weighted with the imatrix), and,
with llama-cpp-python installed, the model's quality: KL divergence of the next-token
distributions from the F16 model's and top-1 agreement over a fixed token sequence; then the
llama-quantize/flightquant time ratio of the same recipe.

    python benchmarks/bench_recipes.py [--recipes Q4_K_M,Q8_0] [--threads 2] [--runs 3]

The binary is $FLIGHTQUANT_LLAMA_QUANTIZE (or llama-quantize on PATH). The
timings are whole processes on whatever else the machine runs: quote medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gguf_models import write_imatrix, write_llama  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flightquant.testing import llama_tool  # noqa: E402

LLAMA_QUANTIZE = llama_tool("llama-quantize") or "llama-quantize"


def timed(argv: list[str], runs: int) -> float:
    """Median wall seconds of ``runs`` runs of a whole process (it must succeed)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return statistics.median(times)


def tensor_snr(src: Path, out: Path, sample: int, imatrix: Path | None) -> float:
    """SNR (dB) of the quantized tensors against the input, on every ``sample``-th row,
    weighted per column by the imatrix's mean squared activations when given."""
    from gguf import GGUFReader, quants

    a, b = GGUFReader(str(src)), GGUFReader(str(out))
    weights = {}
    if imatrix is not None:
        m = {
            t.name: np.asarray(t.data, np.float64).reshape(-1)
            for t in GGUFReader(str(imatrix)).tensors
        }
        for key, sums in m.items():
            if key.endswith(".in_sum2"):
                name = key[: -len(".in_sum2")]
                weights[name] = sums / m[f"{name}.counts"][0]
    by = {t.name: t for t in b.tensors}
    sig = err = 0.0
    for t in a.tensors:
        q = by[t.name]
        if q.tensor_type == t.tensor_type or len(t.shape) < 2:
            continue
        x = np.asarray(t.data)[::sample].astype(np.float64)
        raw = np.asarray(q.data)[::sample]
        y = quants.dequantize(raw, q.tensor_type).reshape(x.shape).astype(np.float64)
        w = weights.get(t.name, 1.0)
        sig += float(((x * x) * w).sum())
        err += float((((x - y) ** 2) * w).sum())
    return 10 * np.log10(sig / err) if err else float("inf")


class Logits:
    """Next-token distributions of a model on a fixed token sequence (llama-cpp-python)."""

    def __init__(self, tokens: int, threads: int):
        import llama_cpp  # noqa: F401 - raises ImportError when absent

        self.tokens = list(np.random.default_rng(0).integers(259, 2000, tokens))
        self.threads = threads

    def probs(self, path: Path) -> np.ndarray:
        import llama_cpp

        m = llama_cpp.Llama(model_path=str(path), n_ctx=len(self.tokens) + 8, logits_all=True,
                            n_threads=self.threads, verbose=False)  # fmt: skip
        m.eval([1, *self.tokens])
        z = np.array(m.scores[: len(self.tokens) + 1], np.float64)
        m.close()
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    kl = float(np.mean(np.sum(ref * (np.log(ref + 1e-30) - np.log(got + 1e-30)), axis=1)))
    return kl, float(np.mean(ref.argmax(1) == got.argmax(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench_recipes")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ff", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--recipes", default="Q4_K_M,Q8_0")
    ap.add_argument("--imatrix-recipes", default="Q4_K_M", help="also with an imatrix ('' none)")
    ap.add_argument("--methods", default="rtn,mse")
    ap.add_argument("--target-methods", default="mse", help="methods of the size-target rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sample", type=int, default=16, help="SNR on every N-th row")
    ap.add_argument("--tokens", type=int, default=64, help="model quality: tokens evaluated")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"llama-{args.dim}x{args.layers}-f16.gguf"
    if not src.exists():
        t0 = time.perf_counter()
        write_llama(src, d=args.dim, n_ff=args.ff, n_layer=args.layers, n_vocab=args.vocab,
                    n_head=args.dim // 128, n_head_kv=max(1, args.dim // 512))  # fmt: skip
        print(
            f"wrote {src} ({src.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s"
        )
    imatrix = work / (src.stem + ".imatrix.gguf")
    if not imatrix.exists():
        write_imatrix(imatrix, src)
    try:
        logits = Logits(args.tokens, args.threads)
        ref = logits.probs(src)
    except ImportError:
        logits, ref = None, None
        print("llama-cpp-python is not installed: no model-quality columns")

    fq = [sys.executable, "-m", "flightquant", "quantize", str(src), "-q",
          "--threads", str(args.threads)]  # fmt: skip
    jobs = []  # (label, recipe, imatrix?, argv, out)
    imx = [r for r in args.imatrix_recipes.split(",") if r]
    for rec in args.recipes.split(","):
        for use_imatrix in (False, True) if rec in imx else (False,):
            extra = ["--imatrix", str(imatrix)] if use_imatrix else []
            tag = rec + ("+imatrix" if use_imatrix else "")
            out = work / f"lc-{tag}.gguf"
            jobs.append((f"llama-quantize {tag}", rec, use_imatrix,
                         [LLAMA_QUANTIZE, *extra, str(src), str(out), rec, str(args.threads)],
                         out))  # fmt: skip
            for method in args.methods.split(","):
                out = work / f"fq-{tag}-{method}.gguf"
                jobs.append((f"flightquant {tag} {method}", rec, use_imatrix,
                             [*fq, "-o", str(out), "--format", rec, "--method", method, *extra],
                             out))  # fmt: skip
    rows = []
    base: dict[str, float] = {}
    for label, rec, use_imatrix, argv, out in jobs:
        seconds = timed(argv, args.runs)
        tag = rec + ("+imatrix" if use_imatrix else "")
        if label.startswith("llama-quantize"):
            base[tag] = seconds
        rows.append(measure(label, tag, seconds, out, src, args, imatrix if use_imatrix else None,
                            logits, ref, base))  # fmt: skip
    # the size target at llama-quantize's Q4_K_M size
    q4km = work / "lc-Q4_K_M.gguf"
    if q4km.exists():
        size = q4km.stat().st_size
        for use_imatrix in (False, True) if "Q4_K_M" in imx else (False,):
            extra = ["--imatrix", str(imatrix)] if use_imatrix else []
            for method in args.target_methods.split(","):
                tag = "target=Q4_K_M size" + ("+imatrix" if use_imatrix else "")
                out = work / f"fq-target-{method}{'-imatrix' if use_imatrix else ''}.gguf"
                argv = [*fq, "-o", str(out), "--target-size", str(size), "--method", method,
                        *extra]  # fmt: skip
                seconds = timed(argv, args.runs)
                rows.append(measure(f"flightquant {tag} {method}", tag, seconds, out, src, args,
                                    imatrix if use_imatrix else None, logits, ref, base))  # fmt: skip
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def measure(label, tag, seconds, out, src, args, imatrix, logits, ref, base) -> dict:
    row = {"job": label, "seconds": seconds, "bytes": out.stat().st_size,
           "snr_db": tensor_snr(src, out, args.sample, imatrix)}  # fmt: skip
    lq = base.get(tag) or base.get(tag.replace("target=Q4_K_M size", "Q4_K_M"))
    row["speedup"] = lq / seconds if lq and not label.startswith("llama") else None
    if logits is not None:
        row["kl"], row["top1"] = kl_top1(ref, logits.probs(out))
    return row


def print_table(rows, args) -> None:
    print(f"\n{args.threads} threads each, median of {args.runs} whole-process runs "
          f"(a shared machine: other jobs run beside these)")  # fmt: skip
    head = f"{'job':<44} {'seconds':>8} {'x llama':>8} {'MB':>8} {'SNR dB':>7}"
    if "kl" in rows[0]:
        head += f" {'KL':>9} {'top-1':>6}"
    print(head)
    for r in rows:
        sp = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        line = (f"{r['job']:<44} {r['seconds']:>8.2f} {sp:>8} {r['bytes'] / 1e6:>8.1f} "
                f"{r['snr_db']:>7.2f}")  # fmt: skip
        if "kl" in r:
            line += f" {r['kl']:>9.5f} {r['top1']:>6.3f}"
        print(line)


if __name__ == "__main__":
    main()
