"""K-quants with an importance vector: weighted SNR and speed per thread against llama.cpp.

    FLIGHTQUANT_LLAMA_LIB=/path/to/libggml-base.so \
        python benchmarks/bench_importance_k.py [--rows 256] [--k 4096] [--repeat 3] [TYPE ...]

Input: heavy-tailed row-scaled weights (student-t with 4 degrees of freedom, rows scaled
by lognormal(0, 0.5)) in ggml rows of ``--k``, and a lognormal(0, 1.5) importance vector
with 2% zeros. Per type (default Q2_K Q3_K Q4_K Q5_K Q6_K) it prints the weighted SNR
10*log10(sum w x^2 / sum w (x - x_hat)^2) of llama.cpp without importance, llama.cpp with
importance (``quantize_row_*_impl``), flightquant rtn+importance (the same bytes) and
mse+importance, the gain of mse over llama.cpp+imatrix, and microseconds per 256-weight
block on one thread of llama.cpp's impl path and of flightquant's rtn / mse with importance
(best of ``--repeat``, interleaved, in the same run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flightquant import kernels  # noqa: E402
from flightquant.testing import llama_quantizer  # noqa: E402

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("types", nargs="*", default=list(TYPES))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    lq = llama_quantizer()
    if lq is None:
        print("llama.cpp's libggml-base not found: set FLIGHTQUANT_LLAMA_LIB", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    x = rng.standard_t(4, size=(args.rows, args.k)) * rng.lognormal(0, 0.5, (args.rows, 1))
    x = x.astype(np.float32).reshape(-1)
    w = rng.lognormal(0, 1.5, args.k).astype(np.float32)
    w[rng.random(args.k) < 0.02] = 0
    ww = np.tile(w.astype(np.float64), args.rows)
    xd = x.astype(np.float64)
    n_blocks = x.size / 256

    def snr(data, name):
        xh = kernels.dequantize_ggml(np.frombuffer(bytes(data), np.uint8), name)
        return 10 * np.log10((ww * xd * xd).sum() / (ww * (xd - xh) ** 2).sum())

    print(f"{args.rows} rows of {args.k}; weighted SNR dB; us per block on one thread")
    print(
        f"{'type':5} {'llama':>7} {'llama+imp':>9} {'rtn+imp':>8} {'mse+imp':>8} {'gain':>7}"
        f" | {'llama_imp':>9} {'rtn+imp':>8} {'mse+imp':>8} {'mse/llama':>9}"
    )
    for name in args.types:
        runs = {
            "llama_imp": lambda: lq.quantize(x, name, importance=w),
            "rtn": lambda: kernels.quantize_ggml(x, name, "rtn", importance=w, threads=1),
            "mse": lambda: kernels.quantize_ggml(x, name, "mse", importance=w, threads=1),
        }
        best = {k: float("inf") for k in runs}
        out = {}
        for _ in range(args.repeat):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                out[k] = fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        s0 = snr(lq.quantize(x, name), name)
        s1, s2, s3 = (snr(out[k], name) for k in ("llama_imp", "rtn", "mse"))
        us = {k: v / n_blocks * 1e6 for k, v in best.items()}
        print(
            f"{name:5} {s0:7.3f} {s1:9.3f} {s2:8.3f} {s3:8.3f} {s3 - s1:+7.3f}"
            f" | {us['llama_imp']:9.2f} {us['rtn']:8.2f} {us['mse']:8.2f}"
            f" {best['mse'] / best['llama_imp']:9.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
