# Which row holds a global block: included by _kernels.pyx and _ggml.pyx, whose kernels
# spread the blocks of all rows over threads. ``bo`` (block offsets) is nondecreasing,
# bo[0] = 0 <= blk < bo[nrows]; rows without blocks are skipped.

cdef inline int64_t row_of(const int64_t* bo, int64_t nrows, int64_t blk) noexcept nogil:
    """The row r with bo[r] <= blk < bo[r+1] (a binary search)."""
    cdef int64_t lo = 0, hi = nrows, mid
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if bo[mid] <= blk:
            lo = mid
        else:
            hi = mid
    return lo
