"""Typed stub for the compiled kernels (``ext/_kernels.pyx``).

Call these through :mod:`flightquant.kernels`, which validates the inputs: the kernels do
no bounds checking. Array arguments are 1-D, C-contiguous buffers of the stated dtype
(``const`` ones may be read-only).
"""

import numpy as np
import numpy.typing as npt

def openmp_enabled() -> bool: ...
def max_threads() -> int: ...
def stage_max() -> int: ...
def mse_isa(name: str | None = None) -> str:
    """The mse search's vector loops ("portable", "sse2", "avx2"); switch with ``name``
    (to one this CPU runs) and get the previous name back. Results never depend on it."""

def quantize_kernel(
    values: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    row_starts: npt.NDArray[np.int64],
    row_lens: npt.NDArray[np.int64],
    group_offsets: npt.NDArray[np.int64],
    code_offsets: npt.NDArray[np.int64],
    block_offsets: npt.NDArray[np.int64],
    groups_per_block: int,
    bits: int,
    scheme: int,
    method: int,
    group_size: int,
    qmin: int,
    qmax: int,
    offset: int,
    has_clip: bool,
    clip: float,
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.float32],
    group_sse: npt.NDArray[np.float64],
    group_max_err: npt.NDArray[np.float64],
    stats: bool,
    n_threads: int,
    stage_elems: int = 0,
    importance: npt.NDArray[np.float32] | None = None,
    imp_starts: npt.NDArray[np.int64] | None = None,
    imp_k: npt.NDArray[np.int64] | None = None,
    scale_dtype: int = 0,
) -> int:
    """Fill the outputs; return the number of blocks holding a non-finite value.

    ``stage_elems > 0``: ``values`` may be misaligned; each group is read through an
    aligned per-thread scratch of that many elements. ``importance`` (with per row
    ``imp_starts``, -1 for none, and ``imp_k``): the mse search of row r weighs element e
    by ``importance[imp_starts[r] + e % imp_k[r]]``. ``scale_dtype`` (0: none): scales
    stored in that dtype (``options.SCALE_DTYPE_CODES``)."""

def dequantize_kernel(
    codes: npt.NDArray[np.uint8],
    row_lens: npt.NDArray[np.int64],
    group_offsets: npt.NDArray[np.int64],
    code_offsets: npt.NDArray[np.int64],
    block_offsets: npt.NDArray[np.int64],
    out_starts: npt.NDArray[np.int64],
    groups_per_block: int,
    bits: int,
    group_size: int,
    scales: npt.NDArray[np.float32],
    zero_points: npt.NDArray[np.float32],
    offset: int,
    out: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    n_threads: int,
) -> None:
    """Write ``(q - zero_point) * scale`` (float32 arithmetic) of every row into ``out``."""
