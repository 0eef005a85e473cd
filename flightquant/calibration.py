"""Calibration: activations in, per-column sums of squares out (an importance matrix).

One owner for the calibration protocol and its arithmetic, used by the server's sessions,
the client, the torch hooks and the in-process path alike:

- the Flight names: the ``calibrate`` op of a DoExchange command, the ``imatrix`` DoGet
  ticket, the two session actions and the table a session is read back as
  (:data:`IMATRIX_SCHEMA`);
- :func:`batch_sums`: a batch of activations, validated as a whole, reduced per layer to
  the float64 sums of squares per column and the token count;
- :class:`Accumulator`: the running statistic (thread-safe; a batch is added entirely or
  not at all).

A batch of activations has one row per (layer, group of tokens): the layer's weight name
(the first string column), a float list column holding ``tokens x width`` values row-major,
and optionally ``shape`` (``list<int64>``: ``[tokens, width]``, or more leading dimensions,
whose product is the token count; absent = one token per row). For each row the statistic
adds ``in_sum2[j] += x[t, j]**2`` over its tokens and ``count += tokens``, as llama.cpp's
``llama-imatrix`` does for the input of every matrix multiplication.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import wire
from .errors import echo
from .options import check_session_name
from .protocol import CALIBRATION_DROP

__all__ = [
    "IMATRIX_SCHEMA",
    "OP",
    "SHAPE_COLUMN",
    "TICKET_KEY",
    "Accumulator",
    "BatchSums",
    "CalibrationError",
    "activation_batch",
    "array_sums",
    "batch_sums",
    "imatrix_ticket",
    "parse_drop",
    "parse_ticket",
    "sums_from_table",
]

#: the ``op`` of a DoExchange command that feeds a session: ``{"op": "calibrate", "session": N}``
OP = "calibrate"
#: key of the DoGet ticket that reads a session: ``{"imatrix": NAME}``
TICKET_KEY = "imatrix"
#: the optional column of ``[tokens, width]`` per row
SHAPE_COLUMN = "shape"
#: a session read back: one row per layer, sorted by name
IMATRIX_SCHEMA = pa.schema(
    [
        ("layer_name", pa.string()),
        ("in_sum2", pa.list_(pa.float32())),
        ("count", pa.int64()),
    ]
)
#: elements squared at a time (bounds the float64 temporary of a large row to 8 MiB)
_CHUNK_ELEMENTS = 1 << 20
#: bytes a layer of a session holds beyond its ``width`` float64 sums (name, dict, array)
LAYER_OVERHEAD = 256


class CalibrationError(ValueError):
    """A batch of activations or a session request that cannot be taken (INVALID_ARGUMENT
    over Flight); the message names the layer, the row and what to fix."""


def imatrix_ticket(session: str) -> bytes:
    """The DoGet ticket that reads ``session`` as an :data:`IMATRIX_SCHEMA` table."""
    return json.dumps({TICKET_KEY: check_session_name(session)}).encode()


def parse_ticket(raw: bytes) -> str:
    """The session name of an ``{"imatrix": NAME}`` ticket."""
    try:
        obj = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict) or set(obj) != {TICKET_KEY}:
        raise CalibrationError(
            'a DoGet ticket must be the JSON object {"imatrix": SESSION} (read a '
            "calibration session back)"
        )
    return check_session_name(obj[TICKET_KEY])


def parse_drop(body: bytes) -> str:
    """The session name of a ``calibration-drop`` action body: ``{"session": NAME}``."""
    try:
        obj = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict) or set(obj) != {"session"}:
        raise CalibrationError(
            f'the {CALIBRATION_DROP!r} action takes the body {{"session": NAME}}'
        )
    return check_session_name(obj["session"])


# --------------------------------------------------------------------------- one batch


@dataclass
class BatchSums:
    """A batch reduced per layer: ``layers[name] = (sum2 float64 [width], tokens)``."""

    layers: dict[str, tuple[np.ndarray, int]]
    rows: int
    tokens: int
    elements: int
    input_bytes: int

    def totals(self) -> dict[str, int]:
        """The batch's totals, as a calibrate reply's ``app_metadata`` carries them."""
        return {
            "rows": self.rows,
            "layers": len(self.layers),
            "tokens": self.tokens,
            "elements": self.elements,
            "input_bytes": self.input_bytes,
        }


def _columns(schema: pa.Schema) -> tuple[int, int, int | None]:
    name_col = wire.key_column(schema)
    value_col = shape_col = None
    for i, f in enumerate(schema):
        t = f.type
        if i == name_col:
            continue
        if f.name == SHAPE_COLUMN:
            if not (
                (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
                and pa.types.is_integer(t.value_type)
            ):
                raise CalibrationError(
                    f"column 'shape' must be list<int64> ([tokens, width] per row), got {t}"
                )
            shape_col = i
        elif value_col is None and wire.is_float_list(t):
            value_col = i
    if name_col is None:
        raise CalibrationError(
            "a calibration batch needs a string column with each row's layer (weight) name, "
            f"got columns {echo([f'{f.name}: {f.type}' for f in schema])}"
        )
    if value_col is None:
        raise CalibrationError(
            "a calibration batch needs a float list column with each row's activations "
            f"(tokens x width values), got columns {echo([f'{f.name}: {f.type}' for f in schema])}"
        )
    return name_col, value_col, shape_col


def _flat(arr: pa.Array, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list array with no null rows, offsets from 0."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        offsets = np.arange(len(arr) + 1, dtype=np.int64) * size
    else:
        offsets = np.asarray(arr.offsets, dtype=np.int64)
        offsets = offsets - offsets[0]
    values = arr.flatten()
    if values.null_count:
        raise CalibrationError(f"{what} holds null values; send numbers only")
    return values.to_numpy(zero_copy_only=False), offsets


def _row_key(names: list, row: int) -> str:
    return f"row {row} (layer {echo(names[row])})"


def batch_sums(
    batch: pa.RecordBatch,
    *,
    max_width: int | None = None,
    reserve: Callable[[int], None] | None = None,
) -> BatchSums:
    """Validate a batch of activations as a whole and reduce it per layer.

    Raises :class:`CalibrationError` naming the row and layer for a missing name, shape or
    value, a non-finite value, a shape that does not match the values, or a layer whose
    width differs between rows (or exceeds ``max_width``). Nothing is reduced until the
    whole batch is known to be valid. ``reserve(nbytes)`` is called with the bytes the
    reduction will hold (8 per column of each layer) before they are allocated (a server
    reserves them from its memory budget); the rest of the work is bounded blocks.

    Examples
    --------
    >>> b = activation_batch([("blk.0.attn_q.weight", np.ones((3, 2), np.float32))])
    >>> s = batch_sums(b)
    >>> s.layers["blk.0.attn_q.weight"][0].tolist(), s.tokens
    ([3.0, 3.0], 3)
    """
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else None
        if batch is None:
            return BatchSums({}, 0, 0, 0, 0)
    name_col, value_col, shape_col = _columns(batch.schema)
    n = batch.num_rows
    names_arr = batch.column(name_col)
    values_arr = batch.column(value_col)
    vname = batch.schema.field(value_col).name
    if names_arr.null_count:
        row = int(np.flatnonzero(np.asarray(names_arr.is_null()))[0])
        raise CalibrationError(
            f"row {row} has no layer name (column {batch.schema[name_col].name!r})"
        )
    names = names_arr.to_pylist()
    for row, name in enumerate(names):
        if not name:
            raise CalibrationError(f"row {row} has an empty layer name")
    if values_arr.null_count:
        row = int(np.flatnonzero(np.asarray(values_arr.is_null()))[0])
        raise CalibrationError(
            f"{_row_key(names, row)} has no activations (column {vname!r} is null)"
        )
    values, offsets = _flat(values_arr, f"column {vname!r}")
    lengths = np.diff(offsets)
    i = _first_non_finite(values)
    if i is not None:
        row = int(np.searchsorted(offsets, i, side="right") - 1)
        raise CalibrationError(
            f"non-finite value {float(values[i])!r} in column {vname!r}, {_row_key(names, row)}, "
            f"element {i - int(offsets[row])}: activations must be finite"
        )
    # shapes: tokens and width per row
    if shape_col is None:
        tokens = np.ones(n, dtype=np.int64)
        widths = lengths.copy()
    else:
        shape_arr = batch.column(shape_col)
        if shape_arr.null_count:
            row = int(np.flatnonzero(np.asarray(shape_arr.is_null()))[0])
            raise CalibrationError(
                f"{_row_key(names, row)} has no shape: give [tokens, width] in column 'shape'"
            )
        dims, dim_offsets = _flat(shape_arr, "column 'shape'")
        tokens = np.empty(n, dtype=np.int64)
        widths = np.empty(n, dtype=np.int64)
        for row in range(n):
            shape = [int(d) for d in dims[dim_offsets[row] : dim_offsets[row + 1]]]
            if not shape or any(d < 0 for d in shape) or shape[-1] < 1:
                raise CalibrationError(
                    f"{_row_key(names, row)} has shape {echo(shape)}: give [tokens, width] "
                    "with width >= 1 and tokens >= 0"
                )
            t = math.prod(shape[:-1])
            if t * shape[-1] != lengths[row]:
                raise CalibrationError(
                    f"{_row_key(names, row)}: shape {echo(shape)} holds {t * shape[-1]} values "
                    f"but the row has {int(lengths[row])}"
                )
            tokens[row], widths[row] = t, shape[-1]
    # widths per layer, all checked before any arithmetic
    width_of: dict[str, int] = {}
    for row, name in enumerate(names):
        w = int(widths[row])
        if w < 1:
            raise CalibrationError(f"{_row_key(names, row)} has no activations (width 0)")
        if max_width is not None and w > max_width:
            raise CalibrationError(
                f"{_row_key(names, row)} is {w} wide, over this session's limit of {max_width} "
                "(--max-session-width)"
            )
        if width_of.setdefault(name, w) != w:
            raise CalibrationError(
                f"{_row_key(names, row)} is {w} wide, but an earlier row of the same layer "
                f"is {width_of[name]} wide"
            )
    if reserve is not None:
        reserve(8 * sum(width_of.values()))
    layers: dict[str, list] = {}
    for row, name in enumerate(names):
        t, w = int(tokens[row]), int(widths[row])
        x = values[offsets[row] : offsets[row + 1]].reshape(t, w)
        acc = layers.get(name)
        if acc is None:
            acc = layers[name] = [np.zeros(w, np.float64), 0]
        _add_squares(acc[0], x)
        acc[1] += t
    return BatchSums(
        {k: (v[0], v[1]) for k, v in layers.items()},
        rows=n,
        tokens=int(tokens.sum()),
        elements=int(lengths.sum()),
        input_bytes=int(batch.get_total_buffer_size()),
    )


def array_sums(name: str, x: np.ndarray, *, max_width: int | None = None) -> BatchSums:
    """The reduction of one layer's activations ``x`` (``[..., width]``), checked as a
    batch row is: a name, at least one column, finite values."""
    x = np.asarray(x)
    if not isinstance(name, str) or not name:
        raise CalibrationError(f"a layer name must be a non-empty string, got {echo(name)}")
    if x.ndim == 0 or x.shape[-1] < 1 or x.dtype.kind not in "fiu":
        raise CalibrationError(
            f"layer {echo(name)}: activations must be numbers shaped [..., width] with width "
            f">= 1, got {x.dtype} {x.shape}"
        )
    width = int(x.shape[-1])
    if max_width is not None and width > max_width:
        raise CalibrationError(
            f"layer {echo(name)} is {width} wide, over this session's limit of {max_width} "
            "(--max-session-width)"
        )
    x = x.reshape(-1, width)
    i = _first_non_finite(x.reshape(-1))
    if i is not None:
        raise CalibrationError(
            f"non-finite value {float(x.reshape(-1)[i])!r} in the activations of layer "
            f"{echo(name)}, element {i}: activations must be finite"
        )
    s = np.zeros(width, np.float64)
    _add_squares(s, x)
    return BatchSums({name: (s, x.shape[0])}, 1, x.shape[0], x.size, x.nbytes)


def _first_non_finite(values: np.ndarray) -> int | None:
    """Index of the first NaN or infinity (checked in bounded blocks), or None."""
    if values.dtype.kind != "f":
        return None
    for start in range(0, values.size, _CHUNK_ELEMENTS):
        block = values[start : start + _CHUNK_ELEMENTS]
        finite = np.isfinite(block)
        if not finite.all():
            return start + int(np.flatnonzero(~finite)[0])
    return None


def _add_squares(out: np.ndarray, x: np.ndarray) -> None:
    """``out += (x * x).sum(axis=0)`` in float64, a bounded block of tokens at a time."""
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1]))
    for start in range(0, x.shape[0], step):
        block = x[start : start + step]
        # dtype: the products and sums in float64, without a float64 copy of the block
        out += np.einsum("ij,ij->j", block, block, dtype=np.float64)


# --------------------------------------------------------------------------- the statistic


class Accumulator:
    """Per layer: float64 sums of squares per column and the token count.

    Thread-safe. :meth:`add_batch` validates the whole batch (and its widths against the
    layers already held) before it changes anything, so a bad batch leaves it as it was.

    Examples
    --------
    >>> acc = Accumulator()
    >>> _ = acc.add("w", np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    >>> acc.table().to_pylist()
    [{'layer_name': 'w', 'in_sum2': [10.0, 20.0], 'count': 2}]
    """

    def __init__(self, *, max_layers: int | None = None, max_width: int | None = None):
        self.max_layers = max_layers
        self.max_width = max_width
        self.layers: dict[str, list] = {}  # name -> [sum2 float64 [width], count]
        self.lock = threading.Lock()
        self.batches = 0
        self.rows = 0
        self.tokens = 0

    # -- adding ----------------------------------------------------------------------
    def add_batch(self, batch: pa.RecordBatch) -> BatchSums:
        """Add a batch of activations; returns its reduction (whose ``totals()`` say what
        was added)."""
        sums = batch_sums(batch, max_width=self.max_width)
        self.add_sums(sums)
        return sums

    def add(self, name: str, x: np.ndarray) -> BatchSums:
        """Add the activations ``x`` of layer ``name`` (``[..., width]``: the leading
        dimensions are tokens), as one row of a batch would be."""
        sums = array_sums(name, x, max_width=self.max_width)
        self.add_sums(sums)
        return sums

    def new_layers(self, sums: BatchSums) -> dict[str, int]:
        """The layers of ``sums`` not held yet, with their widths; raises for a width that
        differs from the one held, or for layers over ``max_layers``. Call with the lock."""
        new = {}
        for name, (s, _) in sums.layers.items():
            held = self.layers.get(name)
            if held is None:
                new[name] = s.shape[0]
            elif held[0].shape[0] != s.shape[0]:
                raise CalibrationError(
                    f"layer {echo(name)} is {s.shape[0]} wide in this batch, but "
                    f"{held[0].shape[0]} wide in the data already added"
                )
        if self.max_layers is not None and len(self.layers) + len(new) > self.max_layers:
            raise CalibrationError(
                f"this batch brings {len(new)} new layers to the {len(self.layers)} held, over "
                f"the limit of {self.max_layers} layers per session (--max-session-layers)"
            )
        return new

    def add_sums(self, sums: BatchSums, *, checked: bool = False) -> None:
        """Add a batch's reduction (all of it, or nothing when a width does not fit)."""
        with self.lock:
            if not checked:
                self.new_layers(sums)
            self._merge(sums)

    def _merge(self, sums: BatchSums) -> None:
        """Add ``sums`` (whose arrays a new layer takes over: no copy)."""
        for name, (s, t) in sums.layers.items():
            held = self.layers.get(name)
            if held is None:
                self.layers[name] = [s, t]
            else:
                held[0] += s
                held[1] += t
        self.batches += 1
        self.rows += sums.rows
        self.tokens += sums.tokens

    # -- reading ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """What the statistic holds (its accounting under a server's memory budget)."""
        with self.lock:
            return sum(layer_bytes(s.shape[0]) for s, _ in self.layers.values())

    def snapshot(self) -> dict[str, tuple[np.ndarray, int]]:
        """A copy: ``{name: (sum2 float64 [width], count)}``, sorted by name."""
        with self.lock:
            return {k: (self.layers[k][0].copy(), self.layers[k][1]) for k in sorted(self.layers)}

    def table(self) -> pa.Table:
        """The statistic as an :data:`IMATRIX_SCHEMA` table (in_sum2 rounded to float32)."""
        return pa.Table.from_batches(list(table_batches(self)), schema=IMATRIX_SCHEMA)


def layer_bytes(width: int) -> int:
    """Bytes one layer of ``width`` columns holds in a session."""
    return 8 * width + LAYER_OVERHEAD


def table_batches(acc: Accumulator, max_bytes: int = 16 << 20):
    """The statistic as :data:`IMATRIX_SCHEMA` batches of about ``max_bytes`` (at least
    one batch), each a copy made under the lock: memory stays bounded for any session."""
    with acc.lock:
        names = sorted(acc.layers)
    start = 0
    while True:
        rows, size = [], 0
        with acc.lock:
            while start < len(names) and (not rows or size < max_bytes):
                held = acc.layers.get(names[start])
                if held is not None:
                    rows.append((names[start], held[0].astype(np.float32), int(held[1])))
                    size += 4 * held[0].shape[0]
                start += 1
        yield _imatrix_batch(rows)
        if start >= len(names):
            return


def _imatrix_batch(rows: list[tuple[str, np.ndarray, int]]) -> pa.RecordBatch:
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([r[1].shape[0] for r in rows], out=offsets[1:])
    flat = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r[0] for r in rows], pa.string()),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32())),
            pa.array([r[2] for r in rows], pa.int64()),
        ],
        schema=IMATRIX_SCHEMA,
    )


# --------------------------------------------------------------------------- conversions


def activation_batch(
    items: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
) -> pa.RecordBatch:
    """A calibration batch from ``(layer name, activations)`` pairs (or a dict): each array
    ``[..., width]`` becomes one row of float32 values with ``shape = [tokens, width]``.

    >>> activation_batch({"w": np.zeros((4, 3))}).column("shape").to_pylist()
    [[4, 3]]
    """
    if isinstance(items, Mapping):
        items = items.items()
    names, arrays, shapes = [], [], []
    for name, x in items:
        x = np.asarray(x)
        if x.ndim == 0:
            raise CalibrationError(f"layer {name!r}: activations need at least one dimension")
        width = x.shape[-1]
        tokens = math.prod(x.shape[:-1])
        names.append(name)
        arrays.append(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
        shapes.append([tokens, width])
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise CalibrationError("one batch holds at most 2**31 - 1 values; send several")
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(names, pa.string()),
            pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat)),
            pa.array(shapes, pa.list_(pa.int64())),
        ],
        names=["layer_name", "activations", SHAPE_COLUMN],
    )


def sums_from_table(table: pa.Table | pa.RecordBatch) -> dict[str, tuple[np.ndarray, int]]:
    """``{layer: (in_sum2 float32 [width], count)}`` of an :data:`IMATRIX_SCHEMA` table."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    missing = [f.name for f in IMATRIX_SCHEMA if f.name not in table.column_names]
    if missing:
        raise CalibrationError(f"an imatrix table needs columns {missing}")
    out: dict[str, tuple[np.ndarray, int]] = {}
    names = table.column("layer_name").to_pylist()
    counts = table.column("count").to_pylist()
    sums = table.column("in_sum2").combine_chunks()
    values, offsets = _flat(sums, "column 'in_sum2'")
    for i, name in enumerate(names):
        out[name] = (
            np.asarray(values[offsets[i] : offsets[i + 1]], np.float32),
            int(counts[i]),
        )
    return out
