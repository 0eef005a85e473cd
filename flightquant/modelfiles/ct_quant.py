"""compressed-tensors' pack-quantized layout: group quantization against the scale as
stored (in the model's dtype), int32 packing of the codes, and decoding back. The writer
(:mod:`flightquant.modelfiles.compressed_tensors`) runs these tensor by tensor."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ml_dtypes
import numpy as np

VALID_BITS = (4, 8)
SCHEMES = ("symmetric", "asymmetric")

#: the dtypes that are quantized: safetensors name -> NumPy dtype (little-endian)
_FLOAT_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
#: torch.finfo(dtype).eps, the scale compressed-tensors puts in place of a zero one
_EPS = {
    "F32": float(np.finfo(np.float32).eps),
    "F16": float(np.finfo(np.float16).eps),
    "BF16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps),
}
_ROWS_ELEMS = 1 << 20  # elements per work item (a few MiB of float32 temporaries)


class CompressedTensorsError(ValueError):
    """An input or output that cannot be used as asked; the message names what to fix."""


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


def _code_range(bits: int) -> tuple[int, int, int]:
    """(qmin, qmax, stored offset) of compressed-tensors' signed int range."""
    offset = 1 << (bits - 1)
    return -offset, offset - 1, offset


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``[rows, cols]`` (uint8, < 2**bits) into int32 words along axis 1.

    Low bits first: code ``j`` of a word sits at bits ``j*bits .. (j+1)*bits - 1``; a row's
    last word is padded with zero codes. The same words as compressed-tensors'
    ``pack_to_int32`` (which takes the signed codes and adds ``2**(bits-1)`` itself).

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


def _round_scale(s32: np.ndarray, st_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The scale as stored (in the weight's dtype) and its exact float32 value; a scale
    that is zero once stored becomes the dtype's epsilon."""
    stored = s32.astype(_FLOAT_DTYPES[st_dtype])
    exact = stored.astype(np.float32)
    zero = exact == 0
    if zero.any():
        exact = np.where(zero, np.float32(_EPS[st_dtype]), exact)
        stored = exact.astype(_FLOAT_DTYPES[st_dtype])
    return stored, exact


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even), as float32: the
    bits ml_dtypes' cast gives for finite values, without its slow per-element cast."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    u = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def _sum_squares(a: np.ndarray) -> float:
    a = a.ravel()
    total = float(np.dot(a, a))  # float32 BLAS; float64 only when that overflows
    if not math.isfinite(total):
        a64 = a.astype(np.float64)
        total = float(np.dot(a64, a64))
    return total


def _quantize_rows(x: np.ndarray, bits: int, group_size: int, symmetric: bool, st_dtype: str):
    """Codes (uint8, stored), scales (stored), zero points (stored codes) or None, sse,
    energy for float32 rows ``x [r, in]``."""
    rows, cols = x.shape
    g = x.reshape(rows, cols // group_size, group_size)
    qmin, qmax, offset = _code_range(bits)
    if symmetric:
        amax = np.max(np.abs(g), axis=-1)
        s32 = amax / np.float32(qmax)  # float32 division, as flightquant's symmetric scheme
        scale, s = _round_scale(s32, st_dtype)
        q = np.rint(g / s[..., None])
        zp = None
    else:
        mn = np.minimum(g.min(axis=-1), np.float32(0))
        mx = np.maximum(g.max(axis=-1), np.float32(0))
        s32 = ((mx.astype(np.float64) - mn) / float(qmax - qmin)).astype(np.float32)
        scale, s = _round_scale(s32, st_dtype)
        zp = np.clip(np.rint(np.float32(qmin) - mn / s), qmin, qmax).astype(np.float32)
        q = np.rint(g / s[..., None] + zp[..., None])
    np.clip(q, qmin, qmax, out=q)
    # what the loader computes: (q - z) in the scale's dtype (exact: small integers), times
    # the scale, rounded once to the scale's dtype (float32 holds the product exactly)
    deq = (q - zp[..., None]) * s[..., None] if zp is not None else q * s[..., None]
    if st_dtype == "BF16":
        deq = _bf16_round(deq)
    elif st_dtype == "F16":
        deq = deq.astype(np.float16).astype(np.float32)
    sse = _sum_squares(deq - g)
    energy = _sum_squares(x)
    codes = (q + np.float32(offset)).astype(np.uint8).reshape(rows, cols)
    zcodes = None if zp is None else (zp + np.float32(offset)).astype(np.uint8)
    return codes, scale, zcodes, sse, energy


def _as_float32(weight: np.ndarray) -> tuple[np.ndarray, str]:
    """float32 values and the safetensors name of the weight's dtype."""
    dt = weight.dtype
    if dt == _FLOAT_DTYPES["BF16"]:
        st = "BF16"
    elif dt.kind == "f" and dt.itemsize in (2, 4):
        st = "F16" if dt.itemsize == 2 else "F32"
    else:
        raise CompressedTensorsError(
            f"weights must be bfloat16, float16 or float32 to quantize, got {dt}"
        )
    return weight.astype(np.float32), st


def quantize_weight(
    weight: np.ndarray,
    *,
    bits: int = 4,
    group_size: int = 128,
    scheme: str = "symmetric",
    threads: int | None = None,
    name: str = "weight",
    pool: ThreadPoolExecutor | None = None,
) -> PackedWeight:
    """Quantize one Linear weight ``[out, in]`` to compressed-tensors' pack-quantized layout.

    Parameters
    ----------
    weight : ndarray
        2-D, float32, float16 or bfloat16 (``ml_dtypes.bfloat16``); the scales come out in
        the same dtype.
    bits : {4, 8}
    group_size : int
        Must divide ``in`` (the second dimension).
    scheme : {"symmetric", "asymmetric"}
    threads : int or None
        Threads for the row blocks (NumPy releases the GIL); ``None``: all allowed cores.
    name : str
        The tensor's name, for error messages.
    pool : ThreadPoolExecutor, optional
        An executor to run the row blocks on instead of a new one (``threads`` is then
        ignored); the writer shares one across tensors.

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
    _check_args(bits, group_size, scheme)
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise CompressedTensorsError(f"{name}: a Linear weight is 2-D, got shape {weight.shape}")
    out_f, in_f = (int(d) for d in weight.shape)
    _check_group(name, in_f, group_size)
    st_dtype = _as_float32(weight[:0])[1]
    rows_per = max(1, _ROWS_ELEMS // max(1, in_f))
    starts = list(range(0, out_f, rows_per))
    codes = np.empty((out_f, in_f), np.uint8)
    scale = np.empty((out_f, in_f // group_size), _FLOAT_DTYPES[st_dtype])
    zcodes = None if scheme == "symmetric" else np.empty(scale.shape, np.uint8)

    def work(r0: int) -> tuple[float, float]:
        r1 = min(out_f, r0 + rows_per)
        x, _ = _as_float32(weight[r0:r1])
        if not np.isfinite(x).all():
            r, c = (int(i) for i in np.argwhere(~np.isfinite(x))[0])
            raise CompressedTensorsError(
                f"{name}: non-finite value {float(x[r, c])!r} at [{r0 + r}, {c}]: "
                "replace NaN/Inf in the model before quantizing"
            )
        c, s, z, sse, energy = _quantize_rows(x, bits, group_size, scheme == "symmetric", st_dtype)
        codes[r0:r1] = c
        scale[r0:r1] = s
        if zcodes is not None:
            zcodes[r0:r1] = z
        return sse, energy

    if pool is not None:
        parts = list(pool.map(work, starts))
    else:
        n_threads = _resolve_threads(threads)
        if n_threads == 1 or len(starts) == 1:
            parts = [work(r0) for r0 in starts]
        else:
            with ThreadPoolExecutor(max_workers=n_threads) as ex:
                parts = list(ex.map(work, starts))
    zp = None
    if zcodes is not None:
        zp = np.ascontiguousarray(pack_codes(zcodes.T, bits).T)
    return PackedWeight(
        weight_packed=pack_codes(codes, bits),
        weight_scale=scale,
        weight_zero_point=zp,
        weight_shape=np.array([out_f, in_f], np.int64),
        bits=bits,
        group_size=group_size,
        sse=float(sum(p[0] for p in parts)),
        energy=float(sum(p[1] for p in parts)),
    )


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
    _, _, offset = _code_range(p.bits)
    q = unpack_codes(p.weight_packed, p.bits, in_f).astype(np.float32) - offset
    q = q.reshape(out_f, in_f // p.group_size, p.group_size)
    if p.weight_zero_point is not None:
        z = unpack_codes(np.ascontiguousarray(p.weight_zero_point.T), p.bits, out_f).T
        q = q - (z.astype(np.float32) - offset)[..., None]
    s = np.asarray(p.weight_scale)
    w = q * s.astype(np.float32)[..., None]
    return w.astype(s.dtype).reshape(out_f, in_f)


def _check_args(bits, group_size, scheme) -> None:
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise CompressedTensorsError(f"compressed-tensors bits must be 4 or 8, got {bits!r}")
    if scheme not in SCHEMES:
        raise CompressedTensorsError(
            f"scheme must be 'symmetric' or 'asymmetric' for compressed-tensors, got {scheme!r}"
        )
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


def _resolve_threads(threads: int | None) -> int:
    from ..kernels import resolve_threads  # the one rule for thread counts

    return resolve_threads(threads)


# --------------------------------------------------------------------------- which tensors
