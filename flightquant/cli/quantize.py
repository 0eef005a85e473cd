"""``flightquant quantize INPUT -o OUTPUT``: quantize a model or table file.

The command reads files (:mod:`flightquant.modelfiles`) and hands RecordBatches to the
in-process API (the embedded default) or, with ``--server``, to a ``Client``; it knows
nothing of kernels. Both paths see the same batches, so they write byte-identical files.
Outputs are written to a temporary file beside OUTPUT and renamed at the end, so a failed
or interrupted job leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from pathlib import Path

import numpy as np

from .. import formats, modelfiles, wire
from ..modelfiles import TensorInfo
from .accounting import Ledger, float_list_columns
from .common import (
    JobError,
    Runner,
    add_gguf_options,
    add_output_options,
    add_quant_options,
    add_remote_options,
    add_selection_options,
    check_not_same,
    command,
    gguf_flags_given,
    imatrix_feed,
    is_quantized,
    never_empty,
    one_line_errors,
    positive_int,
    progress,
    quant_options,
    read_ahead,
    release,
    selection,
)
from .summary import print_estimate, print_summary, quantized_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quantize`` to the ``flightquant`` parser."""
    q = subparsers.add_parser(
        "quantize",
        help="quantize the float tensors of a model or table file",
        description=(
            "Quantize the float tensors of INPUT (.safetensors, .gguf, .npz, .npy, "
            ".arrow/.feather, .parquet) into OUTPUT (.arrow or .parquet; .gguf from a .gguf "
            "input with a ggml --format, as llama-quantize). Runs in-process unless --server "
            "is given. Float tensors with two or more dimensions are quantized (for GGUF: the "
            "ones llama.cpp quantizes); --only/--keep/--type choose others; 1-D tensors "
            "(norms, biases) and integer tensors are kept as they are."
        ),
    )
    q.add_argument("input", metavar="INPUT")
    q.add_argument(
        "-o", "--output", metavar="OUTPUT", help=".arrow (Arrow IPC file), .parquet or .gguf"
    )
    add_quant_options(q)
    add_selection_options(q)
    add_gguf_options(q)
    q.add_argument(
        "--column",
        action="append",
        metavar="NAME",
        dest="columns",
        help="table inputs: quantize only this list column (repeatable; default: every float list column)",
    )
    q.add_argument(
        "--estimate",
        action="store_true",
        help="print the quantized size without quantizing (no OUTPUT needed)",
    )
    add_remote_options(q)
    q.add_argument(
        "--max-batch-bytes",
        type=positive_int,
        default=modelfiles.DEFAULT_BATCH_BYTES,
        metavar="N",
        help="float payload per RecordBatch sent (default: 64 MiB)",
    )
    add_output_options(q)
    q.set_defaults(func=run)
    one_line_errors(q)


# --------------------------------------------------------------------------- quantize


@command
def run(args: argparse.Namespace) -> int:
    """``flightquant quantize INPUT -o OUTPUT``."""
    if (args.format or "").lower() == "compressed-tensors":
        from . import quantize_ct

        return quantize_ct.run(args)
    source = modelfiles.open_input(args.input)
    if source.kind == "gguf":
        from . import quantize_gguf

        return quantize_gguf.run(args, source)
    if args.output and str(args.output).lower().endswith(".gguf"):
        raise JobError(
            f"a .gguf OUTPUT needs a .gguf INPUT; convert {args.input} to GGUF first "
            "(llama.cpp's convert_hf_to_gguf.py), then quantize that"
        )
    if given := gguf_flags_given(args):
        raise JobError(f"{', '.join(given)}: GGUF flags; they apply to .gguf inputs")
    options = quant_options(args, args.columns)
    if source.kind == "table" and is_quantized(source.schema):
        raise JobError(f"{args.input} is already quantized; `flightquant dequantize` restores it")
    selected = selection(args, source)
    imatrix = imatrix_feed(args, options)
    block = formats.get(options["format"]).block_size if "format" in options else 1
    if source.kind == "tensors":
        for info in source.infos:
            if selected(info):
                if "format" in options:  # a ggml block must fit each tensor
                    quantized_bytes(info.numel, options, info.name)
                if imatrix is not None:
                    imatrix.check(info.name, tuple(info.shape), block)
    if args.estimate:
        return print_estimate(source, options, args, selected)
    if not args.output:
        raise JobError("quantize needs -o OUTPUT (.arrow or .parquet), or --estimate")
    fmt = modelfiles.output_format(args.output, ("arrow", "parquet"))
    check_not_same(args.input, args.output)
    modelfiles.check_output_path(args.output)  # before any work
    runner = Runner(args)
    t0 = time.perf_counter()
    meta: dict[bytes, bytes] = {wire.K_SOURCE_FORMAT: source.format.encode()}
    if source.kind == "tensors":
        # per batch: its tensors and their sums of squares, from the widening pass itself
        infos_q: deque[tuple[list[TensorInfo], np.ndarray | None]] | None = deque()
        batches = modelfiles.tensor_batches(
            source,
            max_batch_bytes=args.max_batch_bytes,
            on_batch=lambda infos, signal: infos_q.append((infos, signal)),
            quantize=selected,
            threads=modelfiles.widening_threads(args.threads),
        )
        batches = never_empty(batches, modelfiles.TENSOR_SCHEMA, lambda: infos_q.append(([], None)))
        ledger = Ledger(True, ["weights"])
        options = {**options, "columns": ["weights"]}
        total = source.nbytes
        if source.format == "safetensors" and source.metadata:
            meta[wire.K_SAFETENSORS] = json.dumps(source.metadata, sort_keys=True).encode()
    else:
        infos_q = None
        columns = float_list_columns(source.schema, options.get("columns"))
        missing = sorted(set(options.get("columns") or []) - set(columns))
        if missing:
            raise JobError(
                f"{args.input}: column(s) {', '.join(map(repr, missing))} are not "
                f"float list columns of the file (it has: {', '.join(source.schema.names)})"
            )
        ledger = Ledger(False, columns)
        batches = never_empty(source.iter_batches(args.max_batch_bytes), source.schema, None)
        total = None
    bar = progress(args, total, "quantize")
    writer = None
    fed = ledger.feed(batches, infos_q)
    if imatrix is not None:
        fed = imatrix.add(fed)
    stream = runner.quantize(read_ahead(fed), stats=True, **options)
    try:
        with modelfiles.atomic_output(args.output) as tmp:
            for out in stream:
                done = ledger.settle(out)
                if writer is None:
                    writer = modelfiles.TableWriter(
                        tmp, fmt, out.schema.with_metadata({**(out.schema.metadata or {}), **meta})
                    )
                writer.write(out)
                bar.update(done if total is not None else out.num_rows)
            if writer is None:  # pragma: no cover - never_empty sends at least one batch
                raise JobError("the job produced no output")
            writer.close()
            writer = None
    finally:
        release(bar, writer, stream, runner, source)
    seconds = time.perf_counter() - t0
    if not args.quiet:
        print_summary(
            args,
            ledger.stats,
            seconds,
            options,
            runner.where,
            Path(args.output).stat().st_size,
            importance=imatrix.summary() if imatrix is not None else None,
        )
    return 0
