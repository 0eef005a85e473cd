"""ggml's legacy types with importance (an imatrix): weighted SNR and speed per thread of
flightquant's rtn and mse against llama.cpp's own importance path, in one run.

    FLIGHTQUANT_LLAMA_LIB=/path/to/libggml-base.so \\
    python benchmarks/bench_importance_legacy.py [--rows 256] [--k 4096] [--sigma 1.5]
                                                 [--repeat 5] [--types Q4_0,Q4_1,Q5_0,Q5_1]

Input: ``--rows`` rows of ``--k`` heavy-tailed weights (Student-t, 4 degrees of freedom,
lognormal row scales) and one importance vector of ``--k`` lognormal(0, ``--sigma``) values
with about 5% zeros. Quality is the importance-weighted SNR
``10*log10(sum w*x^2 / sum w*(x - x_hat)^2)`` (dB) of: llama.cpp without importance,
llama.cpp with it (``ggml_quantize_chunk`` with the imatrix), ours rtn+importance (the same
bytes) and ours mse+importance; ``gain`` is mse+importance minus llama.cpp+importance.

Speed: each quantizer runs on one thread, interleaved (llama, rtn, mse, llama, ...) so
load from other processes hits all alike; the best of ``--repeat`` runs in CPU seconds of
the calling thread (``time.thread_time``, which other tenants of a busy machine disturb far
less than the wall clock), as M weights/s; ``mse/llama`` > 1 means mse+importance is faster
per thread than llama.cpp's importance path. Without llama.cpp's library only ours is shown.
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


def realistic(rows: int, k: int, sigma: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, (rows, k)) * rng.lognormal(0, 1, (rows, 1)) * 0.02
    imp = rng.lognormal(0, sigma, k)
    imp[rng.random(k) < 0.05] = 0
    return x.astype(np.float32).reshape(-1), imp.astype(np.float32)


def weighted_snr(x: np.ndarray, data: np.ndarray, name: str, imp: np.ndarray) -> float:
    xd = x.astype(np.float64).reshape(-1, imp.size)
    x_hat = kernels.dequantize_ggml(data, name).astype(np.float64).reshape(xd.shape)
    return float(10 * np.log10((imp * xd**2).sum() / (imp * (xd - x_hat) ** 2).sum()))


def best_rates(fns: list, n: int, repeat: int) -> list[float]:
    """M weights / CPU second of the calling thread, best of ``repeat`` interleaved runs."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.thread_time()
            fn()
            best[i] = min(best[i], time.thread_time() - t0)
    return [n / max(t, 1e-9) / 1e6 for t in best]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--k", type=int, default=4096, help="row length (a multiple of 32)")
    p.add_argument("--sigma", type=float, default=1.5, help="lognormal sigma of importance")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--speed-rows", type=int, default=32, help="rows timed (speed only)")
    p.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1")
    args = p.parse_args(argv)
    x, imp = realistic(args.rows, args.k, args.sigma)
    xs = x[: args.speed_rows * args.k]
    llama = llama_quantizer()
    if llama is None:
        print("llama.cpp's libggml-base not found (FLIGHTQUANT_LLAMA_LIB): ours only")
    print(
        f"{args.rows} x {args.k} weights, importance lognormal(0, {args.sigma}) with 5% zeros; "
        f"weighted SNR (dB) | M weights/s per thread (CPU time, best of {args.repeat})"
    )
    head = f"{'type':<5} {'llama':>7} {'llama+imp':>9} {'rtn+imp':>8} {'mse+imp':>8} {'gain':>6} |"
    head += f" {'llama imp':>9} {'rtn+imp':>8} {'mse+imp':>8} {'mse/llama':>9}"
    print(head)
    for name in args.types.split(","):
        rtn = kernels.quantize_ggml(x, name, "rtn", importance=imp)
        mse = kernels.quantize_ggml(x, name, "mse", importance=imp)
        fns = [
            lambda: kernels.quantize_ggml(xs, name, "rtn", importance=imp, threads=1),
            lambda: kernels.quantize_ggml(xs, name, "mse", importance=imp, threads=1),
        ]
        cols = [float("nan"), float("nan")]
        if llama is not None:
            plain = llama.quantize(x, name, n_per_row=args.k)
            with_imp = llama.quantize(x, name, importance=imp)
            if not np.array_equal(with_imp, rtn):
                print(f"{name}: rtn+importance bytes differ from llama.cpp's", file=sys.stderr)
                return 1
            cols = [weighted_snr(x, plain, name, imp), weighted_snr(x, with_imp, name, imp)]
            fns.insert(0, lambda: llama.quantize(xs, name, importance=imp))
        s_rtn, s_mse = weighted_snr(x, rtn, name, imp), weighted_snr(x, mse, name, imp)
        rates = best_rates(fns, xs.size, args.repeat)
        if llama is None:
            rates.insert(0, float("nan"))
        line = f"{name:<5} {cols[0]:7.3f} {cols[1]:9.3f} {s_rtn:8.3f} {s_mse:8.3f}"
        line += f" {s_mse - cols[1]:+6.3f} | {rates[0]:9.1f} {rates[1]:8.1f} {rates[2]:8.1f}"
        line += f" {rates[2] / rates[0]:9.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
