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

#: columns of the seed layer schema used for dicts of arrays
NAME, WEIGHTS, SHAPE, DTYPE = "layer_name", "weights", "shape", "dtype"
_FLOATS = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}
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
    if value.dtype.name not in _FLOATS:
        raise TypeError(
            f"array {name!r} has dtype {value.dtype}; quantize_arrays takes float16, bfloat16, "
            f"float32 or float64 arrays: cast it with .astype(numpy.float32)"
        )
    # non-contiguous (sliced, transposed, Fortran-order) arrays are copied in C order
    return np.ascontiguousarray(value).reshape(-1)


def arrays_to_batches(
    arrays: Mapping[str, np.ndarray], *, max_batch_bytes: int = 64 << 20
) -> Iterator[pa.RecordBatch]:
    """Pack a dict of arrays into RecordBatches of the seed layer schema.

    Columns: ``layer_name: string, weights: list<float16|32|64>, shape: list<int64>,
    dtype: string``; consecutive arrays of one value type share a batch of at most about
    ``max_batch_bytes``. Each array is validated and named in every error.
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"arrays must be a dict of name -> numpy array, got {type(arrays).__name__}"
        )
    pending: list[tuple[str, np.ndarray, tuple, str]] = []
    size = 0
    for name, value in arrays.items():
        flat = _check_array(name, value)
        if pending and (flat.dtype != pending[0][1].dtype or size + flat.nbytes > max_batch_bytes):
            yield _batch_of(pending)
            pending, size = [], 0
        pending.append((name, flat, tuple(value.shape), value.dtype.name))
        size += flat.nbytes
    if pending:
        yield _batch_of(pending)


def _batch_of(items) -> pa.RecordBatch:
    dtype = items[0][1].dtype
    lens = np.array([a.size for _, a, _, _ in items], np.int64)
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    big = offsets[-1] > np.iinfo(np.int32).max
    values = pa.array(np.concatenate([a for _, a, _, _ in items]) if items else np.zeros(0, dtype))
    lst = (pa.LargeListArray if big else pa.ListArray).from_arrays(
        pa.array(offsets, pa.int64() if big else pa.int32()), values
    )
    shapes = pa.array([list(s) for _, _, s, _ in items], pa.list_(pa.int64()))
    return pa.record_batch(
        [
            pa.array([n for n, _, _, _ in items], pa.string()),
            lst,
            shapes,
            pa.array([d for _, _, _, d in items], pa.string()),
        ],
        names=[NAME, WEIGHTS, SHAPE, DTYPE],
    )


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
