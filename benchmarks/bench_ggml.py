"""Rate-distortion and speed of every ggml block type, and of flightquant's native format,
beside gguf-py's NumPy quantizer and llama.cpp's C quantizer (ctypes, when installed).

    python benchmarks/bench_ggml.py [--numel 1048576] [--repeat 5] [--types Q4_0,Q4_K,native]
                                    [--plot out.png] [--seed 0]

(a) Rate-distortion on Gaussian and Student-t(3) data: bits per weight (every scale and
    zero-point byte counted: a ggml type's block bytes; for native, the same count as
    ``flightquant quantize`` reports, wire.tensor_bytes) and SNR dB =
    10 log10(sum x^2 / sum (x - x_hat)^2) of rtn and mse, gguf-py and llama.cpp, and how
    many rtn blocks are byte-identical to llama.cpp's ("=C").
(b) Speed in M weights/s: ours 1 thread and all threads, rtn and mse, beside gguf-py and
    llama.cpp (one thread; it has no threaded entry point); medians of --repeat runs, and
    the ratios ours/llama.cpp (1 thread) measured in the same run. Every quantizer
    allocates its output per call, as a caller would.
(c) --plot writes SNR against bits per weight (PNG).

A ggml type whose kernels are still placeholders (the block functions of a family not
written yet) shows "n/a": each type and method is probed first (its decode of its own
bytes must be finite and track the input).
"""

from __future__ import annotations

import os

# numpy's OpenBLAS threads spin on the cores being timed; nothing here uses BLAS
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from flightquant import formats, kernels  # noqa: E402
from flightquant.testing import llama_quantizer  # noqa: E402
from flightquant.wire import tensor_bytes  # noqa: E402

try:
    from gguf import GGMLQuantizationType as _GT
    from gguf import quants as _gq
except ImportError:  # pragma: no cover - gguf-py is a test dependency
    _GT = _gq = None

NATIVE = (("native 4b g128", 4, 128), ("native 4b g32", 4, 32), ("native 2b g32", 2, 32))
DISTS = ("gauss", "t3")
NA = "n/a"


# ------------------------------------------------------------------------------ peers


def gguf_quantize(x: np.ndarray, t: formats.GgmlType):
    """gguf-py's quantizer, or None where gguf-py does not implement the type."""
    if _gq is None:
        return None
    try:
        with np.errstate(all="ignore"):
            return _gq.quantize(x.reshape(-1, t.block_size), _GT[t.name]).reshape(-1)
    except NotImplementedError:
        return None


def gguf_dequantize(data: np.ndarray, t: formats.GgmlType) -> np.ndarray:
    return _gq.dequantize(data.reshape(-1, t.type_size), _GT[t.name]).reshape(-1)


# ------------------------------------------------------------------------------ helpers


def make_data(dist: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) if dist == "gauss" else rng.standard_t(3, n)
    return x.astype(np.float32)


def snr_db(x: np.ndarray, x_hat: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        err = float(np.sum((x64 - np.asarray(x_hat, np.float64)) ** 2))
        if not np.isfinite(err):
            return float("nan")
        return float("inf") if err == 0 else float(10 * np.log10(np.sum(x64**2) / err))


def implemented(t: formats.GgmlType, method: str) -> bool:
    """Do our kernels quantize ``t`` with ``method`` (placeholders leave garbage)?"""
    x = make_data("gauss", 8 * 256, 123)
    try:
        with np.errstate(all="ignore"):
            data = kernels.quantize_ggml(x, t.name, method=method)
            again = kernels.quantize_ggml(x, t.name, method=method)
            x_hat = kernels.dequantize_ggml(data, t.name)
    except Exception:
        return False
    s = snr_db(x, x_hat)
    # rtn ternary (absmax scale) is the weakest real quantizer here, at about 1.9 dB
    return bool(np.array_equal(data, again) and np.isfinite(s) and s > 0.5)


def native_quant(x, bits, group_size, method, threads=None):
    return kernels.quantize_rows(x, [0], [x.size], bits=bits, scheme="asymmetric",
                                 group_size=group_size, method=method, threads=threads)  # fmt: skip


def native_dequant(q):
    return kernels.dequantize_rows(q.codes, q.layout, q.scales, q.zero_points, scheme="asymmetric")


def median_rate(fn, n: int, repeat: int) -> float:
    fn()  # warm up (page in, first-call costs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times) / 1e6


def fmt(v, spec: str, width: int) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return f"{NA:>{width}}"
    return f"{format(v, spec):>{width}}"


# ------------------------------------------------------------------------------ (a)


def rate_distortion(names, natives, data, llama, have):
    """rows of (label, bpw, {dist: {"rtn", "mse", "gguf", "C", "eqC"}})"""
    rows = []
    for name in names:
        t = formats.get(name)
        per = {}
        for dist, x in data.items():
            r = {}
            for m in ("rtn", "mse"):
                if have[name][m]:
                    r[m] = snr_db(
                        x, kernels.dequantize_ggml(kernels.quantize_ggml(x, name, method=m), name)
                    )
            g = gguf_quantize(x, t)
            if g is not None:
                r["gguf"] = snr_db(x, gguf_dequantize(g, t))
            if llama is not None:
                c = llama.quantize(x, t.name)
                r["C"] = snr_db(x, gguf_dequantize(c, t))
                if have[name]["rtn"]:
                    ours = kernels.quantize_ggml(x, name).reshape(-1, t.type_size)
                    r["eqC"] = 100.0 * float((ours == c.reshape(-1, t.type_size)).all(1).mean())
            per[dist] = r
        rows.append((name, t.bits_per_weight, per))
    for label, bits, gs in natives:
        per = {}
        for dist, x in data.items():
            per[dist] = {
                m: snr_db(x, native_dequant(native_quant(x, bits, gs, m))) for m in ("rtn", "mse")
            }
        bpw = 8 * tensor_bytes(x.size, bits=bits, group_size=gs, scheme="asymmetric") / x.size
        rows.append((label, bpw, per))
    return rows


def print_rate_distortion(rows, numel):
    print(f"(a) rate-distortion, {numel} weights per distribution; SNR dB; "
          "=C: % of rtn blocks byte-identical to llama.cpp's")  # fmt: skip
    head = f"{'config':<15} {'bpw':>6}"
    sub = f"{'':<15} {'':>6}"
    for dist in DISTS:
        head += f" | {dist:^42}"
        sub += f" | {'rtn':>6} {'mse':>6} {'gain':>6} {'gguf-py':>7} {'llama.c':>7} {'=C':>5}"
    print(head)
    print(sub)
    for label, bpw, per in rows:
        line = f"{label:<15} {bpw:>6.3f}"
        for dist in DISTS:
            r = per[dist]
            gain = r["mse"] - r["rtn"] if "mse" in r and "rtn" in r else None
            line += (
                f" | {fmt(r.get('rtn'), '.2f', 6)} {fmt(r.get('mse'), '.2f', 6)}"
                f" {fmt(gain, '+.2f', 6)} {fmt(r.get('gguf'), '.2f', 7)}"
                f" {fmt(r.get('C'), '.2f', 7)} {fmt(r.get('eqC'), '.1f', 5)}"
            )
        print(line)


# ------------------------------------------------------------------------------ (b)


def speed(names, natives, x, llama, have, repeat):
    n = x.size
    rows = []
    for name in names:
        t = formats.get(name)
        r = {}
        for m in ("rtn", "mse"):
            if have[name][m]:
                r[m + "1"] = median_rate(
                    lambda: kernels.quantize_ggml(x, name, method=m, threads=1), n, repeat
                )
                r[m + "N"] = median_rate(
                    lambda: kernels.quantize_ggml(x, name, method=m), n, repeat
                )
        if have[name]["rtn"]:
            data = kernels.quantize_ggml(x, name)
            r["deq1"] = median_rate(
                lambda: kernels.dequantize_ggml(data, name, threads=1), n, repeat
            )
        if gguf_quantize(x[: 16 * t.block_size], t) is not None:
            r["gguf"] = median_rate(lambda: gguf_quantize(x, t), n, max(1, repeat // 2))
        if llama is not None:
            r["C"] = median_rate(lambda: llama.quantize(x, t.name), n, repeat)
        rows.append((name, r))
    for label, bits, gs in natives:
        r = {}
        for m in ("rtn", "mse"):
            r[m + "1"] = median_rate(lambda: native_quant(x, bits, gs, m, threads=1), n, repeat)
            r[m + "N"] = median_rate(lambda: native_quant(x, bits, gs, m), n, repeat)
        rows.append((label, r))
    return rows


def print_speed(rows, numel, repeat, threads):
    print(f"(b) speed, M weights/s, Student-t(3) data, {numel} weights, median of {repeat}; "
          f"N = {threads} threads; ratios: ours (1 thread) / llama.cpp (1 thread)")  # fmt: skip
    print(f"{'config':<15} {'rtn 1T':>8} {'rtn NT':>8} {'mse 1T':>8} {'mse NT':>8} {'deq 1T':>8}"
          f" {'gguf-py':>8} {'llama.c':>8} {'rtn/C':>6} {'mse/C':>6}")  # fmt: skip
    for label, r in rows:
        c = r.get("C")
        ratio = {m: (r[m + "1"] / c if c and (m + "1") in r else None) for m in ("rtn", "mse")}
        print(
            f"{label:<15} {fmt(r.get('rtn1'), '.0f', 8)} {fmt(r.get('rtnN'), '.0f', 8)}"
            f" {fmt(r.get('mse1'), '.0f', 8)} {fmt(r.get('mseN'), '.0f', 8)}"
            f" {fmt(r.get('deq1'), '.0f', 8)} {fmt(r.get('gguf'), '.1f', 8)}"
            f" {fmt(c, '.1f', 8)} {fmt(ratio['rtn'], '.2f', 6)} {fmt(ratio['mse'], '.2f', 6)}"
        )


# ------------------------------------------------------------------------------ (c)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DISTS), figsize=(13, 5.5), sharex=True)
    styles = {
        ("ggml", "rtn"): ("o", "tab:blue", "ggml rtn (ours)"),
        ("ggml", "mse"): ("^", "tab:red", "ggml mse (ours)"),
        ("ggml", "C"): ("x", "black", "llama.cpp C"),
        ("native", "rtn"): ("s", "tab:green", "native rtn"),
        ("native", "mse"): ("D", "tab:purple", "native mse"),
    }
    for ax, dist in zip(axes, DISTS, strict=True):
        seen = set()
        for label, bpw, per in rows:
            kind = "native" if label.startswith("native") else "ggml"
            for key in ("rtn", "mse", "C"):
                v = per[dist].get(key)
                if v is None or not np.isfinite(v) or (kind, key) not in styles:
                    continue
                marker, color, legend = styles[(kind, key)]
                ax.scatter(bpw, v, marker=marker, color=color,
                           label=legend if (kind, key) not in seen else None)  # fmt: skip
                seen.add((kind, key))
            best = per[dist].get("mse", per[dist].get("rtn", per[dist].get("C")))
            if best is not None and np.isfinite(best):
                ax.annotate(label.replace("native ", ""), (bpw, best), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_title({"gauss": "Gaussian", "t3": "Student-t (3 dof)"}[dist])
        ax.set_xlabel("bits per weight (scales and zero points counted)")
        ax.set_ylabel("SNR dB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("flightquant: SNR against bits per weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--numel", type=int, default=1 << 20, help="weights per distribution")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    ap.add_argument("--types", default=None,
                    help="comma-separated ggml type names and/or 'native' (default: all)")  # fmt: skip
    ap.add_argument("--plot", default=None, metavar="PNG", help="write SNR vs bits/weight")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    wanted = [s.strip() for s in args.types.split(",")] if args.types else None
    names = [n for n in formats.GGML_TYPES if wanted is None or n in wanted]
    natives = NATIVE if wanted is None or "native" in wanted else ()
    unknown = [w for w in wanted or () if w != "native" and w not in formats.GGML_TYPES]
    if unknown:
        ap.error(f"unknown types {unknown}; valid: {', '.join(formats.GGML_TYPES)}, native")
    block = 256
    numel = max(block, args.numel // block * block)

    llama = llama_quantizer()
    have = {n: {m: implemented(formats.get(n), m) for m in ("rtn", "mse")} for n in names}
    threads = kernels.resolve_threads(None)
    print(f"flightquant {kernels.build_info()['version']}, {threads} threads; gguf-py "
          f"{'yes' if _gq else 'missing'}; llama.cpp {llama.path if llama else 'missing'}")  # fmt: skip
    # other processes on these cores skew the timings (all-threads runs the most)
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    missing = [f"{n} {m}" for n in names for m in ("rtn", "mse") if not have[n][m]]
    if missing:
        print(f"kernels not implemented yet (n/a): {', '.join(missing)}")
    data = {d: make_data(d, numel, args.seed + i) for i, d in enumerate(DISTS)}

    rows = rate_distortion(names, natives, data, llama, have)
    print_rate_distortion(rows, numel)
    print()
    print_speed(
        speed(names, natives, data["t3"], llama, have, args.repeat), numel, args.repeat, threads
    )
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
