"""Dicts of NumPy arrays <-> RecordBatches of the seed layer schema, and the quantized
tensors they come back as. No codec here: the client uses it without loading the kernels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from . import formats, wire

#: default upper bound of the float payload of one batch this package builds from tensors
#: (dicts of arrays, tensor files, Ray blocks): well under a server's ``max_batch_bytes``
DEFAULT_BATCH_BYTES = 64 << 20
#: columns of the seed layer schema used for dicts of arrays
NAME, WEIGHTS, SHAPE, DTYPE = "layer_name", "weights", "shape", "dtype"
_NO_SCALES = np.zeros(0, np.float32)


@dataclass
class QuantizedTensor:
    """One quantized tensor: packed codes, per-group scales and what is needed to decode.

    With a ggml ``format`` the codes are ggml's block bytes (the scales live inside the
    blocks: ``scales`` is empty, ``bits``/``scheme``/``group_size`` are None).
    """

    name: str
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    shape: tuple[int, ...]
    dtype: str
    bits: int | None
    scheme: str | None
    group_size: int | None
    numel: int
    format: str = formats.NATIVE

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.codes.nbytes + self.scales.nbytes + zp

    def dequantize(self, threads: int | None = None) -> np.ndarray:
        """Reconstruct the tensor with its original shape and dtype."""
        from . import kernels
        from .layout import make_layout

        if self.format != formats.NATIVE:
            out = kernels.dequantize_ggml(self.codes, self.format, threads=threads)
            return out.reshape(self.shape).astype(_numpy_dtype(self.dtype), copy=False)
        lay = make_layout(np.array([self.numel]), self.bits, self.group_size)
        out = kernels.dequantize_rows(
            self.codes, lay, self.scales, self.zero_points, scheme=self.scheme, threads=threads
        )
        return out.reshape(self.shape).astype(_numpy_dtype(self.dtype), copy=False)


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _check_array(name: Any, value: Any) -> np.ndarray:
    if not isinstance(name, str):
        raise TypeError(f"array names must be strings, got {name!r} ({type(name).__name__})")
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"array {name!r} is a {type(value).__name__}, not a numpy.ndarray: "
            "pass numpy.asarray(value, dtype=numpy.float32)"
        )
    if value.dtype.name == "bfloat16":
        return value.astype(np.float32)  # exact: bfloat16 is the top half of a float32
    if value.dtype.name not in wire.FLOAT_TYPES:
        raise TypeError(
            f"array {name!r} has dtype {value.dtype}; quantize_arrays takes float16, bfloat16, "
            f"float32 or float64 arrays: cast it with .astype(numpy.float32)"
        )
    # non-contiguous (sliced, transposed, Fortran-order) arrays are copied in C order
    return np.ascontiguousarray(value).reshape(-1)


def check_importance(what: str, w: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One tensor's importance vector as float32: 1-D, finite, non-negative, and (with the
    tensor's ``shape``) of the tensor's row length ``shape[-1]``; a ``ValueError`` naming
    ``what`` (e.g. ``array 'blk.0.attn_q.weight'``) otherwise."""
    if isinstance(w, np.generic) or isinstance(w, (list, tuple)):
        w = np.asarray(w)
    if not isinstance(w, np.ndarray) or w.ndim != 1 or w.dtype.kind not in "fiu":
        desc = f"{w.dtype}{list(w.shape)}" if isinstance(w, np.ndarray) else type(w).__name__
        raise ValueError(
            f"importance of {what} must be a 1-D float vector (one weight per column of its "
            f"rows), got {desc}"
        )
    w = np.ascontiguousarray(w, np.float32)
    if shape is not None:
        k = shape[-1] if shape else 1
        if w.size != k:
            raise ValueError(
                f"importance of {what} has {w.size} weights, but its rows have {k} elements "
                f"(shape {list(shape)}): give one weight per column"
            )
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"importance of {what} must be finite and non-negative; element {j} is {float(w[j])!r}"
        )
    return w


def arrays_to_batches(
    arrays: Mapping[str, np.ndarray],
    *,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
    importance: Mapping[str, Any] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Pack a dict of arrays into RecordBatches of the seed layer schema.

    Columns: ``layer_name: string, weights: list<float16|32|64>, shape: list<int64>,
    dtype: string``; consecutive arrays of one value type share a batch of at most about
    ``max_batch_bytes``. Each array is validated and named in every error. With
    ``importance`` (name -> the tensor's importance vector, its last dimension long) the
    batches also carry ``weights_importance`` (``list<float32>``, null for an array that
    has none).
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"arrays must be a dict of name -> numpy array, got {type(arrays).__name__}"
        )
    if importance is not None:
        if not isinstance(importance, Mapping):
            raise TypeError(
                "importance must be a dict of array name -> importance vector, got "
                f"{type(importance).__name__}"
            )
        unknown = [n for n in importance if n not in arrays]
        if unknown:
            raise ValueError(
                f"importance names {len(unknown)} array(s) not in arrays: "
                f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}"
            )
        importance = importance or None
    pending: list[tuple[str, np.ndarray, tuple, str, np.ndarray | None]] = []
    size = 0
    for name, value in arrays.items():
        flat = _check_array(name, value)
        w = None
        if importance is not None and importance.get(name) is not None:
            w = check_importance(f"array {name!r}", importance[name], tuple(value.shape))
        if pending and (flat.dtype != pending[0][1].dtype or size + flat.nbytes > max_batch_bytes):
            yield _batch_of(pending, importance is not None)
            pending, size = [], 0
        pending.append((name, flat, tuple(value.shape), value.dtype.name, w))
        size += flat.nbytes
    if pending:
        yield _batch_of(pending, importance is not None)


def _batch_of(items, with_importance: bool = False) -> pa.RecordBatch:
    dtype = items[0][1].dtype
    lens = np.array([a.size for _, a, _, _, _ in items], np.int64)
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    big = offsets[-1] > np.iinfo(np.int32).max
    values = pa.array(
        np.concatenate([a for _, a, _, _, _ in items]) if items else np.zeros(0, dtype)
    )
    lst = (pa.LargeListArray if big else pa.ListArray).from_arrays(
        pa.array(offsets, pa.int64() if big else pa.int32()), values
    )
    shapes = pa.array([list(s) for _, _, s, _, _ in items], pa.list_(pa.int64()))
    columns = [
        pa.array([n for n, _, _, _, _ in items], pa.string()),
        lst,
        shapes,
        pa.array([d for _, _, _, d, _ in items], pa.string()),
    ]
    names = [NAME, WEIGHTS, SHAPE, DTYPE]
    if with_importance:
        columns.append(importance_array([w for *_, w in items]))
        names.append(wire.importance_name(WEIGHTS))
    return pa.record_batch(columns, names=names)


def importance_array(vectors: list[np.ndarray | None]) -> pa.Array:
    """``list<float32>``: one importance vector per row (None: a null row)."""
    lens = np.array([0 if w is None else w.size for w in vectors], np.int64)
    offsets = np.zeros(len(vectors) + 1, np.int32)
    np.cumsum(lens, out=offsets[1:])
    parts = [w for w in vectors if w is not None]
    values = pa.array(np.concatenate(parts) if parts else np.zeros(0, np.float32))
    mask = pa.array([w is None for w in vectors])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=mask)


def with_importance(data: Any, importance: Mapping[str, Any], columns=None) -> Any:
    """Arrow data (Table, RecordBatch or an iterable of batches) with importance columns
    added: for each float list column ``c`` that is quantized (those in ``columns``, or
    all), ``c_importance`` holds ``importance[key]`` for each row whose key (the batch's
    first string column) is in ``importance``, null for the others. A column that already
    has its importance column is an error (give the importance one way)."""
    if not isinstance(importance, Mapping):
        raise TypeError(
            "importance must be a dict of row key (e.g. the layer name) -> importance vector, "
            f"got {type(importance).__name__}"
        )
    vectors = {k: check_importance(repr(k), w) for k, w in importance.items() if w is not None}
    if isinstance(data, pa.Table):
        _check_keys(data.schema, vectors, data.column(_key_index(data.schema)).to_pylist())
        batches = [_add_importance(b, vectors, columns) for b in data.to_batches()]
        # an empty table has nothing to weigh (its quantized schema is the same either way)
        return pa.Table.from_batches(batches) if batches else data
    if isinstance(data, pa.RecordBatch):
        _check_keys(data.schema, vectors, data.column(_key_index(data.schema)).to_pylist())
        return _add_importance(data, vectors, columns)
    return (_add_importance(b, vectors, columns) for b in data)


def _key_index(schema: pa.Schema) -> int:
    i = wire.key_column(schema)
    if i is None:
        raise ValueError(
            "importance by row key needs a string column holding each row's key (e.g. the "
            f"layer name); the data's columns are {schema.names}"
        )
    return i


def _check_keys(schema: pa.Schema, vectors: Mapping, keys: list) -> None:
    unknown = [k for k in vectors if k not in set(keys)]
    if unknown:
        raise ValueError(
            f"importance names {len(unknown)} row key(s) that are not in the data's column "
            f"{schema.names[_key_index(schema)]!r}: "
            f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}"
        )


def _add_importance(batch, vectors: Mapping, columns):
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"expected RecordBatches, got {type(batch).__name__}")
    schema = batch.schema
    keys = batch.column(_key_index(schema)).to_pylist()
    have = set(schema.names)
    for name in _quantized_names(schema, columns):
        imp = wire.importance_name(name)
        if imp in have:
            raise ValueError(
                f"column {name!r} already has its importance column {imp!r}: pass importance "
                "either as that column or as importance=, not both"
            )
        batch = batch.append_column(
            imp, importance_array([vectors.get(k) if k is not None else None for k in keys])
        )
    return batch


def _quantized_names(schema: pa.Schema, columns) -> list[str]:
    consumed = set(wire.importance_columns(schema).values())
    return [
        f.name
        for i, f in enumerate(schema)
        if wire.is_float_list(f.type)
        and i not in consumed
        and (columns is None or f.name in columns)
    ]


def batches_to_results(batches: Iterable[pa.RecordBatch]) -> dict[str, QuantizedTensor]:
    """Turn quantized batches of the seed layer schema into :class:`QuantizedTensor` s."""
    out: dict[str, QuantizedTensor] = {}
    for batch in batches:
        field = batch.schema.field(WEIGHTS)
        meta = wire.parse_codes_field(field)
        names = batch.column(NAME).to_pylist()
        shapes = batch.column(SHAPE).to_pylist()
        dtypes = (
            batch.column(DTYPE).to_pylist()
            if DTYPE in batch.schema.names
            else [meta.dtype] * len(names)
        )
        codes = batch.column(WEIGHTS)
        t = meta.ggml
        if t is None:
            scales = batch.column(wire.derived_name(WEIGHTS, "scales"))
            zps = (
                batch.column(wire.derived_name(WEIGHTS, "zero_points"))
                if meta.needs("zero_points")
                else None
            )
            numel = batch.column(wire.derived_name(WEIGHTS, "numel")).to_numpy()
        for i, name in enumerate(names):
            data = np.frombuffer(codes[i].as_buffer() or b"", np.uint8)
            out[name] = QuantizedTensor(
                name=name,
                codes=data,
                scales=_NO_SCALES if t else scales[i].values.to_numpy(),
                zero_points=None if t or zps is None else zps[i].values.to_numpy(),
                shape=tuple(shapes[i]),
                dtype=dtypes[i],
                bits=meta.bits,
                scheme=meta.scheme,
                group_size=meta.group_size,
                numel=data.size // t.type_size * t.block_size if t else int(numel[i]),
                format=meta.format,
            )
    return out
