"""What every reader and writer shares: the error type, dtypes, tensor headers, atomic output.

Nothing here reads a file format; the format modules (``safetensors_files``, ``numpy_files``,
``arrow_files``, ``gguf_files``) build on it.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: default upper bound of the float payload of one batch built from a tensor file
DEFAULT_BATCH_BYTES = 64 << 20
#: most elements one tensor may have (list<float32> offsets are int32)
MAX_TENSOR_ELEMENTS = 2**31 - 1


class ModelIOError(ValueError):
    """A file that cannot be read or written as asked; the message names the file."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (its type name when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------- dtypes


class _MlDtypes(Mapping):
    """bfloat16/float8 dtype name -> NumPy dtype, through ml_dtypes, imported on first use
    (its import costs ~0.5 s of CPU, paid by every process otherwise; ml_dtypes is a
    dependency, but reading must not need it)."""

    @functools.cached_property
    def _dtypes(self) -> dict[str, np.dtype]:
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover
            return {}
        return {
            "bfloat16": np.dtype(ml_dtypes.bfloat16),
            "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
            "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
        }

    def __getitem__(self, name: str) -> np.dtype:
        return self._dtypes[name]

    def __iter__(self):
        return iter(self._dtypes)

    def __len__(self) -> int:
        return len(self._dtypes)


ML_DTYPES: Mapping[str, np.dtype] = _MlDtypes()

#: float dtypes that can be quantized
FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2")
#: non-float dtypes, which are always kept as they are
PASS_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
)  # fmt: skip
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}  # fmt: skip


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (bfloat16/float8 through ml_dtypes)."""
    if name in ML_DTYPES:
        return ML_DTYPES[name]
    if name in ITEMSIZE:
        return np.dtype(name).newbyteorder("<")
    raise ModelIOError(f"unsupported dtype {name!r}")


def dtype_name(dtype: np.dtype) -> str:
    """Canonical name of a NumPy dtype; raises for dtypes that cannot be stored."""
    dtype = np.dtype(dtype)
    for name, dt in ML_DTYPES.items():
        if dtype == dt:
            return name
    if dtype.kind in "fiub" and dtype.name in ITEMSIZE:
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
        return self.numel * ITEMSIZE[self.dtype]

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
    if dtype == "bfloat16" and values.dtype == np.float32 and "bfloat16" in ML_DTYPES:
        from .. import _widen  # the same bits as ml_dtypes' cast, in parallel

        out = np.empty(values.shape, ML_DTYPES["bfloat16"])
        src = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
        _widen.narrow_bf16(src, out.reshape(-1).view(np.uint8))
        return out
    return values.astype(numpy_dtype(dtype))


# --------------------------------------------------------------------------- output


def write_mode(path: str | os.PathLike) -> str:
    """The mode to open an output file in: ``"ab"`` for an existing empty file (the
    temporary :func:`atomic_output` made), else ``"wb"``.

    Opening with truncation (``"wb"``) marks the file on ext4 for writing back in full
    when it is closed (``auto_da_alloc``): measured 0.15-0.2 s per 0.5 GB, in the job's
    time. Appending to the empty file writes the same bytes without that.
    """
    try:
        if os.stat(path).st_size == 0:
            return "ab"
    except OSError:
        pass
    return "wb"


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
