"""The Arrow codec's overhead over the bare kernels.

    python benchmarks/bench_codec.py [--batch-mib 4] [--repeat 31] [--threads N]

For each batch shape (few large tensors, many small ones) and a few option sets, times
in the same run: the bare kernel call on the batch's value buffer
(``flightquant.kernels.quantize_rows`` / ``dequantize_rows``) and the whole codec call
(``codec.quantize_batch`` / ``dequantize_batch``: schema, buffer views, Arrow output
arrays), interleaved call by call. Prints medians and the median per-pair overhead
codec/kernel - 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

from flightquant import codec, kernels
from flightquant.options import QuantOptions


def make_batch(total_floats: int, n_rows: int, seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    per = total_floats // n_rows
    values = rng.standard_normal(per * n_rows).astype(np.float32)
    offsets = np.arange(n_rows + 1, dtype=np.int32) * per
    return pa.record_batch({
        "layer_name": [f"model.layers.{i}.weight" for i in range(n_rows)],
        "weights": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "shape": pa.array([[per]] * n_rows, pa.list_(pa.int64())),
    })


def paired(kernel_fn, codec_fn, repeat: int) -> tuple[float, float, float]:
    """Interleave the two calls so machine noise hits both alike.

    Returns the median kernel time, the median codec time and the median of the
    per-pair ratios codec/kernel.
    """
    kernel_fn(), codec_fn()  # warm-up
    tk, tc, ratio = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        kernel_fn()
        t1 = time.perf_counter()
        codec_fn()
        t2 = time.perf_counter()
        tk.append(t1 - t0)
        tc.append(t2 - t1)
        ratio.append((t2 - t1) / (t1 - t0))
    return statistics.median(tk), statistics.median(tc), statistics.median(ratio)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-mib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=31)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    total = int(args.batch_mib * (1 << 20)) // 4
    info = kernels.build_info()
    print(f"flightquant codec overhead; build: {info}; batch {args.batch_mib} MiB float32; "
          f"threads={args.threads or kernels.resolve_threads(None)}; median of {args.repeat}")
    header = f"{'rows':>6} {'options':<28} {'op':<10} {'kernel ms':>10} {'codec ms':>10} {'overhead':>9}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for n_rows in (4, 256):
        batch = make_batch(total, n_rows)
        arr = batch.column("weights")
        values = arr.values.to_numpy()
        offsets = arr.offsets.to_numpy().astype(np.int64)
        starts, lens = offsets[:-1], np.diff(offsets)
        for opts_dict in ({"bits": 4, "group_size": 128}, {"bits": 8, "group_size": 32},
                          {"bits": 2, "group_size": 128, "scheme": "symmetric"}):
            opts = QuantOptions.from_mapping(opts_dict)
            kw = dict(bits=opts.bits, scheme=opts.scheme, group_size=opts.group_size, threads=args.threads)
            t_kernel, t_codec, ratio = paired(
                lambda: kernels.quantize_rows(values, starts, lens, **kw),
                lambda: codec.quantize_batch(batch, opts, threads=args.threads), args.repeat)
            label = ",".join(f"{k}={v}" for k, v in opts_dict.items())
            over = ratio - 1
            worst = max(worst, over)
            print(f"{n_rows:>6} {label:<28} {'quantize':<10} {t_kernel*1e3:>10.3f} {t_codec*1e3:>10.3f} {over:>8.1%}")
            qbatch, _ = codec.quantize_batch(batch, opts)
            q = kernels.quantize_rows(values, starts, lens, **kw)
            t_kernel, t_codec, ratio = paired(
                lambda: kernels.dequantize_rows(q.codes, q.layout, q.scales, q.zero_points,
                                                scheme=opts.scheme, threads=args.threads),
                lambda: codec.dequantize_batch(qbatch, threads=args.threads), args.repeat)
            over = ratio - 1
            worst = max(worst, over)
            print(f"{n_rows:>6} {label:<28} {'dequantize':<10} {t_kernel*1e3:>10.3f} {t_codec*1e3:>10.3f} {over:>8.1%}")
    print(f"worst overhead: {worst:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
