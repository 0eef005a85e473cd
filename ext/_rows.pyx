# Row bookkeeping for the codec and the kernels' wrapper: per-row extents read from Arrow
# offsets, the group/code/block offsets of a layout, and the consistency checks of a
# quantized batch. Each function is one pass over the rows (a few to a few thousand), so
# a batch costs one call here instead of dozens of small NumPy operations.
#
# Same contract as the kernels: the Python layer (flightquant/kernels.py, codec.py)
# validates shapes and allocates the outputs; these functions only compute into them and
# report the first bad row instead of raising. They keep the GIL: a loop over rows is
# shorter than releasing it. Arrow buffers may sit at any address, so
# offsets and counts are read from bytes with memcpy, never through a cast pointer.

from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memcpy


cdef inline int64_t read_int(const uint8_t* p, int width, int64_t i) noexcept nogil:
    """Element i of a little-endian int32 (width 4) or int64 (width 8) array at p."""
    cdef int32_t v32
    cdef int64_t v64
    if width == 4:
        memcpy(&v32, p + 4 * i, 4)
        return v32
    memcpy(&v64, p + 8 * i, 8)
    return v64


cdef inline bint is_valid(const uint8_t* bitmap, int64_t bit) noexcept nogil:
    return bitmap == NULL or (bitmap[bit >> 3] >> (bit & 7)) & 1


cdef inline const uint8_t* bytes_or_null(const uint8_t[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


# ---------------------------------------------------------------------------------------
# C level (declared in flightquant._rows.pxd): pointers, sizes checked by the caller

cdef int64_t extents(const uint8_t* offsets, int width, int64_t stride, int64_t base,
                     const uint8_t* validity, int64_t limit, int64_t n,
                     int64_t* starts, int64_t* lens) noexcept nogil:
    """:func:`row_extents` on pointers: fills n starts and lens, returns -1 or the first
    row outside ``[0, limit)``."""
    cdef int64_t r, s, e
    cdef int64_t bad = -1
    for r in range(n):
        if width == 0:
            s = (base + r) * stride
            e = s + stride
        else:
            s = read_int(offsets, width, base + r)
            e = read_int(offsets, width, base + r + 1)
        starts[r] = s
        if not is_valid(validity, base + r):
            lens[r] = 0
            continue
        lens[r] = e - s
        if bad < 0 and (s < 0 or e < s or e > limit):
            bad = r
    return bad


cdef void read_counts(const uint8_t* values, int64_t base, const uint8_t* validity,
                      int64_t vbase, int64_t n, int64_t* out) noexcept nogil:
    """:func:`masked_counts` on pointers."""
    cdef int64_t r
    for r in range(n):
        out[r] = read_int(values, 8, base + r) if is_valid(validity, vbase + r) else 0


cdef int64_t layout(const int64_t* lens, int64_t n, int bits, int64_t group_size,
                    int64_t fixed, int64_t groups_per_block, int64_t* group_offsets,
                    int64_t* code_offsets, int64_t* block_offsets) noexcept nogil:
    """:func:`pack_layout` on pointers."""
    cdef int64_t r, slot, go = 0, co = 0, bo = 0
    cdef int64_t gs = group_size, k = groups_per_block
    group_offsets[0] = 0
    code_offsets[0] = 0
    block_offsets[0] = 0
    for r in range(n):
        if lens[r] < 0 or (fixed >= 0 and lens[r] > fixed):
            return r
        slot = fixed if fixed >= 0 else lens[r]
        go += (slot + gs - 1) // gs
        co += (slot * bits + 7) // 8
        bo += ((lens[r] + gs - 1) // gs + k - 1) // k
        group_offsets[r + 1] = go
        code_offsets[r + 1] = co
        block_offsets[r + 1] = bo
    return -1


cdef int64_t check(const int64_t* lens, int64_t n, int bits, int64_t group_size, bint fixed,
                   const int64_t* code_lens, const int64_t* scale_starts,
                   const int64_t* scale_lens, const int64_t* zp_starts,
                   const int64_t* zp_lens, int64_t max_len, int64_t groups_per_block,
                   int64_t* block_offsets) noexcept nogil:
    """:func:`check_quantized` on pointers (``zp_lens`` NULL: no zero points)."""
    cdef int64_t r, need, bo = 0
    cdef int64_t k = groups_per_block
    cdef bint has_zp = zp_lens != NULL
    cdef bint moved = False
    block_offsets[0] = 0
    for r in range(n):
        if lens[r] < 0 or lens[r] > max_len:
            return r
        need = (lens[r] + group_size - 1) // group_size
        if fixed:
            if scale_lens[r] < need or (has_zp and zp_lens[r] < need):
                return r
        else:
            if lens[r] > 0 and code_lens[r] != (lens[r] * bits + 7) // 8:
                return r
            if scale_lens[r] != need or (has_zp and zp_lens[r] != need):
                return r
        if has_zp and need > 0 and zp_starts[r] != scale_starts[r]:
            moved = True
        bo += (need + k - 1) // k
        block_offsets[r + 1] = bo
    return -3 if moved else -1


cdef int64_t concat(const int64_t* lens, int64_t n, int width, uint8_t* offsets,
                    int64_t* starts) noexcept nogil:
    """:func:`output_offsets` on pointers."""
    cdef int64_t r, end = 0
    cdef int32_t v32
    for r in range(n + 1):
        if width == 4:
            if end > 2147483647:
                return -1
            v32 = <int32_t>end
            memcpy(offsets + 4 * r, &v32, 4)
        else:
            memcpy(offsets + 8 * r, &end, 8)
        if r < n:
            starts[r] = end
            end += lens[r]
    return end


# ---------------------------------------------------------------------------------------
# Python level: NumPy arrays, sizes checked here


def row_extents(const uint8_t[::1] offsets, int width, int64_t stride, int64_t base,
                const uint8_t[::1] validity, int64_t limit, int64_t[::1] starts,
                int64_t[::1] lens):
    """Per-row start and length of a list or binary array, 0 for a null row.

    Variable rows (``width`` 4 or 8): ``offsets`` holds the array's offsets as bytes and
    row r spans ``[off[base + r], off[base + r + 1])``. Fixed rows (``width`` 0): row r
    spans ``stride`` items from ``(base + r) * stride``. ``validity`` is the array's
    bitmap (bit ``base + r`` for row r) or empty when there are no nulls. ``starts`` may
    have one entry more than ``lens``; it then ends with ``limit``.

    Returns -1 when every non-null row lies inside ``[0, limit)``, -2 when ``offsets`` or
    ``validity`` is too short for the rows, else the first row that lies outside.
    """
    cdef int64_t n = lens.shape[0]
    cdef int64_t bad
    if starts.shape[0] < n or starts.shape[0] > n + 1:
        return -2
    if width != 0 and width != 4 and width != 8:
        return -2
    if width != 0 and offsets.shape[0] < (base + n + 1) * width:
        return -2
    if validity.shape[0] != 0 and validity.shape[0] * 8 < base + n:
        return -2
    if n == 0:
        bad = -1
    else:
        bad = extents(bytes_or_null(offsets), width, stride, base, bytes_or_null(validity),
                      limit, n, &starts[0], &lens[0])
    if starts.shape[0] == n + 1:
        starts[n] = limit
    return bad


def masked_counts(const uint8_t[::1] counts, int64_t base, const uint8_t[::1] validity,
                  int64_t vbase, int64_t[::1] out):
    """``out[r]`` = int64 ``counts[base + r]`` (bytes), or 0 where bit ``vbase + r`` of
    ``validity`` (empty: no nulls) is clear. Returns -1, or -2 when a buffer is too short."""
    cdef int64_t n = out.shape[0]
    if counts.shape[0] < (base + n) * 8 or (
            validity.shape[0] != 0 and validity.shape[0] * 8 < vbase + n):
        return -2
    if n > 0:
        read_counts(&counts[0], base, bytes_or_null(validity), vbase, n, &out[0])
    return -1


def pack_layout(const int64_t[::1] lens, int bits, int64_t group_size, int64_t fixed,
                int64_t groups_per_block, int64_t[::1] group_offsets,
                int64_t[::1] code_offsets, int64_t[::1] block_offsets):
    """Fill the n+1 group, code-byte and block offsets of rows packed one after another
    (:func:`flightquant.layout.make_layout`, which is the definition). ``fixed >= 0``
    gives every row the slot of a row of that length. Returns -1, or the first row whose
    length is negative (or longer than ``fixed``)."""
    cdef int64_t n = lens.shape[0]
    if (group_offsets.shape[0] < n + 1 or code_offsets.shape[0] < n + 1
            or block_offsets.shape[0] < n + 1):
        return 0
    return layout(&lens[0] if n > 0 else NULL, n, bits, group_size, fixed, groups_per_block,
                  &group_offsets[0], &code_offsets[0], &block_offsets[0])


def place_rows(const int64_t[::1] starts, const int64_t[::1] lens, int64_t size):
    """Where rows of ``lens`` elements at ``starts`` fall in an output of ``size``.

    Returns -2 when they tile it exactly, in order (nothing is left to zero-fill), -1 when
    every non-empty row lies inside it, else the first row that does not."""
    cdef int64_t n = lens.shape[0]
    cdef int64_t r, end = 0
    cdef bint tiled = True
    if starts.shape[0] < n:
        return 0
    for r in range(n):
        if tiled and starts[r] != end:
            tiled = False
        end += lens[r]
        if lens[r] > 0 and (starts[r] < 0 or starts[r] > size - lens[r]):
            return r
    return -2 if tiled and end == size else -1


def check_quantized(const int64_t[::1] lens, int bits, int64_t group_size, bint fixed,
                    const int64_t[::1] code_lens, const int64_t[::1] scale_starts,
                    const int64_t[::1] scale_lens, const int64_t[::1] zp_starts,
                    const int64_t[::1] zp_lens, int64_t max_len, int64_t groups_per_block,
                    int64_t[::1] block_offsets):
    """Check that a quantized column's rows agree with each other, and fill the n+1
    ``block_offsets`` of their groups (``groups_per_block`` groups per block).

    Per row: ``0 <= lens[r] <= max_len``; unless ``fixed``, a non-empty row has exactly
    ceil(lens*bits/8) code bytes, and exactly ceil(lens/group_size) scales (``fixed``: at
    least that many); so many zero points too when ``zp_lens`` is not empty.

    Returns the first row that disagrees; else -3 when some row's zero points start
    elsewhere than its scales (the caller moves them), else -1.
    """
    cdef int64_t n = lens.shape[0]
    cdef bint has_zp = zp_lens.shape[0] > 0
    if (code_lens.shape[0] < n or scale_starts.shape[0] < n or scale_lens.shape[0] < n
            or block_offsets.shape[0] < n + 1 or groups_per_block < 1
            or (has_zp and (zp_lens.shape[0] < n or zp_starts.shape[0] < n))):
        return 0
    if n == 0:
        block_offsets[0] = 0
        return -1
    return check(&lens[0], n, bits, group_size, fixed, &code_lens[0], &scale_starts[0],
                 &scale_lens[0], &zp_starts[0] if has_zp else NULL,
                 &zp_lens[0] if has_zp else NULL, max_len, groups_per_block,
                 &block_offsets[0])


def output_offsets(const int64_t[::1] lens, int width, uint8_t[::1] offsets,
                   int64_t[::1] starts):
    """Offsets (bytes of int32 for ``width`` 4, int64 for 8) and int64 starts of rows of
    ``lens`` concatenated. Returns the total, or -1 when int32 offsets would overflow."""
    cdef int64_t n = lens.shape[0]
    if (width != 4 and width != 8) or offsets.shape[0] < (n + 1) * width or starts.shape[0] < n:
        return -1
    return concat(&lens[0] if n > 0 else NULL, n, width, &offsets[0],
                  &starts[0] if n > 0 else NULL)
