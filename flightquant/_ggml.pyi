"""Typed stub for the ggml block kernels (``ext/_ggml.pyx``).

Call these through :mod:`flightquant.kernels`, which validates the arguments: type codes,
block and type sizes come from :mod:`flightquant.formats`, and a buffer holds whole blocks
(one row). Byte arguments are 1-D, C-contiguous ``uint8`` arrays (``const`` ones may be
read-only).
"""

import numpy as np
import numpy.typing as npt

def quantize_blocks(
    values: npt.NDArray[np.uint8],
    itemsize: int,
    code: int,
    block_size: int,
    type_size: int,
    method: int,
    threads: int,
    stats: bool = False,
    importance: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.uint8], int, npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    """``(block bytes, blocks holding a non-finite value, per-block sse, per-block max
    abs error)``; the last two are empty without ``stats``."""

def dequantize_blocks(
    data: npt.NDArray[np.uint8],
    code: int,
    block_size: int,
    type_size: int,
    itemsize: int,
    threads: int,
) -> npt.NDArray[np.uint8]:
    """The decoded values, ``itemsize`` bytes each, as bytes."""

def fp32_to_fp16_bits(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Tests: the kernels' float32 -> float16 rounding, as uint16 bit patterns."""

def _k456_lane_width(w: int = 0) -> int:
    """Tests: the lane width of the Q4_K/Q5_K/Q6_K kernels; ``w`` = 4 or 8 sets it first."""
