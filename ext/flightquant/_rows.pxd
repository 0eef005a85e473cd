# C-level row bookkeeping, shared with flightquant._engine (the codec engine).
# Pointers, no sizes: the caller guarantees every buffer is long enough for ``n`` rows
# (the def wrappers in _rows.pyx check the sizes of NumPy views first). A NULL validity
# bitmap means "no nulls". Offsets and counts are read with memcpy (any alignment).

from libc.stdint cimport int64_t, uint8_t

cdef int64_t extents(const uint8_t* offsets, int width, int64_t stride, int64_t base,
                     const uint8_t* validity, int64_t limit, int64_t n,
                     int64_t* starts, int64_t* lens) noexcept nogil
cdef void read_counts(const uint8_t* values, int64_t base, const uint8_t* validity,
                      int64_t vbase, int64_t n, int64_t* out) noexcept nogil
cdef int64_t layout(const int64_t* lens, int64_t n, int bits, int64_t group_size,
                    int64_t fixed, int64_t groups_per_block, int64_t* group_offsets,
                    int64_t* code_offsets, int64_t* block_offsets) noexcept nogil
cdef int64_t check(const int64_t* lens, int64_t n, int bits, int64_t group_size, bint fixed,
                   const int64_t* code_lens, const int64_t* scale_starts,
                   const int64_t* scale_lens, const int64_t* zp_starts,
                   const int64_t* zp_lens, int64_t max_len, int64_t groups_per_block,
                   int64_t* block_offsets) noexcept nogil
cdef int64_t concat(const int64_t* lens, int64_t n, int width, uint8_t* offsets,
                    int64_t* starts) noexcept nogil
