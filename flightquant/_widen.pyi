"""Typed stub for the widening of model files' values (``ext/_widen.pyx``).

Called by :mod:`flightquant.modelfiles`, which validates dtypes and allocates the outputs.
Byte arguments are 1-D ``uint8`` arrays at any address. Sums of squares are defined
independently of the thread count (``modelfiles.tensors.signal_reference``).
"""

import numpy as np
import numpy.typing as npt

_Bytes = npt.NDArray[np.uint8]

KIND_F32: int
KIND_BF16: int
KIND_F16: int

def chunk_elements() -> int: ...
def default_threads() -> int: ...
def widen(
    src: _Bytes, kind: int, dst: _Bytes, n_threads: int = 0, signal: float = 0.0
) -> float: ...
def narrow_bf16(src: _Bytes, dst: _Bytes, n_threads: int = 0) -> None: ...
