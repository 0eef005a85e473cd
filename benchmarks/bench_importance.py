"""Importance (llama.cpp's imatrix) per ggml type: weighted quality and speed, flightquant
beside llama.cpp, and flightquant's native format with and without importance.

    python benchmarks/bench_importance.py [--rows 64] [--k 4096] [--types Q4_0,Q4_K]
                                          [--seed 0]

Data: realistic weights (Student-t(4), each row scaled by a lognormal factor) of ``rows``
rows of ``k``, importance lognormal(0, 1.5) per column (llama-imatrix's mean squared input
has that spread). Quality is the weighted SNR, dB = 10 log10(sum w x^2 / sum w (x - x_hat)^2)
(w[j] for every element of column j), of

* llama.cpp without and with the imatrix (``ggml_quantize_chunk``; columns skipped when
  llama.cpp is not there: FLIGHTQUANT_LLAMA_LIB or llama-cpp-python),
* flightquant ``rtn`` + importance (ggml's importance path: ``=C`` is the share of rows whose
  bytes equal llama.cpp's with the imatrix) and ``mse`` + importance (the weighted search),

and ``gain`` = mse+imp - llama.cpp+imatrix. Speed: MB/s of float32 in, one thread: ours
rtn+imp and mse+imp, llama.cpp's importance path, and mse+imp / llama.cpp, each the median
of ``--repeat`` interleaved runs timed in the thread's CPU time (steady on a shared machine:
every quantizer here runs on the calling thread).
A type whose kernels do not use importance yet shows ``ignores`` (its bytes with
importance equal its bytes without).
"""

from __future__ import annotations

import os

# numpy's OpenBLAS threads spin on the cores being timed; nothing here uses BLAS
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import flightquant as fq  # noqa: E402
from flightquant import formats, kernels  # noqa: E402
from flightquant.testing import llama_quantizer  # noqa: E402

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
NATIVE = (("native 4b g128", 4, 128), ("native 4b g32", 4, 32), ("native 2b g32", 2, 32))


def realistic(rows: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, (rows, k)) * rng.lognormal(-3, 0.5, (rows, 1))
    w = rng.lognormal(0, 1.5, k)
    return x.astype(np.float32), w.astype(np.float32)


def wsnr(x: np.ndarray, x_hat: np.ndarray, w: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    d = x_hat.reshape(x.shape).astype(np.float64) - x64
    w64 = w.astype(np.float64)
    return float(10 * np.log10((w64 * x64 * x64).sum() / (w64 * d * d).sum()))


REPEAT = 5


def timed_many(fns: list) -> list[tuple[object, float]]:
    """Each function's result and median CPU seconds over REPEAT interleaved runs."""
    outs, times = [None] * len(fns), [[] for _ in fns]
    for _ in range(REPEAT):
        for i, fn in enumerate(fns):
            t0 = time.thread_time()
            outs[i] = fn()
            times[i].append(time.thread_time() - t0)
    return [(o, float(np.median(t))) for o, t in zip(outs, times, strict=True)]


def timed(fn):
    return timed_many([fn])[0]


def row_equal(a: np.ndarray, b: np.ndarray, rows: int) -> float:
    return float((a.reshape(rows, -1) == b.reshape(rows, -1)).all(axis=1).mean())


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def ggml_table(x: np.ndarray, w: np.ndarray, types: list[str], llama) -> None:
    rows, k = x.shape
    mb = x.nbytes / 1e6
    flat = x.reshape(-1)
    head = ["type", "llama", "llama+imat", "rtn+imp", "=C", "mse+imp", "gain dB",
            "MB/s rtn+imp", "MB/s mse+imp", "MB/s llama+imat", "mse/llama"]  # fmt: skip
    print(
        f"(a) ggml types: {rows} rows x {k}, weighted SNR dB, speed 1 thread (median of {REPEAT})"
    )
    print("  ".join(f"{h:>10}" for h in head))
    for name in types:
        t = formats.get(name)
        plain = kernels.quantize_ggml(flat, name, "rtn", threads=1)
        fns = [
            lambda: kernels.quantize_ggml(flat, name, "rtn", importance=w, threads=1),
            lambda: kernels.quantize_ggml(flat, name, "mse", importance=w, threads=1),
        ]
        if llama is not None:
            fns.append(lambda: llama.quantize(flat, name, importance=w))
        runs = timed_many(fns)
        (rtn_imp, s_rtn), (mse_imp, s_mse) = runs[:2]
        ignores = plain.tobytes() == rtn_imp.tobytes()

        def snr(codes):
            return wsnr(x, kernels.dequantize_ggml(codes, name), w)

        ours_rtn, ours_mse = snr(rtn_imp), snr(mse_imp)
        l_plain = l_imat = same = s_llama = None
        if llama is not None:
            l_plain = snr(llama.quantize(flat, name, n_per_row=k))
            l_bytes, s_llama = runs[2]
            l_imat = snr(l_bytes)
            same = row_equal(rtn_imp, l_bytes, rows)
        gain = None if l_imat is None else ours_mse - l_imat
        cells = [
            name,
            fmt(l_plain),
            fmt(l_imat),
            fmt(ours_rtn) + (" ignores" if ignores else ""),
            fmt(same, ".0%"),
            fmt(ours_mse),
            fmt(gain, "+.2f"),
            fmt(mb / s_rtn, ".1f"),
            fmt(mb / s_mse, ".1f"),
            fmt(None if s_llama is None else mb / s_llama, ".1f"),
            fmt(None if s_llama is None else s_llama / s_mse, ".2f") + ("x" if s_llama else ""),
        ]
        print("  ".join(f"{c:>10}" for c in cells))
        del t


def native_table(x: np.ndarray, w: np.ndarray) -> None:
    mb = x.nbytes / 1e6
    print()
    print(
        f"(b) native: weighted SNR dB of mse and mse+importance; speed 1 thread (median of {REPEAT})"
    )
    head = ["format", "rtn", "mse", "mse+imp", "gain dB", "MB/s mse", "MB/s mse+imp"]
    print("  ".join(f"{h:>14}" for h in head))
    for label, bits, gs in NATIVE:
        opts = {"bits": bits, "group_size": gs}
        rtn = fq.quantize_arrays({"x": x}, threads=1, **opts)["x"].dequantize()
        (mse, s_mse), (imp, s_imp) = timed_many(
            [
                lambda: fq.quantize_arrays({"x": x}, threads=1, method="mse", **opts),
                lambda: fq.quantize_arrays(
                    {"x": x}, importance={"x": w}, threads=1, method="mse", **opts
                ),
            ]
        )
        a, b, c = (wsnr(x, y, w) for y in (rtn, mse["x"].dequantize(), imp["x"].dequantize()))
        cells = [label, fmt(a), fmt(b), fmt(c), fmt(c - b, "+.2f"), fmt(mb / s_mse, ".1f"),
                 fmt(mb / s_imp, ".1f")]  # fmt: skip
        print("  ".join(f"{v:>14}" for v in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=REPEAT, help="timed runs (median)")
    args = ap.parse_args()
    globals()["REPEAT"] = max(1, args.repeat)
    types = [t for t in args.types.split(",") if t in formats.GGML_TYPES]
    skipped = [t for t in args.types.split(",") if t not in formats.GGML_TYPES]
    x, w = realistic(args.rows, args.k, args.seed)
    llama = llama_quantizer()
    print(f"llama.cpp: {llama.path if llama else 'not found (its columns show -)'}")
    if skipped:
        print(f"not in this build's formats: {', '.join(skipped)}")
    ggml_table(x, w, types, llama)
    native_table(x, w)


if __name__ == "__main__":
    main()
