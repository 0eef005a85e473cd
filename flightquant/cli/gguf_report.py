"""What the CLI prints about GGUF files: ``inspect``, ``--estimate`` and the job summary.

Bits per weight count every byte of a tensor's blocks (ggml's scales live inside them), as
llama.cpp's own "BPW" does; "file" figures count the whole file, metadata included.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from typing import Any

from gguf import LlamaFileType

from ..modelfiles import gguf_policy
from ..modelfiles.gguf_files import GGUFFile
from ..modelfiles.gguf_policy import Choice
from .accounting import TensorStat, json_float, snr
from .summary import MAX_TABLE_ROWS, fmt_bytes, fmt_db, table


def _shape(ne) -> str:
    return "[" + ", ".join(map(str, ne)) + "]"


def _bpw(nbytes: int, numel: int) -> str:
    return f"{8 * nbytes / numel:.3f}" if numel else "-"


def _types(items) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(Counter(items).items()))


def _file_type(value) -> str:
    try:
        return LlamaFileType(value).name
    except (ValueError, TypeError):
        return str(value)


def recipe_label(args) -> str:
    """``Q4_K_M``, ``Q4_K_M --pure`` or the size target: what a job writes."""
    return getattr(args, "recipe_label", None) or gguf_policy.recipe(args.format).name


def _target_dict(target, choices: list[Choice], stats=None) -> dict[str, Any] | None:
    if target is None:
        return None
    out: dict[str, Any] = {
        "budget_bytes": target.budget,
        "bytes": sum(c.dst_bytes for c in choices),
        "error": target.error,
        "predicted_error": sum(target.predicted.values()),
        "tensors_chosen": len(target.predicted),
    }
    if stats is not None:
        by = {s.name: s for s in stats}
        got = [target.achieved(by[n]) for n in target.predicted]
        out["achieved_error"] = None if None in got else sum(got)
    return out


def _target_fields(target, name: str, stat=None) -> dict[str, Any]:
    if target is None or name not in target.predicted:
        return {}
    d: dict[str, Any] = {"predicted_error": target.predicted[name],
                         "options": {o.type: [o.bytes, o.error] for o in target.options[name]}}  # fmt: skip
    if stat is not None:
        d["achieved_error"] = target.achieved(stat)
    return d


def _recipe_name(file_type) -> str | None:
    """The llama-quantize name of a ``general.file_type`` (``15`` -> ``Q4_K_M``)."""
    return next(
        (r.name for r in gguf_policy.RECIPES.values() if int(r.file_type) == file_type), None
    )


def _per_type(tensors) -> dict[str, dict[str, Any]]:
    """Per ggml type: tensors, parameters, bytes and bits per weight (largest share first)."""
    out: dict[str, dict[str, Any]] = {}
    for t in tensors:
        d = out.setdefault(t.type, {"tensors": 0, "parameters": 0, "bytes": 0})
        d["tensors"] += 1
        d["parameters"] += t.numel
        d["bytes"] += t.nbytes
    for d in out.values():
        d["bits_per_weight"] = 8 * d["bytes"] / d["parameters"] if d["parameters"] else None
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def inspect_gguf(source: GGUFFile, args: argparse.Namespace) -> int:
    """``flightquant inspect model.gguf``: tensors, types, sizes, bits per weight."""
    tensors = source.tensors
    numel = sum(t.numel for t in tensors)
    nbytes = sum(t.nbytes for t in tensors)
    file_type = source.value("general.file_type")
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(source.path),
                    "format": "gguf",
                    "version": source.version,
                    "architecture": source.architecture,
                    "file_type": None if file_type is None else _file_type(file_type),
                    "alignment": source.alignment,
                    "metadata_keys": source.keys,
                    "tensors": len(tensors),
                    "parameters": numel,
                    "bytes": nbytes,
                    "bits_per_weight": 8 * nbytes / numel if numel else None,
                    "types": dict(Counter(t.type for t in tensors)),
                    "recipe": None if file_type is None else _recipe_name(file_type),
                    "per_type": _per_type(tensors),
                    "per_tensor": [
                        {
                            "name": t.name,
                            "shape": list(t.ne),
                            "type": t.type,
                            "bytes": t.nbytes,
                            "bits_per_weight": 8 * t.nbytes / t.numel if t.numel else None,
                        }
                        for t in tensors
                    ],
                },
                indent=2,
            )
        )
        return 0
    shown = tensors if len(tensors) <= MAX_TABLE_ROWS or args.verbose else tensors[:MAX_TABLE_ROWS]
    rows = [
        [t.name, _shape(t.ne), t.type, fmt_bytes(t.nbytes), _bpw(t.nbytes, t.numel)] for t in shown
    ]
    print(table(["tensor", "shape", "type", "size", "bits/w"], rows, {3, 4}))
    if len(shown) < len(tensors):
        print(f"... {len(tensors) - len(shown)} more tensors (-v lists all)")
    print()
    per = _per_type(tensors)
    rows = [[typ, str(d["tensors"]), f"{d['parameters']:,}", fmt_bytes(d["bytes"]),
             f"{100 * d['bytes'] / nbytes:.1f}%" if nbytes else "-",
             _bpw(d["bytes"], d["parameters"])] for typ, d in per.items()]  # fmt: skip
    print(table(["type", "tensors", "parameters", "size", "share", "bits/w"], rows,
                {1, 2, 3, 4, 5}))  # fmt: skip
    print()
    name = None if file_type is None else _recipe_name(file_type)
    ft = "" if file_type is None else f", file type {_file_type(file_type)}"
    ft += f" (llama-quantize {name})" if name else ""
    print(f"{source.path}: GGUF v{source.version}, {source.architecture or '?'}{ft}")
    print(f"metadata    {len(source.keys)} keys, alignment {source.alignment}")
    print(f"tensors     {len(tensors)} ({_types(t.type for t in tensors)})")
    print(f"parameters  {numel:,}")
    print(
        f"size        {fmt_bytes(nbytes)} of tensor data, {_bpw(nbytes, numel)} bits/weight; "
        f"file {fmt_bytes(source.path.stat().st_size)}"
    )
    return 0


def print_gguf_estimate(source: GGUFFile, choices: list[Choice], target, args) -> int:
    """The types and sizes a GGUF job would give, from the headers alone."""
    bytes_in = sum(c.src_bytes for c in choices)
    bytes_out = sum(c.dst_bytes for c in choices)
    numel = sum(c.numel for c in choices)
    changed = [c for c in choices if c.dst != c.src]
    fallbacks = [c for c in choices if "->" in c.note]
    if getattr(args, "json", False):
        print(
            json.dumps(
                {
                    "file": str(source.path),
                    "format": args.recipe_name,
                    "recipe": recipe_label(args),
                    "target": _target_dict(target, choices),
                    "tensors": len(choices),
                    "changed": len(changed),
                    "fallbacks": len(fallbacks),
                    "parameters": numel,
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "ratio": bytes_in / bytes_out if bytes_out else None,
                    "bits_per_weight": 8 * bytes_out / numel if numel else None,
                    "per_tensor": [
                        {**_choice_dict(c), **_target_fields(target, c.name)} for c in choices
                    ],
                },
                indent=2,
            )
        )
        return 0
    verbose = getattr(args, "verbose", False)
    shown = choices if len(choices) <= MAX_TABLE_ROWS or verbose else changed[:MAX_TABLE_ROWS]
    rows = [
        [
            c.name,
            _shape(c.ne),
            c.src,
            c.dst,
            fmt_bytes(c.src_bytes),
            fmt_bytes(c.dst_bytes),
            _bpw(c.dst_bytes, c.numel),
            c.note,
        ]  # fmt: skip
        for c in shown
    ]
    print(table(["tensor", "shape", "in", "out", "size", "new size", "bits/w", "note"], rows,
                {4, 5, 6}))  # fmt: skip
    if len(shown) < len(choices):
        print(f"... {len(choices) - len(shown)} more tensors (-v lists all)")
    print()
    print(
        f"estimate    {recipe_label(args)}: {len(choices)} tensors ({len(changed)} changed: "
        f"{_types(c.dst for c in changed) or 'none'}; {len(choices) - len(changed)} kept)"
    )
    if fallbacks:
        print(f"fallback    {len(fallbacks)} tensor(s) whose rows do not fit the block size")
    ratio = f"{bytes_in / bytes_out:.2f}x" if bytes_out else "-"
    print(
        f"bytes       {fmt_bytes(bytes_in)} ({bytes_in:,}) -> {fmt_bytes(bytes_out)} "
        f"({bytes_out:,}), ratio {ratio}, {_bpw(bytes_out, numel)} bits/weight"
    )
    return 0


def _choice_dict(c: Choice) -> dict[str, Any]:
    return {"name": c.name, "shape": list(c.ne), "type_in": c.src, "type_out": c.dst,
            "bytes_in": c.src_bytes, "bytes_out": c.dst_bytes, "note": c.note}  # fmt: skip


def print_gguf_summary(
    args,
    choices: list[Choice],
    stats: list[TensorStat],
    seconds: float,
    where: str,
    file_bytes: int,
    target=None,
) -> None:
    """The end of a GGUF job: per tensor, types, sizes and SNR; then the totals."""
    changed = [(c, s) for c, s in zip(choices, stats, strict=True) if c.dst != c.src]
    bytes_in = sum(s.bytes_in for s in stats)
    bytes_out = sum(s.bytes_out for s in stats)
    numel = sum(s.numel for s in stats)
    sig = sum(s.signal or 0.0 for _, s in changed)
    sse = sum(s.sse or 0.0 for _, s in changed)
    has_err = changed and all(s.sse is not None for _, s in changed)
    overall = snr(sig, sse) if has_err else None
    fallbacks = [c for c in choices if "->" in c.note]
    method = args.method
    if args.json:
        per = []
        for c, s in zip(choices, stats, strict=True):
            d = _choice_dict(c)
            d["snr_db"] = json_float(s.snr_db)
            d.update(_target_fields(target, c.name, s))
            per.append(d)
        print(
            json.dumps(
                {
                    "where": where,
                    "format": args.recipe_name,
                    "recipe": recipe_label(args),
                    "target": _target_dict(target, choices, stats),
                    "method": method,
                    "tensors": len(stats),
                    "quantized": sum(1 for c in choices if c.quantize),
                    "converted": sum(1 for c in choices if c.convert),
                    "kept": len(stats) - len(changed),
                    "fallbacks": len(fallbacks),
                    "parameters": numel,
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "file_bytes": file_bytes,
                    "ratio": bytes_in / bytes_out if bytes_out else None,
                    "bits_per_weight": 8 * bytes_out / numel if numel else None,
                    "snr_db": json_float(overall),
                    "seconds": seconds,
                    "per_tensor": per,
                },
                indent=2,
            )
        )
        return
    pairs = list(zip(choices, stats, strict=True))
    if len(pairs) > MAX_TABLE_ROWS and not args.verbose:
        ranked = sorted(changed, key=lambda p: p[1].snr_db if p[1].snr_db is not None else math.inf)
        shown = ranked[:10]
        more = f"... {len(pairs) - len(shown)} more tensors (the 10 lowest SNR are shown; -v lists all)"
    else:
        shown, more = pairs, ""
    rows = [
        [
            c.name,
            _shape(c.ne),
            c.src if c.dst == c.src else f"{c.src}->{c.dst}",
            fmt_bytes(s.bytes_in),
            fmt_bytes(s.bytes_out),
            _bpw(s.bytes_out, s.numel),
            "kept" if c.dst == c.src else fmt_db(s.snr_db),
            c.note,
        ]  # fmt: skip
        for c, s in shown
    ]
    print(table(["tensor", "shape", "type", "in", "out", "bits/w", "SNR dB", "note"], rows,
                {3, 4, 5, 6}))  # fmt: skip
    if more:
        print(more)
    print()
    print(
        f"tensors     {len(stats)} ({_types(c.dst for c, _ in changed) or 'none changed'}; "
        f"{len(stats) - len(changed)} kept as they are)"
    )
    if fallbacks:
        print(
            f"fallback    {len(fallbacks)} tensor(s) whose rows do not fit the block size: "
            + ", ".join(f"{c.name} -> {c.dst}" for c in fallbacks[:3])
            + (" ..." if len(fallbacks) > 3 else "")
        )
    print(f"options     {recipe_label(args)} {method} ({where})")
    ratio = f"{bytes_in / bytes_out:.2f}x" if bytes_out else "-"
    print(
        f"bytes       {fmt_bytes(bytes_in)} in -> {fmt_bytes(bytes_out)} out (ratio {ratio}, "
        f"{_bpw(bytes_out, numel)} bits/weight); file {fmt_bytes(file_bytes)}"
    )
    print(f"SNR         {fmt_db(overall)} dB over the tensors changed")
    t = _target_dict(target, choices, stats)
    if t is not None:
        achieved = t["achieved_error"]
        print(
            f"target      {fmt_bytes(t['budget_bytes'])} for the tensors: "
            f"{fmt_bytes(t['bytes'])} used; {t['error']} squared error predicted "
            f"{t['predicted_error']:.4g}, "
            f"achieved {'-' if achieved is None else f'{achieved:.4g}'} "
            f"over the {t['tensors_chosen']} tensors chosen"
        )
    rate = bytes_in / seconds if seconds > 0 else 0
    print(f"time        {seconds:.2f} s ({fmt_bytes(rate)}/s)")
