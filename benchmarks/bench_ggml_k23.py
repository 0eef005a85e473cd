"""Q2_K and Q3_K: flightquant's rtn and mse against llama.cpp's C reference quantizer.

    python benchmarks/bench_ggml_k23.py [--elements 1048576] [--repeats 7] [--seed 0]

Prints, for Gaussian and Student-t(3) data: SNR (dB) of rtn, mse and llama.cpp's C, the
share of blocks whose rtn bytes equal llama.cpp's, the blocks mse improves and any it makes
worse; then single-thread speed (M weights/s, median of the repeats, the three run in turn
so machine load hits all alike) with the ratios. llama.cpp's columns need llama-cpp-python
(its libggml-base, called through ctypes); without it they read "-".
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import pathlib
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads spin on a small box

import numpy as np  # noqa: E402

from flightquant import formats  # noqa: E402
from flightquant.kernels import dequantize_ggml, quantize_ggml  # noqa: E402

TYPES = ("Q2_K", "Q3_K")


def load_llama():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib" / "libggml-base.so"
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    return lib


def llama_quantize(lib, x: np.ndarray, name: str) -> np.ndarray:
    t = formats.get(name)
    nb = x.size // t.block_size
    out = np.zeros(nb * t.type_size, np.uint8)
    lib.ggml_quantize_init(t.ggml_type)
    lib.ggml_quantize_chunk(t.ggml_type, x.ctypes.data, out.ctypes.data, 0, nb, t.block_size, None)
    return out


def block_sse(x: np.ndarray, data: np.ndarray, name: str) -> np.ndarray:
    d = dequantize_ggml(data, name).astype(np.float64) - x.astype(np.float64)
    return np.sum((d * d).reshape(-1, formats.get(name).block_size), axis=1)


def snr(x: np.ndarray, sse: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / sse.sum()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--elements", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.elements - args.elements % 256
    rng = np.random.default_rng(args.seed)
    data = {
        "gauss": rng.standard_normal(n).astype(np.float32),
        "t3": rng.standard_t(3, n).astype(np.float32),
    }
    lib = load_llama()
    print(f"{n} float32 weights per distribution, seed {args.seed}; llama.cpp C: "
          f"{'libggml-base via ctypes' if lib else 'not installed'}")  # fmt: skip
    print()
    print(f"{'type':<5} {'data':<6} {'rtn dB':>8} {'mse dB':>8} {'C dB':>8} {'mse-rtn':>8} "
          f"{'rtn==C blocks':>14} {'mse better':>11} {'mse worse':>10}")  # fmt: skip
    for name in TYPES:
        size = formats.get(name).type_size
        for dist, x in data.items():
            rtn = quantize_ggml(x, name, "rtn", threads=1)
            mse = quantize_ggml(x, name, "mse", threads=1)
            e_rtn, e_mse = block_sse(x, rtn, name), block_sse(x, mse, name)
            c_db, same = "-", "-"
            if lib is not None:
                c = llama_quantize(lib, x, name)
                c_db = f"{snr(x, block_sse(x, c, name)):.3f}"
                eq = (rtn.reshape(-1, size) == c.reshape(-1, size)).all(axis=1)
                same = f"{eq.mean() * 100:.3f}%"
            print(
                f"{name:<5} {dist:<6} {snr(x, e_rtn):>8.3f} {snr(x, e_mse):>8.3f} {c_db:>8} "
                f"{snr(x, e_mse) - snr(x, e_rtn):>8.3f} {same:>14} "
                f"{(e_mse < e_rtn).mean() * 100:>10.1f}% {int((e_mse > e_rtn).sum()):>10}"
            )
    print()
    x = data["t3"]
    print(f"speed, 1 thread, Student-t(3), M weights/s, median of {args.repeats}")
    print(f"{'type':<5} {'C':>8} {'rtn':>8} {'mse':>8} {'rtn/C':>7} {'mse/C':>7} {'mse/rtn':>8}")
    for name in TYPES:
        runs = {"rtn": lambda: quantize_ggml(x, name, "rtn", threads=1),
                "mse": lambda: quantize_ggml(x, name, "mse", threads=1)}  # fmt: skip
        if lib is not None:
            runs["C"] = lambda: llama_quantize(lib, x, name)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for f in runs.values():
            f()  # warm up
        for _ in range(args.repeats):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        speed = {k: n / np.median(v) / 1e6 for k, v in times.items()}
        c = speed.get("C")
        cs = f"{c:>8.1f}" if c else f"{'-':>8}"
        rc = f"{speed['rtn'] / c:>7.2f}" if c else f"{'-':>7}"
        mc = f"{speed['mse'] / c:>7.2f}" if c else f"{'-':>7}"
        print(f"{name:<5} {cs} {speed['rtn']:>8.1f} {speed['mse']:>8.1f} {rc} {mc} "
              f"{speed['mse'] / speed['rtn']:>8.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
