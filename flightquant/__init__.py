"""flightquant: an Apache Arrow Flight data-plane server that quantizes float tensors.

In-process::

    import flightquant as fq
    q = fq.quantize(table, bits=4, group_size=128)
    x = fq.dequantize(q)

Over the network: :class:`flightquant.Server` and :class:`flightquant.Client`.
"""

from __future__ import annotations

from ._version import __version__
from .api import (
    QuantizedTensor,
    dequantize,
    dequantize_arrays,
    quantize,
    quantize_arrays,
)
from .codec import BatchInfo, CodecError
from .errors import NonFiniteError
from .kernels import build_info
from .options import OptionsError, QuantOptions

__all__ = [
    "BatchInfo",
    "Client",
    "CodecError",
    "NonFiniteError",
    "OptionsError",
    "QuantOptions",
    "QuantizedTensor",
    "Server",
    "__version__",
    "build_info",
    "dequantize",
    "dequantize_arrays",
    "quantize",
    "quantize_arrays",
]


def __getattr__(name: str):
    # the network layer loads pyarrow.flight only when asked for
    if name == "Server":
        from .server import Server

        return Server
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(f"module 'flightquant' has no attribute {name!r}")
