"""The Arrow codec's overhead over the bare kernels.

    python benchmarks/bench_codec.py [--batch-mib 4] [--repeat 31] [--threads N]

For each batch shape (few large tensors, many small ones) and a few option sets, times
in the same run, interleaved call by call:

* ``core``: the compiled kernel alone (``flightquant._kernels.quantize_kernel`` /
  ``dequantize_kernel``) on prepared arguments and preallocated outputs;
* ``kernel``: the kernels' public call (``flightquant.kernels.quantize_rows`` /
  ``dequantize_rows``: checks, layout, output allocation, the compiled kernel), on the
  batch's value buffer;
* ``codec``: the whole codec call (``codec.quantize_batch`` / ``dequantize_batch``:
  schema, Arrow buffers in, Arrow arrays out).

Prints medians and the median per-call overhead codec/kernel - 1 (the codec's overhead
over the bare kernels) and codec/core - 1 (everything around the compiled loop,
allocation included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

from flightquant import _kernels, codec, kernels
from flightquant.options import METHOD_CODES, SCHEME_CODES, QuantOptions
from flightquant.reference import qparams


def make_batch(total_floats: int, n_rows: int, seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    per = total_floats // n_rows
    values = rng.standard_normal(per * n_rows).astype(np.float32)
    offsets = np.arange(n_rows + 1, dtype=np.int32) * per
    return pa.record_batch(
        {
            "layer_name": [f"model.layers.{i}.weight" for i in range(n_rows)],
            "weights": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "shape": pa.array([[per]] * n_rows, pa.list_(pa.int64())),
        }
    )


def interleaved(fns, repeat: int) -> list[tuple[float, float]]:
    """Call ``fns`` one after the other, ``repeat`` times, so machine noise hits them
    alike. Returns per function the median time and the median per-round ratio of the
    last function's time to its time."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    last = times[-1]
    return [
        (statistics.median(ts), statistics.median(c / t for c, t in zip(last, ts, strict=True)))
        for ts in times
    ]


def core_calls(q, values, starts, opts, threads: int):
    """The compiled quantize and dequantize kernels on prepared arguments."""
    lay = q.layout
    qmin, qmax, offset = qparams(opts.bits, opts.scheme)
    codes, scales = np.empty_like(q.codes), np.empty_like(q.scales)
    zps = np.empty_like(q.zero_points) if q.zero_points is not None else kernels._NO_F32
    none = kernels._NO_F64
    scheme = SCHEME_CODES[opts.scheme]
    out = np.empty(int(lay.row_lens.sum()), np.float32)
    out_starts = np.concatenate([[0], np.cumsum(lay.row_lens)[:-1]]).astype(np.int64)
    zp_in = q.zero_points if q.zero_points is not None else kernels._NO_F32

    def quantize():
        _kernels.quantize_kernel(
            values,
            starts,
            lay.row_lens,
            lay.group_offsets,
            lay.code_offsets,
            lay.block_offsets,
            lay.groups_per_block,
            opts.bits,
            scheme,
            METHOD_CODES[opts.method],
            opts.group_size,
            qmin,
            qmax,
            offset,
            False,
            0.0,
            codes,
            scales,
            zps,
            none,
            none,
            False,
            threads,
        )

    def dequantize():
        _kernels.dequantize_kernel(
            q.codes,
            lay.row_lens,
            lay.group_offsets,
            lay.code_offsets,
            lay.block_offsets,
            out_starts,
            lay.groups_per_block,
            opts.bits,
            opts.group_size,
            q.scales,
            zp_in,
            offset,
            out,
            threads,
        )

    return quantize, dequantize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch-mib", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=31)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    total = int(args.batch_mib * (1 << 20)) // 4
    threads = kernels.resolve_threads(args.threads)
    info = kernels.build_info()
    print(
        f"flightquant codec overhead; build: {info}; batch {args.batch_mib} MiB float32; "
        f"threads={threads}; median of {args.repeat}"
    )
    header = (
        f"{'rows':>5} {'options':<30} {'op':<10} {'core ms':>8} {'kernel ms':>9} {'codec ms':>8} "
        f"{'over kernel':>11} {'over core':>9}"
    )
    print(header)
    print("-" * len(header))
    worst = {"quantize": -1.0, "dequantize": -1.0}
    for n_rows in (4, 256):
        batch = make_batch(total, n_rows)
        arr = batch.column("weights")
        values = arr.values.to_numpy()
        offsets = arr.offsets.to_numpy().astype(np.int64)
        starts, lens = offsets[:-1], np.diff(offsets)
        for opts_dict in (
            {"bits": 4, "group_size": 128},
            {"bits": 8, "group_size": 32},
            {"bits": 2, "group_size": 128, "scheme": "symmetric"},
        ):
            opts = QuantOptions.from_mapping(opts_dict)
            kw = dict(
                bits=opts.bits, scheme=opts.scheme, group_size=opts.group_size, threads=threads
            )
            q = kernels.quantize_rows(values, starts, lens, **kw)
            qbatch, _ = codec.quantize_batch(batch, opts)
            core_q, core_d = core_calls(q, values, starts, opts, threads)
            label = ",".join(f"{k}={v}" for k, v in opts_dict.items())
            runs = {
                "quantize": (
                    core_q,
                    lambda: kernels.quantize_rows(values, starts, lens, **kw),
                    lambda: codec.quantize_batch(batch, opts, threads=threads),
                ),
                "dequantize": (
                    core_d,
                    lambda: kernels.dequantize_rows(
                        q.codes,
                        q.layout,
                        q.scales,
                        q.zero_points,
                        scheme=opts.scheme,
                        threads=threads,
                    ),
                    lambda: codec.dequantize_batch(qbatch, threads=threads),
                ),
            }
            for op, fns in runs.items():
                (t_core, r_core), (t_kernel, r_kernel), (t_codec, _) = interleaved(fns, args.repeat)
                worst[op] = max(worst[op], r_kernel - 1)
                print(
                    f"{n_rows:>5} {label:<30} {op:<10} {t_core * 1e3:>8.3f} {t_kernel * 1e3:>9.3f} "
                    f"{t_codec * 1e3:>8.3f} {r_kernel - 1:>11.1%} {r_core - 1:>9.1%}"
                )
    print(
        "worst overhead over the kernels: " + ", ".join(f"{op} {w:.1%}" for op, w in worst.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
