"""The wire format: the only module that writes or reads ``flightquant.*`` metadata and
derived column names (``docs/wire-format.md``).

A quantized column ``c`` is a codes field whose metadata says how to decode it, followed
by its derived columns (``c_scales``, ``c_zero_points``, ``c_numel``, ``c_mse``,
``c_max_abs_error``), each marked with its role and the name of its codes column.

* format version 1 (``native``): packed b-bit codes plus per-group float32 scales (and
  zero points); metadata ``bits``, ``scheme``, ``group_size``...
* format version 2 (a ggml type): the codes of a row are ggml's block bytes; no scale or
  zero-point columns; metadata ``format`` names the type.

Examples
--------
>>> import pyarrow as pa
>>> from flightquant.options import QuantOptions
>>> f = pa.field("w", pa.list_(pa.float32()))
>>> [x.name for x in codes_fields(f, QuantOptions.from_mapping({"format": "Q8_0"}))]
['w']
>>> parse_codes_field(codes_fields(f, QuantOptions())[0]).bits
4
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from . import formats
from .options import SCHEMES, VALID_BITS, QuantOptions

PREFIX = "flightquant."
_PREFIX_B = PREFIX.encode()
K_VERSION = b"flightquant.format_version"
K_ROLE = b"flightquant.role"
K_CODES = b"flightquant.codes_column"
#: a codes field's original float dtype (``float16``/``float32``/``float64``)
K_DTYPE = b"flightquant.dtype"
#: schema metadata of the CLI's Arrow/Parquet outputs: the input's format, and a
#: safetensors input's own ``__metadata__`` (JSON), written back by ``dequantize``
K_SOURCE_FORMAT = b"flightquant.source_format"
K_SAFETENSORS = b"flightquant.safetensors_metadata"
#: format version of native batches (v1, unchanged byte for byte) and of ggml batches
VERSION_NATIVE = 1
VERSION_GGML = 2
#: codes-field keys that belong to one format version only; the other version's key on a
#: field is an error (a native field that also says ``format: Q8_0`` is neither)
VERSION_KEYS = {VERSION_NATIVE: ("bits", "scheme", "group_size"), VERSION_GGML: ("format",)}
#: derived columns of a quantized column, in schema order
ROLES = ("scales", "zero_points", "numel", "mse", "max_abs_error")
LIST_KINDS = ("list", "large_list", "fixed_size_list")
#: the float value types of a quantizable list column, by dtype name, and their sizes
FLOAT_TYPES = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}
FLOAT_SIZES = {"float16": 2, "float32": 4, "float64": 8}
_FLOAT_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64"}


class WireError(ValueError):
    """A quantized batch whose metadata cannot be decoded; the message says what is wrong."""


def list_kind(t: pa.DataType) -> str | None:
    """``list``, ``large_list``, ``fixed_size_list`` or None."""
    if pa.types.is_fixed_size_list(t):
        return "fixed_size_list"
    if pa.types.is_large_list(t):
        return "large_list"
    if pa.types.is_list(t):
        return "list"
    return None


def float_name(t: pa.DataType) -> str | None:
    """``float16``/``float32``/``float64`` for an Arrow float type, else None."""
    return _FLOAT_NAMES.get(str(t))


def is_float_list(t: pa.DataType) -> bool:
    return list_kind(t) is not None and float_name(t.value_type) is not None


def derived_name(codes: str, role: str) -> str:
    return f"{codes}_{role}"


#: the input column holding the importance of quantized column ``c`` is ``c + IMPORTANCE``
IMPORTANCE = "_importance"


def importance_name(column: str) -> str:
    """The name of the input column that holds ``column``'s importance vectors."""
    return column + IMPORTANCE


def is_importance_type(t: pa.DataType) -> bool:
    """An importance column's type: a list, large_list or fixed_size_list of float32."""
    return list_kind(t) is not None and t.value_type == pa.float32()


def key_column(schema: pa.Schema) -> int | None:
    """The column holding each row's key (e.g. the layer name): the first string column."""
    for i, f in enumerate(schema):
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            return i
    return None


def importance_columns(schema: pa.Schema) -> dict[int, int]:
    """``{tensor column index: importance column index}`` for every float list column ``c``
    of ``schema`` that has a column named ``c + "_importance"`` (its first such column).

    An importance column is consumed by quantizing ``c``: never quantized itself, never in
    the output. Its type is the codec's to check (:func:`is_importance_type`).
    """
    index: dict[str, int] = {}
    for i, f in enumerate(schema):
        index.setdefault(f.name, i)
    out = {}
    for i, f in enumerate(schema):
        j = index.get(importance_name(f.name))
        if j is not None and j != i and is_float_list(f.type):
            out[i] = j
    return out


def is_quantized_field(field: pa.Field) -> bool:
    """A flightquant codes column (either marker is enough, so a damaged one is not
    mistaken for a plain binary column and passed through)."""
    md = field.metadata or {}
    return K_VERSION in md or md.get(K_ROLE) == b"codes"


def is_quantized_schema(schema: pa.Schema) -> bool:
    """True when the schema has at least one flightquant codes column."""
    return any(is_quantized_field(f) for f in schema)


def role_of(field: pa.Field) -> tuple[str, str] | None:
    """``(role, codes column name)`` of a derived column, None for any other field."""
    md = field.metadata or {}
    role = md.get(K_ROLE)
    if role is None or role == b"codes":
        return None
    return role.decode(errors="replace"), md.get(K_CODES, b"").decode(errors="replace")


def codes_fields(field: pa.Field, options: QuantOptions) -> list[pa.Field]:
    """The fields that replace one float list field in the quantized schema."""
    t = field.type
    kind = list_kind(t)
    c = field.name
    ggml = options.ggml
    md = {
        K_VERSION: str(VERSION_GGML if ggml else VERSION_NATIVE),
        K_ROLE: "codes",
    }
    if ggml:
        md[PREFIX + "format"] = ggml.name
    else:
        md[PREFIX + "bits"] = str(options.bits)
        md[PREFIX + "scheme"] = options.scheme
        md[PREFIX + "group_size"] = str(options.group_size)
    md.update(
        {
            PREFIX + "method": options.method,
            PREFIX + "dtype": float_name(t.value_type),
            PREFIX + "list_type": kind,
            PREFIX + "value_field": t.value_field.name,
            PREFIX + "value_nullable": "true" if t.value_field.nullable else "false",
        }
    )
    if options.clip is not None:
        md[PREFIX + "clip"] = repr(options.clip)
    if options.scale_dtype is not None:  # informational: decoding needs nothing new
        md[PREFIX + "scale_dtype"] = options.scale_dtype
    if kind == "fixed_size_list":
        n = t.list_size
        md[PREFIX + "list_size"] = str(n)
        codes_type = pa.binary(fixed_codes_bytes(n, ggml, options.bits))
        per_group = None if ggml else pa.list_(pa.float32(), -(-n // options.group_size))
    else:
        codes_type = pa.large_binary() if kind == "large_list" else pa.binary()
        per_group = None if ggml else pa.list_(pa.float32())
    orig_md = {k: v for k, v in (field.metadata or {}).items() if not k.startswith(_PREFIX_B)}
    fields = [pa.field(c, codes_type, field.nullable, {**orig_md, **md})]

    def derived(role, typ):
        return pa.field(derived_name(c, role), typ, field.nullable, {K_ROLE: role, K_CODES: c})

    if not ggml:
        fields.append(derived("scales", per_group))
        if options.scheme == "asymmetric":
            fields.append(derived("zero_points", per_group))
        if kind != "fixed_size_list":
            fields.append(derived("numel", pa.int64()))
    if options.stats:
        fields.append(derived("mse", pa.float64()))
        fields.append(derived("max_abs_error", pa.float64()))
    return fields


def tensor_bytes(
    numel: int,
    *,
    format: str = formats.NATIVE,
    bits: int | None = None,
    group_size: int | None = None,
    scheme: str | None = None,
) -> int:
    """Bytes one quantized tensor of ``numel`` weights holds: its codes and every scale and
    zero-point byte (the count behind "bits per weight"; Arrow offsets and the int64
    ``numel`` are not counted). A ggml tensor must be whole blocks (``ValueError``).

    >>> tensor_bytes(4096, bits=4, group_size=128, scheme="asymmetric") * 8 / 4096
    4.5
    >>> tensor_bytes(4096, format="Q4_K") * 8 / 4096
    4.5
    """
    if format != formats.NATIVE:
        t = formats.get(format)
        if numel % t.block_size:
            raise ValueError(
                f"{numel} values is not a multiple of {t.name}'s block size {t.block_size}"
            )
        return t.row_bytes(numel)
    groups = -(-numel // group_size)
    per_group = 8 if scheme == "asymmetric" else 4
    return -(-numel * bits // 8) + groups * per_group


def fixed_codes_bytes(n: int, ggml: formats.GgmlType | None, bits: int | None) -> int:
    """Bytes of the codes of one fixed-size row of ``n`` elements."""
    if ggml:
        return ggml.row_bytes(n) if n % ggml.block_size == 0 else -1
    return -(-n * bits // 8)


@dataclass(frozen=True)
class CodesMeta:
    """What a codes field's metadata says about its column."""

    version: int
    format: str  # "native" or a ggml type name
    bits: int | None  # native only
    scheme: str | None
    group_size: int | None
    dtype: str
    kind: str
    list_size: int | None
    value_field: str
    value_nullable: bool

    @property
    def ggml(self) -> formats.GgmlType | None:
        return formats.GGML_TYPES.get(self.format)

    def decoded_type(self) -> pa.DataType:
        """The list type of the restored column."""
        value = pa.field(self.value_field, FLOAT_TYPES[self.dtype], self.value_nullable)
        if self.kind == "list":
            return pa.list_(value)
        if self.kind == "large_list":
            return pa.large_list(value)
        return pa.list_(value, self.list_size)

    def needs(self, role: str) -> bool:
        """Does this column need its derived column ``role`` to be decoded?"""
        if self.ggml:
            return False
        if role == "scales":
            return True
        if role == "zero_points":
            return self.scheme == "asymmetric"
        return role == "numel" and self.kind != "fixed_size_list"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_codes_field(field: pa.Field) -> CodesMeta:
    """Read and check a codes field's metadata (``WireError`` says what is wrong)."""
    md = {
        k.decode(errors="replace"): v.decode(errors="replace")
        for k, v in (field.metadata or {}).items()
    }
    name = _short(field.name)

    def get(key):
        value = md.get(PREFIX + key)
        if value is None:
            raise WireError(f"quantized column {name!r} lacks metadata key 'flightquant.{key}'")
        return value

    def integer(key, lo, hi):
        value = get(key)
        try:
            number = int(value) if len(value) < 20 else None
        except ValueError:
            number = None
        if number is None or not lo <= number <= hi:
            raise WireError(f"quantized column {name!r}: bad flightquant.{key}={_short(value)!r}")
        return number

    if md.get(PREFIX + "role") != "codes":
        raise WireError(f"quantized column {name!r} lacks flightquant.role='codes'")
    version = get("format_version")
    if version not in (str(VERSION_NATIVE), str(VERSION_GGML)):
        raise WireError(
            f"quantized column {name!r} has format version {_short(version)!r}; this flightquant "
            f"reads versions {VERSION_NATIVE} and {VERSION_GGML} (upgrade flightquant to read newer files)"
        )
    foreign = [
        key
        for v, keys in VERSION_KEYS.items()
        if str(v) != version
        for key in keys
        if PREFIX + key in md
    ]
    if foreign:
        raise WireError(
            f"quantized column {name!r}: format version {version} has no "
            f"flightquant.{foreign[0]} key (a field with it is neither version)"
        )
    bits = scheme = group_size = None
    if version == str(VERSION_GGML):
        fmt = get("format")
        if not formats.is_ggml(fmt):
            raise WireError(
                f"quantized column {name!r}: unknown flightquant.format={_short(fmt)!r}; "
                f"this flightquant reads {', '.join(formats.GGML_TYPES)}"
            )
    else:
        fmt = formats.NATIVE
        bits = integer("bits", 2, 8)
        scheme = get("scheme")
        if bits not in VALID_BITS or scheme not in SCHEMES or (scheme == "ternary" and bits != 2):
            raise WireError(f"quantized column {name!r}: bad bits/scheme {bits}/{_short(scheme)!r}")
        group_size = integer("group_size", 1, 2**31 - 1)
    dtype = get("dtype")
    kind = get("list_type")
    if dtype not in FLOAT_TYPES or kind not in LIST_KINDS:
        raise WireError(
            f"quantized column {name!r}: bad dtype/list_type {_short(dtype)!r}/{_short(kind)!r}"
        )
    list_size = integer("list_size", 0, 2**31 - 1) if kind == "fixed_size_list" else None
    ggml = formats.GGML_TYPES.get(fmt)
    if kind == "fixed_size_list":
        width = fixed_codes_bytes(list_size, ggml, bits)
        if width < 0:
            raise WireError(
                f"quantized column {name!r}: list_size {list_size} is not a multiple of "
                f"{fmt}'s block size {ggml.block_size}"
            )
        expected = pa.binary(width)
    else:
        expected = pa.large_binary() if kind == "large_list" else pa.binary()
    if field.type != expected:
        raise WireError(
            f"quantized column {name!r} has type {field.type}, expected {expected} for "
            f"{kind} codes" + (f" at {bits} bits" if bits else f" of {fmt}")
        )
    nullable = md.get(PREFIX + "value_nullable", "true")
    if nullable not in ("true", "false"):
        raise WireError(
            f"quantized column {name!r}: bad flightquant.value_nullable={_short(nullable)!r}"
        )
    return CodesMeta(
        int(version),
        fmt,
        bits,
        scheme,
        group_size,
        dtype,
        kind,
        list_size,
        md.get(PREFIX + "value_field", "item"),
        nullable == "true",
    )


def stripped_metadata(field: pa.Field) -> dict | None:
    """A field's metadata without flightquant's keys (what the restored column keeps)."""
    md = {k: v for k, v in (field.metadata or {}).items() if not k.startswith(_PREFIX_B)}
    return md or None


def flightquant_metadata(field: pa.Field) -> dict[str, str]:
    """A field's ``flightquant.*`` keys, without the prefix, as text (what ``inspect`` shows)."""
    md = field.metadata or {}
    return {k.decode()[len(PREFIX) :]: v.decode() for k, v in md.items() if k.startswith(_PREFIX_B)}
