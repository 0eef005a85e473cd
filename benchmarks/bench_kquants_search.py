"""Q4_K / Q5_K / Q6_K: quality and single-thread speed of rtn, mse and llama.cpp's C.

Prints, for Gaussian and Student-t(3) weights:

* SNR in dB (10*log10(sum x^2 / sum (x - x_hat)^2)) of rtn, mse and llama.cpp's C
  reference quantizer (``ggml_quantize_chunk``, no imatrix), the share of blocks whose rtn
  bytes equal llama.cpp's, and the share of blocks where mse is worse than rtn (must be 0);
* speed in M weights/s on one thread, the median of ``--repeats`` runs measured as the
  thread's CPU time (robust on a shared machine; wall time is printed too), with the
  ratios to llama.cpp's C measured in the same run, at each lane width the CPU offers.

Run: ``python benchmarks/bench_kquants_search.py [--weights 1048576] [--repeats 7]``
llama-cpp-python must be installed for the C columns (else they are skipped).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import time

import numpy as np

from flightquant import _ggml, formats
from flightquant.kernels import dequantize_ggml, quantize_ggml

TYPES = ("Q4_K", "Q5_K", "Q6_K")


def load_llama():
    spec = importlib.util.find_spec("llama_cpp")
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(d, "lib", "libggml-base.so")
        if os.path.exists(path):
            lib = ctypes.CDLL(path)
            f = lib.ggml_quantize_chunk
            f.restype = ctypes.c_size_t
            f.argtypes = [
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_void_p,
            ]
            return lib
    return None


def llama_quantize(lib, x, name):
    t = formats.get(name)
    out = np.zeros(t.row_bytes(x.size), np.uint8)
    lib.ggml_quantize_chunk(t.ggml_type, x.ctypes.data, out.ctypes.data, 0, 1, x.size, None)
    return out


def snr(x, data, name):
    xh = dequantize_ggml(data, name).astype(np.float64)
    x = x.astype(np.float64)
    return 10 * np.log10((x * x).sum() / ((x - xh) ** 2).sum())


def block_sse(x, data, name):
    xh = dequantize_ggml(data, name).astype(np.float64).reshape(-1, 256)
    return ((xh - x.astype(np.float64).reshape(-1, 256)) ** 2).sum(axis=1)


def timed(fs, repeats):
    """Median CPU and wall time of each function in ``fs``, called in turn ``repeats``
    times (interleaved, so that a busy spell on the machine hits all of them alike)."""
    cpu = [[] for _ in fs]
    wall = [[] for _ in fs]
    for _ in range(repeats):
        for i, f in enumerate(fs):
            c0, w0 = time.thread_time(), time.perf_counter()
            f()
            cpu[i].append(time.thread_time() - c0)
            wall[i].append(time.perf_counter() - w0)
    return [(float(np.median(c)), float(np.median(w))) for c, w in zip(cpu, wall, strict=True)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.weights // 256 * 256
    lib = load_llama()
    rng = np.random.default_rng(args.seed)
    data = {
        "gauss": rng.standard_normal(n).astype(np.float32),
        "t3": rng.standard_t(3, n).astype(np.float32),
    }

    print(f"SNR (dB), {n} weights; mse-rtn; blocks rtn == llama.cpp C; blocks mse worse")
    print(
        f"{'data':6} {'type':5} {'rtn':>8} {'mse':>8} {'C':>8} {'mse-rtn':>8} "
        f"{'rtn==C':>8} {'worse':>6}"
    )
    for kind, x in data.items():
        for name in TYPES:
            r = quantize_ggml(x, name, "rtn")
            m = quantize_ggml(x, name, "mse")
            s_r, s_m = snr(x, r, name), snr(x, m, name)
            worse = int((block_sse(x, m, name) > block_sse(x, r, name)).sum())
            if lib is not None:
                c = llama_quantize(lib, x, name)
                t = formats.get(name).type_size
                same = (r.reshape(-1, t) == c.reshape(-1, t)).all(axis=1).mean()
                s_c, same_s = f"{snr(x, c, name):8.3f}", f"{same:8.2%}"
            else:
                s_c, same_s = f"{'-':>8}", f"{'-':>8}"
            print(
                f"{kind:6} {name:5} {s_r:8.3f} {s_m:8.3f} {s_c} {s_m - s_r:+8.3f} "
                f"{same_s} {worse:6d}"
            )

    x = data["t3"]
    widths = sorted({_ggml._k456_lane_width(w) for w in (4, 8)})
    print(f"\nSpeed, 1 thread, M weights/s (median of {args.repeats}, CPU time; wall in [])")
    print(f"{'type':5} {'lanes':>5} {'rtn':>14} {'mse':>14} {'C':>14} {'rtn/C':>6} {'mse/C':>6}")
    for name in TYPES:
        quantize_ggml(x[:256], name, "mse", threads=1)  # warm up
        for w in widths:
            _ggml._k456_lane_width(w)
            fs = [
                lambda: quantize_ggml(x, name, "rtn", threads=1),
                lambda: quantize_ggml(x, name, "mse", threads=1),
            ]
            if lib is not None:
                fs.append(lambda: llama_quantize(lib, x, name))
            (r_cpu, r_wall), (m_cpu, m_wall), *c = timed(fs, args.repeats)
            if c:
                ((c_cpu, c_wall),) = c
                c_s = f"{n / c_cpu / 1e6:6.1f} [{n / c_wall / 1e6:5.1f}]"
                rat = f"{c_cpu / r_cpu:6.2f} {c_cpu / m_cpu:6.2f}"
            else:
                c_s, rat = f"{'-':>14}", f"{'-':>6} {'-':>6}"
            print(
                f"{name:5} {w:5d} {n / r_cpu / 1e6:6.1f} [{n / r_wall / 1e6:5.1f}] "
                f"{n / m_cpu / 1e6:6.1f} [{n / m_wall / 1e6:5.1f}] {c_s} {rat}"
            )
    _ggml._k456_lane_width(widths[-1])


if __name__ == "__main__":
    main()
