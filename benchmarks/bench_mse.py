"""Native method="mse" against rtn: speed per thread and SNR gain, in one run.

    python benchmarks/bench_mse.py [--elements 4194304] [--repeat 5] [--dtype float32]
                                   [--clip C] [--stats] [--isa NAME] [--no-snr-table]

Input: standard-normal values (``--dtype``) in rows of ``--row-len`` elements. For each of
asymmetric 4-bit g128, asymmetric 2-bit g32, symmetric 4-bit g128 and ternary g64 it times
the public ``kernels.quantize_rows`` (output allocation included) with rtn and mse, on one
thread and on every allowed core, interleaved (rtn, mse, rtn, mse, ...) so load from other
processes hits both alike, and prints the medians of ``--repeat`` runs after one warm-up as
M weights/s *per thread*: weights / wall seconds / threads, then weights / CPU seconds of
this process (``time.process_time``, all threads), which other tenants of a busy machine
disturb far less. ``mse/rtn`` is how many times slower mse is (median of per-round
ratios); the SNR (dB) of each method and the gain close each line.

``--isa`` picks the mse search's vector loops (``_kernels.mse_isa``; default: the best this
CPU runs). ``--sweep`` adds the mse rate (1 thread, per CPU-second) of every scheme and bit
width at group sizes 8 to 4096. Unless ``--no-snr-table``, the SNR of rtn and mse for every
scheme, bit width and group size 32 / 128 on ``--snr-elements`` Gaussian float32 values
follows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flightquant import _kernels, kernels  # noqa: E402

SPEED_CONFIGS = [  # (label, scheme, bits, group_size)
    ("asym 4b g128", "asymmetric", 4, 128),
    ("asym 2b g32", "asymmetric", 2, 32),
    ("symm 4b g128", "symmetric", 4, 128),
    ("ternary g64", "ternary", 2, 64),
]


def snr_db(x: np.ndarray, q, scheme: str) -> float:
    x_hat = kernels.dequantize_rows(q.codes, q.layout, q.scales, q.zero_points, scheme=scheme)
    xd = x.astype(np.float64).reshape(-1)
    err = np.sum((xd - x_hat) ** 2)
    return float(10 * np.log10(np.sum(xd**2) / err))


def timed_pair(fns, repeat: int) -> tuple[list[float], list[float], float]:
    """Median wall and CPU seconds of each fn (interleaved rounds), and the median ratio
    of 2nd / 1st wall time."""
    for fn in fns:
        fn()
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    ratio = statistics.median(b / a for a, b in zip(wall[0], wall[1], strict=True))
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu], ratio


def speed_table(x, starts, lens, args, threads_all: int) -> None:
    n = x.size
    opts = dict(clip=args.clip, stats=args.stats)
    thread_counts = [1] if threads_all == 1 else [1, threads_all]
    head = f"{'config':<13}"
    for t in thread_counts:
        head += f" {'rtn ' + str(t) + 't':>8} {'mse ' + str(t) + 't':>8} {'mse/rtn':>7}"
    head += " |" + "".join(
        f" {m + ' ' + str(t) + 't':>8}" for t in thread_counts for m in ("rtn", "mse")
    )
    head += f" | {'rtn dB':>6} {'mse dB':>6} {'gain':>5}"
    print(f"M weights/s per thread, median of {args.repeat} runs: wall clock | CPU time")
    print(head)
    for label, scheme, bits, g in SPEED_CONFIGS:
        kw = dict(bits=bits, scheme=scheme, group_size=g, **opts)
        line, cpu_part = f"{label:<13}", " |"
        for t in thread_counts:
            fns = [
                lambda m=m, t=t: kernels.quantize_rows(x, starts, lens, method=m, threads=t, **kw)
                for m in ("rtn", "mse")
            ]
            (w_rtn, w_mse), (c_rtn, c_mse), ratio = timed_pair(fns, args.repeat)
            line += f" {n / w_rtn / t / 1e6:>8.1f} {n / w_mse / t / 1e6:>8.1f} {ratio:>7.1f}"
            cpu_part += f" {n / c_rtn / 1e6:>8.1f} {n / c_mse / 1e6:>8.1f}"
        snr = [
            snr_db(x, kernels.quantize_rows(x, starts, lens, method=m, **kw), scheme)
            for m in ("rtn", "mse")
        ]
        line += cpu_part + f" | {snr[0]:>6.2f} {snr[1]:>6.2f} {snr[1] - snr[0]:>5.2f}"
        print(line, flush=True)


SWEEP_GROUPS = (8, 16, 32, 64, 128, 256, 1024, 4096)
SWEEP_SCHEMES = [
    ("asymmetric", 2),
    ("asymmetric", 4),
    ("asymmetric", 8),
    ("symmetric", 2),
    ("symmetric", 4),
    ("symmetric", 8),
    ("ternary", 2),
]


def sweep_table(x, starts, lens, args) -> None:
    """mse M weights per CPU-second, 1 thread, median of --repeat runs."""
    print(f"\nmse, 1 thread, M weights per CPU-second (median of {args.repeat} runs)")
    print(f"{'scheme':<15}" + "".join(f"{'g' + str(g):>8}" for g in SWEEP_GROUPS))
    for scheme, bits in SWEEP_SCHEMES:
        line = f"{scheme + ' ' + str(bits) + 'b':<15}"
        for g in SWEEP_GROUPS:
            kw = dict(
                bits=bits,
                scheme=scheme,
                group_size=g,
                method="mse",
                threads=1,
                clip=args.clip,
                stats=args.stats,
            )
            kernels.quantize_rows(x, starts, lens, **kw)
            cpu = []
            for _ in range(args.repeat):
                c0 = time.process_time()
                kernels.quantize_rows(x, starts, lens, **kw)
                cpu.append(time.process_time() - c0)
            line += f"{x.size / statistics.median(cpu) / 1e6:>8.1f}"
        print(line, flush=True)


def snr_table(n: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    print(f"\nSNR on Gaussian N(0,1), {n} float32 elements, seed {seed}")
    print(f"{'scheme':<11} {'bits':>4} {'group':>5} {'rtn dB':>8} {'mse dB':>8} {'gain dB':>8}")
    for scheme, bits_list in (
        ("asymmetric", (2, 4, 8)),
        ("symmetric", (2, 4, 8)),
        ("ternary", (2,)),
    ):
        for bits in bits_list:
            for g in (32, 128):
                kw = dict(bits=bits, scheme=scheme, group_size=g)
                a, b = (
                    snr_db(x, kernels.quantize_rows(x, [0], [n], method=m, **kw), scheme)
                    for m in ("rtn", "mse")
                )
                print(f"{scheme:<11} {bits:>4} {g:>5} {a:>8.2f} {b:>8.2f} {b - a:>8.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--row-len", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--clip", type=float, default=None, help="clip to [-C, C] (both methods)")
    ap.add_argument("--stats", action="store_true", help="quantize with stats=True")
    ap.add_argument("--isa", default=None, help="mse vector loops (default: the best here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snr-elements", type=int, default=1 << 20)
    ap.add_argument("--sweep", action="store_true", help="mse rate over schemes and groups")
    ap.add_argument("--no-snr-table", action="store_true")
    args = ap.parse_args(argv)
    if args.isa is not None:
        _kernels.mse_isa(args.isa)
    rows = max(1, args.elements // args.row_len)
    n = rows * args.row_len
    x = np.random.default_rng(args.seed).standard_normal(n).astype(args.dtype)
    starts = np.arange(rows, dtype=np.int64) * args.row_len
    lens = np.full(rows, args.row_len, np.int64)
    threads_all = kernels.resolve_threads(None)
    info = kernels.build_info() if hasattr(kernels, "build_info") else {}
    print(
        f"{n} {args.dtype} N(0,1) values in rows of {args.row_len}, clip={args.clip}, "
        f"stats={args.stats}, threads 1 and {threads_all}, openmp={info.get('openmp', '?')}, "
        f"mse loops: {_kernels.mse_isa() if hasattr(_kernels, 'mse_isa') else 'scalar'}"
    )
    speed_table(x, starts, lens, args, threads_all)
    if args.sweep:
        sweep_table(x, starts, lens, args)
    if not args.no_snr_table:
        snr_table(args.snr_elements, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
