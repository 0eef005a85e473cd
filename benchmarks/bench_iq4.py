"""IQ4_NL and IQ4_XS with and without importance: quality and speed beside llama.cpp.

    python benchmarks/bench_iq4.py [--rows 256] [--k 4096] [--repeat 3] [--seed 0]

Data: realistic weights (Student-t(3), each row scaled by a lognormal factor) and a
lognormal importance vector (sigma 1.5) with 2% zeros, the shape of an imatrix.

(a) SNR dB, plain 10 log10(sum x^2 / sum (x - x_hat)^2) and importance-weighted
    10 log10(sum w x^2 / sum w (x - x_hat)^2), of llama.cpp (ggml_quantize_chunk, with the
    imatrix for the weighted rows), our rtn (byte-identical to it: "=C" says so) and mse.
(b) Speed in M weights/s on one thread (llama.cpp's quantizer has no threaded entry
    point), best of --repeat, and ours/llama.cpp measured in the same run.

Needs llama.cpp's libggml-base (llama-cpp-python, or FLIGHTQUANT_LLAMA_LIB).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from flightquant import kernels  # noqa: E402
from flightquant.testing import llama_quantizer  # noqa: E402

TYPES = ("IQ4_NL", "IQ4_XS")


def snr(x, xh, w=None) -> float:
    x = x.astype(np.float64)
    d = (x - xh.astype(np.float64)) ** 2
    if w is not None:
        w = np.tile(w.astype(np.float64), x.size // w.size)
        return 10 * np.log10((w * x * x).sum() / (w * d).sum())
    return 10 * np.log10((x * x).sum() / d.sum())


def best_rate(fn, n: int, repeat: int) -> float:
    t = min(_timed(fn) for _ in range(repeat))
    return n / t / 1e6


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    llama = llama_quantizer()
    if llama is None:
        ap.error("llama.cpp's libggml-base not found (llama-cpp-python or FLIGHTQUANT_LLAMA_LIB)")
    rng = np.random.default_rng(args.seed)
    k = args.k
    x = rng.standard_t(3, (args.rows, k)) * rng.lognormal(0, 1, (args.rows, 1)) * 0.02
    x = x.astype(np.float32).reshape(-1)
    w = rng.lognormal(0, 1.5, k).astype(np.float32)
    w[rng.random(k) < 0.02] = 0
    n = x.size
    print(f"{args.rows} rows x {k}, Student-t(3) row-scaled; importance lognormal(1.5), 2% zero")
    print(
        f"{'type':<7} {'imp':<4} | {'SNR C':>6} {'rtn':>6} {'mse':>6} {'gain':>5} {'=C':>3}"
        f" | {'C Mw/s':>7} {'rtn':>6} {'mse':>6} {'rtn/C':>6} {'mse/C':>6}"
    )
    for name in TYPES:
        for imp in (None, w):
            c = llama.quantize(x, name, n_per_row=k, importance=imp)
            r = kernels.quantize_ggml(x, name, "rtn", importance=imp, threads=1)
            m = kernels.quantize_ggml(x, name, "mse", importance=imp, threads=1)
            s = {
                key: snr(x, kernels.dequantize_ggml(b, name), imp)
                for key, b in (("C", c), ("rtn", r), ("mse", m))
            }
            rate = {
                "C": best_rate(
                    lambda: llama.quantize(x, name, n_per_row=k, importance=imp), n, args.repeat
                ),
                **{
                    meth: best_rate(
                        lambda meth=meth: kernels.quantize_ggml(
                            x, name, meth, importance=imp, threads=1
                        ),
                        n,
                        args.repeat,
                    )
                    for meth in ("rtn", "mse")
                },
            }
            same = "yes" if np.array_equal(c, r) else "NO"
            print(
                f"{name:<7} {'yes' if imp is not None else 'no':<4} | {s['C']:6.2f} {s['rtn']:6.2f}"
                f" {s['mse']:6.2f} {s['mse'] - s['C']:+5.2f} {same:>3}"
                f" | {rate['C']:7.2f} {rate['rtn']:6.2f} {rate['mse']:6.2f}"
                f" {rate['rtn'] / rate['C']:6.2f} {rate['mse'] / rate['C']:6.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
