"""What every reader and writer shares: the error type, dtypes, tensor headers, the file
rules for hostile inputs, atomic output.

Nothing here reads a file format; the format modules (``safetensors_files``, ``numpy_files``,
``arrow_files``, ``gguf_files``, ``compressed_tensors``) build on it.

The file rules every reader follows (a new reader calls these, never its own variant):

* :func:`check_input_file` (:func:`check_input_path` where a folder is accepted too): a
  regular file, or a symlink to one; a FIFO would block the reader forever, a device never
  ends.
* :func:`read_json` / :func:`parse_json`: JSON files (``config.json``, index files) at most
  :data:`MAX_JSON_BYTES`, parsed so that deep nesting is one clear error.
* :func:`inside_folder`: a file of a model folder that is copied or read must resolve to a
  regular file inside that folder (symlinks resolved), never ``/proc``, a device or a file
  elsewhere; :func:`copy_file` copies it with errors that name it.
* :func:`check_output_path` before any work, :func:`atomic_output` for the writing (the
  umask's mode for a new file, the old mode for a replaced one).
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# re-exported: the default bound of a batch built from a tensor file
from ..arrays import DEFAULT_BATCH_BYTES as DEFAULT_BATCH_BYTES

#: most elements one tensor may have (list<float32> offsets are int32)
MAX_TENSOR_ELEMENTS = 2**31 - 1


#: the largest JSON file a reader parses (config.json, model.safetensors.index.json, ...);
#: the largest real index files (hundreds of thousands of tensors) are about 10 MB
MAX_JSON_BYTES = 16 << 20


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


# --------------------------------------------------------------------------- file rules

#: never read or copy from these, whatever a symlink says
_SYSTEM_TREES = ("/proc", "/sys", "/dev")


def _stat(path: str | os.PathLike) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ModelIOError(f"{os.fspath(path)}: no such file") from None
    except OSError as exc:
        raise ModelIOError(f"{os.fspath(path)}: cannot read ({exc.strerror or exc})") from None


def _not_regular(path: str | os.PathLike, mode: int) -> str:
    kind = (
        "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
    )  # fmt: skip
    return f"{os.fspath(path)}: is {kind}, not a regular file; give a file on disk"


def check_input_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a regular file (symlinks followed), else :class:`ModelIOError`.

    Call it before opening any input: a FIFO blocks ``open`` forever and a device never
    ends, so only a regular file is read.

    >>> check_input_file("/dev/null")
    Traceback (most recent call last):
    ...
    flightquant.modelfiles.common.ModelIOError: /dev/null: is a device, not a regular file; give a file on disk
    """
    mode = _stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise ModelIOError(f"{os.fspath(path)}: is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise ModelIOError(_not_regular(path, mode))
    return Path(path)


def check_input_path(path: str | os.PathLike) -> Path:
    """``path`` if it is a regular file or a folder (where a model folder is accepted)."""
    mode = _stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ModelIOError(_not_regular(path, mode))
    return Path(path)


def parse_json(raw: bytes | str, where: str):
    """``json.loads(raw)``; bad JSON and deep nesting are one :class:`ModelIOError` that
    starts with ``where`` (the file, and the part of it: ``"x.safetensors: the header"``)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ModelIOError(f"{where} is JSON nested too deeply to read") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ModelIOError(f"{where} is not JSON ({first_line(exc)})") from None


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES):
    """The parsed content of a JSON file of at most ``max_bytes`` (a regular file).

    Every failure (missing, not a regular file, too large, unreadable, not JSON, nested
    too deeply) is one :class:`ModelIOError` that names the file.
    """
    check_input_file(path)
    name = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise ModelIOError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if size > max_bytes or len(raw) > max_bytes:
        raise ModelIOError(
            f"{name}: {max(size, len(raw))} bytes, more than the {max_bytes} bytes "
            f"({max_bytes >> 20} MiB) a JSON file may have"
        )
    return parse_json(raw, name)


def _hub_blobs(folder: Path) -> Path | None:
    """The ``blobs`` folder of a Hugging Face cache snapshot (``.../snapshots/<rev>``),
    where the snapshot's files are symlinks to."""
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return (folder.parent.parent / "blobs").resolve()
    return None


def inside_folder(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The real path of ``path``, a file of the model folder ``folder``, if it resolves
    (symlinks followed) to a regular file inside ``folder``; else :class:`ModelIOError`.

    A model folder's files are read and copied into outputs, so a symlink must not reach
    out of it (``tokenizer.json -> /proc/self/environ`` would copy the process's
    environment). The one exception is a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/``), whose files link to the repository's
    ``blobs/``.
    """
    folder = Path(folder)
    root = folder.resolve()
    try:
        real = (folder / path).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, a symlink loop
        raise ModelIOError(f"{folder / path}: cannot be resolved ({first_line(exc)})") from None
    allowed = [root] + [b for b in [_hub_blobs(root)] if b is not None]
    system = any(real.is_relative_to(t) for t in _SYSTEM_TREES)
    if system or not any(real.is_relative_to(a) for a in allowed):
        raise ModelIOError(f"{folder / path}: leads to {real}, outside the model folder {folder}")
    mode = _stat(real).st_mode
    if not stat.S_ISREG(mode):
        raise ModelIOError(_not_regular(folder / path, mode))
    return real


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file (checked with :func:`inside_folder` first); a read or write error is
    one :class:`ModelIOError` naming the file."""
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            try:
                while chunk := fin.read(16 << 20):
                    fout.write(chunk)
            except BaseException:
                fout.close()
                os.unlink(dst)
                raise
    except OSError as exc:
        raise ModelIOError(f"{os.fspath(src)}: cannot copy ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------- output


def current_umask() -> int:
    """The process's umask (read by setting it and back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Refuse an output path before any work: its folder must exist; a file output must not
    be a directory, a folder output not a symlink (nor a file, nor a non-empty folder)."""
    target = Path(path)
    name = os.fspath(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise ModelIOError(f"{name}: directory {os.fspath(directory)} does not exist")
    if folder:
        if target.is_symlink():
            raise ModelIOError(f"{name}: is a symbolic link; give the path of a new folder")
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ModelIOError(f"{name}: exists and is not an empty folder; give a new folder")
    elif target.is_dir():
        raise ModelIOError(f"{name}: is a directory; give a file name")


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

    A failed or interrupted job leaves neither ``path`` nor the temporary file behind. The
    file gets the mode a new file gets under the umask (0644 under 022), or the mode of
    the file it replaces.
    """
    check_output_path(path)
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=directory)
    tmp_path = Path(tmp)
    try:
        try:
            os.fchmod(fd, mode)  # mkstemp makes it private
        finally:
            os.close(fd)
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        try:
            tmp_path.unlink()
        except FileNotFoundError:
            pass
        raise
