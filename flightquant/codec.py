"""The Arrow codec: RecordBatch in, quantized RecordBatch out (and back). No network.

Float list columns (``list``, ``large_list``, ``fixed_size_list`` of float16/32/64) are
read straight from their Arrow buffers (no conversion through Python lists, no per-row
copies), quantized by the kernels, and the results are wrapped back into Arrow arrays
without copying. Every other column passes through untouched, in place. The layout of
the output is wire format v1 (``docs/wire-format.md``).

Two paths, one answer. Everything that depends on the schema is decided once per schema
(a plan, cached). A plain valid batch is then done in one call by
:mod:`flightquant._fastpath` (C data interface in and out, the kernels on the exported
pointers); any other batch (NaN, a null inside a tensor, malformed rows, float16 values,
``stats``...) goes down the general path below, which names what is wrong. Both give
the same batches (``tests/test_fastpath.py``); ``docs/design-notes.md`` says why.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from . import _arrow, _fastpath, _rows, kernels
from .errors import CodecError, NonFiniteError, echo, echo_list
from .layout import RowLayout, groups_per_block
from .options import METHOD_CODES, SCHEME_CODES, SCHEMES, VALID_BITS, OptionsError, QuantOptions
from .reference import qparams
from .validate import validate_batch, validate_schema

FORMAT_VERSION = 1
PREFIX = "flightquant."
K_VERSION = b"flightquant.format_version"
K_ROLE = b"flightquant.role"
K_CODES = b"flightquant.codes_column"

_NP_DTYPES = {"halffloat": np.float16, "float": np.float32, "double": np.float64}
_DTYPE_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64"}
_ARROW_FLOATS = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}
_NP_DTYPES_BY_NAME = {name: np.dtype(name) for name in _ARROW_FLOATS}
_LIST_KINDS = ("list", "large_list", "fixed_size_list")
# bytes per offset of a list/binary type (0: fixed-size rows)
_OFFSET_WIDTH = {
    pa.lib.Type_LIST: 4, pa.lib.Type_BINARY: 4,
    pa.lib.Type_LARGE_LIST: 8, pa.lib.Type_LARGE_BINARY: 8,
    pa.lib.Type_FIXED_SIZE_LIST: 0, pa.lib.Type_FIXED_SIZE_BINARY: 0,
}
_NO_BYTES = np.zeros(0, np.uint8)
_NO_INT64 = np.zeros(0, np.int64)
# flightquant._fastpath's list kinds
_FAST_KINDS = {"list": 0, "large_list": 1, "fixed_size_list": 2}
_ITEMSIZE = {"float32": 4, "float64": 8}  # value types the one-call path takes

#: Batches go through :mod:`flightquant._fastpath` (one Cython call per batch) when their
#: schema and options allow it and the batch is valid; False sends every batch down the
#: general path here (tests compare the two). ``FLIGHTQUANT_FASTPATH=0`` in the
#: environment turns it off for a whole process (a server, say) without code changes.
use_fastpath = os.environ.get("FLIGHTQUANT_FASTPATH", "1").strip() != "0"
#: tests: a list that gets the address each one-call kernel read its values from
_fast_trace: list | None = None


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
# schema


def _list_kind(t: pa.DataType) -> str | None:
    if pa.types.is_fixed_size_list(t):
        return "fixed_size_list"
    if pa.types.is_large_list(t):
        return "large_list"
    if pa.types.is_list(t):
        return "list"
    return None


def _is_float_list(t: pa.DataType) -> bool:
    return _list_kind(t) is not None and str(t.value_type) in _NP_DTYPES


def is_quantized_field(field: pa.Field) -> bool:
    """A flightquant codes column (either marker is enough, so a damaged one is not
    mistaken for a plain binary column and passed through)."""
    md = field.metadata or {}
    return K_VERSION in md or md.get(K_ROLE) == b"codes"


def is_quantized_schema(schema: pa.Schema) -> bool:
    """True when the schema has at least one flightquant codes column."""
    return any(is_quantized_field(f) for f in schema)


def _columns_to_quantize(schema: pa.Schema, options: QuantOptions) -> list[int]:
    if options.columns is None:
        return [i for i, f in enumerate(schema) if _is_float_list(f.type)]
    picked = []
    index_of = {name: i for i, name in enumerate(schema.names)}  # unique: validate_schema
    for name in options.columns:
        idx = [index_of[name]] if name in index_of else []
        if not idx:
            raise CodecError(
                f"column {echo(name)} named in 'columns' is not in the batch; "
                f"its columns are: {echo_list(schema.names)}"
            )
        f = schema.field(idx[0])
        if not _is_float_list(f.type):
            raise CodecError(
                f"column {echo(name)} has type {f.type}, which cannot be quantized: accepted are "
                "list, large_list and fixed_size_list of float16, float32 or float64"
            )
        picked.append(idx[0])
    return sorted(set(picked))


def _derived_fields(field: pa.Field, options: QuantOptions) -> list[pa.Field]:
    """The fields that replace one float list field in the quantized schema."""
    t = field.type
    kind = _list_kind(t)
    c = field.name
    md = {
        K_VERSION: str(FORMAT_VERSION),
        K_ROLE: "codes",
        "flightquant.bits": str(options.bits),
        "flightquant.scheme": options.scheme,
        "flightquant.group_size": str(options.group_size),
        "flightquant.method": options.method,
        "flightquant.dtype": _DTYPE_NAMES[str(t.value_type)],
        "flightquant.list_type": kind,
        "flightquant.value_field": t.value_field.name,
        "flightquant.value_nullable": "true" if t.value_field.nullable else "false",
    }
    if options.clip is not None:
        md["flightquant.clip"] = repr(options.clip)
    if kind == "fixed_size_list":
        n = t.list_size
        md["flightquant.list_size"] = str(n)
        codes_type = pa.binary(-(-n * options.bits // 8))
        per_group = pa.list_(pa.float32(), -(-n // options.group_size))
    else:
        codes_type = pa.large_binary() if kind == "large_list" else pa.binary()
        per_group = pa.list_(pa.float32())
    orig_md = {k: v for k, v in (field.metadata or {}).items() if not k.startswith(b"flightquant.")}
    fields = [pa.field(c, codes_type, field.nullable, {**orig_md, **md})]

    def derived(suffix, typ, role):
        return pa.field(f"{c}_{suffix}", typ, field.nullable, {K_ROLE: role, K_CODES: c})

    fields.append(derived("scales", per_group, "scales"))
    if options.scheme == "asymmetric":
        fields.append(derived("zero_points", per_group, "zero_points"))
    if kind != "fixed_size_list":
        fields.append(derived("numel", pa.int64(), "numel"))
    if options.stats:
        fields.append(derived("mse", pa.float64(), "mse"))
        fields.append(derived("max_abs_error", pa.float64(), "max_abs_error"))
    return fields


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
    return _quantize_plan(schema, options)[0]


@dataclass(frozen=True)
class _QColumn:
    """What every batch of a schema shares about one column to quantize."""

    name: str
    kind: str  # list, large_list or fixed_size_list


def _quantize_plan(schema: pa.Schema, options: QuantOptions):
    """``(output schema, {input index: _QColumn}, _fastpath.QuantizePlan or None)``."""
    return _cached("q", schema, options, lambda: _build_quantize_plan(schema, options))


def _build_quantize_plan(schema: pa.Schema, options: QuantOptions):
    validate_schema(schema)
    picked = _columns_to_quantize(schema, options)
    chosen = set(picked)
    fields: list[pa.Field] = []
    for i, f in enumerate(schema):
        fields.extend(_derived_fields(f, options) if i in chosen else [f])
    dupes = sorted(n for n, count in Counter(f.name for f in fields).items() if count > 1)
    if dupes:
        raise CodecError(
            f"the quantized batch would have duplicate column(s) {', '.join(map(repr, dupes))}: "
            "rename the input columns that end in _scales/_zero_points/_numel/_mse/"
            "_max_abs_error, or quantize fewer columns with 'columns'"
        )
    columns = {i: _QColumn(schema.field(i).name, _list_kind(schema.field(i).type)) for i in picked}
    out_schema = pa.schema(fields, metadata=schema.metadata)
    return out_schema, columns, _fast_quantize_plan(schema, out_schema, columns, options)


def _fast_quantize_plan(schema, out_schema, columns, options: QuantOptions):
    """The one-call plan, or None for what only the general path does (stats, float16)."""
    if options.stats:
        return None
    specs = []
    for i, f in enumerate(schema):
        col = columns.get(i)
        if col is None:
            specs.append(None)
            continue
        itemsize = _ITEMSIZE.get(_DTYPE_NAMES[str(f.type.value_type)])
        if itemsize is None:
            return None
        specs.append((_FAST_KINDS[col.kind], itemsize,
                      f.type.list_size if col.kind == "fixed_size_list" else 0))
    clip = 0.0
    if options.clip is not None:
        clip = float(np.float32(options.clip))
        if not (math.isfinite(clip) and clip > 0):
            return None  # the kernel wrapper explains
    qmin, qmax, offset = qparams(options.bits, options.scheme)
    return _fastpath.QuantizePlan(
        out_schema, specs, options.bits, SCHEME_CODES[options.scheme],
        METHOD_CODES[options.method], options.group_size,
        groups_per_block(options.group_size, options.bits), qmin, qmax, offset,
        options.clip is not None, clip, options.scheme == "asymmetric",
    )


def _fast_batch(plan, batch: pa.RecordBatch, threads, trace=None):
    """``plan.run`` on a valid batch, or None: the general path takes the batch."""
    if plan is None or not use_fastpath:
        return None
    try:
        batch.validate()  # the C data interface carries no buffer sizes: see _fastpath.pyx
    except pa.ArrowInvalid:
        return None
    done = plan.run(batch, kernels.resolve_threads(threads), trace)
    if done is None:
        return None
    out, elements, seconds = done
    return out, BatchInfo(batch.num_rows, elements, batch.get_total_buffer_size(),
                          out.get_total_buffer_size(), seconds)


# ---------------------------------------------------------------------------------------
# reading Arrow buffers without copying


def _validity(arr: pa.Array) -> np.ndarray | None:
    if arr.null_count == 0:
        return None
    return arr.is_valid().to_numpy(zero_copy_only=False)


def _bitmap(valid: np.ndarray | None) -> pa.Buffer | None:
    if valid is None:
        return None
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def _primitive_view(arr: pa.Array, dtype) -> np.ndarray:
    """Zero-copy NumPy view of a primitive array's values (nulls not interpreted)."""
    dtype = np.dtype(dtype)
    if len(arr) == 0 or arr.buffers()[1] is None:
        return np.zeros(0, dtype)
    return np.frombuffer(arr.buffers()[1], dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def _bytes_of(buf: pa.Buffer | None) -> np.ndarray:
    return _NO_BYTES if buf is None else np.frombuffer(buf, np.uint8)


def _extents(arr: pa.Array, limit: int, with_end: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-row start and length (0 for a null row) of a list or binary array, in units of
    its child values (lists) or its data bytes (binary), respecting the array offset.

    Returns ``(starts, lens, status)``; ``starts`` ends with ``limit`` when ``with_end``.
    ``status`` is -1 when every non-null row lies inside ``[0, limit)``, -2 when a buffer
    is too short for the rows, else the first row outside (see ``_rows.row_extents``).
    """
    n = len(arr)
    starts = np.empty(n + with_end, np.int64)
    lens = np.empty(n, np.int64)
    if n == 0:
        if with_end:
            starts[0] = limit
        return starts, lens, -1
    t = arr.type
    width = _OFFSET_WIDTH[t.id]
    bufs = arr.buffers()
    validity = _bytes_of(bufs[0]) if arr.null_count else _NO_BYTES
    if width:
        offsets, stride = _bytes_of(bufs[1]), 0
    else:
        offsets = _NO_BYTES
        stride = t.list_size if t.id == pa.lib.Type_FIXED_SIZE_LIST else t.byte_width
    status = _rows.row_extents(offsets, width, stride, arr.offset, validity, limit, starts, lens)
    return starts, lens, status


def _out_bitmap(arr: pa.Array) -> pa.Buffer | None:
    """The validity bitmap of an output array with ``arr``'s rows (offset 0): ``arr``'s
    own bitmap when it starts on bit 0, else repacked."""
    if not arr.null_count:
        return None
    if arr.offset == 0:
        return arr.buffers()[0]
    return _bitmap(_validity(arr))


@dataclass
class _Rows:
    values: np.ndarray  # zero-copy view of the child values
    child: pa.Array
    starts: np.ndarray  # int64 per row, index into values
    lens: np.ndarray  # int64 per row, 0 for null rows
    fixed: int | None


def _rows_of(arr: pa.Array, name: str = "values") -> _Rows:
    child = arr.values  # the whole child array; the list's own offset is applied below
    values = _primitive_view(child, _NP_DTYPES[str(arr.type.value_type)])
    starts, lens, status = _extents(arr, len(child))
    if status != -1:
        _validate(arr, name)
        raise CodecError(f"column {name!r} is not a valid list array: a row lies outside its values")
    fixed = arr.type.list_size if arr.type.id == pa.lib.Type_FIXED_SIZE_LIST else None
    return _Rows(values, child, starts, lens, fixed)


def _row_key(batch: pa.RecordBatch, row: int) -> str | None:
    """The value of the batch's first string column at ``row`` (e.g. the layer name)."""
    for i, f in enumerate(batch.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            value = batch.column(i)[row].as_py()
            return None if value is None else str(value)
    return None


def _where(batch: pa.RecordBatch, column: str, row: int) -> str:
    key = _row_key(batch, row)
    return f"column {echo(column)}, row {row}" + (f" ({echo(key)})" if key is not None else "")


def _check_child_nulls(batch, name, rows: _Rows) -> None:
    if rows.child.null_count == 0 or not rows.lens.any():
        return  # no row holds a value (an empty slice of a batch, only null rows...)
    child_valid = rows.child.is_valid().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~child_valid)
    r = np.searchsorted(rows.starts, bad, side="right") - 1
    inside = (r >= 0) & (bad < rows.starts[np.maximum(r, 0)] + rows.lens[np.maximum(r, 0)])
    if inside.any():
        k = int(np.flatnonzero(inside)[0])
        row, elem = int(r[k]), int(bad[k] - rows.starts[r[k]])
        raise CodecError(
            f"null element in {_where(batch, name, row)}, element {elem}: tensors cannot hold "
            "nulls; fill them (pyarrow.compute.fill_null) or make the whole row null"
        )


# ---------------------------------------------------------------------------------------
# quantize


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
    validate_batch(batch)
    schema, columns, fast = _quantize_plan(batch.schema, options)
    done = _fast_batch(fast, batch, threads, _fast_trace)
    if done is not None:
        return done
    # buffer sizes (cheap) rather than nbytes (walks the data): exact for unsliced batches
    info = BatchInfo(rows=batch.num_rows, input_bytes=batch.get_total_buffer_size())
    arrays: list = []  # input column index (passed through) or _arrow.make_batch spec
    total_sse, max_err = 0.0, 0.0
    for i in range(batch.num_columns):
        col = columns.get(i)
        if col is None:
            arrays.append(i)
            continue
        arr = batch.column(i)
        rows = _rows_of(arr, col.name)
        _check_child_nulls(batch, col.name, rows)
        t0 = time.perf_counter()
        try:
            q = kernels.quantize_rows(
                rows.values, rows.starts, rows.lens,
                bits=options.bits, scheme=options.scheme, group_size=options.group_size,
                method=options.method, clip=options.clip, stats=options.stats,
                fixed_row_len=rows.fixed, threads=threads,
            )
        except NonFiniteError as exc:
            raise NonFiniteError(exc.row, exc.element, exc.value,
                                 _where(batch, col.name, exc.row)) from None
        info.kernel_seconds += time.perf_counter() - t0
        info.elements += int(rows.lens.sum())
        bitmap = _out_bitmap(arr)
        arrays.extend(_quantized_specs(arr, rows, q, col, bitmap))
        if options.stats:
            sse = q.row_sse()
            mx = q.row_max_abs_error()
            total_sse += float(sse.sum())
            max_err = max(max_err, float(mx.max(initial=0.0)))
            with np.errstate(invalid="ignore", divide="ignore"):
                mse = np.where(rows.lens > 0, sse / np.maximum(rows.lens, 1), 0.0)
            arrays.append((len(mse), arr.null_count, (bitmap, mse), ()))
            arrays.append((len(mx), arr.null_count, (bitmap, mx), ()))
    if options.stats:
        info.sse, info.max_abs_error = total_sse, max_err
    out = _arrow.make_batch(schema, batch.num_rows, arrays, batch)
    info.output_bytes = out.get_total_buffer_size()
    return out, info


_F32 = _ARROW_FLOATS["float32"]
_INT32_MAX = 2**31 - 1


def _quantized_specs(arr: pa.Array, rows: _Rows, q, col: _QColumn, bitmap) -> list[tuple]:
    """The codes, scales, zero-point (and numel) arrays of one quantized column, as
    :func:`flightquant._arrow.make_batch` specs around the kernel's outputs (no copy)."""
    n = len(arr)
    lay = q.layout
    nulls = arr.null_count
    if col.kind == "fixed_size_list":
        out = [(n, nulls, (bitmap, q.codes), ())]
        group_bufs = (bitmap,)
    else:
        if lay.n_groups > _INT32_MAX:
            raise CodecError("more than 2**31 groups in one batch: use a larger group_size or smaller batches")
        if col.kind == "list" and lay.n_code_bytes > _INT32_MAX:
            raise CodecError(
                f"column {col.name!r}: more than 2 GiB of codes in one batch, beyond the binary "
                "type's int32 offsets: send smaller batches or use large_list columns"
            )
        code_offsets = lay.code_offsets if col.kind == "large_list" else lay.code_offsets.astype(np.int32)
        out = [(n, nulls, (bitmap, code_offsets, q.codes), ())]
        group_bufs = (bitmap, lay.group_offsets.astype(np.int32))
    for values in (q.scales, q.zero_points):
        if values is not None:
            out.append((n, nulls, group_bufs, ((len(values), 0, (None, values), ()),)))
    if col.kind != "fixed_size_list":
        out.append((n, nulls, (bitmap, rows.lens), ()))
    return out


# ---------------------------------------------------------------------------------------
# dequantize


@dataclass
class _CodesMeta:
    bits: int
    scheme: str
    group_size: int
    dtype: str
    kind: str
    list_size: int | None
    value_field: str
    value_nullable: bool


def _meta_of(field: pa.Field) -> _CodesMeta:
    md = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (field.metadata or {}).items()}

    def get(key):
        value = md.get(PREFIX + key)
        if value is None:
            raise CodecError(f"quantized column {field.name!r} lacks metadata key 'flightquant.{key}'")
        return value

    if md.get(PREFIX + "role") != "codes":
        raise CodecError(f"quantized column {field.name!r} lacks flightquant.role='codes'")
    version = get("format_version")
    if version != str(FORMAT_VERSION):
        raise CodecError(
            f"quantized column {field.name!r} has format version {version!r}; this flightquant "
            f"reads version {FORMAT_VERSION} (upgrade flightquant to read newer files)"
        )

    def integer(key, lo, hi):
        value = get(key)
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not lo <= number <= hi:
            raise CodecError(f"quantized column {field.name!r}: bad flightquant.{key}={value!r}")
        return number

    bits = integer("bits", 2, 8)
    scheme = get("scheme")
    if bits not in VALID_BITS or scheme not in SCHEMES or (scheme == "ternary" and bits != 2):
        raise CodecError(f"quantized column {field.name!r}: bad bits/scheme {bits}/{scheme!r}")
    group_size = integer("group_size", 1, 2**31 - 1)
    dtype = get("dtype")
    kind = get("list_type")
    if dtype not in _ARROW_FLOATS or kind not in _LIST_KINDS:
        raise CodecError(f"quantized column {field.name!r}: bad dtype/list_type {dtype!r}/{kind!r}")
    list_size = integer("list_size", 0, 2**31 - 1) if kind == "fixed_size_list" else None
    expected = {
        "list": pa.binary(),
        "large_list": pa.large_binary(),
        "fixed_size_list": pa.binary(-(-(list_size or 0) * bits // 8)),
    }[kind]
    if field.type != expected:
        raise CodecError(
            f"quantized column {field.name!r} has type {field.type}, expected {expected} for "
            f"{kind} codes at {bits} bits"
        )
    nullable = md.get(PREFIX + "value_nullable", "true")
    if nullable not in ("true", "false"):
        raise CodecError(f"quantized column {field.name!r}: bad flightquant.value_nullable={nullable!r}")
    return _CodesMeta(bits, scheme, group_size, dtype, kind, list_size,
                      md.get(PREFIX + "value_field", "item"), nullable == "true")


def dequantized_schema(schema: pa.Schema) -> pa.Schema:
    """The schema :func:`dequantize_batch` gives for a quantized ``schema``."""
    return _dequantize_plan(schema)[0]


@dataclass(frozen=True)
class _DColumn:
    """One column of the dequantized schema and where its inputs are."""

    index: int  # of the column in the input batch
    name: str
    meta: _CodesMeta | None  # None: passed through
    out_type: pa.DataType | None = None
    derived: dict | None = None  # role -> input column index (-1: missing)
    groups_per_block: int = 0


def _dequantize_plan(schema: pa.Schema):
    """``(output schema, [_DColumn], _fastpath.DequantizePlan or None)``."""
    return _cached("d", schema, None, lambda: _build_dequantize_plan(schema))


def _build_dequantize_plan(schema: pa.Schema):
    validate_schema(schema)
    derived = set()
    fields = []
    metas = {}
    for f in schema:
        if is_quantized_field(f):
            m = metas[f.name] = _meta_of(f)
            value = pa.field(m.value_field, _ARROW_FLOATS[m.dtype], m.value_nullable)
            if m.kind == "list":
                typ = pa.list_(value)
            elif m.kind == "large_list":
                typ = pa.large_list(value)
            else:
                typ = pa.list_(value, m.list_size)
            md = {k: v for k, v in (f.metadata or {}).items() if not k.startswith(b"flightquant.")}
            fields.append(pa.field(f.name, typ, f.nullable, md or None))
        else:
            fields.append(f)
    for f in schema:
        md = f.metadata or {}
        if K_ROLE in md and md.get(K_ROLE) != b"codes":
            owner = md.get(K_CODES, b"").decode(errors="replace")
            if owner not in metas:
                raise CodecError(
                    f"column {f.name!r} holds flightquant {md[K_ROLE].decode(errors='replace')} of "
                    f"quantized column {owner!r}, which is not in the batch: the batch is incomplete"
                )
            derived.add(f.name)
    out_fields = [f for f in fields if f.name not in derived]
    index_of = {name: i for i, name in enumerate(schema.names)}  # names are unique
    columns = []
    for f in out_fields:
        index = index_of[f.name]
        m = metas.get(f.name)
        if m is None:
            columns.append(_DColumn(index, f.name, None))
            continue
        roles = {role: index_of.get(f"{f.name}_{role}", -1)
                 for role in ("scales", "zero_points", "numel")}
        k = groups_per_block(m.group_size, m.bits)
        columns.append(_DColumn(index, f.name, m, f.type, roles, k))
    out_schema = pa.schema(out_fields, metadata=schema.metadata)
    return out_schema, columns, _fast_dequantize_plan(schema, out_schema, columns)


def _fast_dequantize_plan(schema, out_schema, columns: list[_DColumn]):
    """The one-call plan, or None for what only the general path does: float16 values,
    missing or mistyped scale/zero-point/numel columns (errors, explained there)."""
    specs = []
    for col in columns:
        m = col.meta
        if m is None:
            specs.append(col.index)
            continue
        itemsize = _ITEMSIZE.get(m.dtype)
        if itemsize is None:
            return None
        fixed = m.kind == "fixed_size_list"
        per_row = -(-(m.list_size or 0) // m.group_size)
        idx = {}
        for role in ("scales", "zero_points", "numel"):
            i = col.derived[role]
            needed = role == "scales" or (role == "zero_points" and m.scheme == "asymmetric") or (
                role == "numel" and not fixed)
            if not needed:
                idx[role] = -1
                continue
            t = schema.field(i).type if i >= 0 else None
            if role == "numel":
                ok = t == pa.int64()
            else:
                ok = t == (pa.list_(_F32, per_row) if fixed else pa.list_(_F32))
            if not ok:
                return None
            idx[role] = i
        _, _, offset = qparams(m.bits, m.scheme)
        specs.append((col.index, _FAST_KINDS[m.kind], itemsize, m.list_size or 0, idx["scales"],
                      idx["zero_points"], idx["numel"], m.bits, m.group_size,
                      col.groups_per_block, float(offset)))
    return _fastpath.DequantizePlan(out_schema, specs)


def _derived_column(batch: pa.RecordBatch, col: _DColumn, role: str) -> pa.Array:
    """The column holding ``role`` of quantized column ``col``, validated."""
    name = f"{col.name}_{role}"
    idx = col.derived[role]
    if idx < 0:
        raise CodecError(f"quantized column {col.name!r} needs its column {name!r}, which is missing")
    arr = batch.column(idx)
    t = arr.type
    if role == "numel":
        if t.id != pa.lib.Type_INT64:
            raise CodecError(f"column {name} must be int64, got {t}")
    else:
        fixed = col.meta.kind == "fixed_size_list"
        if t.id != (pa.lib.Type_FIXED_SIZE_LIST if fixed else pa.lib.Type_LIST) or t.value_type != _F32:
            raise CodecError(f"column {name} must be a list of float32, got {t}")
    _validate(arr, name)
    return arr


def _validate(arr: pa.Array, name: str) -> None:
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise CodecError(f"column {name!r} is not a valid Arrow array: {exc}") from None


def dequantize_batch(batch: pa.RecordBatch, *, threads: int | None = None) -> tuple[pa.RecordBatch, BatchInfo]:
    """Restore the float columns of a quantized batch (original value type, lengths, nulls)."""
    validate_batch(batch)
    schema, columns, fast = _dequantize_plan(batch.schema)
    done = _fast_batch(fast, batch, threads)
    if done is not None:
        return done
    info = BatchInfo(rows=batch.num_rows, input_bytes=batch.get_total_buffer_size())
    arrays = []  # input column index (passed through) or _arrow.make_batch spec
    for col in columns:
        if col.meta is None:
            arrays.append(col.index)
        else:
            arrays.append(_dequantize_column(batch, batch.column(col.index), col, info, threads))
    out = _arrow.make_batch(schema, batch.num_rows, arrays, batch)
    info.output_bytes = out.get_total_buffer_size()
    return out, info


_MAX_NUMEL = 2**40  # per row; more is a corrupt count, not a tensor


def _dequantize_column(batch, arr: pa.Array, col: _DColumn, info: BatchInfo, threads) -> tuple:
    """One restored column, as a :func:`flightquant._arrow.make_batch` spec."""
    m, name, n = col.meta, col.name, len(arr)
    fixed = m.kind == "fixed_size_list"
    _validate(arr, name)  # codes' type was checked by _meta_of
    scales_arr = _derived_column(batch, col, "scales")
    zps_arr = _derived_column(batch, col, "zero_points") if m.scheme == "asymmetric" else None
    codes = _bytes_of(arr.buffers()[-1])  # offsets index the whole data buffer
    code_starts, code_lens, status = _extents(arr, codes.size, with_end=True)
    lens = np.empty(n, np.int64)
    if fixed:
        lens.fill(m.list_size)
        if arr.null_count:
            lens[~_validity(arr)] = 0
    else:
        numel = _derived_column(batch, col, "numel")
        if numel.null_count:
            needed = np.ones(n, bool) if not arr.null_count else _validity(arr)
            if (needed & ~numel.is_valid().to_numpy(zero_copy_only=False)).any():
                raise CodecError(f"column {name}_numel is null where {name!r} is not")
        validity = _bytes_of(arr.buffers()[0]) if arr.null_count else _NO_BYTES
        status = max(status, _rows.masked_counts(
            _bytes_of(numel.buffers()[1]), numel.offset, validity, arr.offset, lens))
    scales = _primitive_view(scales_arr.values, np.float32)
    s_starts, s_lens, s_status = _extents(scales_arr, scales.size, with_end=True)
    if zps_arr is not None:
        zps = _primitive_view(zps_arr.values, np.float32)
        z_starts, z_lens, z_status = _extents(zps_arr, zps.size)
    else:
        zps, z_starts, z_lens, z_status = None, _NO_INT64, _NO_INT64, -1
    if max(status, s_status, z_status) != -1:  # validated arrays never get here
        raise CodecError(f"quantized column {name!r}: a row lies outside its buffers")
    blocks = np.empty(n + 1, np.int64)
    bad = _rows.check_quantized(lens, m.bits, m.group_size, fixed, code_lens, s_starts, s_lens,
                                z_starts, z_lens, _MAX_NUMEL, col.groups_per_block, blocks)
    if bad >= 0:
        _explain_bad_row(batch, col, bad, int(lens[bad]), int(code_lens[bad]), int(s_lens[bad]),
                         int(z_lens[bad]) if zps is not None else None)
    if zps is not None and (bad == -3 or zps.size < scales.size):
        # zero points stored at other offsets than the scales: move them under the scales
        zps = _align(zps, z_starts, scales.size, s_starts[:n], -(-lens // m.group_size))
    if fixed:
        out_starts = np.arange(n, dtype=np.int64) * m.list_size
        out_size = n * m.list_size
        bufs = (_out_bitmap(arr),)
    else:
        big = m.kind == "large_list"
        offsets = np.empty(n + 1, np.int64 if big else np.int32)
        out_starts = np.empty(n, np.int64)
        out_size = _rows.output_offsets(lens, offsets.itemsize, offsets.view(np.uint8), out_starts)
        if out_size < 0:
            raise CodecError(f"column {name!r}: more than 2**31 elements in one list batch")
        bufs = (_out_bitmap(arr), offsets)
    # the rows' codes and groups start where the input arrays put them
    lay = RowLayout(lens, s_starts, code_starts, blocks, col.groups_per_block, m.bits, m.group_size)
    t0 = time.perf_counter()
    values = kernels.dequantize_rows(
        codes, lay, scales, zps, scheme=m.scheme, out_starts=out_starts, out_size=out_size,
        out_dtype=_NP_DTYPES_BY_NAME[m.dtype], threads=threads,
    )
    info.kernel_seconds += time.perf_counter() - t0
    info.elements += out_size if not fixed else int(lens.sum())
    return (n, arr.null_count, bufs, ((out_size, 0, (None, values), ()),))


def _explain_bad_row(batch, col: _DColumn, r: int, numel: int, code_bytes: int,
                     n_scales: int, n_zps: int | None) -> None:
    """Raise the CodecError that says what is wrong with row ``r`` of a quantized column."""
    m, name = col.meta, col.name
    where = _where(batch, name, r)
    if not 0 <= numel <= _MAX_NUMEL:
        raise CodecError(f"{where}: impossible element count {numel}")
    need_bytes = -(-numel * m.bits // 8)
    if m.kind != "fixed_size_list" and numel > 0 and code_bytes != need_bytes:
        raise CodecError(
            f"{where}: {code_bytes} code bytes for {numel} elements at {m.bits} bits "
            f"(expected {need_bytes}): the codes are truncated or the element count is wrong"
        )
    need = -(-numel // m.group_size)
    for role, have in (("scales", n_scales), ("zero_points", n_zps)):
        if have is not None and have != need and (m.kind != "fixed_size_list" or have < need):
            raise CodecError(
                f"{where}: {name}_{role} has {have} values, expected {need} (one per group)"
            )
    raise CodecError(f"{where}: inconsistent quantized row")  # pragma: no cover


def _align(values, starts, size, target_starts, counts) -> np.ndarray:
    out = np.zeros(size, np.float32)
    for s, t, c in zip(starts.tolist(), target_starts.tolist(), counts.tolist(), strict=True):
        out[t : t + c] = values[s : s + c]
    return out


def process_batch(
    batch: pa.RecordBatch, options: QuantOptions, *, threads: int | None = None
) -> tuple[pa.RecordBatch, BatchInfo]:
    """Quantize or dequantize ``batch`` according to ``options.op``."""
    if options.op == "dequantize":
        return dequantize_batch(batch, threads=threads)
    return quantize_batch(batch, options, threads=threads)
