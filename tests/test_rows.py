"""The row bookkeeping in ``flightquant._rows`` against its NumPy definitions."""

from __future__ import annotations

import numpy as np
import pytest

from flightquant import _rows
from flightquant.kernels import row_layout
from flightquant.layout import make_layout


def _misaligned(a: np.ndarray) -> np.ndarray:
    """The bytes of ``a`` at an odd address (as Flight delivers buffers)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    raw[1:] = a.view(np.uint8)
    return raw[1:]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [1, 3, 7, 32, 128])
@pytest.mark.parametrize("fixed", [None, 0, 300])
def test_row_layout_equals_make_layout(bits, group_size, fixed):
    rng = np.random.default_rng(bits * 1000 + group_size)
    for n in (0, 1, 5, 64):
        lens = rng.integers(0, 301 if fixed is None else fixed + 1, n)
        want = make_layout(lens, bits, group_size, fixed)
        got = row_layout(lens, bits, group_size, fixed)
        assert got.groups_per_block == want.groups_per_block
        for name in ("row_lens", "group_offsets", "code_offsets", "block_offsets"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_row_layout_rejects_bad_lengths():
    with pytest.raises(ValueError, match="non-negative"):
        row_layout(np.array([3, -1]), 4, 32)
    with pytest.raises(ValueError, match="non-negative"):
        row_layout(np.array([1.5]), 4, 32)
    with pytest.raises(ValueError, match="longer than fixed_row_len=4"):
        row_layout(np.array([3, 5]), 4, 32, 4)


@pytest.mark.parametrize("width", [4, 8])
def test_row_extents_reads_misaligned_offsets_with_nulls(width):
    offsets = np.array([0, 2, 2, 7, 9, 15], np.int32 if width == 4 else np.int64)
    valid = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1], bool)  # bit base + r is row r
    bitmap = np.packbits(valid, bitorder="little")
    base = 1  # a sliced array: rows are offsets[1:] with validity bits from 1
    n = 4
    starts, lens = np.empty(n + 1, np.int64), np.empty(n, np.int64)
    status = _rows.row_extents(_misaligned(offsets), width, 0, base, bitmap, 15, starts, lens)
    assert status == -1
    np.testing.assert_array_equal(starts, [2, 2, 7, 9, 15])
    np.testing.assert_array_equal(lens, [0, 0, 2, 6])  # row 0 (bit 1): valid, empty; row 1: null


def test_row_extents_fixed_rows_and_limits():
    starts, lens = np.empty(3, np.int64), np.empty(3, np.int64)
    no = np.zeros(0, np.uint8)
    assert _rows.row_extents(no, 0, 4, 2, no, 20, starts, lens) == -1
    np.testing.assert_array_equal(starts, [8, 12, 16])
    np.testing.assert_array_equal(lens, [4, 4, 4])
    assert _rows.row_extents(no, 0, 4, 2, no, 19, starts, lens) == 2  # row 2 ends at 20
    offsets = np.array([0, 3, 1], np.int32).view(np.uint8)  # decreasing
    s2, l2 = np.empty(2, np.int64), np.empty(2, np.int64)
    assert _rows.row_extents(offsets, 4, 0, 0, no, 10, s2, l2) == 1
    assert _rows.row_extents(offsets[:8], 4, 0, 0, no, 10, s2, l2) == -2  # too short
    assert _rows.row_extents(offsets, 4, 0, 0, no, 10, s2[:1], l2) == -2  # starts too short


def test_masked_counts_and_output_offsets():
    counts = np.array([5, 7, 9], np.int64)
    out = np.empty(2, np.int64)
    bitmap = np.packbits([1, 0, 1, 1], bitorder="little")
    assert _rows.masked_counts(_misaligned(counts), 1, bitmap, 1, out) == -1
    np.testing.assert_array_equal(out, [0, 9])  # row 0 is bit 1: null
    assert _rows.masked_counts(_misaligned(counts)[:16], 1, bitmap, 1, out) == -2
    lens = np.array([3, 0, 4], np.int64)
    for width, dtype in ((4, np.int32), (8, np.int64)):
        offsets, starts = np.empty(4, dtype), np.empty(3, np.int64)
        assert _rows.output_offsets(lens, width, offsets.view(np.uint8), starts) == 7
        np.testing.assert_array_equal(offsets, [0, 3, 3, 7])
        np.testing.assert_array_equal(starts, [0, 3, 3])
    big = np.array([2**31 - 1, 1], np.int64)
    offsets = np.empty(3, np.int32)
    assert _rows.output_offsets(big, 4, offsets.view(np.uint8), np.empty(2, np.int64)) == -1


def test_place_rows():
    lens = np.array([2, 0, 3], np.int64)
    assert _rows.place_rows(np.array([0, 2, 2], np.int64), lens, 5) == -2  # tiled
    assert _rows.place_rows(np.array([0, 9, 2], np.int64), lens, 5) == -1  # empty row anywhere
    assert _rows.place_rows(np.array([0, 2, 2], np.int64), lens, 6) == -1  # a gap at the end
    assert _rows.place_rows(np.array([0, 2, 3], np.int64), lens, 5) == 2


def test_check_quantized():
    lens = np.array([5, 0, 3], np.int64)
    code_lens = np.array([3, 0, 2], np.int64)  # 4 bits
    s_starts = np.array([0, 3, 3], np.int64)
    s_lens = np.array([3, 0, 2], np.int64)  # group size 2
    bo = np.empty(4, np.int64)
    no = np.zeros(0, np.int64)
    args = (lens, 4, 2, False, code_lens, s_starts, s_lens)
    assert _rows.check_quantized(*args, s_starts, s_lens, 2**40, 2, bo) == -1
    np.testing.assert_array_equal(bo, [0, 2, 2, 3])
    assert _rows.check_quantized(*args, no, no, 2**40, 2, bo) == -1  # no zero points
    assert _rows.check_quantized(*args, s_starts + 1, s_lens, 2**40, 2, bo) == -3  # moved
    assert _rows.check_quantized(*args, s_starts, s_lens - 1, 2**40, 2, bo) == 0
    assert _rows.check_quantized(*args, s_starts, s_lens, 4, 2, bo) == 0  # 5 > max_len
    bad_codes = np.array([3, 0, 1], np.int64)
    assert (
        _rows.check_quantized(lens, 4, 2, False, bad_codes, s_starts, s_lens, no, no, 2**40, 2, bo)
        == 2
    )
    # fixed-size rows may have more scales than they need, not fewer
    assert (
        _rows.check_quantized(
            lens, 4, 2, True, bad_codes, s_starts, s_lens + 1, no, no, 2**40, 2, bo
        )
        == -1
    )
