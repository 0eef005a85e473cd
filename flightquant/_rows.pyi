"""Typed stub for the row bookkeeping (``ext/_rows.pyx``).

Called by :mod:`flightquant.kernels` and :mod:`flightquant.codec`, which allocate the
outputs. Byte arguments are 1-D ``uint8`` arrays (Arrow buffers viewed as bytes, at any
address); int64 arguments are 1-D, C-contiguous, aligned ``int64`` arrays. The functions
report the first bad row (or a negative status) instead of raising.
"""

import numpy as np
import numpy.typing as npt

_Bytes = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]

def row_extents(
    offsets: _Bytes,
    width: int,
    stride: int,
    base: int,
    validity: _Bytes,
    limit: int,
    starts: _I64,
    lens: _I64,
) -> int: ...
def masked_counts(counts: _Bytes, base: int, validity: _Bytes, vbase: int, out: _I64) -> int: ...
def pack_layout(
    lens: _I64,
    bits: int,
    group_size: int,
    fixed: int,
    groups_per_block: int,
    group_offsets: _I64,
    code_offsets: _I64,
    block_offsets: _I64,
) -> int: ...
def place_rows(starts: _I64, lens: _I64, size: int) -> int: ...
def check_quantized(
    lens: _I64,
    bits: int,
    group_size: int,
    fixed: bool,
    code_lens: _I64,
    scale_starts: _I64,
    scale_lens: _I64,
    zp_starts: _I64,
    zp_lens: _I64,
    max_len: int,
    groups_per_block: int,
    block_offsets: _I64,
) -> int: ...
def output_offsets(lens: _I64, width: int, offsets: _Bytes, starts: _I64) -> int: ...
