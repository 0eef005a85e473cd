"""The end-of-job summary and the size estimate, as text tables or JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .. import formats, wire
from .accounting import (
    ARROW_ITEMSIZE,
    TensorStat,
    float_list_columns,
    json_float,
    key_column,
    list_lengths,
    shape_text,
    snr,
    value_dtype,
)
from .common import JobError, describe, is_quantized

MAX_TABLE_ROWS = 25


# --------------------------------------------------------------------------- summary


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_dict(
    stats: list[TensorStat], seconds: float, options: dict, where: str, file_bytes: int
) -> dict[str, Any]:
    quant = [s for s in stats if not s.passthrough]
    bytes_in = sum(s.bytes_in for s in stats)
    bytes_out = sum(s.bytes_out for s in stats)
    signal = sum(s.signal or 0.0 for s in quant)
    sse = sum(s.sse or 0.0 for s in quant) if all(s.sse is not None for s in quant) else None
    numel = sum(s.numel for s in quant)
    qbytes = sum(s.bytes_out for s in quant)
    return {
        "where": where,
        "options": options,
        "tensors": len(stats),
        "quantized": len(quant),
        "passthrough": len(stats) - len(quant),
        "parameters": numel,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "file_bytes": file_bytes,
        "ratio": bytes_in / bytes_out if bytes_out else None,
        "bits_per_weight": 8 * qbytes / numel if numel else None,
        "snr_db": json_float(snr(signal, sse) if quant else None),
        "seconds": seconds,
        "throughput_bytes_per_s": bytes_in / seconds if seconds > 0 else None,
        "per_tensor": [s.to_dict() for s in stats],
    }


def print_summary(
    args,
    stats: list[TensorStat],
    seconds: float,
    options: dict,
    where: str,
    file_bytes: int,
    importance: dict | None = None,
) -> None:
    """The job's summary; ``importance`` (``--imatrix``): the file, how many tensors it
    weighed, and the quantized tensors it had no vector for."""
    summary = summary_dict(stats, seconds, options, where, file_bytes)
    if importance is not None:
        summary["importance"] = importance
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    shown = stats
    note = ""
    if len(stats) > MAX_TABLE_ROWS and not args.verbose:
        ranked = sorted(
            (s for s in stats if not s.passthrough),
            key=lambda s: s.snr_db if s.snr_db is not None else math.inf,
        )
        shown = ranked[:10]
        note = f"... {len(stats) - len(shown)} more tensors (the 10 lowest SNR are shown; -v lists all)"
    rows = [
        [
            s.name,
            s.shape,
            s.dtype,
            fmt_bytes(s.bytes_in),
            fmt_bytes(s.bytes_out),
            f"{s.bytes_in / s.bytes_out:.2f}x" if s.bytes_out else "-",
            "kept" if s.passthrough else fmt_db(s.snr_db),
        ]
        for s in shown
    ]
    print(table(["tensor", "shape", "dtype", "in", "out", "ratio", "SNR dB"], rows, {3, 4, 5, 6}))
    if note:
        print(note)
    desc = describe(options)
    s = summary
    print()
    print(
        f"tensors     {s['tensors']} ({s['quantized']} quantized, {s['passthrough']} kept as they are)"
    )
    print(f"options     {desc} ({where})")
    ratio = f"{s['ratio']:.2f}x" if s["ratio"] else "-"
    bpw = f", {s['bits_per_weight']:.3f} bits/weight" if s["bits_per_weight"] else ""
    print(
        f"bytes       {fmt_bytes(s['bytes_in'])} in -> {fmt_bytes(s['bytes_out'])} out "
        f"(ratio {ratio}{bpw}); file {fmt_bytes(file_bytes)}"
    )
    print(f"SNR         {fmt_db(snr_of(s))} dB overall" + worst(stats))
    if importance is not None:
        print(importance_line(importance))
    rate = s["throughput_bytes_per_s"]
    print(
        f"time        {seconds:.2f} s ({fmt_bytes(rate) + '/s' if rate else '-'}, "
        f"{s['parameters'] / seconds / 1e6 if seconds > 0 else 0:.1f} M weights/s)"
    )


def importance_line(imp: dict) -> str:
    """``importance  N tensors weighed by FILE; M without: a, b (...)``."""
    line = f"importance  {imp['tensors']} tensors weighed by {imp['file']}"
    for key, what in (("without", "not in it"), ("per_expert_without", "per expert, not applied")):
        names = imp[key]
        if names:
            shown = ", ".join(names[:8]) + (
                f", ... ({len(names) - 8} more)" if len(names) > 8 else ""
            )
            line += f"; {len(names)} {what}, quantized without importance: {shown}"
    return line


def snr_of(summary: dict) -> float | None:
    x = summary["snr_db"]
    if isinstance(x, str):
        return math.inf if x == "inf" else -math.inf
    return x


def worst(stats: list[TensorStat]) -> str:
    quant = [s for s in stats if s.snr_db is not None]
    if len(quant) < 2:
        return ""
    w = min(quant, key=lambda s: s.snr_db)
    return f", lowest {fmt_db(w.snr_db)} dB ({w.name})"


# --------------------------------------------------------------------------- estimate


def estimate_bytes(numel: int, bits: int, group_size: int, scheme: str) -> int:
    """Bytes of one native quantized tensor (:func:`flightquant.wire.tensor_bytes`)."""
    return wire.tensor_bytes(numel, bits=bits, group_size=group_size, scheme=scheme)


def quantized_bytes(numel: int, options: dict, name: str = "") -> int:
    """Bytes of one tensor of ``numel`` weights quantized with ``options`` (any format)."""
    if "format" not in options:
        return estimate_bytes(numel, options["bits"], options["group_size"], options["scheme"])
    t = formats.get(options["format"])
    if numel % t.block_size:
        raise JobError(
            f"tensor {name!r} has {numel} values, not a multiple of {t.name}'s block size "
            f"{t.block_size}; --keep it or choose another --format"
        )
    return wire.tensor_bytes(numel, format=t.name)


def size_desc(options: dict) -> str:
    """What decides the size: ``Q4_K`` or ``4-bit asymmetric, group size 128``."""
    if "format" in options:
        return options["format"]
    return f"{options['bits']}-bit {options['scheme']}, group size {options['group_size']}"


def estimate_stats(source, options: dict, selected=None) -> list[TensorStat]:
    """Per-tensor sizes quantizing would give; ``selected(info)`` says which tensors of a
    tensor file are quantized (default: every float tensor)."""
    stats = []
    if source.kind == "tensors":
        for info in source.infos:
            s = TensorStat(
                info.name,
                shape_text(info.shape),
                info.dtype,
                info.numel,
                info.nbytes,
                passthrough=not (info.is_float if selected is None else selected(info)),
            )
            s.bytes_out = (
                s.bytes_in if s.passthrough else quantized_bytes(info.numel, options, info.name)
            )
            stats.append(s)
        return stats
    if source.kind == "quantized":
        raise JobError("the file is already quantized")
    columns = float_list_columns(source.schema, options.get("columns"))
    key = key_column(source.schema)
    read = columns + ([key] if key else [])
    row = 0
    for batch in source.iter_batches(columns=read):
        keys = batch.column(key).to_pylist() if key else None
        for c in columns:
            col = batch.column(c)
            lens = list_lengths(col)
            size = ARROW_ITEMSIZE.get(col.type.value_type, 4)
            valid = np.asarray(col.is_valid())
            for r in range(batch.num_rows):
                if not valid[r]:
                    continue
                name = str(keys[r]) if keys and keys[r] is not None else f"row {row + r}"
                if len(columns) > 1:
                    name = f"{name} [{c}]"
                n = int(lens[r])
                stats.append(
                    TensorStat(
                        name,
                        f"[{n}]",
                        value_dtype(col.type),
                        n,
                        n * size,
                        bytes_out=quantized_bytes(n, options, name),
                    )
                )
        row += batch.num_rows
    return stats


def print_estimate(source, options: dict, args, selected=None) -> int:
    if source.kind == "table" and is_quantized(source.schema):
        raise JobError(f"{source.path} is already quantized; --estimate needs a plain file")
    stats = estimate_stats(source, options, selected)
    quant = [s for s in stats if not s.passthrough]
    bytes_in = sum(s.bytes_in for s in stats)
    bytes_out = sum(s.bytes_out for s in stats)
    numel = sum(s.numel for s in quant)
    qbytes = sum(s.bytes_out for s in quant)
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "file": str(source.path),
                    "options": options,
                    "tensors": len(stats),
                    "quantized": len(quant),
                    "parameters": numel,
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "ratio": bytes_in / bytes_out if bytes_out else None,
                    "bits_per_weight": 8 * qbytes / numel if numel else None,
                    "per_tensor": [
                        {k: v for k, v in s.to_dict().items() if k != "snr_db"} for s in stats
                    ],
                },
                indent=2,
            )
        )
        return 0
    shown = (
        stats
        if (len(stats) <= MAX_TABLE_ROWS or getattr(args, "verbose", False))
        else sorted(stats, key=lambda s: -s.bytes_in)[:10]
    )
    rows = [
        [
            s.name,
            s.shape,
            s.dtype,
            fmt_bytes(s.bytes_in),
            "kept" if s.passthrough else fmt_bytes(s.bytes_out),
        ]
        for s in shown
    ]
    print(table(["tensor", "shape", "dtype", "size", "quantized"], rows, {3, 4}))
    if len(shown) < len(stats):
        print(
            f"... {len(stats) - len(shown)} more tensors (the 10 largest are shown; -v lists all)"
        )
    print()
    print(
        f"estimate    {size_desc(options)}: "
        f"{len(stats)} tensors ({len(quant)} quantized, {len(stats) - len(quant)} kept), "
        f"{numel:,} weights"
    )
    ratio = f"{bytes_in / bytes_out:.2f}x" if bytes_out else "-"
    bpw = f", {8 * qbytes / numel:.3f} bits/weight" if numel else ""
    print(
        f"bytes       {fmt_bytes(bytes_in)} ({bytes_in:,}) -> {fmt_bytes(bytes_out)} "
        f"({bytes_out:,}), ratio {ratio}{bpw}"
    )
    return 0
