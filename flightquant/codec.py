"""The Arrow codec: RecordBatch in, quantized RecordBatch out (and back). No network.

One engine. Everything that depends on the schema is decided once per schema (a plan,
cached): which columns are quantized, the output schema (:mod:`flightquant.wire` writes
every ``flightquant.*`` key), the kernel parameters. Each batch is then validated in full
(:func:`validate_batch`) and done in one call of the compiled engine
(:mod:`flightquant._engine`: the Arrow C data interface in and out, the kernels on the
exported pointers). The engine never raises for bad data: it returns a status, and
:func:`_fail` turns each status (named by ``_engine.STATUS_NAMES``) into its one message,
with the column, the row and the row's key.

Float list columns (``list``, ``large_list``, ``fixed_size_list`` of float16/32/64) are
quantized; every other column passes through untouched, in place. The layout of the
output is wire format v1 (native) or v2 (ggml types): ``docs/wire-format.md``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from . import _engine, kernels, wire
from .errors import CodecError, NonFiniteError, echo, echo_list, shorten
from .layout import groups_per_block
from .options import (
    METHOD_CODES,
    SCALE_DTYPE_CODES,
    SCHEME_CODES,
    OptionsError,
    QuantOptions,
    check_importance_method,
)
from .reference import qparams
from .validate import validate_batch, validate_schema
from .wire import is_quantized_field, is_quantized_schema  # noqa: F401 (public here too)

__all__ = [
    "BatchInfo",
    "CodecError",
    "dequantize_batch",
    "dequantized_schema",
    "output_schema",
    "process_batch",
    "quantize_batch",
    "validate_batch",
]

_KINDS = {"list": 0, "large_list": 1, "fixed_size_list": 2}
_NATIVE = -1  # the engine's ggml code of a native column
_F32 = pa.float32()


@dataclass
class BatchInfo:
    """What one batch cost and gave: sent as ``app_metadata`` by the server."""

    rows: int = 0
    elements: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    kernel_seconds: float = 0.0
    sse: float | None = None
    max_abs_error: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["sse"] is None:
            del d["sse"], d["max_abs_error"]
        return d


# ---------------------------------------------------------------------------------------
# plans

_PLANS: list = []  # recent (kind, schema, options, plan), newest last
_MAX_PLANS = 32


def _cached(kind: str, schema: pa.Schema, options, build):
    """Memoise per-schema work: every batch of a stream has the same schema.

    Schemas are compared with their metadata (``Schema.__eq__`` and ``hash`` ignore it,
    and it matters here); a comparison costs well under a microsecond.
    """
    for k, sch, opts, plan in reversed(_PLANS):
        if k == kind and opts == options and sch.equals(schema, check_metadata=True):
            return plan
    plan = build()
    _PLANS.append((kind, schema, options, plan))
    if len(_PLANS) > _MAX_PLANS:
        del _PLANS[: len(_PLANS) - _MAX_PLANS]
    return plan


def output_schema(schema: pa.Schema, options: QuantOptions) -> pa.Schema:
    """The schema every output batch has for input ``schema`` under ``options``."""
    if options.op == "dequantize":
        return dequantized_schema(schema)
    return _quantize_plan(schema, options).schema


@dataclass(frozen=True)
class _Plan:
    schema: pa.Schema  # of the output
    names: dict[int, str]  # input column index -> name of each column the engine builds
    engine: object  # _engine.QuantizePlan / DequantizePlan
    ggml: dict[int, object]  # input column index -> its ggml type (ggml columns only)
    importance: dict[int, int] | None = None  # importance column index -> its tensor column


def _columns_to_quantize(schema: pa.Schema, options: QuantOptions) -> list[int]:
    importance = set(wire.importance_columns(schema).values())
    if options.columns is None:
        return [
            i for i, f in enumerate(schema) if wire.is_float_list(f.type) and i not in importance
        ]
    by_name = {}
    for i, f in enumerate(schema):
        by_name.setdefault(f.name, i)
    picked = set()
    for name in options.columns:
        i = by_name.get(name)
        if i is None:
            raise CodecError(
                f"column {echo(name)} named in 'columns' is not in the batch; "
                f"its columns are: {echo_list(schema.names)}"
            )
        t = schema.field(i).type
        if not wire.is_float_list(t):
            raise CodecError(
                f"column {echo(name)} has type {shorten(str(t))}, which cannot be quantized: "
                "accepted are list, large_list and fixed_size_list of float16, float32 or float64"
            )
        if i in importance:
            raise CodecError(
                f"column {echo(name)} named in 'columns' holds the importance of column "
                f"{echo(name[: -len(wire.IMPORTANCE)])}: it is consumed by quantizing that "
                "column, not quantized itself; rename it to quantize it"
            )
        picked.add(i)
    return sorted(picked)


def _importance_spec(schema: pa.Schema, j: int) -> tuple[int, int, int]:
    """The engine's (column, list kind, list size) of importance column ``j`` (-1: none)."""
    if j < 0:
        return -1, 0, 0
    t = schema.field(j).type
    kind = wire.list_kind(t)
    return j, _KINDS[kind], t.list_size if kind == "fixed_size_list" else 0


def _importance_plan(schema: pa.Schema, picked: set[int], options: QuantOptions) -> dict[int, int]:
    """``{tensor column: importance column}`` of the quantized columns that have one, their
    types and the options checked."""
    out = {i: j for i, j in wire.importance_columns(schema).items() if i in picked}
    for i, j in out.items():
        f = schema.field(j)
        if not wire.is_importance_type(f.type):
            raise CodecError(
                f"column {echo(f.name)} (the importance of column {echo(schema.field(i).name)}) "
                f"has type {shorten(str(f.type))}: importance is a list, large_list or "
                "fixed_size_list of float32, one vector of k weights per row"
            )
        check_importance_method(
            options, f"column {echo(schema.field(i).name)} (its column {echo(f.name)})"
        )
    return out


def _quantize_plan(schema: pa.Schema, options: QuantOptions) -> _Plan:
    return _cached("q", schema, options, lambda: _build_quantize_plan(schema, options))


def _build_quantize_plan(schema: pa.Schema, options: QuantOptions) -> _Plan:
    validate_schema(schema)
    picked = set(_columns_to_quantize(schema, options))
    importance = _importance_plan(schema, picked, options)
    consumed = set(importance.values())
    ggml = options.ggml
    fields: list[pa.Field] = []
    specs: list = []
    for i, f in enumerate(schema):
        if i in consumed:
            specs.append("consumed")
            continue
        if i not in picked:
            fields.append(f)
            specs.append(None)
            continue
        kind = wire.list_kind(f.type)
        list_size = f.type.list_size if kind == "fixed_size_list" else 0
        if ggml and list_size % ggml.block_size:
            raise CodecError(
                f"column {echo(f.name)}: its rows of {list_size} elements are not whole "
                f"{ggml.name} blocks of {ggml.block_size}: use a row length that is a multiple "
                f"of {ggml.block_size}, or format='native'"
            )
        fields.extend(wire.codes_fields(f, options))
        specs.append(
            (
                _KINDS[kind],
                wire.FLOAT_SIZES[wire.float_name(f.type.value_type)],
                list_size,
                ggml.code if ggml else _NATIVE,
                ggml.block_size if ggml else 0,
                ggml.type_size if ggml else 0,
                *_importance_spec(schema, importance.get(i, -1)),
            )
        )
    counts = Counter(f.name for f in fields)
    dupes = sorted(n for n, k in counts.items() if k > 1)
    if dupes:
        raise CodecError(
            f"the quantized batch would have duplicate column(s) {echo_list(dupes)}: "
            "rename the input columns that end in _scales/_zero_points/_numel/_mse/"
            "_max_abs_error, or quantize fewer columns with 'columns'"
        )
    out_schema = pa.schema(fields, metadata=schema.metadata)
    clip = 0.0
    if options.clip is not None:
        clip = float(np.float32(options.clip))
        if not (math.isfinite(clip) and clip > 0):
            raise OptionsError(
                f"clip={options.clip!r} is not a positive float32 value: use a clip between "
                "1e-38 and 3.4e38"
            )
    if ggml:
        bits, scheme, group_size, k, qmin, qmax, offset = 8, 0, 1, 1, 0, 0, 0
    else:
        bits, scheme, group_size = options.bits, SCHEME_CODES[options.scheme], options.group_size
        k = groups_per_block(group_size, bits)
        qmin, qmax, offset = qparams(bits, options.scheme)
    engine = _engine.QuantizePlan(
        out_schema,
        specs,
        bits,
        scheme,
        METHOD_CODES[options.method],
        group_size,
        k,
        qmin,
        qmax,
        offset,
        options.clip is not None,
        clip,
        options.scheme == "asymmetric",
        options.stats,
        SCALE_DTYPE_CODES[options.scale_dtype],
    )
    names = {i: schema.field(i).name for i in picked}
    names.update({j: schema.field(j).name for j in consumed})
    return _Plan(
        out_schema,
        names,
        engine,
        {i: ggml for i in picked} if ggml else {},
        {j: i for i, j in importance.items()},
    )


def dequantized_schema(schema: pa.Schema) -> pa.Schema:
    """The schema :func:`dequantize_batch` gives for a quantized ``schema``."""
    return _dequantize_plan(schema).schema


def _dequantize_plan(schema: pa.Schema) -> _Plan:
    return _cached("d", schema, None, lambda: _build_dequantize_plan(schema))


def _parse(field: pa.Field) -> wire.CodesMeta:
    try:
        return wire.parse_codes_field(field)
    except wire.WireError as exc:
        raise CodecError(str(exc)) from None


def _build_dequantize_plan(schema: pa.Schema) -> _Plan:
    validate_schema(schema)
    metas = {f.name: _parse(f) for f in schema if is_quantized_field(f)}
    index = {}
    for i, f in enumerate(schema):
        index.setdefault(f.name, i)
    derived = set()
    for f in schema:
        owned = wire.role_of(f)
        if owned is None:
            continue
        role, owner = owned
        if owner not in metas:
            raise CodecError(
                f"column {echo(f.name)} holds flightquant {shorten(role)} of quantized column "
                f"{echo(owner)}, which is not in the batch: the batch is incomplete"
            )
        derived.add(f.name)
    fields, specs, names, ggml_cols = [], [], {}, {}
    for i, f in enumerate(schema):
        if f.name in derived:
            continue
        m = metas.get(f.name)
        if m is None:
            fields.append(f)
            specs.append(i)
            continue
        fields.append(pa.field(f.name, m.decoded_type(), f.nullable, wire.stripped_metadata(f)))
        names[i] = f.name
        roles = {
            role: _derived_index(schema, index, f.name, m, role)
            for role in ("scales", "zero_points", "numel")
        }
        t = m.ggml
        if t:
            ggml_cols[i] = t
            specs.append(
                (
                    i,
                    _KINDS[m.kind],
                    wire.FLOAT_SIZES[m.dtype],
                    m.list_size or 0,
                    -1,
                    -1,
                    -1,
                    8,
                    1,
                    1,
                    0.0,
                    t.code,
                    t.block_size,
                    t.type_size,
                )
            )
        else:
            offset = qparams(m.bits, m.scheme)[2]
            specs.append(
                (
                    i,
                    _KINDS[m.kind],
                    wire.FLOAT_SIZES[m.dtype],
                    m.list_size or 0,
                    roles["scales"],
                    roles["zero_points"],
                    roles["numel"],
                    m.bits,
                    m.group_size,
                    groups_per_block(m.group_size, m.bits),
                    float(offset),
                    _NATIVE,
                    0,
                    0,
                )
            )
    out_schema = pa.schema(fields, metadata=schema.metadata)
    return _Plan(out_schema, names, _engine.DequantizePlan(out_schema, specs), ggml_cols)


def _derived_index(schema, index, codes: str, m: wire.CodesMeta, role: str) -> int:
    """The input column holding ``role`` of quantized column ``codes`` (-1 if not needed),
    its type checked."""
    if not m.needs(role):
        return -1
    name = wire.derived_name(codes, role)
    i = index.get(name, -1)
    if i < 0:
        raise CodecError(
            f"quantized column {echo(codes)} needs its column {echo(name)}, which is missing"
        )
    t = schema.field(i).type
    if role == "numel":
        if t != pa.int64():
            raise CodecError(f"column {shorten(name)} must be int64, got {t}")
    else:
        fixed = m.kind == "fixed_size_list"
        per_row = -(-(m.list_size or 0) // m.group_size)
        if t != (pa.list_(_F32, per_row) if fixed else pa.list_(_F32)):
            raise CodecError(f"column {shorten(name)} must be a list of float32, got {t}")
    return i


# ---------------------------------------------------------------------------------------
# running a batch


def _row_key(batch: pa.RecordBatch, row: int) -> str | None:
    """The value of the batch's first string column at ``row`` (e.g. the layer name)."""
    i = wire.key_column(batch.schema)
    if i is None:
        return None
    value = batch.column(i)[row].as_py()
    return None if value is None else shorten(str(value), 100)


def _where(batch: pa.RecordBatch, column: str, row: int) -> str:
    if not 0 <= row < batch.num_rows:
        return f"column {echo(column)}"
    key = _row_key(batch, row)
    return f"column {echo(column)}, row {row}" + (f" ({key!r})" if key is not None else "")


def _bad_row(where: str, meta: wire.CodesMeta, name: str, numel, code_bytes, n_scales, n_zps):
    if not 0 <= numel <= 2**40:
        return f"{where}: impossible element count {numel}"
    need_bytes = -(-numel * meta.bits // 8)
    if meta.kind != "fixed_size_list" and numel > 0 and code_bytes != need_bytes:
        return (
            f"{where}: {code_bytes} code bytes for {numel} elements at {meta.bits} bits "
            f"(expected {need_bytes}): the codes are truncated or the element count is wrong"
        )
    need = -(-numel // meta.group_size)
    for role, have in (("scales", n_scales), ("zero_points", n_zps)):
        if have >= 0 and have != need and (meta.kind != "fixed_size_list" or have < need):
            return f"{where}: {shorten(name)}_{role} has {have} values, expected {need} (one per group)"
    return f"{where}: inconsistent quantized row"


def _fail(batch: pa.RecordBatch, plan: _Plan, result: tuple) -> Exception:
    """The exception for an engine status (one message per status)."""
    status, col, row, a, b, c, d, value = result
    name = plan.names.get(col) or batch.schema.field(col).name
    where = _where(batch, name, row)
    kind = _engine.STATUS_NAMES[status]
    if kind == "nonfinite":
        return NonFiniteError(row, a, value, where)
    if kind == "bad_row":
        meta = _parse(batch.schema.field(col))
        return CodecError(_bad_row(where, meta, name, a, b, c, d))
    t = plan.ggml.get(col)
    messages = {
        "null_in_tensor": f"null element in {where}, element {a}: tensors cannot hold nulls; "
        "fill them (pyarrow.compute.fill_null) or make the whole row null",
        "row_outside": f"{where}: a row lies outside its buffers (the batch is not valid Arrow)",
        "codes_int32": f"{where}: more than 2 GiB of codes in one batch ({a} bytes), beyond "
        "the binary type's int32 offsets: send smaller batches or use large_list columns",
        "groups_int32": f"{where}: more than 2**31 groups in one batch: use a larger "
        "group_size or smaller batches",
        "not_blocks": f"{where}: {a} elements is not a multiple of "
        f"{t.name if t else 'the'} block size {b}: ggml formats quantize whole blocks; "
        "pad the row, or use format='native'",
        "numel_null": f"{where}: column {shorten(name)}_numel is null where {echo(name)} is not",
        "scale_nulls": f"{where}: the scales or zero points hold null values",
        "values_int32": f"{where}: more than 2**31 elements in one list batch ({a}): send "
        "smaller batches or use large_list columns",
        "ggml_bytes": f"{where}: {a} code bytes is not a whole number of "
        f"{t.name if t else 'ggml'} blocks of {b} bytes: the codes are truncated or corrupt",
    }
    imp_col = wire.importance_name(name)
    if kind == "importance_length":
        rule = f"k >= 1 dividing the row's {b} elements" + (
            f" and a multiple of {t.name}'s block size {c}" if t else ""
        )
        messages[kind] = (
            f"{where}: its importance {echo(imp_col)} has {a} weights, which cannot be the "
            f"row length of this tensor: give one weight per column of its rows of k ({rule})"
        )
    elif kind == "importance_value":
        what = "a null" if b else f"{value!r}"
        messages[kind] = (
            f"{where}: its importance {echo(imp_col)} holds {what} at element {a}: "
            "importance weights must be finite and non-negative"
        )
    return CodecError(messages[kind])


def _run(plan: _Plan, batch: pa.RecordBatch, threads) -> tuple[pa.RecordBatch, BatchInfo]:
    validate_batch(batch)
    result = plan.engine.run(batch, kernels.resolve_threads(threads))
    if result[0] != 0:
        raise _fail(batch, plan, result)
    _, out, elements, seconds, sse, max_err = result
    # buffer sizes (cheap) rather than nbytes (walks the data): exact for unsliced batches
    return out, BatchInfo(
        batch.num_rows,
        elements,
        batch.get_total_buffer_size(),
        out.get_total_buffer_size(),
        seconds,
        sse,
        max_err,
    )


def quantize_batch(
    batch: pa.RecordBatch, options: QuantOptions, *, threads: int | None = None
) -> tuple[pa.RecordBatch, BatchInfo]:
    """Quantize the float list columns of ``batch``; one output batch, same rows and order.

    Examples
    --------
    >>> import pyarrow as pa
    >>> b = pa.record_batch({"w": pa.array([[0.0, 1.0, 2.0, 3.0]], pa.list_(pa.float32()))})
    >>> out, info = quantize_batch(b, QuantOptions.from_mapping({"bits": 2}))
    >>> out.schema.names, info.elements
    (['w', 'w_scales', 'w_zero_points', 'w_numel'], 4)
    """
    if options.op != "quantize":
        raise OptionsError("quantize_batch needs op='quantize'")
    return _run(_quantize_plan(batch.schema, options), batch, threads)


def dequantize_batch(
    batch: pa.RecordBatch, *, threads: int | None = None
) -> tuple[pa.RecordBatch, BatchInfo]:
    """Restore the float columns of a quantized batch (original value type, lengths, nulls)."""
    return _run(_dequantize_plan(batch.schema), batch, threads)


def process_batch(
    batch: pa.RecordBatch, options: QuantOptions, *, threads: int | None = None
) -> tuple[pa.RecordBatch, BatchInfo]:
    """Quantize or dequantize ``batch`` according to ``options.op``."""
    if options.op == "dequantize":
        return dequantize_batch(batch, threads=threads)
    return quantize_batch(batch, options, threads=threads)
