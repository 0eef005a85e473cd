"""Model files in and out: safetensors, GGUF, npz, npy, Arrow IPC and Parquet.

This package only reads and writes, one module per file format; it knows nothing of kernels
or of the network (the CLI hands the batches it builds here to the in-process API or to a
``Client``).

*Tensor files* (``.safetensors``, ``.npz``, ``.npy``) are read lazily, one tensor at a time,
and turned into RecordBatches of the tensor layout (:mod:`.tensors`). *Table files*
(``.arrow``/``.feather``/``.ipc`` and ``.parquet``) are streamed batch by batch as they are
(:mod:`.arrow_files`). GGUF files (``.gguf``, :mod:`.gguf_files`) are read and written
tensor by tensor in their own layout, with the tensor choice of :mod:`.gguf_policy`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .arrow_files import TableFile, TableWriter
from .common import (
    DEFAULT_BATCH_BYTES,
    FLOAT_DTYPES,
    ITEMSIZE,
    MAX_JSON_BYTES,
    MAX_TENSOR_ELEMENTS,
    PASS_DTYPES,
    ModelIOError,
    TensorInfo,
    atomic_output,
    check_input_file,
    check_input_path,
    check_output_path,
    copy_file,
    dtype_name,
    from_float32,
    inside_folder,
    numpy_dtype,
    parse_json,
    read_json,
    to_float32,
    write_mode,
)
from .gguf_files import GGUFFile, GGUFOutput, GGUFTensor, OutTensor
from .numpy_files import NpyFile, NpzFile, NpzWriter
from .safetensors_files import (
    DTYPE_TO_ST,
    ST_TO_DTYPE,
    SafetensorsFile,
    SafetensorsFolder,
    SafetensorsWriter,
    open_safetensors,
)
from .selection import Selection, matrix_dims
from .tensors import (
    ARROW_FLOAT,
    TENSOR_SCHEMA,
    FileSpan,
    TensorSource,
    is_tensor_layout,
    list_offsets,
    list_parts,
    tensor_batches,
    tensors_from_batch,
    valid_rows,
    widening_threads,
)

__all__ = [
    "ARROW_FLOAT",
    "DEFAULT_BATCH_BYTES",
    "DTYPE_TO_ST",
    "FLOAT_DTYPES",
    "FileSpan",
    "GGUFFile",
    "GGUFOutput",
    "GGUFTensor",
    "ITEMSIZE",
    "MAX_JSON_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "PASS_DTYPES",
    "ST_TO_DTYPE",
    "TENSOR_SCHEMA",
    "ModelIOError",
    "NpyFile",
    "NpzFile",
    "NpzWriter",
    "OutTensor",
    "SafetensorsFile",
    "SafetensorsFolder",
    "SafetensorsWriter",
    "Selection",
    "TableFile",
    "TableWriter",
    "TensorInfo",
    "TensorSource",
    "atomic_output",
    "check_input_file",
    "check_input_path",
    "check_output_path",
    "copy_file",
    "dtype_name",
    "from_float32",
    "inside_folder",
    "input_format",
    "is_tensor_layout",
    "list_offsets",
    "list_parts",
    "matrix_dims",
    "numpy_dtype",
    "open_input",
    "open_safetensors",
    "output_format",
    "parse_json",
    "read_json",
    "tensor_batches",
    "tensors_from_batch",
    "to_float32",
    "valid_rows",
    "widening_threads",
    "write_mode",
]

_TENSOR_FILES = {".safetensors": SafetensorsFile, ".npz": NpzFile, ".npy": NpyFile}
TENSOR_FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".npy": "npy"}
TABLE_FORMATS = {".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow", ".parquet": "parquet"}
GGUF_FORMATS = {".gguf": "gguf"}
_EXTENSIONS = {"arrow": ".arrow", "parquet": ".parquet", "safetensors": ".safetensors",
               "npz": ".npz", "npy": ".npy", "gguf": ".gguf"}  # fmt: skip


def _format_of(path: str | os.PathLike) -> str | None:
    ext = Path(path).suffix.lower()
    return TENSOR_FORMATS.get(ext) or TABLE_FORMATS.get(ext) or GGUF_FORMATS.get(ext)


def input_format(path: str | os.PathLike) -> str:
    """Format of an input file, from its extension."""
    ext = Path(path).suffix.lower()
    fmt = _format_of(path)
    if fmt is None:
        raise ModelIOError(
            f"{os.fspath(path)}: unsupported input extension {ext or '(none)'!r}; use "
            ".safetensors, .gguf, .npz, .npy, .arrow/.feather or .parquet"
        )
    return fmt


def output_format(path: str | os.PathLike, allowed: Sequence[str]) -> str:
    """Format of an output file, from its extension, if it is one of ``allowed``."""
    ext = Path(path).suffix.lower()
    fmt = _format_of(path)
    if fmt not in allowed:
        raise ModelIOError(
            f"{os.fspath(path)}: unsupported output extension {ext or '(none)'!r}; use "
            + " or ".join(_EXTENSIONS[a] for a in allowed)
        )
    return fmt


def open_input(path: str | os.PathLike) -> TensorSource | TableFile | GGUFFile:
    """Open an input file, or a model folder of safetensors weights, for reading (header
    only; data is read lazily)."""
    if Path(path).is_dir():
        return SafetensorsFolder(check_input_path(path))
    fmt = input_format(path)
    p = check_input_file(path)
    if fmt in ("arrow", "parquet"):
        return TableFile(p, fmt)
    if fmt == "gguf":
        return GGUFFile(p)
    return _TENSOR_FILES[p.suffix.lower()](p)
