"""The tensor layout: tensors of a model file as RecordBatches, and back.

Tensor files (safetensors, npz, npy, GGUF) are read lazily, one tensor at a time, into
RecordBatches of :data:`TENSOR_SCHEMA`::

    layer_name: string          the tensor's name (the row key in error messages)
    weights:    list<float32>   float tensors, flattened in C order; null for kept rows
    shape:      list<int64>     the tensor's shape
    dtype:      string          the original dtype: "bfloat16", "float16", "float32", ...
    raw:        large_binary    kept tensors (ints, bools, and floats not quantized): their
                                little-endian C-order bytes; null for quantized rows

Every float tensor travels as float32 whatever its dtype, so all batches of one file share
one schema (an Arrow IPC file holds exactly one). bfloat16, float16 and float8 widen to
float32 exactly; float64 narrows (values beyond the float32 range are refused). The
``dtype`` column restores the original dtype on dequantize.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from .common import (
    DEFAULT_BATCH_BYTES,
    MAX_TENSOR_ELEMENTS,
    ML_DTYPES,
    ModelIOError,
    TensorInfo,
    first_line,
    from_float32,
    numpy_dtype,
    to_float32,
)

TENSOR_SCHEMA = pa.schema(
    [
        ("layer_name", pa.string()),
        ("weights", pa.list_(pa.float32())),
        ("shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
        ("raw", pa.large_binary()),
    ]
)

#: schema metadata keys the CLI writes into Arrow/Parquet outputs
META_SOURCE = b"flightquant.source"
META_SAFETENSORS = b"flightquant.safetensors_metadata"

#: Arrow float value types and their dtype names
ARROW_FLOAT = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}


class TensorSource:
    """A file of named tensors: headers (:attr:`infos`) up front, data one tensor at a time.

    Subclasses set :attr:`format`, fill :attr:`infos` (and :attr:`metadata`) in
    :meth:`_open` and read one tensor in :meth:`_read`.
    """

    kind = "tensors"
    format = ""

    def __init__(self, path: Path):
        self.path = path
        self.metadata: dict[str, str] = {}
        try:
            self.infos: list[TensorInfo] = self._open()
        except ModelIOError:
            raise
        except Exception as exc:  # corrupt files raise all sorts of things
            raise ModelIOError(
                f"{path}: not a valid {self.format} file ({first_line(exc)})"
            ) from None

    def _open(self) -> list[TensorInfo]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, info: TensorInfo) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, info: TensorInfo) -> np.ndarray:
        """The tensor's data in its stored dtype and shape."""
        try:
            arr = self._read(info)
        except ModelIOError:
            raise
        except Exception as exc:
            raise ModelIOError(
                f"{self.path}: cannot read tensor {info.name!r} ({first_line(exc)})"
            ) from None
        if tuple(arr.shape) != info.shape:
            raise ModelIOError(f"{self.path}: tensor {info.name!r} does not match its header")
        return arr

    def __iter__(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        for info in self.infos:
            yield info, self.read(info)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos)

    def close(self) -> None:
        pass


def tensor_batches(
    tensors: Iterable[tuple[TensorInfo, np.ndarray]],
    *,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
    on_batch=None,
    quantize: Callable[[TensorInfo], bool] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Pack tensors into RecordBatches of :data:`TENSOR_SCHEMA`, in order.

    Tensors to quantize (``quantize(info)``; default: every float tensor) travel as float32
    in ``weights``, the others as their ``raw`` bytes. A batch closes once its payload
    reaches ``max_batch_bytes``; a bigger tensor gets a batch of its own.
    ``on_batch(infos)`` is called with the batch's tensors just before it is yielded.
    """
    rows: list[tuple[TensorInfo, np.ndarray | None, bytes | None]] = []
    size = 0
    for info, array in tensors:
        if info.is_float if quantize is None else quantize(info):
            if info.numel > MAX_TENSOR_ELEMENTS:
                raise ModelIOError(
                    f"tensor {info.name!r} has {info.numel} elements; at most "
                    f"{MAX_TENSOR_ELEMENTS} per tensor are supported"
                )
            flat = to_float32(array, info.dtype, info.name)
            row_bytes = flat.nbytes
            rows.append((info, flat, None))
        else:
            raw = np.ascontiguousarray(array, dtype=numpy_dtype(info.dtype)).tobytes()
            row_bytes = len(raw)
            rows.append((info, None, raw))
        size += row_bytes
        if size >= max_batch_bytes:
            batch = _tensor_batch(rows)
            if on_batch is not None:
                on_batch([r[0] for r in rows])
            yield batch
            rows, size = [], 0
    if rows:
        batch = _tensor_batch(rows)
        if on_batch is not None:
            on_batch([r[0] for r in rows])
        yield batch


def _tensor_batch(rows) -> pa.RecordBatch:
    lens = np.array([0 if f is None else f.size for _, f, _ in rows], np.int64)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] > MAX_TENSOR_ELEMENTS:  # cannot happen with sane max_batch_bytes
        raise ModelIOError("a batch of tensors exceeds 2**31-1 elements; lower max_batch_bytes")
    floats = [f for _, f, _ in rows if f is not None]
    values = np.concatenate(floats) if floats else np.zeros(0, np.float32)
    mask = pa.array([f is None for _, f, _ in rows], pa.bool_())
    weights = pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values, pa.float32()), mask=mask
    )
    return pa.RecordBatch.from_arrays(
        [
            pa.array([i.name for i, _, _ in rows], pa.string()),
            weights,
            pa.array([list(i.shape) for i, _, _ in rows], pa.list_(pa.int64())),
            pa.array([i.dtype for i, _, _ in rows], pa.string()),
            pa.array([r for _, _, r in rows], pa.large_binary()),
        ],
        schema=TENSOR_SCHEMA,
    )


def is_tensor_layout(schema: pa.Schema) -> bool:
    """Whether a (plain or quantized) schema holds one tensor per row (``layer_name``,
    ``weights`` and optionally ``shape``/``dtype``/``raw``), as the CLI writes."""
    names = schema.names
    return "layer_name" in names and "weights" in names


def tensors_from_batch(
    batch: pa.RecordBatch, *, npz_safe: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors of a (dequantized) tensor-layout batch with original dtypes and shapes.

    ``dtype`` comes from the ``dtype`` column, else from the weights' value type; ``shape``
    from the ``shape`` column, else 1-D. With ``npz_safe``, dtypes NumPy cannot save
    (bfloat16, float8) come back as float32, exactly.
    """
    names = batch.column("layer_name").to_pylist()
    weights = batch.column("weights")
    shapes = batch.column("shape").to_pylist() if "shape" in batch.schema.names else None
    dtypes = batch.column("dtype").to_pylist() if "dtype" in batch.schema.names else None
    raws = batch.column("raw") if "raw" in batch.schema.names else None
    default_dtype = ARROW_FLOAT.get(weights.type.value_type, "float32")
    offsets, values = list_parts(weights)
    valid = np.asarray(weights.is_valid())
    for r, name in enumerate(names):
        if name is None:
            raise ModelIOError(f"row {r} has no layer_name")
        dtype = (dtypes[r] if dtypes else None) or default_dtype
        if valid[r]:
            flat = values[offsets[r] : offsets[r + 1]]
            if npz_safe and dtype in ML_DTYPES:
                arr = flat.astype(np.float32)
            else:
                arr = from_float32(flat, dtype)
        elif raws is not None and raws[r].is_valid:
            arr = np.frombuffer(raws[r].as_py(), dtype=numpy_dtype(dtype)).copy()
            if npz_safe and dtype in ML_DTYPES:
                arr = arr.astype(np.float32)
        else:
            raise ModelIOError(f"tensor {name!r} has neither weights nor raw bytes")
        shape = shapes[r] if shapes and shapes[r] is not None else [arr.size]
        if math.prod(shape) != arr.size:
            raise ModelIOError(f"tensor {name!r}: {arr.size} values do not fit shape {shape}")
        yield name, arr.reshape(shape)


def list_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list/large_list/fixed_size_list array as NumPy arrays."""
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        values = arr.values.to_numpy(zero_copy_only=False)[arr.offset * size :]
        return np.arange(len(arr) + 1, dtype=np.int64) * size, values
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return offsets, arr.values.to_numpy(zero_copy_only=False)
