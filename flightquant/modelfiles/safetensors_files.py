"""safetensors in and out: a lazy reader of files and model folders, a streaming writer.

:class:`SafetensorsFile` reads one file; :class:`SafetensorsFolder` a Hugging Face model
folder (``model.safetensors``, or shards named by ``model.safetensors.index.json``) as one
source. :func:`open_safetensors` picks between them; the quantize job, ``inspect`` and the
compressed-tensors writer all read through them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    ITEMSIZE,
    ML_DTYPES,
    ModelIOError,
    TensorInfo,
    check_input_file,
    check_input_path,
    inside_folder,
    numpy_dtype,
    parse_json,
    read_json,
    write_mode,
)
from .tensors import TensorSource

ST_TO_DTYPE = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
DTYPE_TO_ST = {v: k for k, v in ST_TO_DTYPE.items()}


#: the largest header the reader accepts (the safetensors library's own limit)
MAX_HEADER_BYTES = 100 << 20
#: most dimensions one tensor may have
MAX_DIMS = 64
#: a model folder's weights: one file, or shards named by the index
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsFile(TensorSource):
    """A ``.safetensors`` file: the header up front, tensors memory-mapped one at a time.

    The header is checked before anything else is read: its length against the file, every
    tensor's dtype, shape and byte range against the data the file holds (in bounds, the
    size its shape needs, no two tensors overlapping). A hostile or truncated file is one
    clear error, never an allocation the size of its claim.
    """

    format = "safetensors"

    def _open(self) -> list[TensorInfo]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelIOError(
                    f"{self.path}: not a valid safetensors file (too short: {size} bytes)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ModelIOError(
                    f"{self.path}: not a valid safetensors file (the header claims {n} bytes; "
                    f"the file holds {size - 8} after the length"
                    + (f", and at most {MAX_HEADER_BYTES} are accepted)" if n <= size - 8 else ")")
                )
            header = parse_json(
                fh.read(n), f"{self.path}: not a valid safetensors file: the header"
            )
        if not isinstance(header, dict):
            raise ModelIOError(f"{self.path}: not a valid safetensors file (header is not a map)")
        self._base = 8 + n
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ModelIOError(f"{self.path}: not a valid safetensors file (bad __metadata__)")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        data_bytes = size - self._base
        infos, ranges = [], []
        for name, entry in header.items():
            info, start, end = self._entry(name, entry, data_bytes)
            infos.append(info)
            ranges.append((start, end, name))
        self._ranges = {name: (start, end) for start, end, name in ranges}
        ranges.sort()
        for (_, end_a, a), (start_b, end_b, b) in zip(ranges, ranges[1:], strict=False):
            if start_b < end_a and end_b > start_b:
                raise ModelIOError(f"{self.path}: tensors {a!r} and {b!r} overlap in the file")
        # the file's order is the data's (as safe_open lists them by offset)
        infos.sort(key=lambda i: self._ranges[i.name])
        return infos

    def _entry(self, name: str, entry, data_bytes: int) -> tuple[TensorInfo, int, int]:
        def bad(why: str) -> ModelIOError:
            return ModelIOError(
                f"{self.path}: not a valid safetensors file (tensor {name!r}: {why})"
            )

        if not isinstance(entry, dict):
            raise bad("its entry is not a map")
        st_dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(st_dtype, str):
            raise bad("no dtype")
        if st_dtype not in ST_TO_DTYPE:
            raise ModelIOError(
                f"{self.path}: tensor {name!r} has dtype {st_dtype[:40]}, which is not supported"
            )
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise bad("its shape is not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise bad("its data_offsets are not [start, end]")
        info = TensorInfo(name, tuple(shape), ST_TO_DTYPE[st_dtype])
        start, end = offsets
        if end > data_bytes:
            raise bad(
                f"it claims bytes {start} to {end}, but the file holds {data_bytes} bytes of "
                "data (truncated or corrupt)"
            )
        if end - start != info.nbytes:
            raise bad(f"{end - start} bytes do not hold shape {list(shape)} of {info.dtype}")
        return info, start, end

    def span(self, info: TensorInfo) -> tuple[int, int] | None:
        start, end = self._ranges[info.name]  # checked against the file in _open
        return self._base + start, end - start

    def _read(self, info: TensorInfo) -> np.ndarray:
        start, end = self._ranges[info.name]
        storage = ML_DTYPES.get(info.dtype) or numpy_dtype(info.dtype)
        if end == start:
            return np.zeros(info.shape, storage)
        raw = np.memmap(self.path, np.uint8, "r", offset=self._base + start, shape=(end - start,))
        if info.dtype in ML_DTYPES:  # bfloat16/float8: through their integer storage
            return raw.view(f"<u{ITEMSIZE[info.dtype]}").view(storage).reshape(info.shape)
        return raw.view(storage).reshape(info.shape)


class SafetensorsFolder(TensorSource):
    """A model folder's safetensors weights as one source: ``model.safetensors``, or the
    shards that ``model.safetensors.index.json`` names (each one a file of the folder,
    no symlink out of it), in the index's order; every shard is a :class:`SafetensorsFile`
    (its header checked as such) and no tensor may be in two of them."""

    format = "safetensors"

    def _open(self) -> list[TensorInfo]:
        index, single = self.path / INDEX_NAME, self.path / WEIGHTS_NAME
        if index.exists() or index.is_symlink():
            names = self._shard_names(index)
        elif single.exists() or single.is_symlink():
            names = [WEIGHTS_NAME]
        else:
            raise ModelIOError(f"{self.path}: no {WEIGHTS_NAME} or {INDEX_NAME} in this folder")
        self.shards = [SafetensorsFile(check_input_file(self.path / n)) for n in names]
        self._owner: dict[str, SafetensorsFile] = {}
        infos = []
        for shard in self.shards:
            inside_folder(self.path, shard.path.name)
            for info in shard.infos:
                if info.name in self._owner:
                    raise ModelIOError(
                        f"{self.path}: tensor {info.name!r} is in both "
                        f"{self._owner[info.name].path.name} and {shard.path.name}"
                    )
                self._owner[info.name] = shard
                infos.append(info)
        self.metadata = dict(self.shards[0].metadata) if self.shards else {}
        return infos

    def _shard_names(self, index: Path) -> list[str]:
        data = read_json(inside_folder(self.path, index.name))
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ModelIOError(
                f"{index}: not a safetensors index (weight_map must map tensor names to file names)"
            )
        names = list(dict.fromkeys(weight_map.values()))
        for rel in names:
            if Path(rel).name != rel or not (self.path / rel).is_file():
                raise ModelIOError(f"{index}: shard {rel!r} is not a file in {self.path}")
        return names

    def path_of(self, info: TensorInfo) -> Path:
        return self._owner[info.name].path

    def span(self, info: TensorInfo) -> tuple[int, int] | None:
        return self._owner[info.name].span(info)

    def _read(self, info: TensorInfo) -> np.ndarray:
        return self._owner[info.name].read(info)


def open_safetensors(path: str | Path) -> SafetensorsFile | SafetensorsFolder:
    """A ``.safetensors`` file or a model folder (see :class:`SafetensorsFolder`)."""
    p = check_input_path(path)
    if p.is_dir():
        return SafetensorsFolder(p)
    return SafetensorsFile(check_input_file(p))


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
        self._staging: np.ndarray | None = None
        self._fh = open(path, write_mode(path))  # noqa: SIM115 - closed in close()
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
        if array.dtype == np.float32 and info.dtype == "bfloat16":
            self._write_bf16(np.ascontiguousarray(array).reshape(-1))
        else:
            arr = np.ascontiguousarray(array, dtype=numpy_dtype(info.dtype))
            self._fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
        self._next += 1

    PIECE = 1 << 20  # float32 values narrowed at a time

    def _write_bf16(self, values: np.ndarray) -> None:
        """float32 -> bfloat16 (round to nearest even, as ``astype``) through one reused
        buffer: no fresh memory per tensor (page faults cost more than the rounding)."""
        from .. import _widen

        if self._staging is None:
            self._staging = np.empty(2 * self.PIECE, np.uint8)
        for lo in range(0, values.size, self.PIECE):
            piece = values[lo : lo + self.PIECE].view(np.uint8)
            out = self._staging[: piece.size // 2]
            _widen.narrow_bf16(piece, out, 1)  # a piece is too small to share out
            self._fh.write(memoryview(out))

    def close(self) -> None:
        missing = len(self._infos) - self._next
        self._fh.close()
        if missing:
            raise ModelIOError(f"{missing} tensor(s) announced but never written")
