"""The ``quantize``, ``dequantize`` and ``inspect`` sub-commands.

The CLI reads and writes files (:mod:`flightquant.modelio`) and hands RecordBatches to
``flightquant.quantize``/``dequantize`` (the embedded default) or, with ``--server``, to a
:class:`flightquant.Client`; it knows nothing of kernels. Both paths see the same batches,
so they write byte-identical files.

Every failure ends as ONE line on stderr (``flightquant: error: ...``) and a non-zero exit
status; outputs are written to a temporary file beside OUTPUT and renamed at the end, so a
failed or interrupted job leaves nothing behind. ``FLIGHTQUANT_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import modelio
from .modelio import TensorInfo

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: per-tensor rows shown in the summary before it lists only the worst ones
MAX_TABLE_ROWS = 25


# --------------------------------------------------------------------------- parsers


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quantize``, ``dequantize`` and ``inspect`` to the ``flightquant`` parser."""
    q = subparsers.add_parser(
        "quantize",
        help="quantize the float tensors of a model or table file",
        description=(
            "Quantize the float tensors of INPUT (.safetensors, .npz, .npy, .arrow/.feather, "
            ".parquet) into OUTPUT (.arrow or .parquet). Runs in-process unless --server is "
            "given. Non-float tensors pass through untouched."
        ),
    )
    q.add_argument("input", metavar="INPUT")
    q.add_argument("-o", "--output", metavar="OUTPUT", help=".arrow (Arrow IPC file) or .parquet")
    _add_quant_options(q)
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
    _add_remote_options(q)
    q.add_argument(
        "--max-batch-bytes",
        type=_positive_int,
        default=modelio.DEFAULT_BATCH_BYTES,
        metavar="N",
        help="float payload per RecordBatch sent (default: 64 MiB)",
    )
    _add_output_options(q)
    q.set_defaults(func=run_quantize)

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
    _add_remote_options(d)
    _add_output_options(d)
    d.set_defaults(func=run_dequantize)

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
    _add_quant_options(i)
    i.add_argument("-v", "--verbose", action="store_true", help="list every tensor")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=run_inspect)

    for p in (q, d, i):
        _one_line_errors(p)


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    # no argparse `choices`: QuantOptions validates, so a bad value is one clear line
    p.add_argument("--bits", type=int, default=None, help="2, 4 or 8 (default 4; ternary: 2)")
    p.add_argument(
        "--group-size", type=int, default=128, metavar="N", help="elements per scale (default 128)"
    )
    p.add_argument(
        "--scheme", default="asymmetric", help="asymmetric (default), symmetric or ternary"
    )
    p.add_argument("--method", default="rtn", help="rtn (default) or mse")
    p.add_argument(
        "--clip", type=float, default=None, metavar="X", help="clamp inputs to [-X, X] first"
    )


def _add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        action="append",
        metavar="URL",
        dest="servers",
        help="stream through this flightquant server, e.g. grpc://host:8815 "
        "(repeatable: spread and fail over)",
    )
    p.add_argument("--token-file", metavar="PATH", help="file holding the servers' bearer token")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="kernel threads in-process (default: all cores)",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("-v", "--verbose", action="store_true", help="list every tensor in the summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make a usage error ONE line on stderr instead of usage + message."""

    def error(message: str):
        sys.stderr.write(f"flightquant: error: {parser.prog.split()[-1]}: {message}\n")
        sys.exit(EXIT_USAGE)

    parser.error = error  # type: ignore[method-assign]
    # unknown arguments would reach the top-level parser, which prints usage too: refuse
    # them here (argparse's sub-command action calls parse_known_args on this parser)
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse_known(args, namespace)
        if extras:
            error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


# --------------------------------------------------------------------------- errors


class JobError(Exception):
    """A failure whose message is already what the user should read."""


def _cli(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; turn every failure into one line on stderr and an exit status."""

    def run(args: argparse.Namespace) -> int:
        if os.environ.get("FLIGHTQUANT_DEBUG"):
            return func(args)
        try:
            with _held_warnings(quiet=getattr(args, "quiet", False)):
                return func(args)
        except KeyboardInterrupt:
            _fail("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # e.g. `flightquant inspect x | head`
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            except OSError:
                pass
            return EXIT_ERROR
        except Exception as exc:  # noqa: BLE001 - the CLI's one place for that
            _fail(_message(exc))
            return EXIT_ERROR

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(" ".join(record.getMessage().split()))


@contextmanager
def _held_warnings(quiet: bool) -> Iterator[None]:
    """Hold the package's log warnings (e.g. a client failing over) until the job ends.

    On success they are printed (``flightquant: warning: ...``) unless ``--quiet``; on
    failure they are dropped, so the error stays ONE line.
    """
    logger = logging.getLogger("flightquant")
    held = _Held()
    saved = logger.propagate
    logger.addHandler(held)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(held)
        logger.propagate = saved
    if not quiet:
        for line in held.lines:
            sys.stderr.write(f"flightquant: warning: {line}\n")


def _fail(message: str) -> None:
    sys.stderr.write(f"flightquant: error: {message}\n")
    sys.stderr.flush()


def _message(exc: BaseException) -> str:
    """One line a person can act on, from any exception (Flight ones included)."""
    text = str(exc).strip()
    # Flight errors: "Flight returned ... error, with message: <msg>. gRPC client debug context: ..."
    for marker in (
        ". gRPC client debug context",
        "gRPC client debug context",
        ". Detail:",
        "\nDetail:",
    ):
        if marker in text:
            text = text.split(marker, 1)[0]
    if "with message: " in text:
        text = text.split("with message: ", 1)[1]
    line = " ".join(text.split()) if text else ""
    known = (ValueError, OSError, JobError, pa.ArrowException)
    if not line:
        line = type(exc).__name__
    elif not isinstance(exc, known):
        line = f"{type(exc).__name__}: {line}"
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in line:
        line = f"{exc.filename}: {line}"
    return line


# --------------------------------------------------------------------------- runners


class _Runner:
    """In-process ``flightquant.quantize``/``dequantize`` or a ``Client`` over --server."""

    def __init__(self, args: argparse.Namespace):
        self.servers = list(args.servers or [])
        self.threads = args.threads
        self.client = None
        token = None
        if args.token_file:
            token = _read_token(args.token_file)
            if not self.servers:
                raise JobError("--token-file needs --server")
        if self.servers:
            from .client import Client

            self.client = Client(
                self.servers if len(self.servers) > 1 else self.servers[0], token=token
            )

    @property
    def where(self) -> str:
        if not self.servers:
            return "in-process"
        return "via " + ", ".join(self.servers)

    def quantize(
        self, batches: Iterable[pa.RecordBatch], **options: Any
    ) -> Iterator[pa.RecordBatch]:
        if self.client is not None:
            return iter(self.client.quantize(batches, **options))
        import flightquant

        return iter(flightquant.quantize(batches, threads=self.threads, **options))

    def dequantize(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        if self.client is not None:
            return iter(self.client.dequantize(batches))
        import flightquant

        return iter(flightquant.dequantize(batches, threads=self.threads))

    def close(self) -> None:
        if self.client is not None and hasattr(self.client, "close"):
            self.client.close()


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise JobError(f"--token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise JobError(f"--token-file {path}: the file is empty")
    return token


def _options(args: argparse.Namespace, columns: list[str] | None) -> dict[str, Any]:
    from .options import QuantOptions

    mapping: dict[str, Any] = {
        "bits": args.bits, "group_size": args.group_size, "scheme": args.scheme,
        "method": args.method, "clip": args.clip,
    }  # fmt: skip
    if mapping["bits"] is None:
        del mapping["bits"]  # ternary picks 2, the others 4
    if columns:
        mapping["columns"] = list(columns)
    opts = QuantOptions.from_mapping(mapping)  # raises OptionsError with a clear message
    out = {"bits": opts.bits, "group_size": opts.group_size, "scheme": opts.scheme,
           "method": opts.method}  # fmt: skip
    if opts.clip is not None:
        out["clip"] = opts.clip
    if opts.columns is not None:
        out["columns"] = list(opts.columns)
    return out


# --------------------------------------------------------------------------- accounting


@dataclass
class TensorStat:
    """One tensor of a job: what went in, what came out, how far off."""

    name: str
    shape: str
    dtype: str
    numel: int
    bytes_in: int
    bytes_out: int = 0
    signal: float | None = None  # sum of squares of the (float32) input
    sse: float | None = None  # sum of squared error
    passthrough: bool = False

    @property
    def snr_db(self) -> float | None:
        return _snr(self.signal, self.sse)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype,
                "numel": self.numel, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "snr_db": _json_float(self.snr_db), "passthrough": self.passthrough}  # fmt: skip


def _snr(signal: float | None, sse: float | None) -> float | None:
    if signal is None or sse is None:
        return None
    if sse <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / sse)


def _json_float(x: float | None):
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"


def _row_signal(col: pa.Array) -> np.ndarray:
    """Per-row sum of squares of a float list column (0 for null/empty rows), for the SNR.

    Few rows (tensors): one BLAS dot per row, ~10x faster than squaring into float64. Many
    rows (e.g. embeddings): one vectorised pass. Precision ~1e-5 relative: plenty for dB.
    """
    offsets, values = modelio._list_parts(col)
    n = len(offsets) - 1
    out = np.zeros(n, np.float64)
    lens = np.diff(offsets)
    if n == 0 or not lens.any():
        return out
    if values.dtype != np.float32:
        values = values.astype(np.float32)
    if n <= 1024:
        for r in np.flatnonzero(lens):
            v = values[offsets[r] : offsets[r + 1]]
            out[r] = float(np.dot(v, v))
        return out
    lo, hi = int(offsets[0]), int(offsets[-1])
    sq = np.square(values[lo:hi])
    nonempty = lens > 0
    # reduceat sums from each start to the next one: right, as rows are contiguous and in order
    out[nonempty] = np.add.reduceat(sq, (offsets[:-1] - lo)[nonempty])
    return out


def _binary_lengths(col: pa.Array) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.binary_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _list_lengths(col: pa.Array) -> np.ndarray:
    if pa.types.is_fixed_size_list(col.type):
        lens = np.full(len(col), col.type.list_size, np.int64)
    else:
        lens = np.diff(np.asarray(col.offsets, dtype=np.int64))
    if col.null_count:
        lens[~np.asarray(col.is_valid())] = 0
    return lens


def _float_list_columns(schema: pa.Schema, names: list[str] | None) -> list[str]:
    picked = []
    for f in schema:
        t = f.type
        if (
            pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        ) and pa.types.is_floating(t.value_type):
            if names is None or f.name in names:
                picked.append(f.name)
    return picked


def _key_column(schema: pa.Schema) -> str | None:
    for f in schema:
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            return f.name
    return None


_ITEMSIZE = {pa.float16(): 2, pa.float32(): 4, pa.float64(): 8}


def _value_dtype(list_type: pa.DataType) -> str:
    return modelio._ARROW_FLOAT.get(list_type.value_type, str(list_type.value_type))


class _Ledger:
    """Matches each output batch with the input batch it came from (same order, same rows)."""

    def __init__(self, tensor_mode: bool, columns: list[str]):
        self.tensor_mode = tensor_mode
        self.columns = columns
        self.pending: deque[tuple[list[str], list[TensorStat]]] = deque()
        self.stats: list[TensorStat] = []
        self.bytes_in = 0
        self.rows_seen = 0

    def feed(
        self, batches: Iterable[pa.RecordBatch], infos: deque | None
    ) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            self.pending.append(self._record(batch, infos.popleft() if infos is not None else None))
            yield batch

    def _record(self, batch: pa.RecordBatch, infos: list[TensorInfo] | None):
        rows: list[TensorStat] = []
        if self.tensor_mode:
            signal = _row_signal(batch.column("weights"))
            for r, info in enumerate(infos or []):
                rows.append(
                    TensorStat(
                        info.name,
                        _shape_text(info.shape),
                        info.dtype,
                        info.numel,
                        info.nbytes,
                        signal=float(signal[r]) if info.is_float else None,
                        passthrough=not info.is_float,
                    )
                )
            self.bytes_in += sum(s.bytes_in for s in rows)
            return ["weights"], rows
        key = _key_column(batch.schema)
        keys = batch.column(key).to_pylist() if key else None
        for c in self.columns:
            col = batch.column(c)
            signal = _row_signal(col)
            lens = _list_lengths(col)
            size = _ITEMSIZE.get(col.type.value_type, 4)
            valid = np.asarray(col.is_valid())
            for r in range(batch.num_rows):
                if not valid[r]:
                    rows.append(None)  # type: ignore[arg-type]
                    continue
                name = str(keys[r]) if keys and keys[r] is not None else f"row {self.rows_seen + r}"
                if len(self.columns) > 1:
                    name = f"{name} [{c}]"
                rows.append(
                    TensorStat(
                        name,
                        f"[{int(lens[r])}]",
                        _value_dtype(col.type),
                        int(lens[r]),
                        int(lens[r]) * size,
                        signal=float(signal[r]),
                    )
                )
        self.rows_seen += batch.num_rows
        self.bytes_in += sum(s.bytes_in for s in rows if s is not None)
        return self.columns, rows

    def settle(self, out: pa.RecordBatch) -> int:
        """Account one output batch; returns the input bytes it covers (for the progress bar)."""
        if not self.pending:
            raise JobError("got more output batches than were sent")
        columns, rows = self.pending.popleft()
        n = out.num_rows
        if len(rows) != n * len(columns) and not (self.tensor_mode and len(rows) == n):
            raise JobError(f"an output batch has {n} rows, its input had a different count")
        done = 0
        for ci, c in enumerate(columns):
            codes = _binary_lengths(out.column(c))
            extra = _list_lengths(out.column(f"{c}_scales")) * 4
            if f"{c}_zero_points" in out.schema.names:
                extra = extra + _list_lengths(out.column(f"{c}_zero_points")) * 4
            mse = (
                out.column(f"{c}_mse").to_numpy(zero_copy_only=False)
                if f"{c}_mse" in out.schema.names
                else None
            )
            for r in range(n):
                s = rows[ci * n + r] if not self.tensor_mode else rows[r]
                if s is None:
                    continue
                if s.passthrough:
                    s.bytes_out = s.bytes_in
                else:
                    s.bytes_out = int(codes[r] + extra[r])
                    if mse is not None and not np.isnan(mse[r]):
                        s.sse = float(mse[r]) * s.numel
                self.stats.append(s)
                done += s.bytes_in
        return done


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


# --------------------------------------------------------------------------- quantize


@_cli
def run_quantize(args: argparse.Namespace) -> int:
    """``flightquant quantize INPUT -o OUTPUT``."""
    options = _options(args, args.columns)
    source = modelio.open_input(args.input)
    if source.kind == "table" and _is_quantized(source.schema):
        raise JobError(f"{args.input} is already quantized; `flightquant dequantize` restores it")
    if args.estimate:
        return _print_estimate(source, options, args)
    if not args.output:
        raise JobError("quantize needs -o OUTPUT (.arrow or .parquet), or --estimate")
    fmt = modelio.output_format(args.output, ("arrow", "parquet"))
    _check_not_same(args.input, args.output)
    runner = _Runner(args)
    t0 = time.perf_counter()
    meta: dict[bytes, bytes] = {b"flightquant.source_format": source.format.encode()}
    if source.kind == "tensors":
        infos_q: deque[list[TensorInfo]] | None = deque()
        batches = modelio.tensor_batches(
            source, max_batch_bytes=args.max_batch_bytes, on_batch=infos_q.append
        )
        batches = _never_empty(batches, modelio.TENSOR_SCHEMA, lambda: infos_q.append([]))
        ledger = _Ledger(True, ["weights"])
        options = {**options, "columns": ["weights"]}
        total = source.nbytes
        if source.format == "safetensors" and source.metadata:
            meta[modelio.META_SAFETENSORS] = json.dumps(source.metadata, sort_keys=True).encode()
    else:
        infos_q = None
        columns = _float_list_columns(source.schema, options.get("columns"))
        missing = sorted(set(options.get("columns") or []) - set(columns))
        if missing:
            raise JobError(
                f"{args.input}: column(s) {', '.join(map(repr, missing))} are not "
                f"float list columns of the file (it has: {', '.join(source.schema.names)})"
            )
        ledger = _Ledger(False, columns)
        batches = _never_empty(source.iter_batches(args.max_batch_bytes), source.schema, None)
        total = None
    bar = _progress(args, total, "quantize")
    writer = None
    stream = runner.quantize(_read_ahead(ledger.feed(batches, infos_q)), stats=True, **options)
    try:
        with modelio.atomic_output(args.output) as tmp:
            for out in stream:
                done = ledger.settle(out)
                if writer is None:
                    writer = modelio.TableWriter(
                        tmp, fmt, out.schema.with_metadata({**(out.schema.metadata or {}), **meta})
                    )
                writer.write(out)
                bar.update(done if total is not None else out.num_rows)
            if writer is None:  # pragma: no cover - _never_empty sends at least one batch
                raise JobError("the job produced no output")
            writer.close()
            writer = None
    finally:
        _release(bar, writer, stream, runner, source)
    seconds = time.perf_counter() - t0
    if not args.quiet:
        _print_summary(
            args, ledger.stats, seconds, options, runner.where, Path(args.output).stat().st_size
        )
    return 0


def _read_ahead(items: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Produce ``items`` in a background thread, ``depth`` ahead of the consumer.

    Reading, widening and packing the next batch (NumPy and Arrow release the GIL) then
    overlap with the kernels working on this one. Errors re-raise in the consumer, in order.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put((exc, None))

    thread = threading.Thread(target=produce, name="flightquant-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _never_empty(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, on_empty
) -> Iterator[pa.RecordBatch]:
    """Yield the batches; if there are none, one empty batch, so OUTPUT gets its schema."""
    any_batch = False
    for b in batches:
        any_batch = True
        yield b
    if not any_batch:
        if on_empty is not None:
            on_empty()
        yield pa.RecordBatch.from_pylist([], schema=schema)


def _check_not_same(src: str, dst: str) -> None:
    try:
        if Path(dst).exists() and os.path.samefile(src, dst):
            raise JobError(f"OUTPUT {dst} is the INPUT file; choose another path")
    except OSError:
        pass


def _release(bar, writer, stream, runner, source) -> None:
    """End a job's resources, whether it finished or failed: the progress bar, a writer
    still open (modelio's atomic-output context removes its temporary file), the result
    stream, the server connection and the input file."""
    bar.close()
    if writer is not None:
        _quietly(writer.close)
    if hasattr(stream, "close"):
        _quietly(stream.close)
    runner.close()
    source.close()


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - cleanup after an error already being reported
        pass


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(args: argparse.Namespace, total: int | None, desc: str):
    if args.quiet or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    if total is None:
        return tqdm(desc=desc, unit=" rows", file=sys.stderr, leave=False, dynamic_ncols=True)
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------- summary


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _summary_dict(
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
        "snr_db": _json_float(_snr(signal, sse) if quant else None),
        "seconds": seconds,
        "throughput_bytes_per_s": bytes_in / seconds if seconds > 0 else None,
        "per_tensor": [s.to_dict() for s in stats],
    }


def _print_summary(
    args, stats: list[TensorStat], seconds: float, options: dict, where: str, file_bytes: int
) -> None:
    summary = _summary_dict(stats, seconds, options, where, file_bytes)
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
            _fmt_bytes(s.bytes_in),
            _fmt_bytes(s.bytes_out),
            f"{s.bytes_in / s.bytes_out:.2f}x" if s.bytes_out else "-",
            "pass" if s.passthrough else _fmt_db(s.snr_db),
        ]
        for s in shown
    ]
    print(_table(["tensor", "shape", "dtype", "in", "out", "ratio", "SNR dB"], rows, {3, 4, 5, 6}))
    if note:
        print(note)
    o = options
    desc = f"{o['bits']}-bit {o['scheme']} {o['method']}, group size {o['group_size']}"
    if o.get("clip") is not None:
        desc += f", clip {o['clip']:g}"
    s = summary
    print()
    print(
        f"tensors     {s['tensors']} ({s['quantized']} quantized, {s['passthrough']} passed through)"
    )
    print(f"options     {desc} ({where})")
    ratio = f"{s['ratio']:.2f}x" if s["ratio"] else "-"
    bpw = f", {s['bits_per_weight']:.3f} bits/weight" if s["bits_per_weight"] else ""
    print(
        f"bytes       {_fmt_bytes(s['bytes_in'])} in -> {_fmt_bytes(s['bytes_out'])} out "
        f"(ratio {ratio}{bpw}); file {_fmt_bytes(file_bytes)}"
    )
    print(f"SNR         {_fmt_db(_snr_of(s))} dB overall" + _worst(stats))
    rate = s["throughput_bytes_per_s"]
    print(
        f"time        {seconds:.2f} s ({_fmt_bytes(rate) + '/s' if rate else '-'}, "
        f"{s['parameters'] / seconds / 1e6 if seconds > 0 else 0:.1f} M weights/s)"
    )


def _snr_of(summary: dict) -> float | None:
    x = summary["snr_db"]
    if isinstance(x, str):
        return math.inf if x == "inf" else -math.inf
    return x


def _worst(stats: list[TensorStat]) -> str:
    quant = [s for s in stats if s.snr_db is not None]
    if len(quant) < 2:
        return ""
    w = min(quant, key=lambda s: s.snr_db)
    return f", lowest {_fmt_db(w.snr_db)} dB ({w.name})"


# --------------------------------------------------------------------------- estimate


def estimate_bytes(numel: int, bits: int, group_size: int, scheme: str) -> int:
    """Bytes of one quantized tensor: packed codes, float32 scales (+ zero points).

    The same count ``quantize`` reports as "out" (the per-row ``*_numel`` int64 and the
    Arrow offsets are not counted).
    """
    groups = -(-numel // group_size)
    per_group = 8 if scheme == "asymmetric" else 4
    return -(-numel * bits // 8) + groups * per_group


def _estimate_stats(source, options: dict) -> list[TensorStat]:
    bits, gs, scheme = options["bits"], options["group_size"], options["scheme"]
    stats = []
    if source.kind == "tensors":
        for info in source.infos:
            s = TensorStat(
                info.name,
                _shape_text(info.shape),
                info.dtype,
                info.numel,
                info.nbytes,
                passthrough=not info.is_float,
            )
            s.bytes_out = (
                s.bytes_in if s.passthrough else estimate_bytes(info.numel, bits, gs, scheme)
            )
            stats.append(s)
        return stats
    if source.kind == "quantized":
        raise JobError("the file is already quantized")
    columns = _float_list_columns(source.schema, options.get("columns"))
    key = _key_column(source.schema)
    read = columns + ([key] if key else [])
    row = 0
    for batch in source.iter_batches(columns=read):
        keys = batch.column(key).to_pylist() if key else None
        for c in columns:
            col = batch.column(c)
            lens = _list_lengths(col)
            size = _ITEMSIZE.get(col.type.value_type, 4)
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
                        _value_dtype(col.type),
                        n,
                        n * size,
                        bytes_out=estimate_bytes(n, bits, gs, scheme),
                    )
                )
        row += batch.num_rows
    return stats


def _print_estimate(source, options: dict, args) -> int:
    if source.kind == "table" and _is_quantized(source.schema):
        raise JobError(f"{source.path} is already quantized; --estimate needs a plain file")
    stats = _estimate_stats(source, options)
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
            _fmt_bytes(s.bytes_in),
            "pass" if s.passthrough else _fmt_bytes(s.bytes_out),
        ]
        for s in shown
    ]
    print(_table(["tensor", "shape", "dtype", "size", "quantized"], rows, {3, 4}))
    if len(shown) < len(stats):
        print(
            f"... {len(stats) - len(shown)} more tensors (the 10 largest are shown; -v lists all)"
        )
    o = options
    print()
    print(
        f"estimate    {o['bits']}-bit {o['scheme']}, group size {o['group_size']}: "
        f"{len(stats)} tensors ({len(quant)} quantized, {len(stats) - len(quant)} passed through), "
        f"{numel:,} weights"
    )
    ratio = f"{bytes_in / bytes_out:.2f}x" if bytes_out else "-"
    bpw = f", {8 * qbytes / numel:.3f} bits/weight" if numel else ""
    print(
        f"bytes       {_fmt_bytes(bytes_in)} ({bytes_in:,}) -> {_fmt_bytes(bytes_out)} "
        f"({bytes_out:,}), ratio {ratio}{bpw}"
    )
    return 0


def _is_quantized(schema: pa.Schema) -> bool:
    from .codec import is_quantized_schema

    return is_quantized_schema(schema)


# --------------------------------------------------------------------------- dequantize


@_cli
def run_dequantize(args: argparse.Namespace) -> int:
    """``flightquant dequantize INPUT -o OUTPUT``."""
    fmt = modelio.output_format(args.output, ("safetensors", "npz", "arrow", "parquet"))
    source = modelio.open_input(args.input)
    if source.kind != "table" or not _is_quantized(source.schema):
        raise JobError(
            f"{args.input} holds no quantized columns: nothing to dequantize "
            "(it must be an .arrow/.parquet file written by `flightquant quantize`)"
        )
    _check_not_same(args.input, args.output)
    tensor_out = fmt in ("safetensors", "npz")
    if tensor_out and not modelio.is_tensor_layout(source.schema):
        raise JobError(
            f"{args.input} has no layer_name/weights columns, so its rows are not "
            "named tensors; write .arrow or .parquet instead"
        )
    infos = _tensor_infos(source) if fmt == "safetensors" else None
    runner = _Runner(args)
    t0 = time.perf_counter()
    bar = _progress(args, source.num_rows, "dequantize")
    tensors = 0
    writer = None
    stream = runner.dequantize(
        _read_ahead(_never_empty(source.iter_batches(), source.schema, None))
    )
    try:
        with modelio.atomic_output(args.output) as tmp:
            if fmt == "safetensors":
                st_meta = source.metadata.get(modelio.META_SAFETENSORS)
                writer = modelio.SafetensorsWriter(
                    tmp, infos, json.loads(st_meta) if st_meta else None
                )
            elif fmt == "npz":
                writer = modelio.NpzWriter(tmp)
            for out in stream:
                if tensor_out:
                    for name, arr in modelio.tensors_from_batch(out, npz_safe=fmt == "npz"):
                        writer.write(name, arr)
                        tensors += 1
                else:
                    if writer is None:
                        writer = modelio.TableWriter(tmp, fmt, out.schema)
                    writer.write(out)
                    tensors += out.num_rows
                bar.update(out.num_rows)
            writer.close()
            writer = None
    finally:
        _release(bar, writer, stream, runner, source)
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
                f"{tensors} {what} -> {args.output} ({_fmt_bytes(size)}) in {seconds:.2f} s "
                f"({runner.where})"
            )
    return 0


def _tensor_infos(source) -> list[TensorInfo]:
    """Names, shapes and original dtypes of a quantized tensor-layout file, without decoding."""
    names = source.schema.names
    cols = ["layer_name"] + [c for c in ("shape", "dtype", "weights_numel") if c in names]
    table = source.read_columns(cols)
    field_md = source.schema.field("weights").metadata or {}
    default = field_md.get(b"flightquant.dtype", b"float32").decode()
    lname = table.column("layer_name").to_pylist()
    shapes = table.column("shape").to_pylist() if "shape" in cols else None
    dtypes = table.column("dtype").to_pylist() if "dtype" in cols else None
    numel = table.column("weights_numel").to_pylist() if "weights_numel" in cols else None
    infos = []
    for r, name in enumerate(lname):
        shape = shapes[r] if shapes and shapes[r] is not None else [numel[r] if numel else 0]
        infos.append(TensorInfo(name, tuple(shape), (dtypes[r] if dtypes else None) or default))
    return infos


# --------------------------------------------------------------------------- inspect


@_cli
def run_inspect(args: argparse.Namespace) -> int:
    """``flightquant inspect FILE``."""
    source = modelio.open_input(args.file)
    try:
        if args.estimate:
            return _print_estimate(source, _options(args, None), args)
        if source.kind == "tensors":
            return _inspect_tensors(source, args)
        if _is_quantized(source.schema):
            return _inspect_quantized(source, args)
        return _inspect_table(source, args)
    finally:
        source.close()


def _inspect_tensors(source, args) -> int:
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
        _table(
            ["tensor", "shape", "dtype", "size"],
            [[i.name, _shape_text(i.shape), i.dtype, _fmt_bytes(i.nbytes)] for i in shown],
            {3},
        )
    )
    if len(shown) < len(infos):
        print(f"... {len(infos) - len(shown)} more tensors (-v lists all)")
    print()
    print(f"{source.path}: {source.format}, not quantized")
    print(f"tensors     {len(infos)} ({', '.join(f'{k} {v}' for k, v in sorted(dtypes.items()))})")
    print(f"parameters  {numel:,} float weights")
    print(f"size        {_fmt_bytes(nbytes)} ({nbytes:,} bytes)")
    return 0


def _inspect_table(source, args) -> int:
    columns = _float_list_columns(source.schema, None)
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
    if modelio.is_tensor_layout(source.schema):
        stats = _estimate_stats(
            source,
            {"bits": 8, "group_size": 1 << 30, "scheme": "symmetric", "columns": ["weights"]},
        )
        shown = stats if len(stats) <= MAX_TABLE_ROWS or args.verbose else stats[:MAX_TABLE_ROWS]
        print(
            _table(
                ["tensor", "numel", "dtype", "size"],
                [[s.name, f"{s.numel:,}", s.dtype, _fmt_bytes(s.bytes_in)] for s in shown],
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


def _inspect_quantized(source, args) -> int:
    schema = source.schema
    qcols = [f.name for f in schema if (f.metadata or {}).get(b"flightquant.role") == b"codes"]
    meta = {
        c: {
            k.decode()[len("flightquant.") :]: v.decode()
            for k, v in (schema.field(c).metadata or {}).items()
            if k.startswith(b"flightquant.")
        }
        for c in qcols
    }
    key = _key_column(schema)
    stats: list[dict[str, Any]] = []
    for batch in source.iter_batches():
        keys = batch.column(key).to_pylist() if key else [None] * batch.num_rows
        shapes = batch.column("shape").to_pylist() if "shape" in batch.schema.names else None
        dtypes = batch.column("dtype").to_pylist() if "dtype" in batch.schema.names else None
        for c in qcols:
            m = meta[c]
            codes = _binary_lengths(batch.column(c))
            extra = _list_lengths(batch.column(f"{c}_scales")) * 4
            if f"{c}_zero_points" in batch.schema.names:
                extra = extra + _list_lengths(batch.column(f"{c}_zero_points")) * 4
            valid = np.asarray(batch.column(c).is_valid())
            if f"{c}_numel" in batch.schema.names:
                numel = batch.column(f"{c}_numel").to_numpy(zero_copy_only=False)
            else:
                numel = np.full(batch.num_rows, int(m.get("list_size", 0)))
            mse = (
                batch.column(f"{c}_mse").to_numpy(zero_copy_only=False)
                if f"{c}_mse" in batch.schema.names
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
                dtype = (dtypes[r] if dtypes and c == "weights" else None) or m.get("dtype")
                n = int(numel[r])
                name = keys[r] if keys[r] is not None else f"row {len(stats)}"
                if len(qcols) > 1:
                    name = f"{name} [{c}]"
                itemsize = modelio._ITEMSIZE.get(dtype, 4)
                stats.append(
                    {
                        "name": name,
                        "shape": shapes[r] if shapes and c == "weights" else [n],
                        "dtype": dtype,
                        "bits": int(m["bits"]),
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
            _shape_text(tuple(s["shape"] or ())),
            str(s["dtype"]),
            "pass" if s["bits"] is None else str(s["bits"]),
            _fmt_bytes(s["original_bytes"]),
            _fmt_bytes(s["bytes"]),
            "-" if s["mse"] is None else f"{s['mse']:.3g}",
        ]
        for s in shown
    ]
    print(
        _table(
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
        m = meta[c]
        print(
            f"  {c}: {m.get('bits')}-bit {m.get('scheme')} {m.get('method', '')}, group size "
            f"{m.get('group_size')}, carried as {m.get('dtype')} {m.get('list_type', '')}".rstrip()
            + (
                " (original dtypes in the dtype column)"
                if c == "weights" and "dtype" in schema.names
                else ""
            )
        )
    ratio = f"{orig / total:.2f}x" if total else "-"
    print(f"tensors     {len(stats)}")
    print(
        f"size        {_fmt_bytes(orig)} original -> {_fmt_bytes(total)} quantized (ratio {ratio}); "
        f"file {_fmt_bytes(source.path.stat().st_size)}"
    )
    return 0
