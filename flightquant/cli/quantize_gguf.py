"""``flightquant quantize model.gguf -o out.gguf --format Q4_K``: the job of ``llama-quantize``.

The tensors to quantize and their types come from :mod:`flightquant.modelfiles.gguf_policy`
(llama.cpp's own choice, with ``--only``/``--keep``/``--type`` overrides). Each tensor to
quantize travels as one row of float32 values (``ne[0]`` contiguous) through the codec with
``format=<type>``, in-process or through ``--server``; the codes of that row are the tensor's
GGUF data, so both paths write byte-identical files. Kept tensors are copied byte for byte,
float-to-float conversions (``--type X=F16``, the F16 fallback) are done here. Tensors are
read and written one at a time, so a model larger than memory works.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from gguf import GGUFValueType

from .. import formats, modelfiles, wire
from ..modelfiles import gguf_policy
from ..modelfiles.gguf_files import GGUFFile, GGUFTensor
from ..modelfiles.gguf_policy import Choice
from . import gguf_imatrix, gguf_target_job
from .accounting import TensorStat, shape_text
from .common import (
    JobError,
    Runner,
    check_not_same,
    native_flags,
    never_empty,
    progress,
    read_ahead,
    release,
)
from .gguf_report import print_gguf_estimate, print_gguf_summary
from .gguf_target_job import Target
from .summary import fmt_bytes

#: ``general.quantization_version`` llama-quantize writes (GGML_QNT_VERSION)
QUANTIZATION_VERSION = 2


def recipe_of(args: argparse.Namespace, source: GGUFFile) -> gguf_policy.Recipe:
    """The llama-quantize recipe ``--format`` names (``Q4_K`` = ``Q4_K_M``, as there)."""
    fmt = getattr(args, "format", None)
    if fmt is None and gguf_target_job.wants_target(args):
        return gguf_policy.recipe(gguf_target_job.BASE_RECIPE)
    if fmt is None or fmt.lower() == formats.NATIVE:
        raise JobError(
            f"{source.path}: a GGUF input needs --format, the recipe to write (as "
            f"llama-quantize's TYPE): {', '.join(gguf_policy.RECIPE_NAMES)}"
        )
    return gguf_policy.recipe(fmt)


def plan(args: argparse.Namespace, source: GGUFFile) -> list[Choice]:
    """The type of every tensor of ``source`` for this job."""
    rec = recipe_of(args, source)
    native_flags(args, rec.name)
    from ..options import QuantOptions

    # validated here, so --estimate refuses what the job refuses
    QuantOptions.from_mapping({"method": args.method, "clip": args.clip})
    if source.value("split.count", 1) != 1:
        raise JobError(
            f"{source.path} is one shard of a split model; merge the shards first "
            "(llama-gguf-split --merge)"
        )

    def type_flag(dest: str, flag: str) -> str | None:
        value = getattr(args, dest, None)
        return None if value is None else gguf_policy.parse_type(value, flag)

    choices = gguf_policy.choose(
        [(t.name, t.ne, t.type) for t in source.tensors],
        rec,
        gguf_policy.ModelParams.from_gguf(source.value),
        pure=getattr(args, "pure", False),
        output_type=type_flag("output_tensor_type", "--output-tensor-type"),
        token_embd_type=type_flag("token_embedding_type", "--token-embedding-type"),
        leave_output=getattr(args, "leave_output_tensor", False),
        types=gguf_policy.parse_type_overrides(getattr(args, "types", None) or ()),
        only=args.only or (),
        keep=args.keep or (),
        allow_requantize=getattr(args, "allow_requantize", False),
        has_imatrix=getattr(args, "imatrix", None) is not None,
    )
    args.recipe_name = rec.name
    args.recipe_label = f"{rec.name} --pure" if getattr(args, "pure", False) else rec.name
    return choices


def prepare(args: argparse.Namespace, source: GGUFFile) -> tuple[list[Choice], Target | None]:
    """The choices of the recipe, or of the size target (measured: this reads the tensors)."""
    choices = plan(args, source)
    args.imatrix_data = None
    if getattr(args, "imatrix", None) is not None:
        args.imatrix_data = gguf_imatrix.load(args.imatrix)
    budget = gguf_target_job.budget_of(args, source)
    if budget is None:
        return choices, None
    importance = _importance_of(args.imatrix_data, source)
    runner = Runner(args)
    try:
        target = gguf_target_job.choose(args, source, choices, runner, budget, importance)
    finally:
        runner.close()
    label = f"target {fmt_bytes(budget)} of tensor data"
    if getattr(args, "format", None) is None:
        args.recipe_name = target.file_type
        args.recipe_label = label
    else:
        args.recipe_label = f"{label} (tensors of {args.recipe_label})"
    return target.choices, target


def _importance_of(imatrix, source: GGUFFile):
    """name -> the importance vector a tensor's rows are weighted by (``None`` without)."""
    if imatrix is None:
        return lambda name: None
    ne = {t.name: t.ne for t in source.tensors}

    def importance(name: str):
        w = imatrix.importance(name)
        if w is None or np.asarray(w).size % ne[name][0]:
            return None
        return np.asarray(w, np.float32).reshape(-1, ne[name][0])[0]

    return importance


def run(args: argparse.Namespace, source: GGUFFile) -> int:
    """Quantize a GGUF file into a GGUF file (or print the estimate)."""
    try:
        choices, target = prepare(args, source)
        if args.estimate:
            return print_gguf_estimate(source, choices, target, args)
        if not args.output:
            raise JobError("quantize needs -o OUTPUT.gguf, or --estimate")
        needs = next((c for c in choices if c.requires_imatrix), None)
        if needs is not None and getattr(args, "imatrix", None) is None:
            raise JobError(
                f"--format {args.recipe_name} needs an importance matrix (--imatrix FILE, from "
                f"llama-imatrix): llama.cpp refuses to write {needs.name} as {needs.dst} "
                'without one ("this quantization requires an imatrix")'
            )
        unwritable = sorted({c.dst for c in choices if c.quantize} - set(formats.GGML_TYPES))
        if unwritable:
            raise JobError(
                f"--format {args.format}: flightquant does not write {', '.join(unwritable)} "
                f"(it writes {', '.join(formats.GGML_TYPES)})"
            )
        modelfiles.output_format(args.output, ("gguf",))
        check_not_same(args.input, args.output)
        modelfiles.check_output_path(args.output)  # before any work
    except BaseException:
        source.close()
        raise
    return _Job(args, source, choices, target).run()


class _Job:
    def __init__(self, args, source: GGUFFile, choices: list[Choice], target: Target | None):
        self.args = args
        self.source = source
        self.choices = choices
        self.target = target
        self.by_name: dict[str, GGUFTensor] = {t.name: t for t in source.tensors}
        self.stats: dict[str, TensorStat] = {}
        self.recipe = gguf_policy.recipe(args.recipe_name)
        imatrix = getattr(args, "imatrix_data", None)
        self.importance = {} if imatrix is None else gguf_imatrix.vectors(imatrix, choices)

    def run(self) -> int:
        args, source = self.args, self.source
        runner = Runner(args)
        t0 = time.perf_counter()
        bar = progress(args, source.nbytes, "quantize")
        writer = None
        try:
            with modelfiles.atomic_output(args.output) as tmp:
                writer = modelfiles.GGUFOutput(
                    tmp,
                    source,
                    [modelfiles.OutTensor(c.name, c.ne, c.dst) for c in self.choices],
                    {
                        "general.quantization_version": (
                            GGUFValueType.UINT32,
                            QUANTIZATION_VERSION,
                        ),
                        "general.file_type": (
                            GGUFValueType.UINT32,
                            int(self.recipe.file_type),
                        ),
                        **self._imatrix_keys(),
                    },
                )
                self._write_all(writer, runner, bar)
                writer.close()
                writer = None
        finally:
            release(bar, writer, None, runner, source)
        seconds = time.perf_counter() - t0
        if not args.quiet:
            stats = [self.stats[c.name] for c in self.choices]
            size = Path(args.output).stat().st_size
            print_gguf_summary(args, self.choices, stats, seconds, runner.where, size, self.target)
        return 0

    def _imatrix_keys(self) -> dict:
        imatrix = getattr(self.args, "imatrix_data", None)
        return {} if imatrix is None else gguf_imatrix.metadata(self.args.imatrix, imatrix)

    # ------------------------------------------------------------------ writing
    def _write_all(self, writer, runner: Runner, bar) -> None:
        """Write every tensor in order; the ones to quantize go through the codec in runs of
        consecutive tensors of one type (tensors written directly may sit between them)."""
        direct: deque[int] = deque(i for i, c in enumerate(self.choices) if not c.quantize)
        for run in self._runs():
            options = {"format": run[0][1].dst, "method": self.args.method}
            if self.args.clip is not None:
                options["clip"] = self.args.clip
            pending: deque[tuple[int, Choice]] = deque(run)
            batches = never_empty(self._batches(run), modelfiles.TENSOR_SCHEMA, None)
            stream = runner.quantize(
                read_ahead(batches), columns=["weights"], stats=True, **options
            )
            try:
                for out in stream:
                    self._settle(out, pending, direct, writer, bar)
            finally:
                if hasattr(stream, "close"):
                    stream.close()
            if pending:
                raise JobError(f"the codec returned no output for {pending[0][1].name!r}")
        while direct:
            self._write_direct(direct.popleft(), writer, bar)

    def _runs(self) -> Iterator[list[tuple[int, Choice]]]:
        run: list[tuple[int, Choice]] = []
        for i, c in enumerate(self.choices):
            if not c.quantize:
                continue
            if run and run[-1][1].dst != c.dst:
                yield run
                run = []
            run.append((i, c))
        if run:
            yield run

    def _batches(self, run: list[tuple[int, Choice]]) -> Iterator[pa.RecordBatch]:
        def tensors():
            for _, c in run:
                t = self.by_name[c.name]
                self.stats[c.name] = TensorStat(
                    c.name, shape_text(t.ne), t.type, t.numel, t.nbytes, bytes_out=c.dst_bytes
                )
                dtype = _STORED.get(t.type)
                if dtype is not None:  # read from the file and widened into the batch
                    info = modelfiles.TensorInfo(c.name, t.shape, dtype)
                    yield info, modelfiles.FileSpan(self.source.path, t.offset, t.nbytes)
                else:  # a quantized type (--allow-requantize): decoded first
                    yield modelfiles.TensorInfo(c.name, t.shape, "float32"), self.source.floats(t)

        def signals(infos, signal) -> None:  # from the widening pass itself
            for info, s in zip(infos, signal, strict=True):
                self.stats[info.name].signal = float(s)

        batches = modelfiles.tensor_batches(
            tensors(),
            max_batch_bytes=self.args.max_batch_bytes,
            on_batch=signals,
            threads=modelfiles.widening_threads(self.args.threads),
        )
        if not self.importance:
            return batches
        return (gguf_imatrix.with_importance(b, self.importance) for b in batches)

    def _settle(self, out: pa.RecordBatch, pending, direct, writer, bar) -> None:
        codes = out.column("weights")
        names = out.column("layer_name").to_pylist()
        mse_name = wire.derived_name("weights", "mse")
        mse = out.column(mse_name) if mse_name in out.schema.names else None
        for r, name in enumerate(names):
            if not pending or pending[0][1].name != name:
                raise JobError(f"the codec returned {name!r} out of order")
            index, c = pending.popleft()
            while direct and direct[0] < index:
                self._write_direct(direct.popleft(), writer, bar)
            buf = codes[r].as_buffer()
            if buf is None or buf.size != c.dst_bytes:
                raise JobError(
                    f"tensor {name!r}: the codec returned {0 if buf is None else buf.size} "
                    f"bytes, {c.dst} needs {c.dst_bytes}"
                )
            writer.write(name, buf)
            s = self.stats[name]
            if mse is not None and mse[r].is_valid:
                s.sse = float(mse[r].as_py()) * s.numel
            bar.update(s.bytes_in)

    def _write_direct(self, index: int, writer, bar) -> None:
        c = self.choices[index]
        t = self.by_name[c.name]
        s = TensorStat(c.name, shape_text(t.ne), t.type, t.numel, t.nbytes, bytes_out=c.dst_bytes)
        if c.convert:
            x = self.source.floats(t)
            y = _to_float_type(x, c.dst)
            writer.write(c.name, y)
            d = x.astype(np.float64) - _widen(y, c.dst)
            s.signal, s.sse = float(np.dot(x, x)), float(np.dot(d, d))
        else:
            writer.write(c.name, self.source.data(t))
            s.passthrough = True
        self.stats[c.name] = s
        bar.update(s.bytes_in)


#: GGUF float types read as stored, and their dtype names
_STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _to_float_type(x: np.ndarray, typ: str) -> np.ndarray:
    """float32 values stored as F32, F16 or BF16 (round to nearest even, as ggml converts)."""
    if typ == "F32":
        return np.ascontiguousarray(x, "<f4")
    if typ == "F16":
        with np.errstate(over="ignore"):
            return x.astype("<f2")
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16).view("<u2")


def _widen(y: np.ndarray, typ: str) -> np.ndarray:
    if typ == "BF16":
        return (y.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return y.astype(np.float64)
