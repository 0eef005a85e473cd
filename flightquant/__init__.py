"""flightquant: an Apache Arrow Flight data-plane server that quantizes float tensors.

In-process::

    import flightquant as fq
    q = fq.quantize(table, bits=4, group_size=128)
    q = fq.quantize(table, format="Q4_K", method="mse")   # llama.cpp's blocks
    x = fq.dequantize(q)

Over the network: :class:`flightquant.Server` and :class:`flightquant.Client`.

Names are loaded on first use, so ``import flightquant.client`` (say) loads only what the
client needs, not the kernels.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "BatchInfo": "codec",
    "CodecError": "codec",
    "Client": "client",
    "NonFiniteError": "errors",
    "OptionsError": "options",
    "QuantOptions": "options",
    "QuantizedTensor": "arrays",
    "Server": "server",
    "build_info": "kernels",
    "dequantize": "api",
    "dequantize_arrays": "api",
    "quantize": "api",
    "quantize_arrays": "api",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flightquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return __all__
