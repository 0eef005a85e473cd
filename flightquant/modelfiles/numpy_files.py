"""NumPy files in and out: ``.npz`` (one tensor per member) and ``.npy`` (one tensor)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .common import ModelIOError, TensorInfo, dtype_name, first_line
from .tensors import TensorSource


class NpzFile(TensorSource):
    """An ``.npz``: headers from the zip members, arrays read one at a time."""

    format = "npz"

    def _open(self) -> list[TensorInfo]:
        infos = []
        self._members = {}
        archive = self.path.stat().st_size
        with zipfile.ZipFile(self.path) as zf:
            for zi in zf.infolist():
                member = zi.filename
                if not member.endswith(".npy"):
                    continue
                name = member[: -len(".npy")]
                with zf.open(zi) as fh:
                    shape, dtype = _npy_header(fh, f"{self.path}:{member}")
                    header = fh.tell()
                info = TensorInfo(name, shape, _checked_dtype(dtype, name, self.path))
                # numpy allocates what the header claims before reading: hold the claim to
                # the bytes the member holds (a stored member its size, a deflated one at
                # most deflate's ~1032:1)
                ratio = 1 if zi.compress_type == zipfile.ZIP_STORED else 1100
                if zi.compress_size > archive or (
                    header + info.nbytes > min(zi.file_size, zi.compress_size * ratio)
                ):
                    raise ModelIOError(
                        f"{self.path}: member {member!r} claims {info.nbytes} bytes of data, "
                        f"more than it holds (truncated or corrupt)"
                    )
                infos.append(info)
                self._members[name] = member
        return infos

    def _read(self, info: TensorInfo) -> np.ndarray:
        with zipfile.ZipFile(self.path) as zf, zf.open(self._members[info.name]) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)


class NpyFile(TensorSource):
    """An ``.npy``: one tensor named after the file, memory-mapped."""

    format = "npy"

    def _open(self) -> list[TensorInfo]:
        with open(self.path, "rb") as fh:
            shape, dtype = _npy_header(fh, str(self.path))
            header = fh.tell()
        name = self.path.stem
        info = TensorInfo(name, shape, _checked_dtype(dtype, name, self.path))
        if header + info.nbytes > self.path.stat().st_size:
            raise ModelIOError(
                f"{self.path}: the header claims {info.nbytes} bytes of data, more than the "
                "file holds (truncated or corrupt)"
            )
        return [info]

    def _read(self, info: TensorInfo) -> np.ndarray:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)


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
        raise ModelIOError(f"{where}: not a valid .npy array ({first_line(exc)})") from None
    return tuple(int(d) for d in shape), dtype


def _checked_dtype(dtype: np.dtype, name: str, path: Path) -> str:
    try:
        return dtype_name(dtype)
    except ModelIOError:
        raise ModelIOError(
            f"{path}: tensor {name!r} has dtype {dtype}, which is not supported "
            "(float16/32/64, ints and bools are; save bfloat16 in .safetensors)"
        ) from None


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
