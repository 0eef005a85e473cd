"""Dequantize into fresh memory against a memory copy, and what ``stats=True`` costs.

    python benchmarks/bench_dequantize.py [--mib 128] [--repeat 9] [--threads 1 2]

Prints, per thread count, the median over interleaved rounds of: ``codec.dequantize_batch``
of a quantized batch of ``--mib`` MiB of float32 output, ``np.copy`` of the same float32
array (both allocate their output, so both pay its page faults), their ratio, and quantize
with and without ``stats`` (the per-row error columns) with the overhead of stats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flightquant import codec  # noqa: E402
from flightquant.options import QuantOptions  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--format", default="native", help="native (4-bit g128) or a ggml type")
    a = p.parse_args(argv)
    n = (a.mib << 20) // 4 // a.rows * a.rows
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    offsets = np.arange(a.rows + 1, dtype=np.int32) * (n // a.rows)
    batch = pa.record_batch({"w": pa.ListArray.from_arrays(pa.array(offsets), pa.array(x))})
    base = {"bits": 4, "group_size": 128} if a.format == "native" else {"format": a.format}
    plain = QuantOptions.from_mapping(base)
    stats = QuantOptions.from_mapping({**base, "stats": True})
    print(
        f"{a.mib} MiB of float32 in {a.rows} rows, format {a.format}; medians of {a.repeat} interleaved rounds"
    )
    print(
        f"{'threads':>7} {'deq GB/s':>9} {'copy GB/s':>9} {'deq/copy':>8} {'q Mw/s':>8} {'q+stats':>8} {'stats cost':>10}"
    )
    for threads in a.threads:
        q, _ = codec.quantize_batch(batch, plain, threads=threads)
        rounds = {"deq": [], "copy": [], "q": [], "qs": []}
        for _ in range(a.repeat):
            for key, fn in (
                ("deq", lambda: codec.dequantize_batch(q, threads=threads)),
                ("copy", lambda: np.copy(x)),
                ("q", lambda: codec.quantize_batch(batch, plain, threads=threads)),
                ("qs", lambda: codec.quantize_batch(batch, stats, threads=threads)),
            ):
                t0 = time.perf_counter()
                out = fn()
                rounds[key].append(time.perf_counter() - t0)
                del out
        med = {k: float(np.median(v)) for k, v in rounds.items()}
        ratio = float(np.median(np.array(rounds["copy"]) / np.array(rounds["deq"])))
        cost = float(np.median(np.array(rounds["qs"]) / np.array(rounds["q"]))) - 1
        print(
            f"{threads:>7} {n * 4 / med['deq'] / 1e9:>9.2f} {n * 4 / med['copy'] / 1e9:>9.2f} {ratio:>8.2f} "
            f"{n / med['q'] / 1e6:>8.0f} {n / med['qs'] / 1e6:>8.0f} {cost:>+10.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
