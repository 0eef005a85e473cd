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
symmetric), which :func:`dequantize_weight` computes the same way.

The codes are the engine's (:mod:`flightquant.codec`, the kernels; in-process or on a
server, byte for byte the same): its symmetric or asymmetric scheme, ``rtn`` or ``mse``
(optionally importance-weighted), with the engine option ``scale_dtype`` set to the
weight's dtype, so the codes are chosen against the scale *as stored* and asymmetric zero
points are integers over a range that spans zero (the reference's *Stored scales*). The
engine's codes are ``q + 2**(bits-1)`` (symmetric) or ``q - z_min`` with zero point ``z +
2**(bits-1)`` (asymmetric), packed LSB-first: a row's bytes read as little-endian int32 are
``weight_packed``, and the zero points are the stored codes of ``z``. A group whose scale
is zero once stored (an all-zero group) stores scale 0 and reconstructs 0.

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
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .common import (
    ModelIOError,
    TensorInfo,
    check_input_path,
    check_output_path,
    copy_file,
    current_umask,
    inside_folder,
    read_json,
)
from .safetensors_files import (
    DTYPE_TO_ST,
    INDEX_NAME,
    WEIGHTS_NAME,
    SafetensorsFile,
    SafetensorsFolder,
    open_safetensors,
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
CONFIG_NAME = "config.json"
#: files never copied from the input folder: other weight formats and their indexes
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_HEAD_MODULES = ("lm_head", "embed_out")
_EMBED_PARTS = ("wte", "wpe", "shared")

_COPY_CHUNK = 16 << 20


VALID_BITS = (4, 8)
SCHEMES = ("symmetric", "asymmetric")

#: the dtypes that are quantized: safetensors name -> NumPy dtype (little-endian)
_FLOAT_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
#: safetensors name -> the engine's ``scale_dtype`` (codes against the scale as stored)
_SCALE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

#: one error class for model files: the reader's and this writer's
CompressedTensorsError = ModelIOError

#: ``quantize_arrays(arrays, importance=..., **options)``: ``fq.quantize_arrays`` (the
#: default, in-process) or a ``Client``'s (``--server``); both give the same bytes
QuantizeArrays = Callable[..., Mapping[str, Any]]


# --------------------------------------------------------------------------- one matrix


@dataclass
class PackedWeight:
    """One Linear weight in compressed-tensors' pack-quantized layout (see module doc)."""

    weight_packed: np.ndarray  # int32 [out, ceil(in * bits / 32)]
    weight_scale: np.ndarray  # [out, in / group_size], the weight's dtype
    weight_zero_point: np.ndarray | None  # int32 [ceil(out * bits / 32), G], asymmetric
    weight_shape: np.ndarray  # int64 [2]
    bits: int
    group_size: int
    sse: float = 0.0  # sum of squared errors of the dequantized weight (as stored)
    energy: float = 0.0  # sum of squares of the input

    @property
    def snr_db(self) -> float:
        """Signal-to-noise ratio of the stored reconstruction, in dB (inf when exact)."""
        if self.sse == 0.0:
            return math.inf
        if self.energy == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.energy / self.sse)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``[rows, cols]`` (uint8, < 2**bits) into int32 words along axis 1.

    Low bits first: code ``j`` of a word sits at bits ``j*bits .. (j+1)*bits - 1``; a row's
    last word is padded with zero codes. The same words as compressed-tensors'
    ``pack_to_int32`` (which takes the signed codes and adds ``2**(bits-1)`` itself), and
    the same bytes as the engine's LSB-first codes of a row read as little-endian int32.

    Examples
    --------
    >>> import numpy as np
    >>> words = pack_codes(np.array([[1, 2, 3, 4, 5, 6, 7, 15]], np.uint8), 4)
    >>> words.dtype, hex(int(words.view(np.uint32)[0, 0]))
    (dtype('int32'), '0xf7654321')
    """
    if bits not in VALID_BITS:
        raise CompressedTensorsError(f"bits must be 4 or 8, got {bits!r}")
    codes = np.asarray(codes, np.uint8)
    if codes.ndim != 2:
        raise CompressedTensorsError(f"codes must be 2-D, got shape {codes.shape}")
    per_word = 32 // bits
    pad = (-codes.shape[1]) % per_word
    if pad:
        codes = np.pad(codes, ((0, 0), (0, pad)))
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    words = np.ascontiguousarray(codes).view("<i4")
    return words.astype(np.int32, copy=False)


def unpack_codes(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`: uint8 codes ``[rows, cols]``.

    Examples
    --------
    >>> import numpy as np
    >>> c = np.arange(12, dtype=np.uint8).reshape(1, 12)
    >>> unpack_codes(pack_codes(c, 4), 4, 12).tolist()
    [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    """
    if bits not in VALID_BITS:
        raise CompressedTensorsError(f"bits must be 4 or 8, got {bits!r}")
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype.kind not in "iu" or packed.dtype.itemsize != 4:
        raise CompressedTensorsError("packed codes must be a 2-D int32 array")
    rows, words = packed.shape
    if cols > words * (32 // bits) or cols < 0:
        raise CompressedTensorsError(f"{words} words a row cannot hold {cols} {bits}-bit codes")
    raw = np.ascontiguousarray(packed.astype("<i4", copy=False)).view(np.uint8)
    raw = raw.reshape(rows, words * 4)
    if bits == 8:
        return raw[:, :cols].copy()
    out = np.empty((rows, words * 8), np.uint8)
    out[:, 0::2] = raw & 0xF
    out[:, 1::2] = raw >> 4
    return out[:, :cols].copy()


def _st_dtype(dtype: np.dtype) -> str:
    """The safetensors name of a weight's dtype (bfloat16, float16 or float32)."""
    if dtype == _FLOAT_DTYPES["BF16"]:
        return "BF16"
    if dtype.kind == "f" and dtype.itemsize in (2, 4):
        return "F16" if dtype.itemsize == 2 else "F32"
    raise CompressedTensorsError(
        f"weights must be bfloat16, float16 or float32 to quantize, got {dtype}"
    )


def engine_options(bits: int, group_size: int, scheme: str, method: str, st_dtype: str) -> dict:
    """The engine's options for one weight: native codes of ``scheme`` against the scale
    stored in the weight's dtype (integer zero points), which are compressed-tensors'."""
    return {
        "bits": bits,
        "group_size": group_size,
        "scheme": scheme,
        "method": method,
        "scale_dtype": _SCALE_DTYPES[st_dtype],
    }


def packed_weight(qt: Any, st_dtype: str, weight: np.ndarray | None = None) -> PackedWeight:
    """compressed-tensors' tensors from the engine's result ``qt`` (a
    :class:`flightquant.arrays.QuantizedTensor` of a ``[out, in]`` weight quantized with
    :func:`engine_options`): the engine's codes are ``q + 2**(bits-1)`` (symmetric) or
    ``q`` with integer zero points (asymmetric), packed LSB-first along each row, so the
    row's bytes read as little-endian int32 are ``weight_packed`` (a row whose codes do not
    fill whole words is repacked with zero padding). With ``weight`` (the input), the SNR
    of the stored reconstruction is filled in."""
    out_f, in_f = (int(d) for d in qt.shape)
    bits, gs = int(qt.bits), int(qt.group_size)
    if (in_f * bits) % 32 == 0:
        words = np.frombuffer(qt.codes, "<i4").reshape(out_f, in_f * bits // 32)
    else:  # per-row padding to whole words
        from ..reference import unpack_codes as unpack_flat

        flat = unpack_flat(qt.codes, bits, out_f * in_f).reshape(out_f, in_f)
        words = pack_codes(flat, bits)
    scale = np.asarray(qt.scales, np.float32).reshape(out_f, in_f // gs)
    stored = scale.astype(_FLOAT_DTYPES[st_dtype])
    zp = None
    if qt.zero_points is not None:  # integers 0..2**bits-1, i.e. z + 2**(bits-1)
        z = np.asarray(qt.zero_points, np.float32).reshape(out_f, in_f // gs).astype(np.uint8)
        zp = np.ascontiguousarray(pack_codes(np.ascontiguousarray(z.T), bits).T)
    p = PackedWeight(
        np.ascontiguousarray(words.astype(np.int32, copy=False)),
        stored,
        zp,
        np.array([out_f, in_f], np.int64),
        bits,
        gs,
    )
    if weight is not None:
        x = np.asarray(weight, np.float32)
        d = dequantize_weight(p).astype(np.float32) - x
        p.sse = _sum_squares(d)
        p.energy = _sum_squares(x)
    return p


def _sum_squares(a: np.ndarray) -> float:
    a = a.ravel()
    total = float(np.dot(a, a))  # float32 BLAS; float64 only when that overflows
    if not math.isfinite(total):
        a64 = a.astype(np.float64)
        total = float(np.dot(a64, a64))
    return total


def quantize_weight(
    weight: np.ndarray,
    *,
    bits: int = 4,
    group_size: int = 128,
    scheme: str = "symmetric",
    method: str = "rtn",
    importance: np.ndarray | None = None,
    threads: int | None = None,
    name: str = "weight",
    quantize_arrays: QuantizeArrays | None = None,
) -> PackedWeight:
    """Quantize one Linear weight ``[out, in]`` to compressed-tensors' pack-quantized layout
    through the engine (:func:`engine_options`, :func:`packed_weight`).

    Parameters
    ----------
    weight : ndarray
        2-D, float32, float16 or bfloat16 (``ml_dtypes.bfloat16``); the scales come out in
        the same dtype, and the codes are chosen against them as stored.
    bits : {4, 8}
    group_size : int
        Must divide ``in`` (the second dimension).
    scheme : {"symmetric", "asymmetric"}
    method : {"rtn", "mse"}
    importance : ndarray, optional
        ``in`` weights (an imatrix entry): the mse search weighs column ``j`` by it.
    threads : int or None
        Kernel threads (in-process); ``None``: all allowed cores.
    name : str
        The tensor's name, for error messages.
    quantize_arrays : callable, optional
        ``fq.quantize_arrays`` (default) or ``Client.quantize_arrays``.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([[0.0, -2.0, 1.0, 127.0]], np.float32)  # scale 1: exact
    >>> p = quantize_weight(w, bits=8, group_size=4)
    >>> p.weight_packed.shape, p.weight_scale.dtype, p.weight_shape.tolist()
    ((1, 1), dtype('float32'), [1, 4])
    >>> bool(np.array_equal(dequantize_weight(p), w))
    True
    """
    _check_args(bits, group_size, scheme, method)
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise CompressedTensorsError(f"{name}: a Linear weight is 2-D, got shape {weight.shape}")
    st = _st_dtype(weight.dtype)
    _check_group(name, int(weight.shape[1]), group_size)
    run = quantize_arrays or _in_process(threads)
    options = engine_options(bits, group_size, scheme, method, st)
    return packed_weight(_run_one(run, name, weight, importance, options), st, weight)


def _in_process(threads: int | None) -> QuantizeArrays:
    from .. import api

    def run(arrays, importance=None, **options):
        return api.quantize_arrays(arrays, importance=importance, threads=threads, **options)

    return run


def _run_one(run: QuantizeArrays, name: str, weight: np.ndarray, importance, options: dict):
    from ..errors import NonFiniteError

    x = np.asarray(weight, np.float32)  # bfloat16/float16 widen exactly
    imp = None if importance is None else {name: np.asarray(importance, np.float32)}
    try:
        return run({name: x}, importance=imp, **options)[name]
    except NonFiniteError:
        bad = np.argwhere(~np.isfinite(x))
        if not bad.size:  # pragma: no cover - the engine found one
            raise
        r, c = (int(i) for i in bad[0])
        raise CompressedTensorsError(
            f"{name}: non-finite value {float(x[r, c])!r} at [{r}, {c}]: replace NaN/Inf in "
            "the model before quantizing"
        ) from None


def dequantize_weight(p: PackedWeight) -> np.ndarray:
    """``(q - z) * scale`` in the scale's dtype, as compressed-tensors decompresses it.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.linspace(-1, 1, 256, dtype=np.float32).reshape(2, 128)
    >>> p = quantize_weight(w, bits=4, group_size=128, scheme="asymmetric")
    >>> d = dequantize_weight(p)
    >>> d.shape, bool(np.abs(d - w).max() <= np.abs(p.weight_scale).max() / 2 + 1e-7)
    ((2, 128), True)
    """
    out_f, in_f = (int(d) for d in p.weight_shape)
    offset = 1 << (p.bits - 1)
    q = unpack_codes(p.weight_packed, p.bits, in_f).astype(np.float32) - offset
    q = q.reshape(out_f, in_f // p.group_size, p.group_size)
    if p.weight_zero_point is not None:
        z = unpack_codes(np.ascontiguousarray(p.weight_zero_point.T), p.bits, out_f).T
        q = q - (z.astype(np.float32) - offset)[..., None]
    s = np.asarray(p.weight_scale)
    w = q * s.astype(np.float32)[..., None]
    return w.astype(s.dtype).reshape(out_f, in_f)


def _check_args(bits, group_size, scheme, method: str = "rtn") -> None:
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise CompressedTensorsError(f"compressed-tensors bits must be 4 or 8, got {bits!r}")
    if scheme not in SCHEMES:
        raise CompressedTensorsError(
            f"scheme must be 'symmetric' or 'asymmetric' for compressed-tensors, got {scheme!r}"
        )
    if method not in ("rtn", "mse"):
        raise CompressedTensorsError(f"method must be 'rtn' or 'mse', got {method!r}")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, (int, np.integer))
        or (group_size < 1)
    ):
        raise CompressedTensorsError(f"group_size must be a positive integer, got {group_size!r}")


def _check_group(name: str, in_features: int, group_size: int) -> None:
    if in_features % group_size:
        raise CompressedTensorsError(
            f"{name}: {in_features} input features are not a multiple of group_size "
            f"{group_size}: choose a group size that divides {in_features}, or keep this "
            "tensor in float (--keep)"
        )


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


# --------------------------------------------------------------------------- the source


@dataclass
class _Tensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    path: Path  # the shard that holds it
    offset: int  # absolute offset of the data in the file
    nbytes: int
    info: TensorInfo


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


@dataclass
class _Source:
    folder: Path
    reader: SafetensorsFile | SafetensorsFolder
    config: dict
    metadata: dict[str, str]
    tensors: list[_Tensor]


def _open_source(source: str | os.PathLike) -> _Source:
    """The model (one safetensors reader for files and folders) and its config.json."""
    src = Path(source)
    if src.exists() or src.is_symlink():
        check_input_path(src)
    if src.is_file() and src.suffix != ".safetensors":
        raise CompressedTensorsError(
            f"{src}: compressed-tensors output needs a .safetensors model (a file or a "
            "model folder)"
        )
    if not src.exists():
        raise CompressedTensorsError(f"{src}: no such file or folder")
    folder = src if src.is_dir() else src.parent
    config_path = folder / CONFIG_NAME
    if src.is_dir() and not any(
        (src / n).exists() or (src / n).is_symlink() for n in (WEIGHTS_NAME, INDEX_NAME)
    ):
        raise CompressedTensorsError(f"{src}: no {WEIGHTS_NAME} or {INDEX_NAME} in this folder")
    if not (config_path.exists() or config_path.is_symlink()):
        raise CompressedTensorsError(
            f"{config_path}: missing; a compressed-tensors folder needs the model's "
            "config.json (put it beside the .safetensors file)"
        )
    # its content goes into the output: it must be the folder's own
    config = read_json(inside_folder(folder, CONFIG_NAME))
    if not isinstance(config, dict):
        raise CompressedTensorsError(f"{config_path}: not a JSON object")
    if config.get("quantization_config"):
        method = config["quantization_config"]
        method = method.get("quant_method", "?") if isinstance(method, dict) else "?"
        raise CompressedTensorsError(
            f"{config_path}: the model is already quantized ({method}); start from the float model"
        )
    reader = open_safetensors(src)
    tensors = []
    for info in reader.infos:
        offset, nbytes = reader.span(info)
        st = DTYPE_TO_ST[info.dtype]
        tensors.append(
            _Tensor(info.name, st, info.shape, reader.path_of(info), offset, nbytes, info)
        )
    return _Source(folder, reader, config, dict(reader.metadata), tensors)


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
    # before any work: a symlink would fail only at the final rename
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
    method: str = "rtn",
    importance: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    progress: Callable[[str, float], None] | None = None,
    keep: Iterable[str] = (),
    only: Iterable[str] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    quantize_arrays: QuantizeArrays | None = None,
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
    method : {"rtn", "mse"}
        The engine's search (``docs/quantization.md``), against the stored scale.
    importance : mapping, optional
        Tensor name (``<prefix>.weight``) -> its importance vector (``in`` weights, an
        imatrix entry); needs ``method="mse"``. Names of tensors that are not quantized
        are ignored.
    threads : int or None
        Kernel threads (in-process); ``None``: all allowed cores.
    progress : callable, optional
        ``progress(tensor_name, fraction)`` after each tensor, fractions (by input bytes)
        rising to exactly 1.0; its exceptions are logged and ignored.
    keep, only : iterable of str
        Globs on tensor names: ``only`` quantizes just the matching Linear weights (the
        output head included), ``keep`` leaves the matching tensors as they are.
    max_shard_bytes : int
        Above this total the weights are split into ``model-0000i-of-0000n.safetensors``
        shards with ``model.safetensors.index.json``.
    quantize_arrays : callable, optional
        Where the codes are computed: ``fq.quantize_arrays`` in-process (the default) or a
        ``Client``'s ``quantize_arrays`` (the same bytes).

    Returns
    -------
    WriteResult
        Per-tensor sizes and SNR, the ``ignore`` list and the files written.

    Examples
    --------
    >>> write_compressed_tensors("llama/", "llama-w4/", bits=4)  # doctest: +SKIP
    """
    _check_args(bits, group_size, scheme, method)
    if importance and method != "mse":
        raise CompressedTensorsError(
            f"importance needs method='mse' (the importance-weighted search), got {method!r}"
        )
    if (
        isinstance(max_shard_bytes, bool)
        or not isinstance(max_shard_bytes, int)
        or (max_shard_bytes < 1)
    ):
        raise CompressedTensorsError(f"max_shard_bytes must be >= 1, got {max_shard_bytes!r}")
    run = quantize_arrays or _in_process(threads)
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
        for shard_name, shard in zip(shard_names, shards, strict=True):
            entries = [e for _, es in shard for e in es]
            with open(tmp / shard_name, "wb") as fh:
                fh.write(_safetensors_header(entries, src.metadata))
                for t, es in shard:
                    if t.name in chosen:
                        w = (importance or {}).get(t.name)
                        snr = _write_quantized(
                            src, fh, t, es, run, bits, group_size, scheme, method, w
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


def _write_quantized(src, fh, t: _Tensor, entries, run, bits, group_size, scheme, method, w):
    """Quantize one weight through the engine and write its tensors in the planned order;
    return its SNR."""
    weight = src.reader.read(t.info)
    options = engine_options(bits, group_size, scheme, method, t.dtype)
    p = packed_weight(_run_one(run, t.name, weight, w, options), t.dtype, weight)
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
        copy_file(real, dest / name)
        copied.append(name)
    return copied
