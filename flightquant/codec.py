"""The Arrow codec: RecordBatch in, quantized RecordBatch out (and back). No network.

Float list columns (``list``, ``large_list``, ``fixed_size_list`` of float16/32/64) are
read straight from their Arrow buffers (no conversion through Python lists, no per-row
copies), quantized by the kernels, and the results are wrapped back into Arrow arrays
without copying. Every other column passes through untouched, in place. The layout of
the output is wire format v1 (``docs/wire-format.md``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa

from . import kernels
from .errors import NonFiniteError
from .layout import make_layout
from .options import SCHEMES, VALID_BITS, OptionsError, QuantOptions

FORMAT_VERSION = 1
PREFIX = "flightquant."
K_VERSION = b"flightquant.format_version"
K_ROLE = b"flightquant.role"
K_CODES = b"flightquant.codes_column"

_NP_DTYPES = {"halffloat": np.float16, "float": np.float32, "double": np.float64}
_DTYPE_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64"}
_ARROW_FLOATS = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}
_LIST_KINDS = ("list", "large_list", "fixed_size_list")


class CodecError(ValueError):
    """A batch that cannot be quantized or decoded; the message says why and what to do."""


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
    for name in options.columns:
        idx = schema.get_all_field_indices(name)
        if not idx:
            raise CodecError(
                f"column {name!r} named in 'columns' is not in the batch; "
                f"its columns are: {', '.join(map(repr, schema.names))}"
            )
        f = schema.field(idx[0])
        if not _is_float_list(f.type):
            raise CodecError(
                f"column {name!r} has type {f.type}, which cannot be quantized: accepted are "
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


def _quantize_plan(schema: pa.Schema, options: QuantOptions) -> tuple[pa.Schema, list[int]]:
    return _cached("q", schema, options, lambda: _build_quantize_plan(schema, options))


def _build_quantize_plan(schema: pa.Schema, options: QuantOptions) -> tuple[pa.Schema, list[int]]:
    picked = _columns_to_quantize(schema, options)
    fields: list[pa.Field] = []
    for i, f in enumerate(schema):
        fields.extend(_derived_fields(f, options) if i in picked else [f])
    names = [f.name for f in fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CodecError(
            f"the quantized batch would have duplicate column(s) {', '.join(map(repr, dupes))}: "
            "rename the input columns that end in _scales/_zero_points/_numel/_mse/"
            "_max_abs_error, or quantize fewer columns with 'columns'"
        )
    return pa.schema(fields, metadata=schema.metadata), picked


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


def _offsets_view(arr: pa.Array) -> np.ndarray:
    """The n+1 offsets of a (large) list/binary array, respecting the array offset."""
    dtype = np.int64 if pa.types.is_large_list(arr.type) or pa.types.is_large_binary(arr.type) else np.int32
    if len(arr) == 0 or arr.buffers()[1] is None:
        return np.zeros(1, np.int64)
    return np.frombuffer(arr.buffers()[1], dtype, count=len(arr) + 1, offset=arr.offset * np.dtype(dtype).itemsize)


def _row_extents(arr: pa.Array, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row start and length (0 for a null row) of a list or binary array, in units of
    its child values (lists) or its data bytes (binary), respecting the array offset."""
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type) or pa.types.is_fixed_size_binary(arr.type):
        width = arr.type.list_size if pa.types.is_fixed_size_list(arr.type) else arr.type.byte_width
        starts = (np.arange(n, dtype=np.int64) + arr.offset) * width
        lens = np.full(n, width, np.int64)
    else:
        offsets = _offsets_view(arr).astype(np.int64)
        starts, lens = offsets[:-1], np.diff(offsets)
    if valid is not None:
        lens = np.where(valid, lens, 0)
    return starts, lens


@dataclass
class _Rows:
    values: np.ndarray  # zero-copy view of the child values
    child: pa.Array
    starts: np.ndarray  # int64 per row, index into values
    lens: np.ndarray  # int64 per row, 0 for null rows
    valid: np.ndarray | None
    fixed: int | None


def _rows_of(arr: pa.Array) -> _Rows:
    kind = _list_kind(arr.type)
    child = arr.values  # the whole child array; the list's own offset is applied below
    values = _primitive_view(child, _NP_DTYPES[str(arr.type.value_type)])
    valid = _validity(arr)
    starts, lens = _row_extents(arr, valid)
    fixed = arr.type.list_size if kind == "fixed_size_list" else None
    return _Rows(values, child, starts, lens, valid, fixed)


def _row_key(batch: pa.RecordBatch, row: int) -> str | None:
    """The value of the batch's first string column at ``row`` (e.g. the layer name)."""
    for i, f in enumerate(batch.schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            value = batch.column(i)[row].as_py()
            return None if value is None else str(value)
    return None


def _where(batch: pa.RecordBatch, column: str, row: int) -> str:
    key = _row_key(batch, row)
    return f"column {column!r}, row {row}" + (f" ({key!r})" if key is not None else "")


def _check_child_nulls(batch, name, rows: _Rows) -> None:
    if rows.child.null_count == 0:
        return
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
    schema, picked = _quantize_plan(batch.schema, options)
    # buffer sizes (cheap) rather than nbytes (walks the data): exact for unsliced batches
    in_bytes = batch.get_total_buffer_size()
    info = BatchInfo(rows=batch.num_rows, input_bytes=in_bytes, output_bytes=in_bytes)
    arrays: list[pa.Array] = []
    total_sse, max_err = 0.0, 0.0
    for i, field in enumerate(batch.schema):
        arr = batch.column(i)
        if i not in picked:
            arrays.append(arr)
            continue
        info.output_bytes -= arr.get_total_buffer_size()
        rows = _rows_of(arr)
        _check_child_nulls(batch, field.name, rows)
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
                                 _where(batch, field.name, exc.row)) from None
        info.kernel_seconds += time.perf_counter() - t0
        info.elements += int(rows.lens.sum())
        arrays.extend(_quantized_arrays(arr, rows, q, options))
        info.output_bytes += q.codes.nbytes + q.scales.nbytes + (
            0 if q.zero_points is None else q.zero_points.nbytes) + rows.lens.nbytes * (rows.fixed is None)
        if options.stats:
            sse = q.row_sse()
            mx = q.row_max_abs_error()
            total_sse += float(sse.sum())
            max_err = max(max_err, float(mx.max(initial=0.0)))
            valid = rows.valid
            with np.errstate(invalid="ignore", divide="ignore"):
                mse = np.where(rows.lens > 0, sse / np.maximum(rows.lens, 1), 0.0)
            arrays.append(_primitive(pa.float64(), mse, valid))
            arrays.append(_primitive(pa.float64(), mx, valid))
            info.output_bytes += mse.nbytes + mx.nbytes
    if options.stats:
        info.sse, info.max_abs_error = total_sse, max_err
    return pa.RecordBatch.from_arrays(arrays, schema=schema), info


def _primitive(typ, values: np.ndarray, valid) -> pa.Array:
    nulls = 0 if valid is None else int((~valid).sum())
    return pa.Array.from_buffers(typ, len(values), [_bitmap(valid), pa.py_buffer(values)], nulls)


def _quantized_arrays(arr: pa.Array, rows: _Rows, q, options: QuantOptions) -> list[pa.Array]:
    n = len(arr)
    lay = q.layout
    valid = rows.valid
    bitmap = _bitmap(valid)
    nulls = arr.null_count
    kind = _list_kind(arr.type)
    codes_buf = pa.py_buffer(q.codes)
    out = []
    if kind == "fixed_size_list":
        width = -(-rows.fixed * options.bits // 8)
        out.append(pa.Array.from_buffers(pa.binary(width), n, [bitmap, codes_buf], nulls))
        gpr = -(-rows.fixed // options.group_size)
        per_group_type = pa.list_(pa.float32(), gpr)

        def per_group(values):
            child = pa.Array.from_buffers(pa.float32(), n * gpr, [None, pa.py_buffer(values)])
            return pa.Array.from_buffers(per_group_type, n, [bitmap], nulls, children=[child])
    else:
        large = kind == "large_list"
        code_offsets = lay.code_offsets if large else lay.code_offsets.astype(np.int32)
        codes_type = pa.large_binary() if large else pa.binary()
        out.append(pa.Array.from_buffers(codes_type, n, [bitmap, pa.py_buffer(code_offsets), codes_buf], nulls))
        if lay.n_groups > np.iinfo(np.int32).max:
            raise CodecError("more than 2**31 groups in one batch: use a larger group_size or smaller batches")
        group_offsets = pa.py_buffer(lay.group_offsets.astype(np.int32))

        def per_group(values):
            child = pa.Array.from_buffers(pa.float32(), len(values), [None, pa.py_buffer(values)])
            return pa.Array.from_buffers(pa.list_(pa.float32()), n, [bitmap, group_offsets], nulls, children=[child])

    out.append(per_group(q.scales))
    if q.zero_points is not None:
        out.append(per_group(q.zero_points))
    if kind != "fixed_size_list":
        out.append(_primitive(pa.int64(), rows.lens, valid))
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


def _dequantize_plan(schema: pa.Schema) -> tuple[pa.Schema, dict[str, _CodesMeta]]:
    return _cached("d", schema, None, lambda: _build_dequantize_plan(schema))


def _build_dequantize_plan(schema: pa.Schema) -> tuple[pa.Schema, dict[str, _CodesMeta]]:
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
    return pa.schema([f for f in fields if f.name not in derived], metadata=schema.metadata), metas


def _derived_column(batch: pa.RecordBatch, codes_name: str, role: str, required: bool = True):
    name = f"{codes_name}_{role}"
    idx = batch.schema.get_field_index(name)
    if idx < 0:
        if required:
            raise CodecError(f"quantized column {codes_name!r} needs its column {name!r}, which is missing")
        return None
    return batch.column(idx)


def _group_values(batch, codes_name: str, role: str, counts: np.ndarray, fixed: bool):
    """Per-group float32 values of a scales/zero-points column, with per-row starts."""
    arr = _derived_column(batch, codes_name, role)
    ok_type = pa.types.is_fixed_size_list(arr.type) if fixed else pa.types.is_list(arr.type)
    if not ok_type or arr.type.value_type != pa.float32():
        raise CodecError(f"column {codes_name}_{role!s} must be a list of float32, got {arr.type}")
    _validate(arr, f"{codes_name}_{role}")
    values = _primitive_view(arr.values, np.float32)
    starts, have = _row_extents(arr, _validity(arr))
    wrong = np.flatnonzero(have[: len(counts)] < counts) if fixed else np.flatnonzero(have != counts)
    if wrong.size:
        r = int(wrong[0])
        raise CodecError(
            f"{_where(batch, codes_name, r)}: {codes_name}_{role} has {int(have[r])} values, "
            f"expected {int(counts[r])} (one per group)"
        )
    return values, starts


def _validate(arr: pa.Array, name: str) -> None:
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise CodecError(f"column {name!r} is not a valid Arrow array: {exc}") from None


def dequantize_batch(batch: pa.RecordBatch, *, threads: int | None = None) -> tuple[pa.RecordBatch, BatchInfo]:
    """Restore the float columns of a quantized batch (original value type, lengths, nulls)."""
    schema, metas = _dequantize_plan(batch.schema)
    info = BatchInfo(rows=batch.num_rows, input_bytes=batch.get_total_buffer_size())
    arrays = []
    n = batch.num_rows
    for field in schema:
        arr = batch.column(field.name)
        m = metas.get(field.name)
        if m is None:
            arrays.append(arr)
            info.output_bytes += arr.get_total_buffer_size()
            continue
        _validate(arr, field.name)
        valid = _validity(arr)
        fixed = m.kind == "fixed_size_list"
        codes = _data_bytes(arr)
        code_starts, have_bytes = _row_extents(arr, valid)  # codes' type checked by _meta_of
        if fixed:
            lens = np.full(n, m.list_size, np.int64)
        else:
            numel = _derived_column(batch, field.name, "numel")
            if numel.type != pa.int64():
                raise CodecError(f"column {field.name}_numel must be int64, got {numel.type}")
            lens = _primitive_view(numel, np.int64).copy()
            if numel.null_count:
                needed = np.ones(n, bool) if valid is None else valid
                if (needed & ~numel.is_valid().to_numpy(zero_copy_only=False)).any():
                    raise CodecError(f"column {field.name}_numel is null where {field.name!r} is not")
        if valid is not None:
            lens = np.where(valid, lens, 0)
        if (lens < 0).any() or (lens > 2**40).any():
            r = int(np.flatnonzero((lens < 0) | (lens > 2**40))[0])
            raise CodecError(f"{_where(batch, field.name, r)}: impossible element count {int(lens[r])}")
        need_bytes = -(-lens * m.bits // 8)
        if not fixed:
            wrong = np.flatnonzero(np.where(lens > 0, have_bytes != need_bytes, False))
            if wrong.size:
                r = int(wrong[0])
                raise CodecError(
                    f"{_where(batch, field.name, r)}: {int(have_bytes[r])} code bytes for "
                    f"{int(lens[r])} elements at {m.bits} bits (expected {int(need_bytes[r])}): "
                    "the codes are truncated or the element count is wrong"
                )
        counts = -(-lens // m.group_size)
        scales, s_starts = _group_values(batch, field.name, "scales", counts, fixed)
        zps = None
        if m.scheme == "asymmetric":
            zps, z_starts = _group_values(batch, field.name, "zero_points", counts, fixed)
            if not np.array_equal(z_starts[counts > 0], s_starts[counts > 0]):
                zps = _align(zps, z_starts, scales.size, s_starts, counts)
        # the rows' codes and groups start where the input arrays put them
        lay = replace(make_layout(lens, m.bits, m.group_size),
                      group_offsets=np.append(s_starts, scales.size),
                      code_offsets=np.append(code_starts, codes.size))
        if fixed:
            out_starts = np.arange(n, dtype=np.int64) * m.list_size
            out_size = n * m.list_size
            offsets_buf = None
        else:
            ends = np.cumsum(lens)
            out_starts = ends - lens
            out_size = int(ends[-1]) if n else 0
            big = m.kind == "large_list"
            if not big and out_size > np.iinfo(np.int32).max:
                raise CodecError(f"column {field.name!r}: more than 2**31 elements in one list batch")
            offsets = np.concatenate([[0], ends]).astype(np.int64 if big else np.int32)
            offsets_buf = pa.py_buffer(offsets)
        t0 = time.perf_counter()
        values = kernels.dequantize_rows(
            codes, lay, scales, zps, scheme=m.scheme, out_starts=out_starts, out_size=out_size,
            out_dtype=np.dtype(m.dtype), threads=threads,
        )
        info.kernel_seconds += time.perf_counter() - t0
        info.elements += int(lens.sum())
        child = pa.Array.from_buffers(_ARROW_FLOATS[m.dtype], out_size, [None, pa.py_buffer(values)])
        bufs = [_bitmap(valid)] if fixed else [_bitmap(valid), offsets_buf]
        arrays.append(pa.Array.from_buffers(field.type, n, bufs, arr.null_count, children=[child]))
        info.output_bytes += values.nbytes + (0 if offsets_buf is None else offsets_buf.size)
    return pa.RecordBatch.from_arrays(arrays, schema=schema), info


def _data_bytes(arr: pa.Array) -> np.ndarray:
    """The whole data buffer of a (fixed-size / large) binary array; offsets index into it."""
    buf = arr.buffers()[-1]
    if buf is None:
        return np.zeros(0, np.uint8)
    return np.frombuffer(buf, np.uint8)


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
