"""NumPy helpers every ggml family's reference shares (the twins of ext/ggml_common.pxi):
ggml's ``nearest_int``, float32 sums in C's loop order, and float16 rounding as the
kernels do it (NumPy's cast: round to nearest even)."""

from __future__ import annotations

import numpy as np

F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(v) -> np.ndarray:
    """ggml's nearest_int (round half to even via the 1.5*2**23 trick), int32, bit for bit
    the C result for every float32, including the garbage it gives past 2**22."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = (np.asarray(v, F32) + _MAGIC).view(np.int32)
    return (s & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum float32 terms over the last axis strictly in index order, from +0 (C's loop)."""
    acc = np.zeros(terms.shape[:-1], F32)
    for i in range(terms.shape[-1]):
        acc = acc + terms[..., i]
    return acc


def f16_bits(v) -> np.ndarray:
    """float32 -> the float16 bit patterns (uint16) ggml stores."""
    with np.errstate(over="ignore"):
        return np.asarray(v, F32).astype(np.float16).view(np.uint16)


def round_f16(v) -> np.ndarray:
    """float32 -> float16 -> float32: the value a stored fp16 scale decodes to."""
    with np.errstate(over="ignore"):
        return np.asarray(v, F32).astype(np.float16).astype(F32)
