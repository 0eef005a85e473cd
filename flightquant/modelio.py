"""Model files in and out: safetensors, npz, npy, Arrow IPC and Parquet.

This module only reads and writes; it knows nothing of kernels or of the network (the CLI
hands the batches it builds here to ``flightquant.quantize`` or to a ``Client``).

Two kinds of input
------------------
*Tensor files* (``.safetensors``, ``.npz``, ``.npy``) are read lazily, one tensor at a time,
and turned into RecordBatches of the *tensor layout* (:data:`TENSOR_SCHEMA`)::

    layer_name: string          the tensor's name (the row key in error messages)
    weights:    list<float32>   float tensors, flattened in C order; null for pass-through rows
    shape:      list<int64>     the tensor's shape
    dtype:      string          the original dtype: "bfloat16", "float16", "float32", ...
    raw:        large_binary    pass-through tensors (ints, bools): their little-endian
                                C-order bytes; null for float rows

Every float tensor travels as float32 whatever its dtype, so all batches of one file share
one schema (an Arrow IPC file holds exactly one). bfloat16, float16 and float8 widen to
float32 exactly; float64 narrows (values beyond the float32 range are refused). The
``dtype`` column restores the original dtype on dequantize.

*Table files* (``.arrow``/``.feather``/``.ipc`` and ``.parquet``) are streamed batch by
batch as they are; their float list columns are quantized in place, every other column
passes through.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

__all__ = [
    "ModelIOError",
    "TensorInfo",
    "TENSOR_SCHEMA",
    "TensorFile",
    "TableFile",
    "open_input",
    "input_format",
    "output_format",
    "is_tensor_layout",
    "tensor_batches",
    "tensors_from_batch",
    "atomic_output",
    "TableWriter",
    "SafetensorsWriter",
    "NpzWriter",
]

#: default upper bound of the float payload of one batch built from a tensor file
DEFAULT_BATCH_BYTES = 64 << 20
#: most elements one tensor may have (list<float32> offsets are int32)
MAX_TENSOR_ELEMENTS = 2**31 - 1

TENSOR_SCHEMA = pa.schema(
    [
        ("layer_name", pa.string()),
        ("weights", pa.list_(pa.float32())),
        ("shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
        ("raw", pa.large_binary()),
    ]
)

#: schema metadata keys this module writes into Arrow/Parquet outputs
META_SOURCE = b"flightquant.source"
META_SAFETENSORS = b"flightquant.safetensors_metadata"

TENSOR_FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".npy": "npy"}
TABLE_FORMATS = {".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow", ".parquet": "parquet"}


class ModelIOError(ValueError):
    """A file that cannot be read or written as asked; the message names the file."""


# --------------------------------------------------------------------------- dtypes

try:  # ml_dtypes is a dependency, but reading must not need it
    import ml_dtypes

    _ML = {
        "bfloat16": np.dtype(ml_dtypes.bfloat16),
        "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
        "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    }
except ImportError:  # pragma: no cover
    _ML = {}

#: float dtypes that are quantized (everything else passes through)
FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2")
#: non-float dtypes that pass through untouched
PASS_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
)  # fmt: skip

ST_TO_DTYPE = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
DTYPE_TO_ST = {v: k for k, v in ST_TO_DTYPE.items()}
_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}  # fmt: skip


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (bfloat16/float8 through ml_dtypes)."""
    if name in _ML:
        return _ML[name]
    if name in _ITEMSIZE:
        return np.dtype(name).newbyteorder("<")
    raise ModelIOError(f"unsupported dtype {name!r}")


def dtype_name(dtype: np.dtype) -> str:
    """Canonical name of a NumPy dtype; raises for dtypes that cannot be stored."""
    dtype = np.dtype(dtype)
    for name, dt in _ML.items():
        if dtype == dt:
            return name
    if dtype.kind in "fiub" and dtype.name in _ITEMSIZE:
        return dtype.name
    raise ModelIOError(
        f"dtype {dtype} is not supported (float16/32/64, bfloat16, float8, ints and bools are)"
    )


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of a tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def to_float32(array: np.ndarray, dtype: str, name: str = "") -> np.ndarray:
    """Flatten a float tensor to float32 (exact for bfloat16, float16 and float8)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if dtype == "float32":
        return flat.astype(np.float32, copy=False)
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: widening is a shift, exact, no ml_dtypes
        bits = flat.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    if dtype == "float64":
        finite = flat[np.isfinite(flat)]
        if finite.size and np.abs(finite).max() > np.finfo(np.float32).max:
            raise ModelIOError(
                f"tensor {name!r}: float64 values beyond the float32 range "
                f"(|x| > {np.finfo(np.float32).max:.4g}) cannot be quantized"
            )
        return flat.astype(np.float32)
    return flat.astype(np.float32)  # float16, float8: exact


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast dequantized float32 values back to their original dtype (round to nearest)."""
    if dtype == "float32":
        return values.astype(np.float32, copy=False)
    return values.astype(numpy_dtype(dtype))


# --------------------------------------------------------------------------- formats


def input_format(path: str | os.PathLike) -> str:
    """Format of an input file, from its extension."""
    ext = Path(path).suffix.lower()
    fmt = TENSOR_FORMATS.get(ext) or TABLE_FORMATS.get(ext)
    if fmt is None:
        raise ModelIOError(
            f"{os.fspath(path)}: unsupported input extension {ext or '(none)'!r}; use "
            ".safetensors, .npz, .npy, .arrow/.feather or .parquet"
        )
    return fmt


def output_format(path: str | os.PathLike, allowed: Sequence[str]) -> str:
    """Format of an output file, from its extension, if it is one of ``allowed``."""
    ext = Path(path).suffix.lower()
    fmt = TENSOR_FORMATS.get(ext) or TABLE_FORMATS.get(ext)
    if fmt not in allowed:
        exts = {"arrow": ".arrow", "parquet": ".parquet", "safetensors": ".safetensors",
                "npz": ".npz", "npy": ".npy"}  # fmt: skip
        raise ModelIOError(
            f"{os.fspath(path)}: unsupported output extension {ext or '(none)'!r}; use "
            + " or ".join(exts[a] for a in allowed)
        )
    return fmt


def open_input(path: str | os.PathLike) -> TensorFile | TableFile:
    """Open an input file for reading (header only; data is read lazily)."""
    fmt = input_format(path)
    p = Path(path)
    if not p.exists():
        raise ModelIOError(f"{os.fspath(path)}: no such file")
    if p.is_dir():
        raise ModelIOError(f"{os.fspath(path)}: is a directory, not a file")
    if fmt in ("arrow", "parquet"):
        return TableFile(p, fmt)
    return TensorFile(p, fmt)


# --------------------------------------------------------------------------- tensor files


class TensorFile:
    """A safetensors, npz or npy file: tensor headers up front, data one tensor at a time."""

    kind = "tensors"

    def __init__(self, path: Path, fmt: str):
        self.path = path
        self.format = fmt
        self.metadata: dict[str, str] = {}
        try:
            self.infos: list[TensorInfo] = getattr(self, f"_open_{fmt}")()
        except ModelIOError:
            raise
        except Exception as exc:  # corrupt files raise all sorts of things
            raise ModelIOError(f"{path}: not a valid {fmt} file ({_first_line(exc)})") from None

    # -- safetensors
    def _open_safetensors(self) -> list[TensorInfo]:
        from safetensors import safe_open

        self._st = safe_open(str(self.path), framework="numpy")
        self.metadata = dict(self._st.metadata() or {})
        infos = []
        for name in self._st.keys():
            sl = self._st.get_slice(name)
            st_dtype = sl.get_dtype()
            if st_dtype not in ST_TO_DTYPE:
                raise ModelIOError(
                    f"{self.path}: tensor {name!r} has dtype {st_dtype}, which is not supported"
                )
            infos.append(
                TensorInfo(name, tuple(int(d) for d in sl.get_shape()), ST_TO_DTYPE[st_dtype])
            )
        return infos

    def _read_safetensors(self, info: TensorInfo) -> np.ndarray:
        if info.dtype in _ML:  # bfloat16/float8: read the bytes, whatever numpy supports
            return self._read_safetensors_raw(info)
        return self._st.get_tensor(info.name)

    def _read_safetensors_raw(self, info: TensorInfo) -> np.ndarray:
        if not hasattr(self, "_st_header"):
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self._st_header = (8 + n, json.loads(fh.read(n)))
        base, header = self._st_header
        start, end = header[info.name]["data_offsets"]
        if end - start != info.nbytes:
            raise ModelIOError(f"{self.path}: tensor {info.name!r} has a wrong byte range")
        with open(self.path, "rb") as fh:
            fh.seek(base + start)
            data = np.frombuffer(fh.read(end - start), np.uint8)
        if data.size != info.nbytes:
            raise ModelIOError(f"{self.path}: tensor {info.name!r} is truncated")
        storage = _ML.get(info.dtype) or np.dtype(f"<u{_ITEMSIZE[info.dtype]}")
        return data.view(storage).reshape(info.shape)

    # -- npz: headers from the zip members, arrays one at a time
    def _open_npz(self) -> list[TensorInfo]:
        infos = []
        self._npz_members = {}
        with zipfile.ZipFile(self.path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                name = member[: -len(".npy")]
                with zf.open(member) as fh:
                    shape, dtype = _npy_header(fh, f"{self.path}:{member}")
                infos.append(TensorInfo(name, shape, _checked_dtype(dtype, name, self.path)))
                self._npz_members[name] = member
        return infos

    def _read_npz(self, info: TensorInfo) -> np.ndarray:
        with zipfile.ZipFile(self.path) as zf, zf.open(self._npz_members[info.name]) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)

    # -- npy: one tensor named after the file
    def _open_npy(self) -> list[TensorInfo]:
        with open(self.path, "rb") as fh:
            shape, dtype = _npy_header(fh, str(self.path))
        name = self.path.stem
        return [TensorInfo(name, shape, _checked_dtype(dtype, name, self.path))]

    def _read_npy(self, info: TensorInfo) -> np.ndarray:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def read(self, info: TensorInfo) -> np.ndarray:
        """The tensor's data in its stored dtype and shape."""
        try:
            arr = getattr(self, f"_read_{self.format}")(info)
        except ModelIOError:
            raise
        except Exception as exc:
            raise ModelIOError(
                f"{self.path}: cannot read tensor {info.name!r} ({_first_line(exc)})"
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
        self._st = None


def _npy_header(fh, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        reader = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if reader is None:
            raise ValueError(f"npy format version {version}")
        shape, fortran, dtype = reader(fh)
    except Exception as exc:
        raise ModelIOError(f"{where}: not a valid .npy array ({_first_line(exc)})") from None
    return tuple(int(d) for d in shape), dtype


def _checked_dtype(dtype: np.dtype, name: str, path: Path) -> str:
    try:
        return dtype_name(dtype)
    except ModelIOError:
        raise ModelIOError(
            f"{path}: tensor {name!r} has dtype {dtype}, which is not supported "
            "(float16/32/64, ints and bools are; save bfloat16 in .safetensors)"
        ) from None


def tensor_batches(
    tensors: Iterable[tuple[TensorInfo, np.ndarray]],
    *,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
    on_batch=None,
) -> Iterator[pa.RecordBatch]:
    """Pack tensors into RecordBatches of :data:`TENSOR_SCHEMA`, in order.

    A batch closes once its float32 payload reaches ``max_batch_bytes``; a bigger tensor gets
    a batch of its own. ``on_batch(infos)`` is called with the batch's tensors just before it
    is yielded.
    """
    rows: list[tuple[TensorInfo, np.ndarray | None, bytes | None]] = []
    size = 0
    for info, array in tensors:
        if info.is_float:
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


# --------------------------------------------------------------------------- table files


class TableFile:
    """An Arrow IPC (file or stream) or Parquet file, read batch by batch."""

    kind = "table"

    def __init__(self, path: Path, fmt: str):
        self.path = path
        self.format = fmt
        self._ipc_file = None
        self._ipc_stream_path = False
        try:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                self._pq = pq.ParquetFile(str(path), memory_map=True)
                self.schema = self._pq.schema_arrow
                self.num_rows = self._pq.metadata.num_rows
            else:
                self._open_ipc()
        except ModelIOError:
            raise
        except Exception as exc:
            kind = "Parquet" if fmt == "parquet" else "Arrow IPC"
            raise ModelIOError(f"{path}: not a valid {kind} file ({_first_line(exc)})") from None

    def _open_ipc(self) -> None:
        source = pa.memory_map(str(self.path), "r")
        try:
            self._ipc_file = ipc.open_file(source)
            self.schema = self._ipc_file.schema
            self.num_rows = sum(
                self._ipc_file.get_record_batch(i).num_rows
                for i in range(self._ipc_file.num_record_batches)
            )
            return
        except pa.ArrowInvalid:
            pass
        try:  # an IPC stream saved as .arrow
            with ipc.open_stream(source) as reader:
                self.schema = reader.schema
            self._ipc_stream_path = True
            self.num_rows = None
        except pa.ArrowInvalid:
            import pyarrow.feather as feather  # feather v1

            table = feather.read_table(str(self.path))
            self._table = table
            self.schema = table.schema
            self.num_rows = table.num_rows

    @property
    def metadata(self) -> dict[bytes, bytes]:
        return dict(self.schema.metadata or {})

    def iter_batches(
        self, max_batch_bytes: int | None = None, columns: Sequence[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """The file's batches in order (sliced by rows so none exceeds ``max_batch_bytes``)."""
        try:
            for batch in self._raw_batches(columns):
                yield from _rechunk(batch, max_batch_bytes)
        except ModelIOError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise ModelIOError(f"{self.path}: cannot read ({_first_line(exc)})") from None

    def _raw_batches(self, columns) -> Iterator[pa.RecordBatch]:
        if self.format == "parquet":
            for rg in range(self._pq.num_row_groups):
                table = self._pq.read_row_group(rg, columns=columns)
                yield from table.combine_chunks().to_batches() or []
        elif self._ipc_file is not None:
            for i in range(self._ipc_file.num_record_batches):
                batch = self._ipc_file.get_batch(i)
                yield batch.select(columns) if columns else batch
        elif self._ipc_stream_path:
            with ipc.open_stream(pa.memory_map(str(self.path), "r")) as reader:
                for batch in reader:
                    yield batch.select(columns) if columns else batch
        else:
            table = self._table.select(columns) if columns else self._table
            yield from table.to_batches()

    def read_columns(self, columns: Sequence[str]) -> pa.Table:
        """Selected columns of the whole file (cheap: no codes are decoded)."""
        batches = list(self.iter_batches(columns=list(columns)))
        return pa.Table.from_batches(batches, schema=_select_schema(self.schema, columns))

    def close(self) -> None:
        self._ipc_file = None
        self._pq = None


def _select_schema(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)


def _rechunk(batch: pa.RecordBatch, max_bytes: int | None) -> Iterator[pa.RecordBatch]:
    if not max_bytes or batch.num_rows <= 1:
        yield batch
        return
    nbytes = batch.nbytes
    if nbytes <= max_bytes:
        yield batch
        return
    rows = max(1, int(batch.num_rows * max_bytes / nbytes))
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


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
    default_dtype = _ARROW_FLOAT.get(weights.type.value_type, "float32")
    offsets, values = _list_parts(weights)
    valid = np.asarray(weights.is_valid())
    for r, name in enumerate(names):
        if name is None:
            raise ModelIOError(f"row {r} has no layer_name")
        dtype = (dtypes[r] if dtypes else None) or default_dtype
        if valid[r]:
            flat = values[offsets[r] : offsets[r + 1]]
            if npz_safe and dtype in _ML:
                arr = flat.astype(np.float32)
            else:
                arr = from_float32(flat, dtype)
        elif raws is not None and raws[r].is_valid:
            arr = np.frombuffer(raws[r].as_py(), dtype=numpy_dtype(dtype)).copy()
        else:
            raise ModelIOError(f"tensor {name!r} has neither weights nor raw bytes")
        shape = shapes[r] if shapes and shapes[r] is not None else [arr.size]
        if math.prod(shape) != arr.size:
            raise ModelIOError(f"tensor {name!r}: {arr.size} values do not fit shape {shape}")
        yield name, arr.reshape(shape)


_ARROW_FLOAT = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}


def _list_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list/large_list/fixed_size_list array as NumPy arrays."""
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        values = arr.values.to_numpy(zero_copy_only=False)[arr.offset * size :]
        return np.arange(len(arr) + 1, dtype=np.int64) * size, values
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return offsets, arr.values.to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------- writers


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    A failed or interrupted job leaves neither ``path`` nor the temporary file behind.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise ModelIOError(f"{os.fspath(path)}: directory {os.fspath(directory)} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        try:
            tmp_path.unlink()
        except FileNotFoundError:
            pass
        raise


class TableWriter:
    """Write RecordBatches of one schema to an Arrow IPC file or a Parquet file."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema):
        self.schema = schema
        self.format = fmt
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(str(path), schema)
        else:
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = ipc.new_file(self._sink, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        if not _same_fields(batch.schema, self.schema):
            raise ModelIOError(
                "a batch's schema differs from the first batch's (e.g. another quantization "
                "setting); one file holds one schema"
            )
        if self.format == "parquet":
            self._writer.write_batch(batch)
        else:
            self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()
        if self.format != "parquet":
            self._sink.close()


def _same_fields(a: pa.Schema, b: pa.Schema) -> bool:
    return len(a) == len(b) and all(
        fa.equals(fb, check_metadata=True) for fa, fb in zip(a, b, strict=True)
    )


class SafetensorsWriter:
    """Stream tensors into a safetensors file whose header is written first.

    ``infos`` fixes names, dtypes, shapes and order; :meth:`write` must then be called for
    each tensor in that order.
    """

    def __init__(
        self, path: Path, infos: Sequence[TensorInfo], metadata: Mapping[str, str] | None = None
    ):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for info in infos:
            if info.name in header or info.name == "__metadata__":
                raise ModelIOError(f"tensor name {info.name!r} appears twice")
            if info.dtype not in DTYPE_TO_ST:
                raise ModelIOError(f"tensor {info.name!r}: dtype {info.dtype} cannot be saved")
            header[info.name] = {
                "dtype": DTYPE_TO_ST[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._infos = list(infos)
        self._next = 0
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._infos):
            raise ModelIOError(f"tensor {name!r} was not announced in the header")
        info = self._infos[self._next]
        if name != info.name or tuple(array.shape) != info.shape:
            raise ModelIOError(
                f"expected tensor {info.name!r} {list(info.shape)}, got {name!r} {list(array.shape)}"
            )
        arr = np.ascontiguousarray(array, dtype=numpy_dtype(info.dtype))
        self._fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        missing = len(self._infos) - self._next
        self._fh.close()
        if missing:
            raise ModelIOError(f"{missing} tensor(s) announced but never written")


class NpzWriter:
    """Stream arrays into an uncompressed ``.npz`` one at a time (like ``numpy.savez``)."""

    def __init__(self, path: Path):
        self._zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._names: set[str] = set()

    def write(self, name: str, array: np.ndarray) -> None:
        if name in self._names:
            raise ModelIOError(f"tensor name {name!r} appears twice")
        self._names.add(name)
        with self._zf.open(name + ".npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)

    def close(self) -> None:
        self._zf.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
