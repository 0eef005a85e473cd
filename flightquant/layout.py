"""Row layout shared by the NumPy reference and the kernels' wrapper.

A batch of tensors is a flat value buffer plus, per row, a start and a length (null rows
have length 0). Groups of ``group_size`` run along each row; the last may be shorter.
Codes of a row start on a byte. For the kernels, consecutive groups of a row are bundled
into *blocks* whose bits fill whole bytes, so threads never write to the same byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: smallest positive float32 (subnormal); the floor of a non-degenerate scale
FLOAT32_TRUE_MIN = np.float32(np.finfo(np.float32).smallest_subnormal)


@dataclass(frozen=True)
class RowLayout:
    """Where each row's groups and codes live in the output buffers.

    The kernels read only the *start* of row r in ``group_offsets`` and ``code_offsets``
    (its extent follows from ``row_lens``); the last entry is the buffer's size.
    """

    row_lens: np.ndarray  # int64[n]: elements of row r (0 for a null row)
    group_offsets: np.ndarray  # int64[n+1]: row r's groups start at go[r]
    code_offsets: np.ndarray  # int64[n+1]: row r's code bytes start at co[r]
    block_offsets: np.ndarray  # int64[n+1]: row r's work blocks are [bo[r], bo[r+1])
    groups_per_block: int
    bits: int
    group_size: int

    @property
    def n_groups(self) -> int:
        return int(self.group_offsets[-1])

    @property
    def n_code_bytes(self) -> int:
        return int(self.code_offsets[-1])

    @property
    def n_blocks(self) -> int:
        return int(self.block_offsets[-1])

    @property
    def n_elements(self) -> int:
        return int(self.row_lens.sum())

    def row_of_group(self) -> np.ndarray:
        """Row index of every group slot (slots of null fixed-size rows included)."""
        counts = np.diff(self.group_offsets)
        return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def groups_per_block(group_size: int, bits: int) -> int:
    """Groups per kernel block: the fewest whose codes end on a byte boundary, so
    blocks can be packed in parallel."""
    return 8 // math.gcd((group_size * bits) % 8 or 8, 8)


def make_layout(
    row_lens: np.ndarray, bits: int, group_size: int, fixed_row_len: int | None = None
) -> RowLayout:
    """Compute group, code-byte and block offsets for rows of the given lengths.

    Rows are packed one after the other. With ``fixed_row_len`` every row gets the slot of
    a row of that length (the fixed-size-list layout), whatever its own length (0 for a
    null row), so the outputs keep a fixed stride.
    """
    lens = np.ascontiguousarray(row_lens, dtype=np.int64)
    if lens.ndim != 1 or (lens.size and lens.min() < 0):
        raise ValueError("row lengths must be a 1-D array of non-negative integers")
    n = lens.size
    slot = lens if fixed_row_len is None else np.full(n, fixed_row_len, np.int64)
    ngroups = _ceil_div(slot, group_size)
    nbytes = _ceil_div(slot * bits, 8)
    k = groups_per_block(group_size, bits)
    nblocks = _ceil_div(_ceil_div(lens, group_size), k)  # blocks cover the row's own groups
    go = np.zeros(n + 1, np.int64)
    co = np.zeros(n + 1, np.int64)
    bo = np.zeros(n + 1, np.int64)
    np.cumsum(ngroups, out=go[1:])
    np.cumsum(nbytes, out=co[1:])
    np.cumsum(nblocks, out=bo[1:])
    return RowLayout(lens, go, co, bo, k, bits, group_size)


def _ceil_div(a, b):
    return -(-a // b)


@dataclass
class QuantizedRows:
    """Output of quantizing a set of rows: packed codes, per-group scales, statistics."""

    layout: RowLayout
    codes: np.ndarray  # uint8[layout.n_code_bytes]
    scales: np.ndarray  # float32[layout.n_groups]
    zero_points: np.ndarray | None  # float32[layout.n_groups], asymmetric only
    group_sse: np.ndarray | None = None  # float64[n_groups]: sum of squared error
    group_max_err: np.ndarray | None = None  # float64[n_groups]: max |x - x_hat|

    def row_sse(self) -> np.ndarray:
        """Per-row sum of squared error (groups summed in order)."""
        assert self.group_sse is not None
        n = self.layout.row_lens.size
        return np.bincount(self.layout.row_of_group(), self.group_sse, minlength=n)

    def row_max_abs_error(self) -> np.ndarray:
        assert self.group_max_err is not None
        out = np.zeros(self.layout.row_lens.size, np.float64)
        np.maximum.at(out, self.layout.row_of_group(), self.group_max_err)
        return out
