"""What every CLI command shares: one-line errors, the runner, progress, common options.

Every failure ends as ONE line on stderr (``flightquant: error: ...``) and a non-zero exit
status; ``FLIGHTQUANT_DEBUG=1`` shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from .. import formats, modelfiles
from ..progress import bar

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------- options


def add_quant_options(p: argparse.ArgumentParser) -> None:
    # no argparse `choices`: QuantOptions validates, so a bad value is one clear line
    p.add_argument(
        "--format",
        default=None,
        metavar="F",
        help="native (default: --bits/--group-size/--scheme apply), a ggml type ("
        + ", ".join(formats.GGML_TYPES)
        + "), compressed-tensors (quantize only: a model folder for transformers/vLLM); "
        "for a .gguf input, llama-quantize's recipe names (Q4_K_M, Q5_K_S, IQ4_XS, F16, ...)",
    )
    p.add_argument("--bits", type=int, default=None, help="2, 4 or 8 (default 4; ternary: 2)")
    p.add_argument(
        "--group-size", type=int, default=None, metavar="N", help="elements per scale (default 128)"
    )
    p.add_argument("--scheme", default=None, help="asymmetric (default), symmetric or ternary")
    p.add_argument("--method", default="rtn", help="rtn (default) or mse")
    p.add_argument(
        "--clip", type=float, default=None, metavar="X", help="clamp inputs to [-X, X] first"
    )
    p.add_argument(
        "--imatrix",
        default=None,
        metavar="FILE",
        help="llama.cpp importance matrix (GGUF or .dat): weigh each tensor by it (ggml "
        "formats: llama-quantize --imatrix; native: needs --method mse)",
    )


def format_name(args: argparse.Namespace) -> str:
    """The ``--format`` asked for: ``"native"`` or a ggml type name (case as ggml spells it)."""
    fmt = getattr(args, "format", None)
    if fmt is None or fmt.lower() == formats.NATIVE:
        return formats.NATIVE
    if fmt.upper() in formats.GGML_TYPES:
        return fmt.upper()
    raise JobError(
        f"--format {fmt!r} is not a format; valid formats are: "
        f"{', '.join(formats.FORMAT_NAMES)}, compressed-tensors"
    )


def add_selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only",
        action="append",
        metavar="GLOB",
        help="quantize exactly the float tensors whose name matches (repeatable; default: "
        "float tensors with two or more dimensions)",
    )
    p.add_argument(
        "--keep",
        action="append",
        metavar="GLOB",
        help="keep the tensors whose name matches as they are (repeatable)",
    )


def add_gguf_options(p: argparse.ArgumentParser) -> None:
    """llama-quantize's flags (GGUF inputs), and flightquant's size target."""
    p.add_argument(
        "--tensor-type",
        "--type",
        action="append",
        metavar="PATTERN=TYPE",
        dest="types",
        help="GGUF: give the tensors whose name matches this ggml type or F32/F16/BF16 "
        "(repeatable, first match wins; PATTERN is found in the name as a regular expression, "
        "as llama-quantize reads it, or matches the whole name as a glob), e.g. "
        "'attn_v=Q8_0' or 'blk.*.ffn_down.weight=Q6_K'",
    )
    p.add_argument(
        "--pure",
        action="store_true",
        help="GGUF: no mix: every tensor llama.cpp quantizes gets the recipe's type",
    )
    p.add_argument("--output-tensor-type", metavar="TYPE", help="GGUF: the type of output.weight")
    p.add_argument(
        "--token-embedding-type", metavar="TYPE", help="GGUF: the type of token_embd.weight"
    )
    p.add_argument(
        "--leave-output-tensor",
        action="store_true",
        help="GGUF: leave output.weight as it is",
    )
    p.add_argument(
        "--target-size",
        metavar="SIZE",
        help="GGUF: choose each tensor's type for the least (importance-weighted) error "
        "within this file size (bytes, or e.g. 400M, 1.5G)",
    )
    p.add_argument(
        "--target-bpw",
        type=float,
        metavar="X",
        help="GGUF: as --target-size, for X bits per weight over all tensors",
    )
    p.add_argument(
        "--target-error",
        choices=("relative", "absolute"),
        default="relative",
        help="GGUF size target: minimise the sum of each tensor's squared error relative to "
        "its own mean square times its size (relative, default), or the plain sum (absolute)",
    )
    p.add_argument(
        "--allow-requantize",
        action="store_true",
        help="GGUF: re-quantize tensors that are already quantized (default: they pass through)",
    )


#: the GGUF-only flags and their argparse names
GGUF_FLAGS = (
    ("--tensor-type", "types"),
    ("--pure", "pure"),
    ("--output-tensor-type", "output_tensor_type"),
    ("--token-embedding-type", "token_embedding_type"),
    ("--leave-output-tensor", "leave_output_tensor"),
    ("--target-size", "target_size"),
    ("--target-bpw", "target_bpw"),
    ("--allow-requantize", "allow_requantize"),
)


def gguf_flags_given(args: argparse.Namespace) -> list[str]:
    """The GGUF-only flags ``args`` gives."""
    return [flag for flag, dest in GGUF_FLAGS if getattr(args, dest, None) not in (None, False)]


def selection(args: argparse.Namespace, source) -> modelfiles.Selection:
    """The tensors ``--only``/``--keep`` (or the default rule) pick from ``source``."""
    sel = modelfiles.Selection(getattr(args, "only", None), getattr(args, "keep", None))
    if sel.overridden:
        if source.kind != "tensors":
            raise JobError(
                "--only/--keep pick tensors by name in tensor files (.safetensors, .npz, .npy); "
                "a table file's list columns are chosen with --column"
            )
        sel.check((i.name for i in source.infos), str(source.path))
    return sel


def add_remote_options(p: argparse.ArgumentParser) -> None:
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
        type=positive_int,
        default=None,
        metavar="N",
        help="kernel threads in-process (default: all cores)",
    )


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("-v", "--verbose", action="store_true", help="list every tensor in the summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def one_line_errors(parser: argparse.ArgumentParser) -> None:
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


def command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; turn every failure into one line on stderr and an exit status."""

    def run(args: argparse.Namespace) -> int:
        if os.environ.get("FLIGHTQUANT_DEBUG"):
            return func(args)
        try:
            with held_warnings(quiet=getattr(args, "quiet", False)):
                return func(args)
        except KeyboardInterrupt:
            fail("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # e.g. `flightquant inspect x | head`
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            except OSError:
                pass
            return EXIT_ERROR
        except Exception as exc:  # noqa: BLE001 - the CLI's one place for that
            fail(message(exc))
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
def held_warnings(quiet: bool) -> Iterator[None]:
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


def fail(message: str) -> None:
    sys.stderr.write(f"flightquant: error: {message}\n")
    sys.stderr.flush()


def message(exc: BaseException) -> str:
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


# --------------------------------------------------------------------------- running a job


class Runner:
    """The in-process API (``quantize``/``dequantize``) or a ``Client`` over --server."""

    def __init__(self, args: argparse.Namespace):
        self.servers = list(getattr(args, "servers", None) or [])
        self.threads = getattr(args, "threads", None)
        self.client = None
        token = None
        if getattr(args, "token_file", None):
            token = read_token(args.token_file)
            if not self.servers:
                raise JobError("--token-file needs --server")
        if self.servers:
            from ..client import Client

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
        from .. import api

        return iter(api.quantize(batches, threads=self.threads, **options))

    def dequantize(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        if self.client is not None:
            return iter(self.client.dequantize(batches))
        from .. import api

        return iter(api.dequantize(batches, threads=self.threads))

    def close(self) -> None:
        if self.client is not None and hasattr(self.client, "close"):
            self.client.close()


class ImportanceFeed:
    """``--imatrix FILE``: each batch gets its quantized columns' importance columns, the
    vector of a row looked up by the row's key (the tensor's name) in the imatrix. A tensor
    the file lacks, or holds per expert (``[n_expert, k]``), is quantized without it and
    listed in the summary (:meth:`summary`)."""

    def __init__(self, path: str, options: dict[str, Any]):
        from ..modelfiles.imatrix import read_imatrix
        from ..options import QuantOptions, check_importance_method

        mapping = {k: v for k, v in options.items() if k != "columns"}
        check_importance_method(QuantOptions.from_mapping(mapping), f"--imatrix {path}: the job")
        self.path = path
        self.imatrix = read_imatrix(path)
        self.columns = options.get("columns")
        self.used: list[str] = []
        self.missing: list[str] = []
        self.per_expert: list[str] = []

    def check(self, name: str, shape: tuple[int, ...], block_size: int = 1) -> None:
        """Before any work: ``name``'s importance fits its rows (``JobError`` otherwise)."""
        w = self.imatrix.importance(name)
        if w is None or w.ndim != 1:
            return
        k = shape[-1] if shape else 1
        if w.size != k or k % block_size:
            raise JobError(
                f"--imatrix {self.path}: {name} has {w.size} importance weights, but the "
                f"tensor's rows have {k} elements (shape {list(shape)})"
                + (f" and must be whole blocks of {block_size}" if k % block_size else "")
                + ": the imatrix is for another model"
            )

    def add(self, batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from .. import wire
        from ..arrays import with_importance

        for batch in batches:
            i = wire.key_column(batch.schema)
            if i is None:
                raise JobError(
                    f"--imatrix {self.path}: the input has no string column naming each row's "
                    "tensor, so no importance can be looked up"
                )
            keys = batch.column(i).to_pylist()
            quantized = [
                j for j, f in enumerate(batch.schema)
                if wire.is_float_list(f.type) and (self.columns is None or f.name in self.columns)
            ]  # fmt: skip
            vectors = {}
            for r, key in enumerate(keys):
                if key is None or not any(batch.column(j)[r].is_valid for j in quantized):
                    continue  # a kept tensor
                w = self.imatrix.importance(key)
                if w is None:
                    self.missing.append(key)
                elif w.ndim != 1:
                    self.per_expert.append(key)
                else:
                    vectors[key] = w
                    self.used.append(key)
            yield with_importance(batch, vectors, self.columns)

    def summary(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "tensors": len(self.used),
            "without": self.missing,
            "per_expert_without": self.per_expert,
        }


def imatrix_feed(args: argparse.Namespace, options: dict[str, Any]) -> ImportanceFeed | None:
    """The ``--imatrix`` of ``args`` (None without one)."""
    path = getattr(args, "imatrix", None)
    return ImportanceFeed(path, options) if path else None


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise JobError(f"--token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise JobError(f"--token-file {path}: the file is empty")
    return token


def native_flags(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """The native layout's flags given (``--bits``, ``--group-size``, ``--scheme``); an
    error if any is given with a ``--format`` that implies them (a ggml type, a recipe)."""
    given = {k: getattr(args, k, None) for k in ("bits", "group_size", "scheme")}
    given = {k: v for k, v in given.items() if v is not None}
    if given and fmt != formats.NATIVE:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise JobError(f"{flags}: implied by --format {fmt}; give one or the other")
    return given


def quant_options(args: argparse.Namespace, columns: list[str] | None) -> dict[str, Any]:
    """The codec options of ``args``, validated, as a keyword mapping.

    Options not given are left to the codec's defaults; with a ggml ``--format``, giving
    ``--bits``/``--group-size``/``--scheme`` too is an error (the format implies them).
    """
    from ..options import QuantOptions

    fmt = format_name(args)
    given = native_flags(args, fmt)
    mapping: dict[str, Any] = {**given, "method": args.method, "clip": args.clip}
    if fmt != formats.NATIVE:
        mapping["format"] = fmt
    if columns:
        mapping["columns"] = list(columns)
    opts = QuantOptions.from_mapping(mapping)  # raises OptionsError with a clear message
    if fmt != formats.NATIVE:
        out: dict[str, Any] = {"format": fmt, "method": opts.method}
    else:
        out = {"bits": opts.bits, "group_size": opts.group_size, "scheme": opts.scheme,
               "method": opts.method}  # fmt: skip
    if opts.clip is not None:
        out["clip"] = opts.clip
    if opts.columns is not None:
        out["columns"] = list(opts.columns)
    return out


def describe(options: dict[str, Any]) -> str:
    """``4-bit asymmetric rtn, group size 128`` or ``Q4_K rtn``."""
    if "format" in options:
        desc = f"{options['format']} {options['method']}"
    else:
        o = options
        desc = f"{o['bits']}-bit {o['scheme']} {o['method']}, group size {o['group_size']}"
    if options.get("clip") is not None:
        desc += f", clip {options['clip']:g}"
    return desc


def read_ahead(items: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Produce ``items`` in a background thread, ``depth`` ahead of the consumer.

    Reading, widening and packing the next batch (the widening kernel, NumPy and Arrow
    release the GIL) then overlap with the kernels working on this one. The producer starts
    an item only when fewer than ``depth`` are ahead of the one the consumer holds (asking
    for the next item means being done with the last), so at most ``depth + 1`` items are
    alive at once: the memory bound of a job. Errors re-raise in the consumer, in order.
    """
    import queue
    import threading

    q: queue.SimpleQueue = queue.SimpleQueue()
    slots = threading.Semaphore(depth)
    stop = threading.Event()
    done = object()

    def take_slot() -> bool:
        while not stop.is_set():
            if slots.acquire(timeout=0.1):
                return True
        return False

    def produce() -> None:
        try:
            it = iter(items)
            while take_slot():
                try:
                    item = next(it)
                except StopIteration:
                    q.put((None, done))
                    return
                q.put((None, item))
                del item
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((exc, None))

    thread = threading.Thread(target=produce, name="flightquant-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            slots.release()  # done with the item before: the producer may start another
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
            del item
    finally:
        stop.set()
        thread.join(timeout=5)


def never_empty(
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


def check_not_same(src: str, dst: str) -> None:
    try:
        if Path(dst).exists() and os.path.samefile(src, dst):
            raise JobError(f"OUTPUT {dst} is the INPUT file; choose another path")
    except OSError:
        pass


def release(bar, writer, stream, runner, source) -> None:
    """End a job's resources, whether it finished or failed: the progress bar, a writer
    still open (modelfiles's atomic-output context removes its temporary file), the result
    stream, the server connection and the input file."""
    bar.close()
    if writer is not None:
        quietly(writer.close)
    if hasattr(stream, "close"):
        quietly(stream.close)
    runner.close()
    source.close()


def quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - cleanup after an error already being reported
        pass


def progress(args: argparse.Namespace, total: int | None, desc: str):
    """The job's bar (:func:`flightquant.progress.bar`), off with ``--quiet``."""
    return bar(total, desc, quiet=args.quiet)


def is_quantized(schema: pa.Schema) -> bool:
    """Whether a table's schema holds quantized columns (the wire format says)."""
    from ..wire import is_quantized_schema

    return is_quantized_schema(schema)
