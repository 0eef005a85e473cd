"""NumPy reference of llama.cpp's ggml block formats: the definition the kernels
(``ext/_ggml.pyx``) are held to, bit for bit, for every thread count.

One module per family (``ggml_legacy``: Q4_0...Q8_0 and TQ1_0/TQ2_0, ``ggml_k456``:
Q4_K/Q5_K/Q6_K, ``ggml_k23``: Q2_K/Q3_K), each with ``quantize_blocks(x, name, method)``
(float32 ``(n_blocks, block_size)`` -> uint8 ``(n_blocks, type_size)``) and
``dequantize_blocks(data, name)``; this module picks the family of a type.
"""

from __future__ import annotations

import importlib

import numpy as np

from .. import formats

_FAMILY_MODULES = {"legacy": "ggml_legacy", "ternary": "ggml_legacy"}
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


def dequantize_blocks(data: np.ndarray, name: str) -> np.ndarray:
    """float32 ``(n_blocks, block_size)`` of ggml blocks ``data`` (uint8)."""
    t = formats.get(name)
    data = np.ascontiguousarray(data, np.uint8).reshape(-1, t.type_size)
    return _module(name).dequantize_blocks(data, name)
