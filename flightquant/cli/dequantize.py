"""``flightquant dequantize INPUT -o OUTPUT``: restore a quantized file to float tensors."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import modelfiles, wire
from ..modelfiles import TensorInfo
from .common import (
    JobError,
    Runner,
    add_output_options,
    add_remote_options,
    check_not_same,
    command,
    is_quantized,
    never_empty,
    one_line_errors,
    progress,
    read_ahead,
    release,
)
from .summary import fmt_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dequantize`` to the ``flightquant`` parser."""
    d = subparsers.add_parser(
        "dequantize",
        help="restore a quantized file to float tensors",
        description=(
            "Restore the tensors of a quantized INPUT (.arrow/.parquet written by "
            "`flightquant quantize`) into OUTPUT (.safetensors, .npz, .arrow or .parquet) "
            "with their original dtypes and shapes."
        ),
    )
    d.add_argument("input", metavar="INPUT")
    d.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT",
        required=True,
        help=".safetensors, .npz, .arrow or .parquet",
    )
    add_remote_options(d)
    add_output_options(d)
    d.set_defaults(func=run)
    one_line_errors(d)


# --------------------------------------------------------------------------- dequantize


@command
def run(args: argparse.Namespace) -> int:
    """``flightquant dequantize INPUT -o OUTPUT``."""
    fmt = modelfiles.output_format(args.output, ("safetensors", "npz", "arrow", "parquet"))
    source = modelfiles.open_input(args.input)
    if source.kind != "table" or not is_quantized(source.schema):
        raise JobError(
            f"{args.input} holds no quantized columns: nothing to dequantize "
            "(it must be an .arrow/.parquet file written by `flightquant quantize`)"
        )
    check_not_same(args.input, args.output)
    modelfiles.check_output_path(args.output)  # before any work
    tensor_out = fmt in ("safetensors", "npz")
    if tensor_out and not modelfiles.is_tensor_layout(source.schema):
        raise JobError(
            f"{args.input} has no layer_name/weights columns, so its rows are not "
            "named tensors; write .arrow or .parquet instead"
        )
    infos = tensor_infos(source) if fmt == "safetensors" else None
    runner = Runner(args)
    t0 = time.perf_counter()
    bar = progress(args, source.num_rows, "dequantize")
    tensors = 0
    writer = None
    stream = runner.dequantize(read_ahead(never_empty(source.iter_batches(), source.schema, None)))
    try:
        with modelfiles.atomic_output(args.output) as tmp, _naming(args):
            if fmt == "safetensors":
                st_meta = source.metadata.get(wire.K_SAFETENSORS)
                where = f"{args.input}: schema metadata {wire.K_SAFETENSORS.decode()}"
                writer = modelfiles.SafetensorsWriter(
                    tmp, infos, modelfiles.parse_json(st_meta, where) if st_meta else None
                )
            elif fmt == "npz":
                writer = modelfiles.NpzWriter(tmp)
            for out in stream:
                if tensor_out:
                    rows = modelfiles.tensors_from_batch(
                        out, npz_safe=fmt == "npz", float32=fmt == "safetensors"
                    )  # the safetensors writer narrows float32 itself, through one buffer
                    for name, arr in rows:
                        writer.write(name, arr)
                        tensors += 1
                else:
                    if writer is None:
                        writer = modelfiles.TableWriter(tmp, fmt, out.schema)
                    writer.write(out)
                    tensors += out.num_rows
                bar.update(out.num_rows)
            writer.close()
            writer = None
    finally:
        release(bar, writer, stream, runner, source)
    seconds = time.perf_counter() - t0
    if not args.quiet:
        size = Path(args.output).stat().st_size
        what = "tensors" if tensor_out else "rows"
        if args.json:
            print(
                json.dumps(
                    {"where": runner.where, what: tensors, "file_bytes": size, "seconds": seconds},
                    indent=2,
                )
            )
        else:
            print(
                f"{tensors} {what} -> {args.output} ({fmt_bytes(size)}) in {seconds:.2f} s "
                f"({runner.where})"
            )
    return 0


@contextmanager
def _naming(args: argparse.Namespace) -> Iterator[None]:
    """A tensor of INPUT that cannot be written (its shape, dtype or metadata) is an error
    naming INPUT."""
    try:
        yield
    except modelfiles.ModelIOError as exc:
        text = str(exc)
        if args.input in text or args.output in text:
            raise
        raise JobError(f"{args.input}: {text}") from None


#: the numel column of a tensor-layout file's quantized ``weights``
_NUMEL = wire.derived_name("weights", "numel")


def tensor_infos(source) -> list[TensorInfo]:
    """Names, shapes and original dtypes of a quantized tensor-layout file, without decoding."""
    names = source.schema.names
    cols = ["layer_name"] + [c for c in ("shape", "dtype", _NUMEL) if c in names]
    table = source.read_columns(cols)
    field_md = source.schema.field("weights").metadata or {}
    default = field_md.get(wire.K_DTYPE, b"float32").decode()
    lname = table.column("layer_name").to_pylist()
    shapes = table.column("shape").to_pylist() if "shape" in cols else None
    dtypes = table.column("dtype").to_pylist() if "dtype" in cols else None
    numel = table.column(_NUMEL).to_pylist() if _NUMEL in cols else None
    infos = []
    for r, name in enumerate(lname):
        shape = shapes[r] if shapes and shapes[r] is not None else [numel[r] if numel else 0]
        infos.append(TensorInfo(name, tuple(shape), (dtypes[r] if dtypes else None) or default))
    return infos
