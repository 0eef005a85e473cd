"""Why the codec's overhead grows next to the kernel: its Python work on evicted caches.

    python benchmarks/codec_cache_effect.py [--batch-mib 4] [--repeat 300]

Prints, per 4 MiB quantize batch: the codec's own work with the kernel stubbed out (warm
caches), the same codec call with the real kernel, the kernel alone, and one codec step
(reading the list column's buffers) timed warm and right after streaming 4 and 64 MiB
through the cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from flightquant import codec, kernels
from flightquant.options import QuantOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_codec import make_batch  # noqa: E402


def median_us(fn, repeat, before=lambda: None) -> float:
    fn()
    times = []
    for _ in range(repeat):
        before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-mib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args(argv)
    batch = make_batch(int(args.batch_mib * (1 << 20)) // 4, 4)
    opts = QuantOptions.from_mapping({})
    arr = batch.column("weights")
    rows = codec._rows_of(arr)
    kw = dict(bits=4, scheme="asymmetric", group_size=128)
    real = kernels.quantize_rows
    q = real(rows.values, rows.starts, rows.lens, **kw)

    full = median_us(lambda: codec.quantize_batch(batch, opts), args.repeat)
    bare = median_us(lambda: real(rows.values, rows.starts, rows.lens, **kw), args.repeat)
    kernels.quantize_rows = lambda *a, **k: q  # the codec without the kernel's work
    try:
        stub = median_us(lambda: codec.quantize_batch(batch, opts), args.repeat)
    finally:
        kernels.quantize_rows = real
    src = np.ones(1 << 20, np.float32)
    dst = np.empty_like(src)
    big = np.ones(16 << 20, np.float32)
    step = lambda: codec._rows_of(arr)  # noqa: E731
    warm = median_us(step, args.repeat)
    after4 = median_us(step, args.repeat, before=lambda: np.copyto(dst, src))
    after64 = median_us(step, args.repeat, before=lambda: big.sum())
    print(f"{args.batch_mib:g} MiB float32 batch, 4-bit g128, median of {args.repeat} (us)")
    print(f"  codec.quantize_batch, real kernel      {full:9.1f}")
    print(f"  kernels.quantize_rows alone            {bare:9.1f}")
    print(f"  -> codec work next to the kernel       {full - bare:9.1f}")
    print(f"  codec.quantize_batch, kernel stubbed   {stub:9.1f}   (its own work, warm caches)")
    print(f"  one step (_rows_of): warm              {warm:9.1f}")
    print(f"                       after 4 MiB copy  {after4:9.1f}")
    print(f"                       after 64 MiB sum  {after64:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
