"""safetensors in and out: a lazy reader and a streaming writer."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import ITEMSIZE, ML_DTYPES, ModelIOError, TensorInfo, numpy_dtype
from .tensors import TensorSource

ST_TO_DTYPE = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
DTYPE_TO_ST = {v: k for k, v in ST_TO_DTYPE.items()}


class SafetensorsFile(TensorSource):
    """A ``.safetensors`` file: the header up front, tensors read one at a time."""

    format = "safetensors"

    def _open(self) -> list[TensorInfo]:
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

    def _read(self, info: TensorInfo) -> np.ndarray:
        if info.dtype in ML_DTYPES:  # bfloat16/float8: read the bytes, whatever numpy supports
            return self._read_raw(info)
        return self._st.get_tensor(info.name)

    def _read_raw(self, info: TensorInfo) -> np.ndarray:
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
        storage = ML_DTYPES.get(info.dtype) or np.dtype(f"<u{ITEMSIZE[info.dtype]}")
        return data.view(storage).reshape(info.shape)

    def close(self) -> None:
        self._st = None


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
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
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
