"""Kernel throughput against the peers measured in the same run.

    python benchmarks/bench_kernels.py [--size-mib 64] [--repeat 5] [--plot out.png]

Input: float32, ``--size-mib`` MiB of standard-normal values in rows of ``--row-len``
elements. Every rate is GB/s of float32 *input* (for dequantize: of the float32 output it
reconstructs), the median of ``--repeat`` timed runs after one warm-up, through the public
wrapper (so the output allocation is included, as a user pays it). In the same run:

* the NumPy reference (``flightquant.reference``) on a smaller slice (it is slow Python;
  its rate is bytes of that slice / its time, so it compares honestly);
* ``np.copyto`` of the same input into a preallocated array: the memory-copy ceiling
  (and ``np.copy``, which allocates its output like the kernels do);
* the ``gguf`` package's Q8_0 / Q4_0 quantizers (llama.cpp's formats, NumPy code) when
  ``gguf`` is importable (``pip install flightquant[bench]``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flightquant import kernels, reference  # noqa: E402

CONFIGS = [  # (scheme, bits, group_size)
    ("asymmetric", 8, 32),
    ("asymmetric", 8, 128),
    ("asymmetric", 4, 32),
    ("asymmetric", 4, 128),
    ("asymmetric", 2, 32),
    ("asymmetric", 2, 128),
    ("symmetric", 4, 128),
]
TARGET = ("asymmetric", 4, 128)


def timeit(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_paired(fns, repeat: int) -> tuple[list[float], list[float]]:
    """Interleave the calls (a, b, a, b, ...) so load from other tenants hits all alike.

    Returns the median seconds of each and the median per-round ratio first/each.
    """
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    medians = [statistics.median(t) for t in times]
    ratios = [statistics.median(a / b for a, b in zip(times[0], t, strict=True)) for t in times]
    return medians, ratios


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=64.0, help="float32 input size (MiB)")
    ap.add_argument("--row-len", type=int, default=4096, help="elements per row")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    ap.add_argument(
        "--ref-mib", type=float, default=4.0, help="slice the NumPy reference runs on (MiB)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the 'all threads' count (default: all allowed cores)",
    )
    ap.add_argument("--plot", metavar="PNG", help="write a bar chart (needs matplotlib)")
    args = ap.parse_args(argv)

    all_threads = kernels.resolve_threads(args.threads)
    row_len = args.row_len
    n = int(args.size_mib * 2**20 / 4) // row_len * row_len
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    nbytes = x.nbytes
    rows = n // row_len
    starts = np.arange(rows, dtype=np.int64) * row_len
    lens = np.full(rows, row_len, np.int64)
    ref_rows = max(1, min(rows, int(args.ref_mib * 2**20 / 4) // row_len))
    ref_bytes = ref_rows * row_len * 4

    info = kernels.build_info()
    print(
        f"flightquant {info['version']} kernels: backend={info['backend']} "
        f"openmp={info['openmp']} max_threads={info['max_threads']}; "
        f"cores allowed={len(os.sched_getaffinity(0))}"
    )
    print(
        f"input: float32, {nbytes / 2**20:.0f} MiB, {rows} rows x {row_len}; "
        f"reference on {ref_bytes / 2**20:.1f} MiB; median of {args.repeat}\n"
    )

    dst = np.empty_like(x)
    copy_rate = gbps(nbytes, timeit(lambda: np.copyto(dst, x), args.repeat))
    alloc_copy_rate = gbps(nbytes, timeit(lambda: x.copy(), args.repeat))
    thread_counts = [1] if all_threads == 1 else [1, all_threads]

    results = []
    for scheme, bits, gs in CONFIGS:
        row = {"config": f"{scheme[:4]} {bits}b g{gs}", "key": (scheme, bits, gs)}
        kw = dict(bits=bits, scheme=scheme, group_size=gs)
        # 1 and N threads interleaved call by call: the scaling ratio is the median of
        # per-round ratios, robust to load that comes and goes on a shared machine
        q = kernels.quantize_rows(x, starts, lens, **kw)
        tq, rq = timeit_paired(
            [
                partial(kernels.quantize_rows, x, starts, lens, threads=t, **kw)
                for t in thread_counts
            ],
            args.repeat,
        )
        td, rd = timeit_paired(
            [
                partial(
                    kernels.dequantize_rows,
                    q.codes,
                    q.layout,
                    q.scales,
                    q.zero_points,
                    scheme=scheme,
                    threads=t,
                )
                for t in thread_counts
            ],
            args.repeat,
        )
        for i, t in enumerate(thread_counts):
            row[f"q{t}"], row[f"d{t}"] = gbps(nbytes, tq[i]), gbps(nbytes, td[i])
            row[f"q{t}/q1"], row[f"d{t}/d1"] = rq[i], rd[i]
        xs, ss, ls = x[: ref_rows * row_len], starts[:ref_rows], lens[:ref_rows]
        ref_repeat = max(1, args.repeat // 2)
        row["ref"] = gbps(
            ref_bytes, timeit(partial(reference.quantize_rows, xs, ss, ls, **kw), ref_repeat)
        )
        qs = reference.quantize_rows(xs, ss, ls, **kw)
        row["ref_d"] = gbps(
            ref_bytes,
            timeit(
                partial(
                    reference.dequantize_rows,
                    qs.codes,
                    qs.layout,
                    qs.scales,
                    qs.zero_points,
                    scheme=scheme,
                ),
                ref_repeat,
            ),
        )
        results.append(row)

    peers = {
        "memcopy np.copyto (preallocated)": copy_rate,
        "memcopy np.copy (allocating)": alloc_copy_rate,
    }
    try:
        import gguf

        x2 = x.reshape(-1, row_len)
        for name in ("Q8_0", "Q4_0"):
            qt = getattr(gguf.GGMLQuantizationType, name)
            peers[f"gguf {name} quantize (NumPy)"] = gbps(
                nbytes, timeit(lambda qt=qt: gguf.quants.quantize(x2, qt), max(1, args.repeat // 2))
            )
            blob = gguf.quants.quantize(x2, qt)
            peers[f"gguf {name} dequantize (NumPy)"] = gbps(
                nbytes,
                timeit(
                    lambda qt=qt, blob=blob: gguf.quants.dequantize(blob, qt),
                    max(1, args.repeat // 2),
                ),
            )
    except ImportError:
        peers["gguf (not installed: pip install gguf)"] = float("nan")

    tmax = thread_counts[-1]
    head = (
        f"{'config':<16}{'quant 1T':>10}{'quant ' + str(tmax) + 'T':>10}"
        f"{'deq 1T':>9}{'deq ' + str(tmax) + 'T':>9}{'ref q':>8}{'ref dq':>8}"
        f"{'q1/ref':>8}{'q1/copy':>9}{'q' + str(tmax) + '/q1':>7}{'d1/copy':>9}"
        f"{'d' + str(tmax) + '/copy':>8}"
    )
    print("GB/s of float32 input (ratios are x)")
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['config']:<16}{r['q1']:>10.2f}{r[f'q{tmax}']:>10.2f}{r['d1']:>9.2f}"
            f"{r[f'd{tmax}']:>9.2f}{r['ref']:>8.3f}{r['ref_d']:>8.3f}"
            f"{r['q1'] / r['ref']:>8.1f}{r['q1'] / copy_rate:>9.2f}"
            f"{r[f'q{tmax}/q1']:>7.2f}{r['d1'] / copy_rate:>9.2f}"
            f"{r[f'd{tmax}'] / copy_rate:>8.2f}"
        )
    print("\npeers in the same run:")
    for name, rate in peers.items():
        print(f"  {name:<44}{rate:>8.2f} GB/s")

    tr = next(r for r in results if r["key"] == TARGET)
    checks = [
        ("1-thread quantize >= 10x reference", tr["q1"] / tr["ref"], 10.0),
        ("1-thread quantize >= 0.35x memcopy", tr["q1"] / copy_rate, 0.35),
        ("1-thread dequantize >= 0.35x memcopy", tr["d1"] / copy_rate, 0.35),
    ]
    if tmax > 1:
        checks.append((f"{tmax} threads quantize >= 1.6x 1 thread", tr[f"q{tmax}/q1"], 1.6))
    print(f"\ntargets for {TARGET[0]} {TARGET[1]}-bit g{TARGET[2]}:")
    for label, value, goal in checks:
        print(f"  {label:<40} {value:7.2f}  {'ok' if value >= goal else 'MISSED'}")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib); no plot written")
            return 0
        labels = [r["config"] for r in results]
        series = [(f"quantize {t}T", [r[f"q{t}"] for r in results]) for t in thread_counts]
        series += [(f"dequantize {t}T", [r[f"d{t}"] for r in results]) for t in thread_counts]
        series.append(("NumPy reference quantize", [r["ref"] for r in results]))
        fig, ax = plt.subplots(figsize=(11, 5))
        width = 0.8 / len(series)
        for i, (name, vals) in enumerate(series):
            ax.bar(np.arange(len(labels)) + i * width, vals, width, label=name)
        ax.axhline(copy_rate, color="k", linestyle="--", label="np.copyto")
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=20)
        ax.set_ylabel("GB/s of float32 input")
        ax.set_title(f"flightquant kernels, {nbytes / 2**20:.0f} MiB float32")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
