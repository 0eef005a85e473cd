"""NumPy reference of llama.cpp's ggml block formats: the definition the kernels
(``ext/_ggml.pyx``) are held to, bit for bit, for every thread count.

One module per family (``ggml_legacy``: Q4_0...Q8_0 and TQ1_0/TQ2_0, ``ggml_k456``:
Q4_K/Q5_K/Q6_K, ``ggml_k23``: Q2_K/Q3_K, ``ggml_iq4``: IQ4_NL/IQ4_XS), each with ``quantize_blocks(x, name, method,
qw=None, sigma2=None)`` (float32 ``(n_blocks, block_size)`` -> uint8 ``(n_blocks,
type_size)``; ``qw``: each block's importance weights, same shape as ``x``; ``sigma2``: each
block's ggml-row mean square, for the types whose importance path uses it) and
``dequantize_blocks(data, name)``; this module picks the family of a type, and
:func:`quantize_row` lays a tensor and its importance vector out as those blocks.
"""

from __future__ import annotations

import importlib

import numpy as np

from .. import formats
from .ggml_common import seq_sum

_FAMILY_MODULES = {"legacy": "ggml_legacy", "ternary": "ggml_legacy", "iq": "ggml_iq4"}
_K23 = {"Q2_K", "Q3_K"}


def _module(name: str):
    t = formats.get(name)
    mod = _FAMILY_MODULES.get(t.family) or ("ggml_k23" if t.name in _K23 else "ggml_k456")
    return importlib.import_module(f"{__package__}.{mod}")


def quantize_blocks(x: np.ndarray, name: str, method: str = "rtn") -> np.ndarray:
    """ggml's bytes for whole blocks ``x`` (float32, shape ``(n_blocks, block_size)``)."""
    t = formats.get(name)
    x = np.ascontiguousarray(x, np.float32).reshape(-1, t.block_size)
    return _module(name).quantize_blocks(x, name, method)


def quantize_row(
    x: np.ndarray, name: str, method: str = "rtn", importance: np.ndarray | None = None
) -> np.ndarray:
    """ggml's bytes (uint8, 1-D) for the float32 values ``x`` (whole blocks), quantized as
    ggml rows of ``k = importance.size`` elements, element ``j`` of each weighted by
    ``importance[j]`` (without importance: block by block, as :func:`quantize_blocks`).

    Each row's mean square ``sigma2`` is its sum of squares added in order in float32,
    divided by ``k`` (ggml's ``quantize_row_*_impl`` of the legacy types).
    """
    t = formats.get(name)
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    if importance is None:
        return quantize_blocks(x, name, method).reshape(-1)
    w = np.ascontiguousarray(importance, np.float32).reshape(-1)
    k = w.size
    if k == 0 or k % t.block_size or x.size % k:
        raise ValueError(f"importance of {k} weights does not fit {x.size} values of {name}")
    rows = x.reshape(-1, k)
    sigma2 = seq_sum(rows * rows) / np.float32(k)
    per_row = k // t.block_size
    qw = np.tile(w, rows.shape[0]).reshape(-1, t.block_size)
    sig = np.repeat(sigma2.astype(np.float32), per_row)
    blocks = x.reshape(-1, t.block_size)
    out = _module(name).quantize_blocks(blocks, name, method, qw=qw, sigma2=sig)
    return np.ascontiguousarray(out, np.uint8).reshape(-1)


def dequantize_blocks(data: np.ndarray, name: str) -> np.ndarray:
    """float32 ``(n_blocks, block_size)`` of ggml blocks ``data`` (uint8)."""
    t = formats.get(name)
    data = np.ascontiguousarray(data, np.uint8).reshape(-1, t.type_size)
    return _module(name).dequantize_blocks(data, name)
