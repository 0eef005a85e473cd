"""``flightquant quantize MODEL_DIR -o OUT_DIR --format compressed-tensors``.

Wires :func:`flightquant.modelfiles.compressed_tensors.write_compressed_tensors` (the
pack-quantized checkpoint transformers and vLLM load) into the CLI: options, ``--imatrix``,
the engine in-process or on ``--server`` (the same bytes), progress bar, summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Mapping

import numpy as np

from .accounting import json_float, shape_text
from .common import JobError, Runner, imatrix_feed, progress
from .summary import MAX_TABLE_ROWS, fmt_bytes, fmt_db, table

FORMAT = "compressed-tensors"


def run(args: argparse.Namespace) -> int:
    from ..modelfiles.compressed_tensors import write_compressed_tensors

    for flag, value in (
        ("--estimate", args.estimate),
        ("--column", args.columns),
        ("--type", args.types),
        ("--allow-requantize", args.allow_requantize),
        ("--clip", args.clip),
    ):
        if value:
            raise JobError(f"{flag} does not apply to --format {FORMAT}")
    if not args.output:
        raise JobError(f"quantize --format {FORMAT} needs -o OUT_DIR (a new folder)")
    bits = 4 if args.bits is None else args.bits
    scheme = args.scheme or "symmetric"
    group_size = 128 if args.group_size is None else args.group_size
    feed = imatrix_feed(args, {"bits": bits, "scheme": scheme, "method": args.method})
    importance = None if feed is None else _Importance(feed)
    runner = Runner(args)
    bar = progress(args, 1000, "quantize")
    done = [0]

    def on_progress(_label: str, fraction: float) -> None:
        step = int(fraction * 1000) - done[0]
        if step > 0:
            bar.update(step)
            done[0] += step

    t0 = time.perf_counter()
    try:
        result = write_compressed_tensors(
            args.input,
            args.output,
            bits=bits,
            group_size=group_size,
            scheme=scheme,
            method=args.method,
            importance=importance,
            threads=args.threads,
            progress=on_progress,
            keep=args.keep or (),
            only=args.only or (),
            quantize_arrays=None if runner.client is None else runner.client.quantize_arrays,
        )
    finally:
        bar.close()
        runner.close()
    seconds = time.perf_counter() - t0
    if not args.quiet:
        desc = f"{bits}-bit {scheme} {args.method}, group size {group_size}"
        if feed is not None:
            desc += f", imatrix {feed.path} ({len(feed.used)} tensors)"
        _summary(args, result, seconds, desc, runner.where)
    return 0


class _Importance(Mapping):
    """``--imatrix``: a tensor's importance vector by its name, as the file names it (a
    tensor the file lacks, or holds per expert, gets none and is listed in the feed)."""

    def __init__(self, feed):
        self.feed = feed

    def __getitem__(self, name: str) -> np.ndarray:
        w = self.feed.imatrix.importance(name)
        if w is None:
            self.feed.missing.append(name)
            raise KeyError(name)
        if w.ndim != 1:
            self.feed.per_expert.append(name)
            raise KeyError(name)
        self.feed.used.append(name)
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 1  # looked up by name, never listed


def _summary(args, result, seconds: float, desc: str, where: str) -> None:
    tensors = result.tensors
    quant = result.quantized
    bytes_in, bytes_out = result.bytes_in, result.bytes_out
    numel = sum(math.prod(t.shape) for t in quant)
    qbytes = sum(t.bytes_out for t in quant)
    if args.json:
        print(
            json.dumps(
                {
                    "format": FORMAT,
                    "options": desc,
                    "out_dir": str(result.out_dir),
                    "files": result.files,
                    "ignore": result.ignore,
                    "tensors": len(tensors),
                    "quantized": len(quant),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "bits_per_weight": 8 * qbytes / numel if numel else None,
                    "seconds": seconds,
                    "per_tensor": [
                        {
                            "name": t.name,
                            "shape": list(t.shape),
                            "dtype": t.dtype,
                            "quantized": t.quantized,
                            "bytes_in": t.bytes_in,
                            "bytes_out": t.bytes_out,
                            "snr_db": json_float(t.snr_db),
                        }
                        for t in tensors
                    ],
                },
                indent=2,
            )
        )
        return
    shown = tensors
    if len(tensors) > MAX_TABLE_ROWS and not args.verbose:
        shown = sorted(quant, key=lambda t: t.snr_db if t.snr_db is not None else math.inf)[:10]
    rows = [
        [
            t.name,
            shape_text(t.shape),
            t.dtype,
            fmt_bytes(t.bytes_in),
            fmt_bytes(t.bytes_out),
            fmt_db(t.snr_db) if t.quantized else "kept",
        ]  # fmt: skip
        for t in shown
    ]
    print(table(["tensor", "shape", "dtype", "in", "out", "SNR dB"], rows, {3, 4, 5}))
    if len(shown) < len(tensors):
        print(f"... {len(tensors) - len(shown)} more tensors (the 10 lowest SNR are shown)")
    print()
    print(f"tensors     {len(tensors)} ({len(quant)} quantized, {len(tensors) - len(quant)} kept)")
    print(f"options     {FORMAT} {desc} ({where})")
    bpw = f", {8 * qbytes / numel:.3f} bits/weight" if numel else ""
    print(f"bytes       {fmt_bytes(bytes_in)} in -> {fmt_bytes(bytes_out)} out{bpw}")
    print(f"ignore      {', '.join(result.ignore) or '-'}")
    print(f"wrote       {result.out_dir}/ ({', '.join(result.files)}) in {seconds:.2f} s")
