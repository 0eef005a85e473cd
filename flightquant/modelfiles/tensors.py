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
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import wire
from .common import (
    DEFAULT_BATCH_BYTES,
    ITEMSIZE,
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

#: Arrow float value types and their dtype names
ARROW_FLOAT = {t: n for n, t in wire.FLOAT_TYPES.items()}


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

    def span(self, info: TensorInfo) -> tuple[int, int] | None:
        """Where the tensor's little-endian C-order bytes lie in :attr:`path`: (offset,
        nbytes), for reading them straight into a batch; None when they do not lie there
        as such (compressed, another byte order). The header has been checked already."""
        return None

    def path_of(self, info: TensorInfo) -> Path:
        """The file that holds the tensor (:meth:`span` is an offset in it)."""
        return self.path

    def __iter__(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        for info in self.infos:
            yield info, self.read(info)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos)

    def close(self) -> None:
        pass


def widening_threads(threads: int | None) -> int:
    """Threads of the widening pass beside a job whose kernels use ``threads`` (None: all
    cores this process may use): half of them, at least 1."""
    from ..kernels import resolve_threads  # the one thread policy

    return max(1, resolve_threads(threads) // 2)


def tensor_batches(
    tensors: Iterable[tuple[TensorInfo, np.ndarray | FileSpan]],
    *,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
    on_batch=None,
    quantize: Callable[[TensorInfo], bool] | None = None,
    threads: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Pack tensors into RecordBatches of :data:`TENSOR_SCHEMA`, in order.

    Tensors to quantize (``quantize(info)``; default: every float tensor) travel as float32
    in ``weights``, the others as their ``raw`` bytes. A batch holds at most
    ``max_batch_bytes`` of payload, except that a bigger tensor gets a batch of its own.

    ``tensors`` gives (info, data) pairs, data an array or a :class:`FileSpan` (a
    :class:`TensorSource` gives spans where it can, :meth:`TensorSource.span`). Data is
    only read when its batch is built: each float tensor is widened straight into the
    batch's one value buffer (spans read in pieces, so a tensor's file bytes never sit in
    memory whole), and the same pass sums its squares (:func:`widen_into`), in ``threads``
    threads (default: half the cores this process may use, as the kernels quantize the
    batch before meanwhile). ``on_batch(infos, signal)`` is called just before a batch is
    yielded, with its tensors and their float64 sums of squares (NaN for kept tensors).
    """
    if threads is None:
        threads = widening_threads(None)
    pending: list[tuple[TensorInfo, np.ndarray | FileSpan, bool]] = []
    size = 0
    pool = BufferPool()
    reader = _SpanReader()
    try:
        for info, data in _entries(tensors, quantize):
            quantized = info.is_float if quantize is None else quantize(info)
            if quantized and info.numel > MAX_TENSOR_ELEMENTS:
                raise ModelIOError(
                    f"tensor {info.name!r} has {info.numel} elements; at most "
                    f"{MAX_TENSOR_ELEMENTS} per tensor are supported"
                )
            row_bytes = 4 * info.numel if quantized else info.nbytes
            if pending and size + row_bytes > max_batch_bytes:
                yield _flush(pending, on_batch, threads, pool, reader)
                pending, size = [], 0
            pending.append((info, data, quantized))
            size += row_bytes
            del data
        if pending:
            yield _flush(pending, on_batch, threads, pool, reader)
    finally:
        reader.close()


class FileSpan:
    """Where a tensor's little-endian C-order bytes lie in a file: read when needed."""

    __slots__ = ("nbytes", "offset", "path")

    def __init__(self, path: str | os.PathLike, offset: int, nbytes: int):
        self.path, self.offset, self.nbytes = path, offset, nbytes


def _entries(tensors, quantize) -> Iterator[tuple[TensorInfo, np.ndarray | FileSpan]]:
    """(info, data) of each tensor; a source's float tensors to quantize as spans."""
    if not isinstance(tensors, TensorSource):
        yield from tensors
        return
    for info in tensors.infos:
        quantized = info.is_float if quantize is None else quantize(info)
        where = tensors.span(info) if quantized and info.dtype in _WIDEN_KINDS else None
        if where is not None:
            yield info, FileSpan(tensors.path_of(info), *where)
        else:
            yield info, tensors.read(info)


class _SpanReader:
    """Reads :class:`FileSpan` s piece by piece, widening each piece straight from the page
    cache into its place in the batch: each piece is memory-mapped (pre-faulted) and
    unmapped right after, so no copy is made (a read() would copy every byte once more)
    and a tensor's file pages never count in the process's RSS all at once."""

    PIECE = 4 << 20  # bytes per mapping; a whole number of the widening's chunks

    def __init__(self):
        self._path = None
        self._fd = -1

    def _open(self, span: FileSpan) -> int:
        if self._fd < 0 or self._path != span.path:
            self.close()
            self._fd = os.open(span.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._path = span.path
        return self._fd

    def _map(self, span: FileSpan, info: TensorInfo, start: int, n: int) -> tuple[mmap.mmap, int]:
        """A read-only map of the file's bytes [start, start + n) and where they begin in it."""
        fd = self._open(span)
        if os.fstat(fd).st_size < start + n:  # touching a map past the end would be SIGBUS
            raise ModelIOError(
                f"{span.path}: cannot read tensor {info.name!r} (the file ends before its "
                "data: truncated since it was opened?)"
            )
        base = start - start % mmap.ALLOCATIONGRANULARITY
        length = start + n - base
        if os.name == "posix":
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            return mmap.mmap(
                fd, length, flags=flags, prot=mmap.PROT_READ, offset=base
            ), start - base
        return mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=base), start - base

    def read_bytes(self, span: FileSpan, info: TensorInfo) -> bytes:
        if span.nbytes == 0:
            return b""
        m, at = self._map(span, info, span.offset, span.nbytes)
        try:
            return m[at : at + span.nbytes]
        finally:
            m.close()

    def widen(self, span: FileSpan, info: TensorInfo, dst: np.ndarray, threads: int) -> float:
        from .. import _widen

        if span.nbytes != info.nbytes:
            raise ModelIOError(f"tensor {info.name!r}: {span.nbytes} bytes do not hold it")
        kind = _WIDEN_KINDS.get(info.dtype)
        if kind is None:  # float64, float8: through NumPy
            raw = np.frombuffer(self.read_bytes(span, info), numpy_dtype(info.dtype))
            return widen_into(raw, info.dtype, dst, info.name, threads)
        code, item = kind[1], ITEMSIZE[info.dtype]
        signal, pos = 0.0, 0
        while pos < span.nbytes:
            n = min(self.PIECE, span.nbytes - pos)
            m, at = self._map(span, info, span.offset + pos, n)
            try:
                src = np.frombuffer(m, np.uint8, n, at)
                out = dst[pos // item * 4 : (pos + n) // item * 4]
                signal = _widen.widen(src, code, out, threads, signal)
                del src
            finally:
                m.close()
            pos += n
        return signal

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BufferPool:
    """Value buffers for the batches of one :func:`tensor_batches` call, recycled.

    Fresh memory costs a page fault per page and the kernel zeroing it (measured: a third
    of the job's system time); a job's batches are alike in size and at most two are alive
    at once (the one being quantized, the one being read: ``read_ahead``), so two buffers
    serve them all. A buffer is handed out again only once nothing references it any more
    (its reference count is back to what it was when the pool alone held it; a batch
    built on it holds it through its Arrow buffer). When every kept buffer is busy, the
    pool waits ``wait`` seconds for one (the consumer drops its last batch a moment after
    asking for the next), then gives out a buffer it does not keep (and waits no more).
    Buffers are anonymous memory maps, with transparent huge pages asked for.
    """

    def __init__(self, keep: int = 2, wait: float = 0.05):
        self.keep = keep
        self.wait = wait
        self._bufs: list[np.ndarray] = []  # kept buffers (uint8, owning their memory map)
        self._free_refs: list[tuple[int, int]] = []  # their reference counts when free

    @staticmethod
    def _new(nbytes: int) -> np.ndarray:
        m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if nbytes >= 4 << 20 and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # pragma: no cover - kernels without THP
                pass
        return np.frombuffer(m, np.uint8)

    def _refs(self, i: int) -> tuple[int, int]:
        # a view of a buffer holds either the array or (NumPy collapsing bases) its map
        return sys.getrefcount(self._bufs[i]), sys.getrefcount(self._bufs[i].base)

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` (contents undefined)."""
        deadline = None
        while True:
            free = [i for i in range(len(self._bufs)) if self._refs(i) == self._free_refs[i]]
            fit = [i for i in free if self._bufs[i].size >= nbytes]
            if fit:
                return self._bufs[min(fit, key=lambda i: self._bufs[i].size)][:nbytes]
            if free or len(self._bufs) < self.keep:
                if free:  # every free buffer is too small: replace the largest of them
                    i = max(free, key=lambda i: self._bufs[i].size)
                    del self._bufs[i], self._free_refs[i]
                self._bufs.append(self._new(nbytes))
                self._free_refs.append((0, 0))
                self._free_refs[-1] = self._refs(len(self._bufs) - 1)
                return self._bufs[-1][:nbytes]
            if self.wait <= 0:
                return self._new(nbytes)
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.wait
            elif now >= deadline:
                self.wait = 0.0  # the consumer holds more batches: stop waiting for it
                return self._new(nbytes)
            time.sleep(0.001)


def _flush(pending: list, on_batch, threads, pool: BufferPool, reader) -> pa.RecordBatch:
    infos = [info for info, _, _ in pending]
    batch, signal = _tensor_batch(pending, threads, pool, reader)
    pending.clear()  # the batch holds the values now: let the memory maps go
    if on_batch is not None:
        on_batch(infos, signal)
    return batch


def _tensor_batch(
    rows: list, threads: int, pool: BufferPool, reader: _SpanReader
) -> tuple[pa.RecordBatch, np.ndarray]:
    lens = np.array([info.numel if q else 0 for info, _, q in rows], np.int64)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    total = int(offsets[-1])
    if total > MAX_TENSOR_ELEMENTS:  # cannot happen with sane max_batch_bytes
        raise ModelIOError("a batch of tensors exceeds 2**31-1 elements; lower max_batch_bytes")
    # one value buffer (recycled from the batches before), filled in place, wrapped zero-copy
    dst = pool.take(4 * total)
    buf = pa.py_buffer(dst)
    signal = np.full(len(rows), np.nan)
    raws: list[bytes | None] = []
    for r, (info, array, quantized) in enumerate(rows):
        if quantized:
            lo, hi = 4 * int(offsets[r]), 4 * int(offsets[r + 1])
            if isinstance(array, FileSpan):
                signal[r] = reader.widen(array, info, dst[lo:hi], threads)
            else:
                signal[r] = widen_into(array, info.dtype, dst[lo:hi], info.name, threads)
            raws.append(None)
        elif isinstance(array, FileSpan):
            raws.append(reader.read_bytes(array, info))
        else:
            raws.append(np.ascontiguousarray(array, dtype=numpy_dtype(info.dtype)).tobytes())
        rows[r] = (info, None, quantized)  # drop the source array (and its memory map)
    # every column from buffers: pa.array() on Python lists would also import pandas
    # (a quarter of a second, in the middle of the job) to check for its objects
    n = len(rows)
    values = pa.Array.from_buffers(pa.float32(), total, [None, buf])
    valid = np.array([q for _, _, q in rows], bool)
    list_offsets32 = pa.py_buffer(offsets.astype(np.int32))
    weights = pa.Array.from_buffers(
        pa.list_(pa.float32()),
        n,
        [_bitmap(valid), list_offsets32],
        null_count=n - int(valid.sum()),
        children=[values],
    )
    shapes = [i.shape for i, _, _ in rows]
    dims = np.zeros(n + 1, np.int32)
    np.cumsum([len(sh) for sh in shapes], out=dims[1:])
    flat = np.array([d for sh in shapes for d in sh], np.int64)
    dim_values = pa.Array.from_buffers(pa.int64(), len(flat), [None, pa.py_buffer(flat)])
    shape = pa.Array.from_buffers(
        pa.list_(pa.int64()), n, [None, pa.py_buffer(dims)], children=[dim_values]
    )
    raw_offsets = np.zeros(n + 1, np.int64)
    np.cumsum([0 if r is None else len(r) for r in raws], out=raw_offsets[1:])
    has_raw = ~valid
    raw_data = pa.py_buffer(b"".join(r for r in raws if r is not None))
    raw = pa.Array.from_buffers(
        pa.large_binary(),
        n,
        [_bitmap(has_raw), pa.py_buffer(raw_offsets), raw_data],
        null_count=n - int(has_raw.sum()),
    )
    names = _strings([i.name for i, _, _ in rows])
    dtypes = _strings([i.dtype for i, _, _ in rows])
    batch = pa.RecordBatch.from_arrays([names, weights, shape, dtypes, raw], schema=TENSOR_SCHEMA)
    return batch, signal


def _bitmap(bits: np.ndarray) -> pa.Buffer | None:
    """An Arrow validity bitmap of a bool array (None when every bit is set)."""
    if bits.all():
        return None
    return pa.py_buffer(np.packbits(bits, bitorder="little"))


def _strings(texts: list[str]) -> pa.Array:
    """A string array of ``texts``, from its buffers."""
    data = [t.encode() for t in texts]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    if offsets[-1] > 2**31 - 1:
        raise ModelIOError("the tensor names of one batch exceed 2 GiB")
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(data))]
    return pa.Array.from_buffers(pa.string(), len(data), buffers)


#: dtypes the widening kernel reads as stored (little-endian), and its code for each
_WIDEN_KINDS = {
    "float32": (np.dtype("<f4"), 0),
    "bfloat16": (None, 1),
    "float16": (np.dtype("<f2"), 2),
}


def widen_into(
    array: np.ndarray, dtype: str, dst: np.ndarray, name: str = "", threads: int | None = None
) -> float:
    """Write ``array`` (a float tensor of ``dtype``) as float32 into ``dst`` (bytes, C
    order) and return its sum of squares (float64, as :func:`signal_reference` defines).

    float32, bfloat16 and float16 stored little-endian go through one pass of the
    widening kernel; other dtypes (float64, float8, byte-swapped) through
    :func:`to_float32` first. Exact, like :func:`to_float32`.
    """
    from .. import _widen

    kind = _WIDEN_KINDS.get(dtype)
    if kind is not None:
        want = kind[0] if kind[0] is not None else ML_DTYPES.get("bfloat16")
        if want is None or array.dtype != want:
            kind = None
    if kind is None:
        array, code = to_float32(array, dtype, name), 0
    else:
        code = kind[1]
    src = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return _widen.widen(src, code, dst, 0 if threads is None else threads)


def signal_reference(values: np.ndarray) -> float:
    """The definition of the sum of squares :func:`widen_into` returns, in NumPy.

    float64 squares of the float32 values, cut into chunks of ``_widen.chunk_elements()``;
    in a chunk, lane j sums the squares of elements 8k+j in order (cumsum is sequential),
    the lanes are added in order, then the chunk's last n % 8 squares one by one; the
    chunk sums are added in order. Slow (a Python loop per chunk): for tests.
    """
    from .. import _widen

    x = np.asarray(values, np.float32).reshape(-1).astype(np.float64)
    chunk = _widen.chunk_elements()
    total = 0.0
    for c in range(0, x.size, chunk):
        v = x[c : c + chunk]
        m = v.size - v.size % 8
        lanes = np.cumsum(np.square(v[:m]).reshape(-1, 8), axis=0)[-1] if m else np.zeros(8)
        s = float(lanes[0])
        for j in range(1, 8):
            s += float(lanes[j])
        for t in v[m:]:
            s += float(t) * float(t)
        total += s
    return total


def is_tensor_layout(schema: pa.Schema) -> bool:
    """Whether a (plain or quantized) schema holds one tensor per row (``layer_name``,
    ``weights`` and optionally ``shape``/``dtype``/``raw``), as the CLI writes."""
    names = schema.names
    return "layer_name" in names and "weights" in names


def tensors_from_batch(
    batch: pa.RecordBatch, *, npz_safe: bool = False, float32: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors of a (dequantized) tensor-layout batch with original dtypes and shapes.

    ``dtype`` comes from the ``dtype`` column, else from the weights' value type; ``shape``
    from the ``shape`` column, else 1-D. With ``npz_safe``, dtypes NumPy cannot save
    (bfloat16, float8) come back as float32, exactly. With ``float32``, float rows come
    as the batch's float32 values (zero-copy) for a writer that narrows them itself
    (:meth:`SafetensorsWriter.write`); kept rows as their dtype.
    """
    names = batch.column("layer_name").to_pylist()
    weights = batch.column("weights")
    shapes = batch.column("shape").to_pylist() if "shape" in batch.schema.names else None
    dtypes = batch.column("dtype").to_pylist() if "dtype" in batch.schema.names else None
    raws = batch.column("raw") if "raw" in batch.schema.names else None
    default_dtype = ARROW_FLOAT.get(weights.type.value_type, "float32")
    offsets, values = list_parts(weights)
    valid = valid_rows(weights)
    for r, name in enumerate(names):
        if name is None:
            raise ModelIOError(f"row {r} has no layer_name")
        dtype = (dtypes[r] if dtypes else None) or default_dtype
        if valid[r]:
            flat = values[offsets[r] : offsets[r + 1]]
            if float32 and flat.dtype == np.float32:
                arr = flat
            elif npz_safe and dtype in ML_DTYPES:
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


def valid_rows(col: pa.Array) -> np.ndarray:
    """Which rows of an array are not null, as a bool array, from its validity bitmap
    (``np.asarray(col.is_valid())`` would import pandas: a quarter of a second per job)."""
    n = len(col)
    if col.null_count == 0:
        return np.ones(n, bool)
    bitmap = col.buffers()[0]
    if bitmap is None:  # e.g. a null-type array
        return np.zeros(n, bool)
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    return bits[col.offset : col.offset + n].astype(bool)


def list_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list/large_list/fixed_size_list array as NumPy arrays."""
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        values = arr.values.to_numpy(zero_copy_only=False)[arr.offset * size :]
        return np.arange(len(arr) + 1, dtype=np.int64) * size, values
    return list_offsets(arr), arr.values.to_numpy(zero_copy_only=False)


def list_offsets(arr: pa.Array) -> np.ndarray:
    """The n+1 offsets of a list/large_list (or binary/string) array as int64, read from its
    buffer (``np.asarray(arr.offsets)`` goes through pandas-aware conversion: slower, and
    it imports pandas)."""
    t = arr.type
    wide = pa.types.is_large_list(t) or pa.types.is_large_binary(t) or pa.types.is_large_string(t)
    n = len(arr)
    buf = arr.buffers()[1]
    if buf is None or buf.size == 0:  # an empty array may have no offsets buffer
        return np.zeros(n + 1, np.int64)
    raw = np.frombuffer(buf, np.int64 if wide else np.int32)
    return raw[arr.offset : arr.offset + n + 1].astype(np.int64)
