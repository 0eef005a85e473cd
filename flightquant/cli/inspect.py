"""``flightquant inspect FILE``: list the tensors of a file, plain or quantized."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from .. import modelfiles, wire
from .accounting import binary_lengths, float_list_columns, key_column, list_lengths, shape_text
from .common import (
    add_gguf_options,
    add_quant_options,
    add_selection_options,
    command,
    is_quantized,
    one_line_errors,
    quant_options,
    selection,
)
from .summary import MAX_TABLE_ROWS, estimate_stats, fmt_bytes, print_estimate, table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``inspect`` to the ``flightquant`` parser."""
    i = subparsers.add_parser(
        "inspect",
        help="list the tensors of a file (plain or quantized)",
        description=(
            "List the tensors of FILE with shapes, dtypes and sizes; for quantized files also "
            "bits, scheme and group size. With --estimate, the size quantizing would give."
        ),
    )
    i.add_argument("file", metavar="FILE")
    i.add_argument(
        "--estimate",
        action="store_true",
        help="add the quantized size under --bits/--group-size/--scheme",
    )
    add_quant_options(i)
    add_selection_options(i)
    add_gguf_options(i)
    i.add_argument("-v", "--verbose", action="store_true", help="list every tensor")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=run)
    one_line_errors(i)


# --------------------------------------------------------------------------- inspect


@command
def run(args: argparse.Namespace) -> int:
    """``flightquant inspect FILE``."""
    source = modelfiles.open_input(args.file)
    try:
        if source.kind == "gguf":
            from . import gguf_report, quantize_gguf

            if args.estimate:
                return gguf_report.print_gguf_estimate(
                    source, *quantize_gguf.prepare(args, source), args
                )
            return gguf_report.inspect_gguf(source, args)
        if args.estimate:
            return print_estimate(source, quant_options(args, None), args, selection(args, source))
        if source.kind == "tensors":
            return inspect_tensors(source, args)
        if is_quantized(source.schema):
            return inspect_quantized(source, args)
        return inspect_table(source, args)
    finally:
        source.close()


def inspect_tensors(source, args) -> int:
    infos = source.infos
    dtypes: dict[str, int] = {}
    for i in infos:
        dtypes[i.dtype] = dtypes.get(i.dtype, 0) + 1
    numel = sum(i.numel for i in infos if i.is_float)
    nbytes = sum(i.nbytes for i in infos)
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(source.path),
                    "format": source.format,
                    "quantized": False,
                    "tensors": len(infos),
                    "parameters": numel,
                    "bytes": nbytes,
                    "dtypes": dtypes,
                    "metadata": source.metadata,
                    "per_tensor": [
                        {
                            "name": i.name,
                            "shape": list(i.shape),
                            "dtype": i.dtype,
                            "bytes": i.nbytes,
                        }
                        for i in infos
                    ],
                },
                indent=2,
            )
        )
        return 0
    shown = infos if len(infos) <= MAX_TABLE_ROWS or args.verbose else infos[:MAX_TABLE_ROWS]
    print(
        table(
            ["tensor", "shape", "dtype", "size"],
            [[i.name, shape_text(i.shape), i.dtype, fmt_bytes(i.nbytes)] for i in shown],
            {3},
        )
    )
    if len(shown) < len(infos):
        print(f"... {len(infos) - len(shown)} more tensors (-v lists all)")
    print()
    print(f"{source.path}: {source.format}, not quantized")
    print(f"tensors     {len(infos)} ({', '.join(f'{k} {v}' for k, v in sorted(dtypes.items()))})")
    print(f"parameters  {numel:,} float weights")
    print(f"size        {fmt_bytes(nbytes)} ({nbytes:,} bytes)")
    return 0


def inspect_table(source, args) -> int:
    columns = float_list_columns(source.schema, None)
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(source.path),
                    "format": source.format,
                    "quantized": False,
                    "rows": source.num_rows,
                    "float_list_columns": columns,
                    "schema": [f"{f.name}: {f.type}" for f in source.schema],
                },
                indent=2,
            )
        )
        return 0
    if modelfiles.is_tensor_layout(source.schema):
        stats = estimate_stats(
            source,
            {"bits": 8, "group_size": 1 << 30, "scheme": "symmetric", "columns": ["weights"]},
        )
        shown = stats if len(stats) <= MAX_TABLE_ROWS or args.verbose else stats[:MAX_TABLE_ROWS]
        print(
            table(
                ["tensor", "numel", "dtype", "size"],
                [[s.name, f"{s.numel:,}", s.dtype, fmt_bytes(s.bytes_in)] for s in shown],
                {1, 3},
            )
        )
        if len(shown) < len(stats):
            print(f"... {len(stats) - len(shown)} more tensors (-v lists all)")
        print()
    print(f"{source.path}: {source.format}, not quantized, {source.num_rows} rows")
    for f in source.schema:
        mark = "  (float tensors: would be quantized)" if f.name in columns else ""
        print(f"  {f.name}: {f.type}{mark}")
    return 0


def inspect_quantized(source, args) -> int:
    schema = source.schema
    qcols = [f.name for f in schema if wire.is_quantized_field(f)]
    codes_meta = {c: wire.parse_codes_field(schema.field(c)) for c in qcols}
    meta = {c: wire.flightquant_metadata(schema.field(c)) for c in qcols}
    key = key_column(schema)
    stats: list[dict[str, Any]] = []
    for batch in source.iter_batches():
        keys = batch.column(key).to_pylist() if key else [None] * batch.num_rows
        shapes = batch.column("shape").to_pylist() if "shape" in batch.schema.names else None
        dtypes = batch.column("dtype").to_pylist() if "dtype" in batch.schema.names else None
        for c in qcols:
            cm = codes_meta[c]
            codes = binary_lengths(batch.column(c))
            extra = np.zeros(batch.num_rows, np.int64)  # ggml types keep scales in the blocks
            for role in ("scales", "zero_points"):
                if wire.derived_name(c, role) in batch.schema.names:
                    extra = extra + list_lengths(batch.column(wire.derived_name(c, role))) * 4
            valid = np.asarray(batch.column(c).is_valid())
            if wire.derived_name(c, "numel") in batch.schema.names:
                numel = batch.column(wire.derived_name(c, "numel")).to_numpy(zero_copy_only=False)
            elif cm.ggml is not None:
                numel = codes // cm.ggml.type_size * cm.ggml.block_size
            else:
                numel = np.full(batch.num_rows, cm.list_size or 0)
            mse = (
                batch.column(wire.derived_name(c, "mse")).to_numpy(zero_copy_only=False)
                if wire.derived_name(c, "mse") in batch.schema.names
                else None
            )
            for r in range(batch.num_rows):
                if c == "weights" and dtypes and not valid[r]:
                    raw = batch.column("raw")[r] if "raw" in batch.schema.names else None
                    size = len(raw.as_py()) if raw is not None and raw.is_valid else 0
                    stats.append(
                        {
                            "name": keys[r],
                            "shape": shapes[r] if shapes else None,
                            "dtype": dtypes[r],
                            "bits": None,
                            "bytes": size,
                            "original_bytes": size,
                            "mse": None,
                        }
                    )
                    continue
                if not valid[r]:
                    continue
                dtype = (dtypes[r] if dtypes and c == "weights" else None) or cm.dtype
                n = int(numel[r])
                name = keys[r] if keys[r] is not None else f"row {len(stats)}"
                if len(qcols) > 1:
                    name = f"{name} [{c}]"
                itemsize = modelfiles.ITEMSIZE.get(dtype, 4)
                stats.append(
                    {
                        "name": name,
                        "shape": shapes[r] if shapes and c == "weights" else [n],
                        "dtype": dtype,
                        "bits": cm.bits,
                        "format": cm.format,
                        "numel": n,
                        "bytes": int(codes[r] + extra[r]),
                        "original_bytes": n * itemsize,
                        "mse": None if mse is None or np.isnan(mse[r]) else float(mse[r]),
                    }
                )
    total = sum(s["bytes"] for s in stats)
    orig = sum(s["original_bytes"] for s in stats)
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(source.path),
                    "format": source.format,
                    "quantized": True,
                    "columns": meta,
                    "tensors": len(stats),
                    "bytes": total,
                    "original_bytes": orig,
                    "per_tensor": stats,
                },
                indent=2,
            )
        )
        return 0
    shown = stats if len(stats) <= MAX_TABLE_ROWS or args.verbose else stats[:MAX_TABLE_ROWS]
    rows = [
        [
            str(s["name"]),
            shape_text(tuple(s["shape"] or ())),
            str(s["dtype"]),
            "kept" if s.get("format") is None else str(s["bits"] or s["format"]),
            fmt_bytes(s["original_bytes"]),
            fmt_bytes(s["bytes"]),
            "-" if s["mse"] is None else f"{s['mse']:.3g}",
        ]
        for s in shown
    ]
    print(
        table(
            ["tensor", "shape", "dtype", "bits", "original", "quantized", "mse"], rows, {3, 4, 5, 6}
        )
    )
    if len(shown) < len(stats):
        print(f"... {len(stats) - len(shown)} more tensors (-v lists all)")
    print()
    print(
        f"{source.path}: {source.format}, quantized (format v{meta[qcols[0]].get('format_version', '?')})"
    )
    for c in qcols:
        m, cm = meta[c], codes_meta[c]
        if cm.ggml is not None:
            how = f"{cm.format} {m.get('method', '')}"
        else:
            how = f"{cm.bits}-bit {cm.scheme} {m.get('method', '')}, group size {cm.group_size}"
        print(
            f"  {c}: {how}, carried as {cm.dtype} {cm.kind}".rstrip()
            + (
                " (original dtypes in the dtype column)"
                if c == "weights" and "dtype" in schema.names
                else ""
            )
        )
    ratio = f"{orig / total:.2f}x" if total else "-"
    print(f"tensors     {len(stats)}")
    print(
        f"size        {fmt_bytes(orig)} original -> {fmt_bytes(total)} quantized (ratio {ratio}); "
        f"file {fmt_bytes(source.path.stat().st_size)}"
    )
    return 0
