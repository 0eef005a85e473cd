"""Quantization options: parsing and validation, shared by the API, the server and the CLI.

Options arrive as Python keyword arguments or as the JSON object of a Flight command.
Unknown keys, wrong types and out-of-range values are errors that say what to fix;
nothing is silently ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from . import formats
from .errors import echo, echo_list, shorten

VALID_BITS = (2, 4, 8)
SCHEMES = ("asymmetric", "symmetric", "ternary")
METHODS = ("rtn", "mse")
#: dtypes a scale can be stored in (``scale_dtype``): codes are chosen against the scale
#: rounded to it, and asymmetric zero points are integers (compressed-tensors' layout)
SCALE_DTYPES = ("float32", "float16", "bfloat16")
OPS = ("quantize", "dequantize")
#: the op of a command that feeds a calibration session (:class:`CalibrateOptions`)
CALIBRATE_OP = "calibrate"
#: longest calibration session name (characters)
MAX_SESSION_NAME = 200
MAX_GROUP_SIZE = 2**31 - 1

#: integer codes the kernels use for the scheme and the method
SCHEME_CODES = {"asymmetric": 0, "symmetric": 1, "ternary": 2}
METHOD_CODES = {"rtn": 0, "mse": 1}
SCALE_DTYPE_CODES = {None: 0, "float32": 1, "float16": 2, "bfloat16": 3}


class OptionsError(ValueError):
    """Bad quantization options (a ``ValueError``, so Flight maps it to INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class QuantOptions:
    """Validated quantization options (``docs/quantization.md``).

    Build one with :meth:`from_mapping` (keyword arguments) or :meth:`from_json` (a
    Flight command); the constructor itself does not validate. With a ggml ``format``,
    ``bits``, ``scheme`` and ``group_size`` are implied by the type and stay None.
    :meth:`get_config` / :meth:`from_config` round-trip the whole configuration through
    a JSON-able dict (numcodecs' convention).

    Examples
    --------
    >>> QuantOptions.from_mapping({"bits": 8, "group_size": 64}).bits
    8
    >>> QuantOptions.from_mapping({"scheme": "ternary"}).bits
    2
    >>> QuantOptions.from_mapping({"format": "Q4_K"}).group_size is None
    True
    """

    op: str = "quantize"
    bits: int | None = 4
    scheme: str | None = "asymmetric"
    group_size: int | None = 128
    method: str = "rtn"
    clip: float | None = None
    columns: tuple[str, ...] | None = None
    stats: bool = False
    format: str = formats.NATIVE
    scale_dtype: str | None = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None = None) -> QuantOptions:
        """Validate a mapping of option names to values; missing keys take defaults."""
        mapping = dict(mapping or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise OptionsError(
                f"unknown option(s) {echo_list(unknown)}; "
                f"valid options are: {', '.join(sorted(known))}"
            )
        op = _choice(mapping.get("op", "quantize"), "op", OPS)
        fmt = _choice(_given(mapping, "format", formats.NATIVE), "format", formats.FORMAT_NAMES)
        method = _choice(mapping.get("method", "rtn"), "method", METHODS)
        if fmt != formats.NATIVE:
            implied = [k for k in ("bits", "scheme", "group_size") if mapping.get(k) is not None]
            if implied:
                t = formats.get(fmt)
                raise OptionsError(
                    f"{', '.join(implied)} cannot be given with format={fmt!r}: a ggml type fixes "
                    f"them ({t.name}: blocks of {t.block_size} weights, "
                    f"{t.bits_per_weight:g} bits/weight); use format='native' to choose them"
                )
            bits = scheme = group_size = None
        else:
            scheme = _choice(_given(mapping, "scheme", "asymmetric"), "scheme", SCHEMES)
            bits, group_size = _native_bits_group(mapping, scheme)
        clip = mapping.get("clip")
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float)):
                raise OptionsError(f"clip must be null or a positive number, got {echo(clip)}")
            try:
                as_float = float(clip)
            except OverflowError:  # an integer beyond float's range
                as_float = math.inf
            if not (math.isfinite(as_float) and as_float > 0):
                raise OptionsError(f"clip must be a positive finite number, got {echo(clip)}")
            clip = as_float
        columns = mapping.get("columns")
        if columns is not None:
            if isinstance(columns, str) or not isinstance(columns, (list, tuple)):
                raise OptionsError(
                    f"columns must be null or a list of column names, got {echo(columns)}"
                )
            if not columns or not all(isinstance(c, str) for c in columns):
                raise OptionsError(
                    "columns must be a non-empty list of column names (strings), "
                    f"got {echo(columns)}; use null for every float list column"
                )
            columns = tuple(columns)
        stats = mapping.get("stats", False)
        if not isinstance(stats, bool):
            raise OptionsError(f"stats must be true or false, got {echo(stats)}")
        scale_dtype = mapping.get("scale_dtype")
        if scale_dtype is not None:
            scale_dtype = _choice(scale_dtype, "scale_dtype", SCALE_DTYPES)
            if fmt != formats.NATIVE or scheme == "ternary":
                raise OptionsError(
                    "scale_dtype applies to format='native' with scheme='symmetric' or "
                    f"'asymmetric', not {fmt if fmt != formats.NATIVE else scheme!r}; drop "
                    "scale_dtype"
                )
        return cls(op, bits, scheme, group_size, method, clip, columns, stats, fmt, scale_dtype)

    @classmethod
    def from_json(cls, data: bytes | str | None) -> QuantOptions:
        """Parse the JSON object of a Flight command; empty means all defaults."""
        return cls.from_mapping(_command_object(data))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["columns"] is not None:
            d["columns"] = list(d["columns"])
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    def get_config(self) -> dict[str, Any]:
        """The whole configuration as a JSON-able dict; :meth:`from_config` restores it."""
        return self.to_dict()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QuantOptions:
        return cls.from_mapping(config)

    @property
    def ggml(self) -> formats.GgmlType | None:
        """The ggml type of a ggml ``format``, None for native."""
        return formats.GGML_TYPES.get(self.format)


@dataclass(frozen=True)
class CalibrateOptions:
    """The command of a calibration stream: ``{"op": "calibrate", "session": NAME}``.

    >>> CalibrateOptions.from_mapping({"op": "calibrate", "session": "llama-8b"}).session
    'llama-8b'
    """

    session: str
    op: str = CALIBRATE_OP

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> CalibrateOptions:
        mapping = dict(mapping)
        unknown = sorted(set(mapping) - {"op", "session"})
        if unknown:
            raise OptionsError(
                f"unknown option(s) {echo_list(unknown)} for op 'calibrate'; its options are: "
                "op, session"
            )
        if mapping.get("op", CALIBRATE_OP) != CALIBRATE_OP:
            raise OptionsError(f"op must be 'calibrate', got {echo(mapping.get('op'))}")
        if "session" not in mapping:
            raise OptionsError(
                'op \'calibrate\' needs a session name: {"op": "calibrate", "session": NAME}'
            )
        return cls(check_session_name(mapping["session"]))

    def to_json(self) -> bytes:
        return json.dumps({"op": self.op, "session": self.session}).encode()


def check_session_name(name: Any) -> str:
    """A calibration session name: a non-empty string of at most 200 printable characters."""
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_SESSION_NAME
        or not name.isprintable()
    ):
        raise OptionsError(
            f"session must be a non-empty string of at most {MAX_SESSION_NAME} printable "
            f"characters, got {echo(name)}"
        )
    return name


def parse_command(data: bytes | str | None) -> QuantOptions | CalibrateOptions:
    """The options of a DoExchange command: :class:`CalibrateOptions` for
    ``op: "calibrate"``, :class:`QuantOptions` otherwise."""
    obj = _command_object(data)
    if obj.get("op") == CALIBRATE_OP:
        return CalibrateOptions.from_mapping(obj)
    return QuantOptions.from_mapping(obj)


def _command_object(data: bytes | str | None) -> dict[str, Any]:
    """The JSON object of a Flight command ({} for an empty one)."""
    if data is None:
        return {}
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise OptionsError(f"the command must be UTF-8 JSON: {exc}") from None
    if not data.strip():
        return {}
    try:
        obj = json.loads(data)
    except RecursionError:
        raise OptionsError(
            "the command nests JSON arrays/objects too deeply to parse; options are a "
            'flat JSON object, e.g. {"bits": 4, "group_size": 128}'
        ) from None
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise OptionsError(
            f"the command must be a JSON object of options, e.g. "
            f'{{"bits": 4, "group_size": 128}}; could not parse it: {shorten(str(exc))}'
        ) from None
    if not isinstance(obj, dict):
        raise OptionsError(
            f"the command must be a JSON object of options, got {type(obj).__name__}"
        )
    return obj


def _native_bits_group(mapping: Mapping[str, Any], scheme: str) -> tuple[int, int]:
    bits = mapping.get("bits")
    if scheme == "ternary":
        if bits is not None and (_is_int(bits) and bits != 2 or not _is_int(bits)):
            raise OptionsError(
                f"bits={echo(bits)} does not fit scheme='ternary': ternary codes "
                "{-1, 0, +1} are always stored in 2 bits; pass bits=2 or leave bits unset"
            )
        bits = 2
    elif bits is None:
        bits = 4
    if not _is_int(bits) or bits not in VALID_BITS:
        raise OptionsError(
            f"bits must be one of {', '.join(map(str, VALID_BITS))}, got {echo(bits)}"
        )
    group_size = _given(mapping, "group_size", 128)
    if not _is_int(group_size) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise OptionsError(
            f"group_size must be an integer from 1 to {MAX_GROUP_SIZE} "
            f"(common: 32, 64, 128, 256), got {echo(group_size)}"
        )
    return int(bits), int(group_size)


def _given(mapping: Mapping[str, Any], key: str, default: Any) -> Any:
    """The value of ``key``; None (JSON null) or absent means the default."""
    value = mapping.get(key)
    return default if value is None else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(value: Any, name: str, valid: tuple[str, ...]) -> str:
    if value not in valid or not isinstance(value, str):
        raise OptionsError(
            f"{name} must be one of {', '.join(map(repr, valid))}, got {echo(value)}"
        )
    return value


def check_importance_method(options: QuantOptions, what: str) -> None:
    """Raise ``OptionsError`` when ``options`` cannot use importance (``what`` names the
    data that has it): native ``rtn`` has no weighted form; ggml ``rtn`` is ggml's
    importance path and native ``mse`` the weighted search."""
    if options.ggml is None and options.method != "mse":
        raise OptionsError(
            f"{what} has importance, which method={options.method!r} cannot use with "
            "format='native': pass method='mse' (the importance-weighted search), or no "
            "importance"
        )
