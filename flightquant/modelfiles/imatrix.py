"""llama.cpp's importance-matrix files in and out: the GGUF kind and the legacy ``.dat``.

An imatrix holds, per weight tensor, the sums of the squared inputs of its matrix
multiplications per column (``in_sum2``, float32 ``[n_mat, k]``: one row per expert of a
MoE tensor, one row otherwise) and the number of tokens summed (``counts``, ``[n_mat]``). The
importance of column ``j`` is ``in_sum2[j] / count``, the mean square of that input.

GGUF kind, as ``llama-imatrix`` (tools/imatrix/imatrix.cpp, ``save_imatrix``) writes it and
``llama-quantize`` (common ``common_imatrix_load``) reads it:

- keys, in this order: ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings,
  possibly empty), ``imatrix.chunk_count`` (u32), ``imatrix.chunk_size`` (u32); llama-quantize
  refuses a GGUF imatrix without the last three;
- per weight, tensors sorted by name: ``<name>.in_sum2`` F32 with ``ne = [k, n_mat]`` and
  ``<name>.counts`` F32 with ``ne = [1, n_mat]`` (ggml writes trailing dimensions of 1 away,
  so a dense weight's are 1-D: ``[k]`` and ``[1]``); newer versions add ``<name>.in_sum``
  (the plain sums), which is kept when present;
- llama.cpp refuses tensor names of 64 bytes or more (``GGML_MAX_NAME``).

Legacy ``.dat`` (``llama-imatrix --output-format dat``, ``save_imatrix_legacy``), all
little-endian: ``int32 n_entries``; per entry ``int32 len, name bytes, int32 ncall,
int32 nval, float32 values[nval]`` with ``values = in_sum2 / count * ncall`` and
``ncall = ceil(max(counts) / chunk_size)``, so that ``values / ncall`` is the importance; then
``int32 chunk_count, int32 len, dataset bytes``. It keeps neither per-expert counts nor the
chunk size: read back, an entry is one row ``[1, nval]`` with ``counts = [ncall]`` and
``chunk_size = 0`` (counts in chunks, not tokens; written as ``.dat`` again, they stay calls).

Reading is bounded: the file must be a regular file, and every count and length is checked
against the bytes it holds before anything is allocated, so a hostile or truncated file is
one :class:`ModelIOError` naming the file (and the entry), never a crash or an allocation the
size of its claim.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType

from .common import ModelIOError, atomic_output, check_input_file
from .gguf_files import GGUFFile, _Raw, _Writer

#: GGUF keys of an imatrix file (llama.cpp's ``LLM_KV_IMATRIX_*``)
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
#: tensor name suffixes of one entry
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_COUNTS = ".counts"
SUFFIX_SUM = ".in_sum"
#: ggml's GGML_MAX_NAME: a tensor name must be shorter than this many bytes
GGML_MAX_NAME = 64
#: longest weight name read from any file (bytes)
MAX_NAME_BYTES = 4096
#: the chunk size llama-imatrix uses by default (its context size)
DEFAULT_CHUNK_SIZE = 512
FORMATS = ("gguf", "dat")

_I32 = struct.Struct("<i")


@dataclass
class ImatrixEntry:
    """One weight's statistics: ``in_sum2`` float32 ``[n_mat, k]``, ``counts`` float32
    ``[n_mat]`` (tokens summed per matrix), and optionally the plain sums ``in_sum``."""

    name: str
    in_sum2: np.ndarray
    counts: np.ndarray
    in_sum: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.in_sum2 = np.asarray(self.in_sum2, np.float32)
        if self.in_sum2.ndim == 1:
            self.in_sum2 = self.in_sum2.reshape(1, -1)
        self.counts = np.asarray(self.counts, np.float32).reshape(-1)
        if self.in_sum is not None:
            self.in_sum = np.asarray(self.in_sum, np.float32).reshape(self.in_sum2.shape)
        if self.in_sum2.ndim != 2 or self.counts.shape != (self.in_sum2.shape[0],):
            raise ModelIOError(
                f"imatrix entry {self.name!r}: in_sum2 of shape {self.in_sum2.shape} needs "
                f"one count per matrix, got counts of shape {self.counts.shape}"
            )

    @property
    def n_mat(self) -> int:
        return int(self.in_sum2.shape[0])

    @property
    def width(self) -> int:
        return int(self.in_sum2.shape[1])


@dataclass
class Imatrix:
    """An importance matrix: entries by weight name, and where it came from.

    Examples
    --------
    >>> import numpy as np
    >>> e = ImatrixEntry("blk.0.attn_q.weight", np.array([[4.0, 8.0]]), np.array([2.0]))
    >>> Imatrix({e.name: e}).importance("blk.0.attn_q.weight")
    array([2., 4.], dtype=float32)
    """

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    path: str | None = None

    def importance(self, name: str) -> np.ndarray | None:
        """``in_sum2 / counts`` of weight ``name``: float32 ``[k]`` for one matrix,
        ``[n_mat, k]`` for a MoE tensor; ``None`` if the file has no entry for it.

        A matrix with no tokens (an expert the data never routed to) gets ones, as
        llama-quantize gives it.
        """
        e = self.entries.get(name)
        if e is None:
            return None
        counts = e.counts.reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(counts > 0, e.in_sum2 / np.where(counts > 0, counts, 1), 1.0)
        values = values.astype(np.float32)
        return values[0] if e.n_mat == 1 else values

    def __len__(self) -> int:
        return len(self.entries)


# --------------------------------------------------------------------------- checks


def _check_name(path: Path, name: str) -> None:
    if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ModelIOError(
            f"{path}: an entry name of {len(name.encode('utf-8'))} bytes (1 to "
            f"{MAX_NAME_BYTES} are allowed)"
        )


def _check_values(path, name: str, in_sum2: np.ndarray, counts: np.ndarray) -> None:
    where = f"{path}: entry {name!r}" if path is not None else f"imatrix entry {name!r}"
    if in_sum2.size == 0:
        raise ModelIOError(f"{where} has no values")
    bad = ~np.isfinite(in_sum2) | (in_sum2 < 0)
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ModelIOError(
            f"{where}: in_sum2 element {i} is {float(in_sum2.reshape(-1)[i])!r}; sums of "
            "squares must be finite and non-negative (corrupt file?)"
        )
    bad = ~np.isfinite(counts) | (counts < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ModelIOError(
            f"{where}: count {i} is {float(counts[i])!r}; token counts must be finite and "
            "non-negative (corrupt file?)"
        )


# --------------------------------------------------------------------------- reading


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read an imatrix file, GGUF or legacy ``.dat`` (decided by the GGUF magic).

    Raises :class:`ModelIOError` (a ``ValueError``) naming the file, and the entry where
    there is one, for anything that is not a valid imatrix.

    Examples
    --------
    >>> imx = read_imatrix("model.imatrix.gguf")  # doctest: +SKIP
    >>> imx.importance("blk.0.ffn_down.weight").shape  # doctest: +SKIP
    (11008,)
    """
    path = Path(path)
    size = check_input_file(path).stat().st_size  # the shared rule: a FIFO would block
    if size < 4:
        raise ModelIOError(f"{path}: not an imatrix file ({size} bytes)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if struct.unpack("<I", magic)[0] == GGUF_MAGIC:
        imatrix = _read_gguf(path)
    else:
        imatrix = _read_dat(path, size)
    imatrix.path = os.fspath(path)
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    gf = GGUFFile(path)  # bounded header parse
    try:
        kind = gf.value(KEY_TYPE)
        if kind is not None and kind != "imatrix":
            raise ModelIOError(
                f"{path}: a GGUF file of type {kind!r}, not an imatrix (general.type = 'imatrix')"
            )
        datasets: list[str] = []
        kv = gf._kv_index.get(KEY_DATASETS)
        if kv is not None:
            if kv.vtype != GGUFValueType.ARRAY or kv.sub_type != GGUFValueType.STRING:
                raise ModelIOError(f"{path}: {KEY_DATASETS} must be an array of strings")
            datasets = list(gf.value(KEY_DATASETS))
        chunk_count = _uint_key(gf, path, KEY_CHUNK_COUNT)
        chunk_size = _uint_key(gf, path, KEY_CHUNK_SIZE)

        parts: dict[str, dict[str, object]] = {}
        for t in gf.tensors:
            for suffix in (SUFFIX_SUM2, SUFFIX_COUNTS, SUFFIX_SUM):
                if t.name.endswith(suffix) and len(t.name) > len(suffix):
                    parts.setdefault(t.name[: -len(suffix)], {})[suffix] = t
                    break
        if not parts:
            raise ModelIOError(
                f"{path}: no imatrix entries (tensors named <weight>.in_sum2 and "
                "<weight>.counts); is this a model file?"
            )
        entries: dict[str, ImatrixEntry] = {}
        for name in sorted(parts):
            _check_name(path, name)
            entries[name] = _gguf_entry(gf, path, name, parts[name])
    finally:
        gf.close()
    return Imatrix(entries, datasets, chunk_count, chunk_size)


def _uint_key(gf: GGUFFile, path: Path, key: str) -> int:
    value = gf.value(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ModelIOError(f"{path}: {key} must be an unsigned 32-bit integer, got {value!r}")
    return value


def _gguf_entry(gf: GGUFFile, path: Path, name: str, part: dict) -> ImatrixEntry:
    t_sum2, t_counts = part.get(SUFFIX_SUM2), part.get(SUFFIX_COUNTS)
    if t_sum2 is None or t_counts is None:
        raise ModelIOError(f"{path}: entry {name!r} has in_sum2 or counts but not both")
    for t in part.values():
        if t.type != "F32":
            raise ModelIOError(f"{path}: entry {name!r}: {t.name} is {t.type}; it must be F32")
    n_mat = t_counts.numel
    if n_mat < 1 or t_sum2.numel < 1 or t_sum2.numel % n_mat:
        raise ModelIOError(
            f"{path}: entry {name!r}: in_sum2 has {t_sum2.numel} values, not a positive "
            f"multiple of its {n_mat} counts"
        )
    k = t_sum2.numel // n_mat
    if len(t_sum2.ne) > 1 and t_sum2.ne[0] != k:
        raise ModelIOError(
            f"{path}: entry {name!r}: in_sum2 has rows of {t_sum2.ne[0]} values but "
            f"{n_mat} counts imply rows of {k}"
        )
    in_sum2 = np.array(gf.floats(t_sum2), np.float32).reshape(n_mat, k)
    counts = np.array(gf.floats(t_counts), np.float32).reshape(n_mat)
    _check_values(path, name, in_sum2, counts)
    in_sum = None
    t_sum = part.get(SUFFIX_SUM)
    if t_sum is not None:
        if t_sum.numel != t_sum2.numel:
            raise ModelIOError(f"{path}: entry {name!r}: in_sum and in_sum2 differ in size")
        in_sum = np.array(gf.floats(t_sum), np.float32).reshape(n_mat, k)
        if not np.isfinite(in_sum).all():
            raise ModelIOError(f"{path}: entry {name!r}: in_sum has non-finite values")
    return ImatrixEntry(name, in_sum2, counts, in_sum)


class _DatCursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left():
            raise ModelIOError(
                f"{self.path}: {what} at byte {self.pos} claims {n} bytes, but the file has "
                f"{self.left()} left (truncated or corrupt)"
            )
        start = self.pos
        self.pos += n
        return self.buf[start : self.pos]

    def i32(self, what: str) -> int:
        return _I32.unpack(self.take(4, what))[0]

    def text(self, what: str, limit: int) -> str:
        n = self.i32(f"the length of {what}")
        if n < 0 or n > limit:
            raise ModelIOError(f"{self.path}: {what} claims {n} bytes (0 to {limit} allowed)")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelIOError(f"{self.path}: {what} is not UTF-8") from None


def _read_dat(path: Path, size: int) -> Imatrix:
    with open(path, "rb") as f:
        data = f.read(size + 1)  # bounded by the size stat() gave
    cur = _DatCursor(memoryview(data), path)
    n_entries = cur.i32("the entry count")
    # an entry takes at least 16 bytes (three int32s and one value)
    if n_entries < 1 or n_entries * 16 > cur.left():
        raise ModelIOError(
            f"{path}: not an imatrix file (neither GGUF nor a legacy .dat that holds "
            f"{n_entries} entries in {size} bytes)"
        )
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        name = cur.text(f"the name of entry {i}", MAX_NAME_BYTES)
        _check_name(path, name)
        if name in entries:
            raise ModelIOError(f"{path}: entry {name!r} appears twice")
        ncall = cur.i32(f"the call count of {name!r}")
        nval = cur.i32(f"the value count of {name!r}")
        if ncall < 0 or nval < 1:
            raise ModelIOError(
                f"{path}: entry {name!r} claims {ncall} calls and {nval} values (corrupt?)"
            )
        raw = cur.take(4 * nval, f"the {nval} values of {name!r}")
        values = np.frombuffer(raw, "<f4").astype(np.float32).reshape(1, nval)
        # ncall 0: llama-quantize takes the values as they are, i.e. a count of 1
        counts = np.array([max(ncall, 1)], np.float32)
        _check_values(path, name, values, counts)
        entries[name] = ImatrixEntry(name, values, counts)
    chunk_count, datasets = 0, []
    if cur.left():  # the trailer is optional
        chunk_count = cur.i32("the chunk count")
        if chunk_count < 0:
            raise ModelIOError(f"{path}: the chunk count is {chunk_count} (corrupt?)")
        if cur.left():
            dataset = cur.text("the dataset name", MAX_NAME_BYTES)
            if dataset:
                datasets.append(dataset)
    if cur.left():
        raise ModelIOError(f"{path}: {cur.left()} bytes after the imatrix data (corrupt?)")
    return Imatrix(entries, datasets, chunk_count, chunk_size=0)


# --------------------------------------------------------------------------- writing


def write_imatrix(path: str | os.PathLike, imatrix: Imatrix, *, format: str = "gguf") -> None:
    """Write ``imatrix`` as llama.cpp's GGUF imatrix (``format="gguf"``) or its legacy
    ``.dat``; atomically (a temporary file renamed into place on success).

    Examples
    --------
    >>> write_imatrix("out.imatrix.gguf", imx)  # doctest: +SKIP
    """
    if format not in FORMATS:
        raise ModelIOError(f"unknown imatrix format {format!r} (one of: gguf, dat)")
    if not imatrix.entries:
        raise ModelIOError(f"{os.fspath(path)}: an imatrix needs at least one entry")
    for name, e in imatrix.entries.items():
        if name != e.name:
            raise ModelIOError(f"imatrix entry {e.name!r} is stored under the name {name!r}")
        _check_values(None, name, e.in_sum2, e.counts)
    for key, value in (("chunk_count", imatrix.chunk_count), ("chunk_size", imatrix.chunk_size)):
        if not 0 <= int(value) < 2**31:
            raise ModelIOError(f"imatrix {key} {value} is out of range")
    with atomic_output(path) as tmp:
        if format == "gguf":
            _write_gguf(tmp, imatrix)
        else:
            _write_dat(tmp, imatrix)


def _write_gguf(tmp: Path, imatrix: Imatrix) -> None:
    w = _Writer(tmp, "")
    w.kv_data = [{}]  # no general.architecture: llama-imatrix writes none
    w.add_string(KEY_TYPE, "imatrix")
    # gguf-py refuses empty arrays, llama-quantize needs the key: write its bytes ourselves
    payload = struct.pack("<IQ", GGUFValueType.STRING, len(imatrix.datasets))
    payload += b"".join(struct.pack("<Q", len(b)) + b for b in _utf8(imatrix.datasets))
    w.add_key_value(KEY_DATASETS, _Raw(payload), GGUFValueType.ARRAY)
    w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
    for name in sorted(imatrix.entries, key=lambda n: n.encode("utf-8")):
        e = imatrix.entries[name]
        if len(name.encode("utf-8")) + len(SUFFIX_SUM2) >= GGML_MAX_NAME:
            raise ModelIOError(
                f"imatrix entry {name!r}: llama.cpp limits tensor names to "
                f"{GGML_MAX_NAME - 1} bytes, and {name + SUFFIX_SUM2!r} is longer "
                "(--output-format dat has no such limit)"
            )
        # ggml drops trailing dimensions of 1: a dense weight's tensors are 1-D
        moe = e.n_mat > 1
        w.add_tensor(name + SUFFIX_SUM2, e.in_sum2 if moe else e.in_sum2.reshape(-1))
        w.add_tensor(name + SUFFIX_COUNTS, e.counts.reshape(-1, 1) if moe else e.counts)
        if e.in_sum is not None:
            w.add_tensor(name + SUFFIX_SUM, e.in_sum if moe else e.in_sum.reshape(-1))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _utf8(texts: Sequence[str]) -> list[bytes]:
    return [str(t).encode("utf-8") for t in texts]


def _write_dat(tmp: Path, imatrix: Imatrix) -> None:
    chunk_size = int(imatrix.chunk_size) or 1  # 0: the counts are calls already (a .dat)
    out = bytearray()
    names = []
    for name in sorted(imatrix.entries, key=lambda n: n.encode("utf-8")):
        if float(imatrix.entries[name].counts.max()) > 0:  # an entry with no data is skipped
            names.append(name)
    if not names:
        raise ModelIOError("imatrix: every entry has zero tokens; nothing to write")
    out += _I32.pack(len(names))
    for name in names:
        e = imatrix.entries[name]
        raw = name.encode("utf-8")
        most = int(round(float(e.counts.max())))
        ncall = (most + chunk_size - 1) // chunk_size  # llama.cpp's ceiling division
        if ncall >= 2**31:
            raise ModelIOError(f"imatrix entry {name!r}: {most} tokens overflow the .dat format")
        counts = e.counts.reshape(-1, 1)
        # llama.cpp's float arithmetic: (value / count) * ncall, a matrix with no tokens as 1
        zero = counts == 0
        values = np.where(zero, np.float32(1), e.in_sum2) / np.where(zero, np.float32(1), counts)
        values = (values.astype(np.float32) * np.float32(ncall)).astype("<f4")
        out += _I32.pack(len(raw)) + raw + _I32.pack(ncall) + _I32.pack(values.size)
        out += values.tobytes()
    dataset = _utf8(imatrix.datasets[-1:]) or [b""]
    out += _I32.pack(int(imatrix.chunk_count)) + _I32.pack(len(dataset[0])) + dataset[0]
    with open(tmp, "ab") as f:  # the empty temporary file atomic_output made
        f.write(out)


# --------------------------------------------------------------------------- from statistics


def imatrix_from_sums(
    sums: Mapping[str, tuple[np.ndarray, int]],
    *,
    datasets: Sequence[str] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_count: int | None = None,
) -> Imatrix:
    """An :class:`Imatrix` of per-layer statistics ``{name: (in_sum2 [k], token count)}``
    (a calibration session's table, an in-process accumulator). ``chunk_count`` defaults
    to the largest count over ``chunk_size``, as llama-imatrix counts its chunks.

    >>> imx = imatrix_from_sums({"w": (np.array([4.0, 8.0]), 2)})
    >>> imx.importance("w").tolist(), imx.chunk_count
    ([2.0, 4.0], 0)
    """
    entries = {}
    for name, (s, count) in sums.items():
        if count < 1:
            continue  # a layer that saw no tokens has no importance
        entries[name] = ImatrixEntry(
            name, np.asarray(s, np.float32).reshape(1, -1), np.array([count], np.float32)
        )
    if chunk_count is None:
        most = max((int(c) for _, c in sums.values()), default=0)
        chunk_count = most // chunk_size if chunk_size else 0
    return Imatrix(entries, list(datasets), int(chunk_count), int(chunk_size))
