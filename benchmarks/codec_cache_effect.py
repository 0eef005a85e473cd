"""Why the codec's general path costs more next to the kernel: Python work on evicted
caches (and what the one-call path saves).

    python benchmarks/codec_cache_effect.py [--batch-mib 4] [--repeat 300]

Prints, per 4 MiB quantize batch: the codec's general path (``codec.use_fastpath =
False``, the path batches take that the one-call path hands back) with the kernel
stubbed out (its own work, warm caches) and with the real kernel, the one-call path
(``flightquant._fastpath``), the kernel alone, and one general-path step (reading the
list column's buffers) timed warm and right after streaming 4 and 64 MiB through the
cache.
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
from bench_codec import interleaved, make_batch  # noqa: E402


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

    def general():
        codec.use_fastpath = False
        try:
            return codec.quantize_batch(batch, opts)
        finally:
            codec.use_fastpath = True

    # interleaved call by call, so machine noise hits all three alike
    (bare, _), (one_call, _), (full, _) = interleaved(
        [lambda: real(rows.values, rows.starts, rows.lens, **kw),
         lambda: codec.quantize_batch(batch, opts), general], args.repeat)
    bare, one_call, full = bare * 1e6, one_call * 1e6, full * 1e6
    kernels.quantize_rows = lambda *a, **k: q  # the codec without the kernel's work
    try:
        stub = median_us(general, args.repeat)
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
    print(f"  kernels.quantize_rows alone            {bare:9.1f}")
    print(f"  one-call path                          {one_call:9.1f}   ({one_call - bare:+.1f} next to the kernel)")
    print(f"  general path, real kernel              {full:9.1f}   ({full - bare:+.1f} next to the kernel)")
    print(f"  general path, kernel stubbed           {stub:9.1f}   (its own work, warm caches)")
    print(f"  one step (_rows_of): warm              {warm:9.1f}")
    print(f"                       after 4 MiB copy  {after4:9.1f}")
    print(f"                       after 64 MiB sum  {after64:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
