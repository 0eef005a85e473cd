"""compressed-tensors checkpoints (``pack-quantized``), the format transformers and vLLM load.

:func:`write_compressed_tensors` turns a float safetensors model (one file, or a folder of
shards with ``model.safetensors.index.json``) into a folder that
``AutoModelForCausalLM.from_pretrained`` (with the ``compressed-tensors`` package) and vLLM
load as they load any such checkpoint: int4 or int8 group quantization of the Linear
weights, everything else copied untouched. No torch is needed to write it.

The layout, as compressed-tensors' ``PackedQuantizationCompressor`` reads it, for a Linear
weight ``<prefix>.weight`` of shape ``[out, in]`` and ``G = in / group_size`` groups a row:

* ``<prefix>.weight_packed``: int32 ``[out, ceil(in * bits / 32)]``, the codes ``q +
  2**(bits-1)`` packed low bits first (eight 4-bit or four 8-bit codes a word, the tail of
  a row padded with zero codes), ``q`` in ``[-2**(bits-1), 2**(bits-1) - 1]``;
* ``<prefix>.weight_scale``: ``[out, G]`` in the weight's own dtype (bfloat16, float16 or
  float32);
* ``<prefix>.weight_zero_point`` (asymmetric only): the integer zero points ``z`` stored
  as ``z + 2**(bits-1)`` and packed the same way along the *output* dimension, int32
  ``[ceil(out * bits / 32), G]``;
* ``<prefix>.weight_shape``: int64 ``[out, in]``.

The loader reconstructs ``w = (q - z) * scale`` in the scale's dtype (``z = 0`` when
symmetric), which :func:`dequantize_weight` computes the same way. Codes are computed
against the scale *as stored*: the float32 scale is rounded to the weight's dtype first,
then ``q = clamp(rint(x / scale + z))``, so no code is off by the rounding of the scale.

Scales: symmetric ``scale = max|x| / (2**(bits-1) - 1)`` (flightquant's symmetric scheme:
the largest magnitude maps to +-7 or +-127); asymmetric over the group's range widened to
include zero (compressed-tensors' rule, so that 0.0 is exact and ``z`` is in range),
``scale = (max - min) / (2**bits - 1)``, ``z = rint(-2**(bits-1) - min / scale)``. A scale
that is zero once stored (an all-zero group) is replaced by the dtype's epsilon, as
compressed-tensors does, so nothing downstream divides by zero.

Which tensors are quantized: the Linear weights, i.e. 2-D bfloat16/float16/float32
tensors whose name ends in ``.weight``, except embeddings (the module's last name part
contains ``embed``, or is ``wte``, ``wpe`` or ``shared``) and the output head (``lm_head``,
``embed_out``), which compressed-tensors' own recipes (llm-compressor) leave in float.
``only`` and ``keep`` (globs on tensor names) override: ``only`` picks among the Linear
weights, the head included; ``keep`` leaves matching tensors as they are. Every 2-D
``.weight`` tensor left in float is named (as its module) in the config's ``ignore`` list,
and so is ``lm_head`` unless it was quantized (a tied head has no tensor of its own but is
still a Linear module that the ``Linear`` target would otherwise claim). Models whose 2-D
weights belong to modules that are not ``torch.nn.Linear`` (GPT-2's ``Conv1D``) are not
loadable this way: keep those tensors (``keep``).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import (
    ModelIOError,
    check_input_path,
    check_output_path,
    copy_file,
    current_umask,
    inside_folder,
    parse_json,
    read_json,
)
from .ct_quant import (  # noqa: F401 (public here too)
    _FLOAT_DTYPES,
    SCHEMES,
    VALID_BITS,
    CompressedTensorsError,
    PackedWeight,
    _check_args,
    _check_group,
    _resolve_threads,
    dequantize_weight,
    pack_codes,
    quantize_weight,
    unpack_codes,
)

__all__ = [
    "CompressedTensorsError",
    "PackedWeight",
    "TensorReport",
    "WriteResult",
    "dequantize_weight",
    "pack_codes",
    "quantization_config",
    "quantize_weight",
    "tensor_role",
    "unpack_codes",
    "write_compressed_tensors",
]

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
#: shard the output above this many bytes (transformers' own default shard size)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
#: safetensors refuses larger headers too
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: files never copied from the input folder: other weight formats and their indexes
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_HEAD_MODULES = ("lm_head", "embed_out")
_EMBED_PARTS = ("wte", "wpe", "shared")

_COPY_CHUNK = 16 << 20


def tensor_role(name: str, dtype: str, shape: Sequence[int]) -> str:
    """``"linear"``, ``"head"``, ``"embedding"`` or ``"other"`` for a safetensors entry.

    ``dtype`` is the safetensors dtype string (``"BF16"``, ...). Only ``"linear"`` is
    quantized by default; ``"head"`` may be chosen with ``only``; the others never are.

    Examples
    --------
    >>> tensor_role("model.layers.0.self_attn.q_proj.weight", "BF16", (64, 64))
    'linear'
    >>> tensor_role("lm_head.weight", "BF16", (256, 64))
    'head'
    >>> tensor_role("model.embed_tokens.weight", "BF16", (256, 64))
    'embedding'
    >>> tensor_role("model.norm.weight", "BF16", (64,))
    'other'
    """
    if not name.endswith(".weight") or len(shape) != 2 or dtype not in _FLOAT_DTYPES:
        return "other"
    if 0 in shape:
        return "other"  # nothing to quantize
    last = name[: -len(".weight")].rsplit(".", 1)[-1]
    if last in _HEAD_MODULES:
        return "head"
    if "embed" in last or last in _EMBED_PARTS:
        return "embedding"
    return "linear"


def _module(name: str) -> str:
    return name[: -len(".weight")]


# --------------------------------------------------------------------------- safetensors


@dataclass
class _Tensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute offset of the data in the file
    nbytes: int


def _read_header(path: Path) -> tuple[dict[str, str], list[_Tensor]]:
    """The entries of a safetensors file, in data order; every claim checked against the
    file's size before anything is allocated for it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CompressedTensorsError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CompressedTensorsError(
                    f"{path}: the safetensors header claims {n} bytes but the file holds "
                    f"{size - 8} after its length field (truncated or not safetensors)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CompressedTensorsError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    with _as_ct_error():
        header = parse_json(raw, f"{path}: the safetensors header")
    if not isinstance(header, dict):
        raise CompressedTensorsError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CompressedTensorsError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = size - data_start
    tensors = []
    for name, entry in header.items():
        bad = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CompressedTensorsError(f"{bad}: its header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise CompressedTensorsError(f"{bad}: no dtype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CompressedTensorsError(f"{bad}: the shape must be a list of sizes >= 0")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CompressedTensorsError(f"{bad}: data_offsets must be [start, end]")
        start, end = offsets
        if end > data_size:
            raise CompressedTensorsError(
                f"{bad} claims bytes {start}..{end} but the file holds {data_size} bytes of "
                "data (truncated?)"
            )
        if dtype in _FLOAT_DTYPES:
            want = math.prod(shape) * _FLOAT_DTYPES[dtype].itemsize
            if want != end - start:
                raise CompressedTensorsError(
                    f"{bad}: shape {shape} of {dtype} needs {want} bytes, the header gives "
                    f"{end - start}"
                )
        tensors.append(_Tensor(name, dtype, tuple(shape), path, data_start + start, end - start))
    tensors.sort(key=lambda t: t.offset)
    for a, b in itertools.pairwise(tensors):
        if b.offset < a.offset + a.nbytes:
            raise CompressedTensorsError(f"{path}: tensors {a.name!r} and {b.name!r} overlap")
    return dict(meta), tensors


def _read_array(t: _Tensor) -> np.ndarray:
    buf = np.empty(t.nbytes, np.uint8)
    with open(t.path, "rb") as fh:
        fh.seek(t.offset)
        got = fh.readinto(memoryview(buf))
    if got != t.nbytes:
        raise CompressedTensorsError(f"{t.path}: tensor {t.name!r} is truncated")
    return buf.view(_FLOAT_DTYPES[t.dtype]).reshape(t.shape)


def _copy_bytes(t: _Tensor, out) -> None:
    with open(t.path, "rb") as fh:
        fh.seek(t.offset)
        left = t.nbytes
        while left:
            chunk = fh.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise CompressedTensorsError(f"{t.path}: tensor {t.name!r} is truncated")
            out.write(chunk)
            left -= len(chunk)


def _le_bytes(a: np.ndarray) -> bytes:
    if a.dtype == _FLOAT_DTYPES["BF16"]:
        return np.ascontiguousarray(a).view(np.uint16).astype("<u2").tobytes()
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).tobytes()


# --------------------------------------------------------------------------- the source


@dataclass
class _Source:
    folder: Path
    files: list[Path]
    config: dict
    metadata: dict[str, str]
    tensors: list[_Tensor]


@contextmanager
def _as_ct_error() -> Iterator[None]:
    """The shared file rules (:mod:`.common`) raise ModelIOError; this module's callers
    catch CompressedTensorsError."""
    try:
        yield
    except ModelIOError as exc:
        raise CompressedTensorsError(str(exc)) from None


def _open_source(source: str | os.PathLike) -> _Source:
    src = Path(source)
    with _as_ct_error():
        if src.exists() or src.is_symlink():
            check_input_path(src)
    if src.is_file():
        if src.suffix != ".safetensors":
            raise CompressedTensorsError(
                f"{src}: compressed-tensors output needs a .safetensors model (a file or a "
                "model folder)"
            )
        folder, files = src.parent, [src]
    elif src.is_dir():
        folder = src
        index, single = src / INDEX_NAME, src / WEIGHTS_NAME
        if index.is_file():
            files = _index_files(index)
        elif single.is_file():
            files = [single]
        else:
            raise CompressedTensorsError(f"{src}: no {WEIGHTS_NAME} or {INDEX_NAME} in this folder")
    else:
        raise CompressedTensorsError(f"{src}: no such file or folder")
    config_path = folder / CONFIG_NAME
    if not (config_path.exists() or config_path.is_symlink()):
        raise CompressedTensorsError(
            f"{config_path}: missing; a compressed-tensors folder needs the model's "
            "config.json (put it beside the .safetensors file)"
        )
    with _as_ct_error():  # its content goes into the output: it must be the folder's own
        config = read_json(inside_folder(folder, CONFIG_NAME))
    if not isinstance(config, dict):
        raise CompressedTensorsError(f"{config_path}: not a JSON object")
    if config.get("quantization_config"):
        method = config["quantization_config"]
        method = method.get("quant_method", "?") if isinstance(method, dict) else "?"
        raise CompressedTensorsError(
            f"{config_path}: the model is already quantized ({method}); start from the float model"
        )
    metadata: dict[str, str] = {}
    tensors: list[_Tensor] = []
    seen: dict[str, Path] = {}
    for f in files:
        meta, ts = _read_header(f)
        metadata = metadata or meta
        for t in ts:
            if t.name in seen:
                raise CompressedTensorsError(f"tensor {t.name!r} is in both {seen[t.name]} and {f}")
            seen[t.name] = f
        tensors.extend(ts)
    return _Source(folder, files, config, metadata, tensors)


def _index_files(index: Path) -> list[Path]:
    with _as_ct_error():
        data = read_json(inside_folder(index.parent, index.name))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CompressedTensorsError(
            f"{index}: not a safetensors index (weight_map must map tensor names to file names)"
        )
    files: list[Path] = []
    for rel in dict.fromkeys(weight_map.values()):
        p = index.parent / rel
        if Path(rel).name != rel or not p.is_file():
            raise CompressedTensorsError(f"{index}: shard {rel!r} is not a file in {index.parent}")
        with _as_ct_error():
            inside_folder(index.parent, rel)
        files.append(p)
    return files


# --------------------------------------------------------------------------- the writer


@dataclass
class TensorReport:
    """What happened to one input tensor."""

    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    quantized: bool
    bytes_in: int
    bytes_out: int
    snr_db: float | None = None  # quantized tensors only


@dataclass
class WriteResult:
    """The summary of :func:`write_compressed_tensors`."""

    out_dir: Path
    files: list[str]
    tensors: list[TensorReport]
    ignore: list[str]
    quantization_config: dict
    copied: list[str] = field(default_factory=list)

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)

    @property
    def quantized(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.quantized]


def quantization_config(bits: int, group_size: int, scheme: str, ignore: list[str]) -> dict:
    """The ``quantization_config`` entry of config.json for a pack-quantized int group model.

    Examples
    --------
    >>> c = quantization_config(4, 128, "symmetric", ["lm_head"])
    >>> c["format"], c["config_groups"]["group_0"]["weights"]["num_bits"], c["ignore"]
    ('pack-quantized', 4, ['lm_head'])
    """
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": scheme == "symmetric",
                    "strategy": "group",
                    "group_size": group_size,
                    "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


@dataclass
class _Entry:  # one output tensor
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _planned(t: _Tensor, quantize: bool, bits: int, group_size: int, scheme: str):
    if not quantize:
        return [_Entry(t.name, t.dtype, t.shape, t.nbytes)]
    out_f, in_f = t.shape
    per_word = 32 // bits
    groups = in_f // group_size
    prefix = _module(t.name)
    item = _FLOAT_DTYPES[t.dtype].itemsize
    words = -(-in_f // per_word)
    entries = [
        _Entry(f"{prefix}.weight_packed", "I32", (out_f, words), out_f * words * 4),
        _Entry(f"{prefix}.weight_scale", t.dtype, (out_f, groups), out_f * groups * item),
    ]
    if scheme == "asymmetric":
        zrows = -(-out_f // per_word)
        entries.append(
            _Entry(f"{prefix}.weight_zero_point", "I32", (zrows, groups), zrows * groups * 4)
        )
    entries.append(_Entry(f"{prefix}.weight_shape", "I64", (2,), 16))
    return entries


def _select(tensors: list[_Tensor], keep: Iterable[str], only: Iterable[str]) -> set[str]:
    keep, only = list(keep), list(only)
    roles = {t.name: tensor_role(t.name, t.dtype, t.shape) for t in tensors}
    if only:
        chosen = set()
        for pattern in only:
            hits = {
                n
                for n, r in roles.items()
                if r in ("linear", "head") and fnmatch.fnmatchcase(n, pattern)
            }
            if not hits:
                raise CompressedTensorsError(
                    f"--only {pattern!r} matches no Linear weight (2-D float '.weight' "
                    "tensors that are not embeddings)"
                )
            chosen |= hits
    else:
        chosen = {n for n, r in roles.items() if r == "linear"}
    return {n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in keep)}


def _check_out_dir(out: Path) -> None:
    with _as_ct_error():  # before any work: a symlink would fail only at the final rename
        check_output_path(out, folder=True)


def _report(progress, label: str, fraction: float) -> None:
    if progress is None:
        return
    try:
        progress(label, fraction)
    except Exception:  # a broken progress bar never fails the job
        log.warning("progress callback failed", exc_info=True)


def _safetensors_header(entries: list[_Entry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": {**metadata, "format": "pt"}}
    pos = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(blob)) + blob


def write_compressed_tensors(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    bits: int = 4,
    group_size: int = 128,
    scheme: str = "symmetric",
    threads: int | None = None,
    progress: Callable[[str, float], None] | None = None,
    keep: Iterable[str] = (),
    only: Iterable[str] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> WriteResult:
    """Write a compressed-tensors (pack-quantized) model folder from a safetensors model.

    Parameters
    ----------
    source : path
        A ``.safetensors`` file (its folder must hold ``config.json``) or a model folder
        with ``model.safetensors`` or sharded files and ``model.safetensors.index.json``.
    out_dir : path
        A new (or empty) folder. It is written beside itself under a temporary name and
        renamed at the end, so a failed job leaves nothing behind.
    bits : {4, 8}
    group_size : int
        Must divide the input features of every quantized tensor.
    scheme : {"symmetric", "asymmetric"}
    threads : int or None
        Threads for each tensor's row blocks; ``None``: all allowed cores.
    progress : callable, optional
        ``progress(tensor_name, fraction)`` after each tensor, fractions (by input bytes)
        rising to exactly 1.0; its exceptions are logged and ignored.
    keep, only : iterable of str
        Globs on tensor names: ``only`` quantizes just the matching Linear weights (the
        output head included), ``keep`` leaves the matching tensors as they are.
    max_shard_bytes : int
        Above this total the weights are split into ``model-0000i-of-0000n.safetensors``
        shards with ``model.safetensors.index.json``.

    Returns
    -------
    WriteResult
        Per-tensor sizes and SNR, the ``ignore`` list and the files written.

    Examples
    --------
    >>> write_compressed_tensors("llama/", "llama-w4/", bits=4)  # doctest: +SKIP
    """
    _check_args(bits, group_size, scheme)
    if (
        isinstance(max_shard_bytes, bool)
        or not isinstance(max_shard_bytes, int)
        or (max_shard_bytes < 1)
    ):
        raise CompressedTensorsError(f"max_shard_bytes must be >= 1, got {max_shard_bytes!r}")
    n_threads = _resolve_threads(threads)
    src = _open_source(source)
    out = Path(out_dir)
    _check_out_dir(out)
    chosen = _select(src.tensors, keep, only)
    for t in src.tensors:
        if t.name in chosen:
            _check_group(t.name, t.shape[1], group_size)

    plans = [(t, _planned(t, t.name in chosen, bits, group_size, scheme)) for t in src.tensors]
    names = [e.name for _, es in plans for e in es]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CompressedTensorsError(
            f"output tensor {dup!r} would be written twice: is the input already quantized?"
        )
    ignore = list(
        dict.fromkeys(
            _module(t.name)
            for t in src.tensors
            if t.name.endswith(".weight") and len(t.shape) == 2 and t.name not in chosen
        )
    )
    if "lm_head.weight" not in chosen and "lm_head" not in ignore:
        ignore.append("lm_head")
    qconfig = quantization_config(bits, group_size, scheme, ignore)

    shards = _plan_shards(plans, max_shard_bytes)
    if len(shards) == 1:
        shard_names = [WEIGHTS_NAME]
    else:
        n = len(shards)
        shard_names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    total_in = sum(t.nbytes for t in src.tensors)
    done = 0
    reports: list[TensorReport] = []
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the result is not
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            for shard_name, shard in zip(shard_names, shards, strict=True):
                entries = [e for _, es in shard for e in es]
                with open(tmp / shard_name, "wb") as fh:
                    fh.write(_safetensors_header(entries, src.metadata))
                    for t, es in shard:
                        if t.name in chosen:
                            snr = _write_quantized(
                                fh, t, es, bits, group_size, scheme, pool if n_threads > 1 else None
                            )
                        else:
                            _copy_bytes(t, fh)
                            snr = None
                        out_bytes = sum(e.nbytes for e in es)
                        reports.append(
                            TensorReport(
                                t.name, t.dtype, t.shape, t.name in chosen, t.nbytes, out_bytes, snr
                            )
                        )
                        done += t.nbytes
                        _report(progress, t.name, done / total_in if total_in else 1.0)
        if len(shards) > 1:
            weight_map = {
                e.name: name
                for name, shard in zip(shard_names, shards, strict=True)
                for _, es in shard
                for e in es
            }
            total = sum(e.nbytes for shard in shards for _, es in shard for e in es)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config = dict(src.config)
        config["quantization_config"] = qconfig
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        copied = _copy_side_files(src.folder, tmp)
        if not src.tensors:
            _report(progress, "", 1.0)
        if out.exists():
            out.rmdir()  # empty (checked above); rename() needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [*shard_names, *([INDEX_NAME] if len(shards) > 1 else []), CONFIG_NAME, *copied]
    return WriteResult(out, files, reports, ignore, qconfig, copied)


def _plan_shards(plans, max_shard_bytes: int) -> list[list[tuple[_Tensor, list[_Entry]]]]:
    """Tensors in order, a new shard whenever the next one would pass the limit (a tensor
    larger than the limit gets a shard of its own)."""
    shards: list[list[tuple[_Tensor, list[_Entry]]]] = [[]]
    size = 0
    for plan in plans:
        n = sum(e.nbytes for e in plan[1])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += n
    return shards


def _write_quantized(fh, t: _Tensor, entries: list[_Entry], bits, group_size, scheme, pool):
    """Quantize one weight and write its tensors in the planned order; return its SNR."""
    p = quantize_weight(
        _read_array(t), bits=bits, group_size=group_size, scheme=scheme, name=t.name, pool=pool
    )
    parts = {
        "weight_packed": p.weight_packed,
        "weight_scale": p.weight_scale,
        "weight_zero_point": p.weight_zero_point,
        "weight_shape": p.weight_shape,
    }
    for e in entries:
        blob = _le_bytes(parts[e.name.rsplit(".", 1)[1]])
        if len(blob) != e.nbytes:  # pragma: no cover - a planning bug
            raise RuntimeError(f"{e.name}: planned {e.nbytes} bytes, wrote {len(blob)}")
        fh.write(blob)
    return p.snr_db


def _copy_side_files(folder: Path, dest: Path) -> list[str]:
    """Copy the tokenizer, generation config and other plain files of the model folder;
    never other weight files, their indexes, hidden files or subfolders, and never a file
    that is not the folder's own (a symlink out of it is skipped with a warning)."""
    copied = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if (
            not p.is_file()
            or name.startswith(".")
            or name == CONFIG_NAME
            or name.endswith(_WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
        ):
            continue
        try:
            real = inside_folder(folder, name)
        except ModelIOError as exc:
            log.warning("not copied: %s", exc)
            continue
        with _as_ct_error():
            copy_file(real, dest / name)
        copied.append(name)
    return copied
