"""GGUF in and out (llama.cpp's model file): a lazy, bounded reader and a streaming writer.

Reading parses the header with explicit bounds: every count, length and shape is checked
against the bytes the file holds before anything is read or allocated, so a hostile or
truncated file is one :class:`ModelIOError`, never a crash, a hang or an allocation the
size of its claim. Tensors' data ranges must follow each other in header order without
overlapping (llama.cpp's loader wants them back to back), and ``general.alignment`` is at
most :data:`MAX_ALIGNMENT`. Tensor data stays in a read-only memory map and is read one
tensor at a time; the file's size is checked before each read (touching a map past the
end of a file that shrank since it was opened is SIGBUS), the header is kept in memory. (``gguf.GGUFReader`` walks every array element in Python, ~7 s for a 150k-token
vocabulary, and trusts the counts it reads; the tests use it as an independent oracle.)

Writing goes through ``gguf.GGUFWriter``: every key/value pair of the input is copied as
its original bytes, in order (keys the job updates, such as ``general.file_type``, keep
their place), the tensors keep their order and the file its alignment; tensor data is then
written one tensor at a time.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
)
from gguf.gguf_writer import GGUFValue, WriterState

from .common import MAX_TENSOR_ELEMENTS, ModelIOError, first_line, write_mode
from .gguf_policy import FLOAT_TYPES, tensor_bytes

#: GGML_MAX_DIMS
MAX_DIMS = 4
#: the largest ``general.alignment`` read. llama.cpp takes any uint32 power of two, but
#: every writer uses 32 (GGUF_DEFAULT_ALIGNMENT) or at most a page; the output repeats the
#: input's padding after every tensor, so 2**30 would turn a small file into gigabytes
MAX_ALIGNMENT = 1 << 20
#: GGUF dimensions are int64 in llama.cpp: larger ones are refused as it refuses them
MAX_DIM = 2**63 - 1
#: fixed-size GGUF value types and their struct codes
_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?",
}  # fmt: skip
_SIZES = {t: struct.calcsize("<" + c) for t, c in _SCALARS.items()}
#: keys of a split model, which llama-quantize does not write either
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


@dataclass(frozen=True)
class KeyValue:
    """One metadata pair; ``start:end`` is the value's encoding in the file (after its type)."""

    key: str
    vtype: int
    start: int
    end: int
    sub_type: int | None = None  # arrays: the element type
    count: int = 0  # arrays: the element count


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's header: GGUF shape ``ne`` (``ne[0]`` contiguous), type, bytes in the file."""

    name: str
    ne: tuple[int, ...]
    type: str
    offset: int  # absolute byte offset of its data
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The NumPy (C-order) shape: ``ne`` reversed."""
        return tuple(reversed(self.ne))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.type in FLOAT_TYPES


class _Cursor:
    """Reads little-endian values from the header, refusing to read past the file's end."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise ModelIOError(
                f"{self.path}: {what} at byte {self.pos} claims {n} bytes, but the file has "
                f"{self.size - self.pos} left (truncated or corrupt)"
            )
        start = self.pos
        self.pos += n
        return start

    def scalar(self, code: str, what: str):
        start = self.need(struct.calcsize("<" + code), what)
        return struct.unpack_from("<" + code, self.buf, start)[0]

    def string(self, what: str) -> tuple[int, int]:
        n = self.scalar("Q", f"the length of {what}")
        return self.need(n, what), n

    def text(self, what: str) -> str:
        start, n = self.string(what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelIOError(f"{self.path}: {what} at byte {start} is not UTF-8") from None


class GGUFFile:
    """A ``.gguf`` file: metadata and tensor headers up front, tensor data memory-mapped."""

    kind = "gguf"
    format = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._mm = np.memmap(path, np.uint8, "r")
        except (ValueError, OSError) as exc:  # an empty file cannot be mapped
            self.close()
            raise ModelIOError(f"{path}: not a valid GGUF file ({first_line(exc)})") from None
        cur = _Cursor(memoryview(self._mm), path)
        self._head: bytes | memoryview = cur.buf
        try:
            self._parse(cur)
        except BaseException:
            self.close()
            raise
        # metadata values are decoded from this copy, so a file that shrinks later cannot
        # turn reading a key into SIGBUS
        self._head = bytes(self._mm[: cur.pos])

    # ------------------------------------------------------------------ header
    def _parse(self, cur: _Cursor) -> None:
        path = self.path
        if cur.size < 24 or cur.scalar("I", "the magic") != GGUF_MAGIC:
            raise ModelIOError(f"{path}: not a valid GGUF file (no GGUF magic)")
        version = cur.scalar("I", "the version")
        if version & 0xFFFF == 0 and version:
            raise ModelIOError(f"{path}: a big-endian GGUF file; only little-endian is supported")
        if version not in (2, 3):
            raise ModelIOError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        n_tensors = cur.scalar("Q", "the tensor count")
        n_kv = cur.scalar("Q", "the key/value count")
        # each pair takes at least 13 bytes, each tensor header at least 28
        if n_kv * 13 > cur.size - cur.pos or n_tensors * 28 > cur.size - cur.pos:
            raise ModelIOError(
                f"{path}: the header claims {n_kv} key/value pairs and {n_tensors} tensors, "
                f"more than the file's {cur.size} bytes can hold (truncated or corrupt)"
            )
        self.kvs: list[KeyValue] = []
        seen: set[str] = set()
        for i in range(n_kv):
            key = cur.text(f"key {i}")
            if key in seen:
                raise ModelIOError(f"{path}: key {key!r} appears twice")
            seen.add(key)
            self.kvs.append(self._kv(cur, key))
        self._kv_index = {kv.key: kv for kv in self.kvs}
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        if "general.alignment" in self._kv_index:
            kv = self._kv_index["general.alignment"]
            align = self.value("general.alignment")
            if kv.vtype != GGUFValueType.UINT32 or align <= 0 or align & (align - 1):
                raise ModelIOError(f"{path}: general.alignment must be a uint32 power of two")
            if align > MAX_ALIGNMENT:
                raise ModelIOError(
                    f"{path}: general.alignment {align} is larger than the {MAX_ALIGNMENT} "
                    "flightquant reads (GGUF writers use 32)"
                )
            self.alignment = align
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = cur.text(f"the name of tensor {i}")
            if name in names:
                raise ModelIOError(f"{path}: tensor {name!r} appears twice")
            names.add(name)
            nd = cur.scalar("I", f"the dimension count of {name!r}")
            if not 1 <= nd <= MAX_DIMS:
                raise ModelIOError(f"{path}: tensor {name!r} claims {nd} dimensions (1 to 4)")
            ne = tuple(cur.scalar("Q", f"a dimension of {name!r}") for _ in range(nd))
            numel = 1
            for d in ne:
                numel *= d
            if max(ne) > MAX_DIM or numel > MAX_DIM:
                raise ModelIOError(
                    f"{path}: tensor {name!r} claims shape {list(ne)}, beyond int64 "
                    "(corrupt or hostile)"
                )
            ggml_type = cur.scalar("I", f"the type of {name!r}")
            offset = cur.scalar("Q", f"the data offset of {name!r}")
            infos.append((name, ne, ggml_type, offset))
        data_start = -(-cur.pos // self.alignment) * self.alignment
        self.data_offset = data_start
        self.tensors: list[GGUFTensor] = [self._tensor(*i, cur.size) for i in infos]
        end, last = data_start, None
        for t in self.tensors:  # in order, none overlapping the one before
            if t.offset < end:
                how = (
                    "overlaps"
                    if last is not None and t.offset + t.nbytes > last.offset
                    else "is before"
                )
                raise ModelIOError(
                    f"{path}: the data of tensor {t.name!r} (bytes {t.offset}..{t.offset + t.nbytes}) "
                    f"{how} the data of {last.name!r} (bytes {last.offset}..{end}): tensor data "
                    "must follow the header's order without overlapping (corrupt or hostile)"
                )
            if t.nbytes:
                end, last = t.offset + t.nbytes, t

    def _kv(self, cur: _Cursor, key: str) -> KeyValue:
        vtype = cur.scalar("I", f"the type of {key!r}")
        start = cur.pos
        if vtype in _SCALARS:
            cur.need(_SIZES[vtype], f"the value of {key!r}")
            return KeyValue(key, vtype, start, cur.pos)
        if vtype == GGUFValueType.STRING:
            cur.string(f"the value of {key!r}")
            return KeyValue(key, vtype, start, cur.pos)
        if vtype != GGUFValueType.ARRAY:
            raise ModelIOError(f"{self.path}: key {key!r} has an unknown value type {vtype}")
        sub = cur.scalar("I", f"the element type of {key!r}")
        count = cur.scalar("Q", f"the element count of {key!r}")
        if sub in _SCALARS:
            cur.need(count * _SIZES[sub], f"the {count} elements of {key!r}")
        elif sub == GGUFValueType.STRING:
            if count * 8 > cur.size - cur.pos:
                cur.need(count * 8, f"the {count} strings of {key!r}")
            for j in range(count):
                cur.string(f"string {j} of {key!r}")
        else:
            raise ModelIOError(
                f"{self.path}: key {key!r} is an array of type {sub} (arrays of arrays are "
                "not supported)"
            )
        return KeyValue(key, vtype, start, cur.pos, sub, count)

    def _tensor(self, name, ne, ggml_type, offset, size) -> GGUFTensor:
        path = self.path
        try:
            typ = GGMLQuantizationType(ggml_type).name
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ModelIOError(
                f"{path}: tensor {name!r} has unknown ggml type {ggml_type}"
            ) from None
        numel = 1
        for d in ne:
            numel *= d
        if ne[0] % block:
            raise ModelIOError(
                f"{path}: tensor {name!r} of type {typ} has rows of {ne[0]} values, not a "
                f"multiple of its block size {block}"
            )
        nbytes = numel // block * type_size
        start = self.data_offset + offset
        if offset % self.alignment or start + nbytes > size:
            raise ModelIOError(
                f"{path}: tensor {name!r} claims {nbytes} bytes at data offset {offset}, "
                f"beyond the file's {size} bytes or misaligned (truncated or corrupt)"
            )
        return GGUFTensor(name, ne, typ, start, nbytes)

    # ------------------------------------------------------------------ access
    def value(self, key: str, default: Any = None) -> Any:
        """The decoded value of a key (arrays as lists); ``default`` if absent."""
        kv = self._kv_index.get(key)
        if kv is None:
            return default
        return _decode(self._head, kv)

    @property
    def keys(self) -> list[str]:
        return [kv.key for kv in self.kvs]

    def raw_value(self, key: str) -> bytes:
        kv = self._kv_index[key]
        return self._head[kv.start : kv.end]

    @property
    def architecture(self) -> str:
        arch = self.value("general.architecture", "")
        return arch if isinstance(arch, str) else ""

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def data(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as stored (a read-only view of the memory map), once the file
        is known to still hold them."""
        end = t.offset + t.nbytes
        size = os.fstat(self._fd).st_size
        if size < end:  # touching the map past the file's end would be SIGBUS
            raise ModelIOError(
                f"{self.path}: cannot read tensor {t.name!r}: the file ends at byte {size}, "
                f"before its data ends at byte {end} (truncated since it was opened?)"
            )
        return self._mm[t.offset : end]

    def floats(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's values as float32, flat, ``ne[0]`` contiguous (decoded if quantized)."""
        if t.numel > MAX_TENSOR_ELEMENTS:
            raise ModelIOError(
                f"tensor {t.name!r} has {t.numel} elements; at most {MAX_TENSOR_ELEMENTS} "
                "per tensor are supported"
            )
        raw = self.data(t)
        if t.numel == 0:
            return np.zeros(0, np.float32)
        if t.type == "F32":
            return raw.view("<f4")
        if t.type == "F16":
            return raw.view("<f2").astype(np.float32)
        if t.type == "BF16":
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        from gguf import quants

        try:
            return quants.dequantize(raw, GGMLQuantizationType[t.type]).reshape(-1)
        except (NotImplementedError, quants.QuantError) as exc:
            raise ModelIOError(
                f"{self.path}: tensor {t.name!r}: cannot decode {t.type} ({first_line(exc)})"
            ) from None

    def close(self) -> None:
        self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _decode(buf: bytes, kv: KeyValue) -> Any:
    mv = memoryview(buf)
    if kv.vtype in _SCALARS:
        return struct.unpack_from("<" + _SCALARS[kv.vtype], mv, kv.start)[0]
    if kv.vtype == GGUFValueType.STRING:
        return bytes(mv[kv.start + 8 : kv.end]).decode("utf-8", "replace")
    pos = kv.start + 12
    if kv.sub_type in _SCALARS:
        code = _SCALARS[kv.sub_type]
        return list(struct.unpack_from(f"<{kv.count}{code}", mv, pos))
    out = []
    for _ in range(kv.count):
        (n,) = struct.unpack_from("<Q", mv, pos)
        out.append(bytes(mv[pos + 8 : pos + 8 + n]).decode("utf-8", "replace"))
        pos += 8 + n
    return out


# --------------------------------------------------------------------------- writer


_ZEROS = bytes(64 << 10)


class _Raw:
    """A value written as the bytes it had in the input file."""

    def __init__(self, payload: bytes):
        self.payload = payload


class _Writer(GGUFWriter):
    def open_output_file(self, path: Path | None = None) -> None:
        # gguf-py's, opening without truncation (common.write_mode says why)
        if self.state is WriterState.NO_FILE and (path or self.path) is not None:
            self.path = path or self.path
            filenames = self.print_plan()
            self.fout = [open(f, write_mode(f)) for f in filenames]  # noqa: SIM115
            self.state = WriterState.EMPTY
            return
        super().open_output_file(path)

    def write_padding(self, fp, n: int, align: int | None = None) -> None:
        # gguf-py's builds the padding as a list of ints: 8 bytes per byte written
        pad = -n % (align if align is not None else self.data_alignment)
        while pad:
            fp.write(_ZEROS[: min(pad, len(_ZEROS))])
            pad -= min(pad, len(_ZEROS))

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if isinstance(val, _Raw):
            return (self._pack("I", vtype) if add_vtype else b"") + val.payload
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its name, GGUF shape and (new) type."""

    name: str
    ne: tuple[int, ...]
    type: str

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.type, self.ne)


class GGUFOutput:
    """Write a GGUF file like ``source``: its metadata (with ``updates``), ``tensors`` in order.

    ``updates`` maps keys to ``(GGUFValueType, value)``: a key the source has keeps its
    place, a new one is appended. The header is written at once; :meth:`write` then takes
    each tensor's bytes in order.
    """

    def __init__(
        self,
        path: Path,
        source: GGUFFile,
        tensors: Sequence[OutTensor],
        updates: Mapping[str, tuple[int, Any]] | None = None,
        drop: Sequence[str] = SPLIT_KEYS,
    ):
        updates = dict(updates or {})
        w = _Writer(path, source.architecture)
        w.kv_data = [{}]  # drop the architecture key the constructor adds: the source's is copied
        w.data_alignment = source.alignment
        for kv in source.kvs:
            if kv.key in drop:
                continue
            if kv.key in updates:
                vtype, value = updates.pop(kv.key)
                w.kv_data[0][kv.key] = GGUFValue(value, GGUFValueType(vtype))
            else:
                w.kv_data[0][kv.key] = GGUFValue(_Raw(source.raw_value(kv.key)), kv.vtype)
        for key, (vtype, value) in updates.items():
            w.kv_data[0][key] = GGUFValue(value, GGUFValueType(vtype))
        for t in tensors:
            w.add_tensor_info(
                t.name,
                tuple(reversed(t.ne)),
                np.dtype(np.float32),  # with raw_dtype given, only the shape and type count
                t.nbytes,
                raw_dtype=GGMLQuantizationType[t.type],
            )
        self._tensors = list(tensors)
        self._next = 0
        self._w = w
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        except BaseException:
            w.close()
            raise

    def write(self, name: str, data) -> None:
        """The next tensor's bytes (any buffer: bytes, a NumPy array, a pyarrow Buffer)."""
        if self._next >= len(self._tensors):
            raise ModelIOError(f"tensor {name!r} was not announced in the header")
        t = self._tensors[self._next]
        arr = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
        arr = arr.reshape(-1).view(np.uint8)
        if name != t.name or arr.nbytes != t.nbytes:
            raise ModelIOError(
                f"expected tensor {t.name!r} of {t.nbytes} bytes ({t.type}), got {name!r} of "
                f"{arr.nbytes} bytes"
            )
        self._w.write_tensor_data(arr)
        self._next += 1

    def close(self) -> None:
        missing = len(self._tensors) - self._next
        self._w.close()
        if missing:
            raise ModelIOError(f"{missing} tensor(s) announced but never written")
