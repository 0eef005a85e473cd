# The codec's one-call path: a whole RecordBatch quantized or dequantized in one call.
#
# Why: on a 4 MiB batch the dequantize kernel runs in about 0.15 ms, and the codec's
# Python path (pyarrow wrappers per column, NumPy views, the kernel wrapper's checks, a
# dozen small calls, each on caches the kernel has just evicted) cost a third of that
# again. Here one call per batch reads the input through one export of the Arrow C data
# interface, runs the row bookkeeping (flightquant._rows) and the kernels
# (flightquant._kernels) on the exported pointers, and builds the output through the same
# interface, with buffers it allocates and the output owns.
#
# It is only a faster road to the same result: flightquant/codec.py decides everything
# that depends on the schema once per stream (the plans below), and whenever a batch is
# anything but valid and plain (a row outside its buffers, a NaN, a null inside a tensor,
# zero points stored apart from their scales...) ``run`` returns None and codec.py does
# the batch on its general path, which raises the error with its full context. Both
# paths give equal batches with equal schemas (tests/test_fastpath.py).
#
# Safety: the C data interface carries no buffer sizes. The caller validates the batch
# first (RecordBatch.validate(): every buffer long enough for its array's length and
# offset, first/last offsets inside the data), and every row read here is checked
# against its array's limits before a kernel touches it. Flight buffers may sit at any
# address: offsets and counts are read with memcpy, and float values at an address that
# is not a multiple of their size go through the kernel's aligned per-thread stage.

import pyarrow as pa

from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from flightquant._arrow cimport (ArrowArray, init_node, new_child, release_node, release_owned,
                                 take_column)
from flightquant._kernels cimport (Params, dequantize_f32, dequantize_f64, quantize_f32,
                                   quantize_f64, set_params)
from flightquant._rows cimport check, concat, extents, layout, read_counts

cdef enum:
    PASS = -1           # a column taken over as it is
    LIST = 0
    LARGE_LIST = 1
    FIXED_SIZE_LIST = 2
    DECLINE = 1         # status: the batch needs codec.py's general path

cdef int64_t INT32_MAX = 2147483647
cdef int64_t STAGE_MAX = 1 << 20    # kernels.STAGE_MAX
cdef int64_t MAX_NUMEL = 1LL << 40  # codec._MAX_NUMEL


cdef struct QColumn:
    int kind            # PASS, LIST, LARGE_LIST or FIXED_SIZE_LIST
    int itemsize        # of the float values: 4 or 8
    int64_t list_size   # FIXED_SIZE_LIST


cdef struct DColumn:
    int64_t index       # of the codes (or passed-through) column in the input batch
    int kind
    int itemsize        # of the restored values: 4 or 8
    int64_t list_size
    int64_t scales      # input column indexes; -1: none
    int64_t zero_points
    int64_t numel
    int bits
    int64_t group_size
    int64_t groups_per_block
    float offset        # the scheme's stored offset (zero point without a column)


cdef inline double now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef inline bint has_nulls(const ArrowArray* a) noexcept nogil:
    return a.null_count != 0 and a.n_buffers > 0 and a.buffers[0] != NULL


cdef inline const uint8_t* validity(const ArrowArray* a) noexcept nogil:
    return <const uint8_t*>a.buffers[0] if has_nulls(a) else NULL


cdef inline bint is_valid(const ArrowArray* a, int64_t r) noexcept nogil:
    """Row ``r`` of ``a`` is not null."""
    cdef const uint8_t* bits = validity(a)
    return bits == NULL or (bits[(a.offset + r) >> 3] >> ((a.offset + r) & 7)) & 1


cdef inline const uint8_t* data_at(const ArrowArray* a, int64_t itemsize) noexcept nogil:
    """The values buffer of a primitive array, at the array's own offset."""
    return <const uint8_t*>a.buffers[1] + a.offset * itemsize


cdef bint null_inside(const ArrowArray* vals, const int64_t* starts, const int64_t* lens,
                      int64_t n) noexcept nogil:
    """A null value inside a row (fixed-size lists hold nulls under their null rows,
    which is fine; a null inside a tensor is not)."""
    cdef const uint8_t* bits = validity(vals)
    cdef int64_t r, i, e
    if bits == NULL:
        return False
    for r in range(n):
        i = vals.offset + starts[r]
        e = i + lens[r]
        while i < e:
            if i % 8 == 0 and e - i >= 8 and bits[i >> 3] == 0xFF:
                i += 8      # a whole byte of valid values
                continue
            if not (bits[i >> 3] >> (i & 7)) & 1:
                return True
            i += 1
    return False


cdef void* alloc(int64_t nbytes, bint zeroed) noexcept nogil:
    """Output memory (freed by release_owned); never NULL for a request of 0 bytes."""
    if nbytes < 1:
        nbytes = 1
    return PyMem_RawCalloc(<size_t>nbytes, 1) if zeroed else PyMem_RawMalloc(<size_t>nbytes)


cdef float* aligned_copy(const float* src, int64_t n) except NULL:
    cdef float* dst = <float*>alloc(n * 4, False)
    if dst == NULL:
        raise MemoryError()
    memcpy(dst, src, n * 4)
    return dst


cdef int copy_bitmap(ArrowArray* out, const ArrowArray* a) except -1:
    """``out``'s buffer 0: ``a``'s validity bits, moved to start at bit 0 (or none)."""
    cdef const uint8_t* src = validity(a)
    cdef uint8_t* dst
    cdef int64_t n = a.length, off = a.offset, i, nbytes = (a.length + 7) // 8
    if src == NULL:
        return 0
    dst = <uint8_t*>alloc(nbytes, True)
    if dst == NULL:
        raise MemoryError()
    out.buffers[0] = dst
    if off % 8 == 0:
        memcpy(dst, src + off // 8, nbytes)
    else:
        for i in range(n):
            if (src[(off + i) >> 3] >> ((off + i) & 7)) & 1:
                dst[i >> 3] |= <uint8_t>(1 << (i & 7))
    return 0


cdef int offsets_buffer(ArrowArray* out, Py_ssize_t slot, const int64_t* offsets, int64_t n,
                        bint large) except -1:
    """``out``'s buffer ``slot``: n+1 offsets as int64 (``large``) or int32."""
    cdef int64_t i
    cdef int32_t* o32
    cdef void* buf = alloc((n + 1) * (8 if large else 4), False)
    if buf == NULL:
        raise MemoryError()
    out.buffers[slot] = buf
    if large:
        memcpy(buf, offsets, (n + 1) * 8)
    else:
        o32 = <int32_t*>buf
        for i in range(n + 1):
            o32[i] = <int32_t>offsets[i]
    return 0


cdef ArrowArray* owned_child(ArrowArray* parent, int64_t length, int64_t null_count,
                             Py_ssize_t n_buffers, Py_ssize_t n_children) except NULL:
    cdef ArrowArray* a = new_child(parent)
    init_node(a, length, null_count, n_buffers, n_children)
    a.release = release_owned
    return a


cdef int values_column(ArrowArray* parent, const ArrowArray* rows, int kind, bint large,
                       const int64_t* offsets, void** values, int64_t n_values,
                       int itemsize) except -1:
    """A list column over ``values`` (taken over: ``values[0]`` becomes NULL), with the
    rows, nulls and validity of ``rows`` and the n+1 ``offsets`` (not FIXED_SIZE_LIST)."""
    cdef int64_t n = rows.length
    cdef ArrowArray* col
    cdef ArrowArray* child
    col = owned_child(parent, n, rows.null_count if has_nulls(rows) else 0,
                      1 if kind == FIXED_SIZE_LIST else 2, 1)
    copy_bitmap(col, rows)
    if kind != FIXED_SIZE_LIST:
        offsets_buffer(col, 1, offsets, n, large)
    child = owned_child(col, n_values, 0, 2, 0)
    child.buffers[1] = values[0]
    values[0] = NULL
    return 0


cdef class _Plan:
    """What every batch of one input schema shares (built once per stream by codec.py):
    the output schema and, per output position, a column taken over from the input or
    one the subclass builds."""

    cdef object schema  # of the output batches
    cdef Py_ssize_t n_out
    cdef Py_ssize_t n_cols  # plan entries, walked in output order

    cdef int64_t passed(self, Py_ssize_t i) noexcept:
        """The input column entry ``i`` takes over as it is, or -1: build it."""
        return -1

    cdef int column(self, ArrowArray* src, Py_ssize_t i, ArrowArray* root, int n_threads,
                    int64_t* elements, double* seconds, list trace) except -1:
        """Build entry ``i``'s column(s) as root's next children; DECLINE or 0."""
        raise NotImplementedError

    def run(self, batch, int n_threads, list trace=None):
        """``(output batch, elements, kernel seconds)``, or None when ``batch`` needs the
        general path. ``batch`` has the plan's input schema and was validated.
        ``trace`` (tests) gets the address each quantize kernel call read its values from."""
        cdef ArrowArray src
        cdef ArrowArray root
        cdef Py_ssize_t i
        cdef int64_t j, elements = 0
        cdef double seconds = 0.0
        cdef int status = 0
        src.release = NULL
        root.release = NULL
        batch._export_to_c(<uintptr_t>&src)
        try:
            init_node(&root, src.length, 0, 1, self.n_out)
            for i in range(self.n_cols):
                j = self.passed(i)
                if j >= 0:
                    take_column(new_child(&root), &src, j, src.length)
                else:
                    status = self.column(&src, i, &root, n_threads, &elements, &seconds, trace)
                    if status == DECLINE:
                        break
        except BaseException:
            release_node(&root)
            raise
        finally:
            if src.release != NULL:  # the columns not moved out
                src.release(&src)
        if status == DECLINE:
            release_node(&root)
            return None
        return pa.RecordBatch._import_from_c(<uintptr_t>&root, self.schema), elements, seconds


# ---------------------------------------------------------------------------------------
# quantize


cdef class QuantizePlan(_Plan):
    """One entry per input column: passed through or quantized."""

    cdef QColumn* cols
    cdef Params p
    cdef bint asymmetric

    def __cinit__(self, schema, list columns, int bits, int scheme, int method,
                  int64_t group_size, int64_t groups_per_block, int qmin, int qmax,
                  int offset, bint has_clip, float clip, bint asymmetric):
        """``columns``: per input column ``None`` (passed through) or ``(kind, itemsize,
        list_size)`` of a float list column to quantize (stats off)."""
        cdef Py_ssize_t i
        self.schema = schema
        self.n_cols = len(columns)
        self.cols = <QColumn*>PyMem_RawCalloc(max(1, self.n_cols), sizeof(QColumn))
        if self.cols == NULL:
            raise MemoryError()
        self.n_out = 0
        for i in range(self.n_cols):
            if columns[i] is None:
                self.cols[i].kind = PASS
                self.n_out += 1
            else:
                kind, itemsize, list_size = columns[i]
                self.cols[i].kind = kind
                self.cols[i].itemsize = itemsize
                self.cols[i].list_size = list_size
                # codes, scales, zero points, numel
                self.n_out += 2 + asymmetric + (kind != FIXED_SIZE_LIST)
        set_params(&self.p, bits, scheme, method, group_size, groups_per_block, qmin, qmax,
                   offset, has_clip, clip, False)
        self.asymmetric = asymmetric

    def __dealloc__(self):
        PyMem_RawFree(self.cols)

    cdef int64_t passed(self, Py_ssize_t i) noexcept:
        return i if self.cols[i].kind == PASS else -1

    cdef int column(self, ArrowArray* src, Py_ssize_t i, ArrowArray* root, int n_threads,
                    int64_t* elements, double* seconds, list trace) except -1:
        """Quantize input column ``i`` into root's next children; DECLINE or 0."""
        cdef const QColumn* c = &self.cols[i]
        cdef const ArrowArray* a = src.children[i]
        cdef const Params* p = &self.p
        cdef const ArrowArray* vals = a.children[0]
        cdef int64_t n = a.length, r, n_groups, n_codes, stage = 0, fixed = -1, bad, total = 0
        cdef int64_t* scratch = NULL
        cdef int64_t* starts
        cdef int64_t* lens
        cdef int64_t* go
        cdef int64_t* co
        cdef int64_t* bo
        cdef void* codes = NULL
        cdef void* scales = NULL
        cdef void* zps = NULL
        cdef void* numel = NULL
        cdef bint gaps = False
        cdef const uint8_t* values
        cdef ArrowArray* out
        cdef double t0
        values = data_at(vals, c.itemsize)
        if c.kind == FIXED_SIZE_LIST:
            fixed = c.list_size
        # two arrays of n rows, three of n + 1 offsets
        scratch = <int64_t*>PyMem_RawMalloc((5 * n + 3) * sizeof(int64_t))
        if scratch == NULL:
            raise MemoryError()
        starts, lens, go = scratch, scratch + n, scratch + 2 * n
        co, bo = go + n + 1, go + 2 * (n + 1)
        try:
            if c.kind == FIXED_SIZE_LIST:
                bad = extents(NULL, 0, c.list_size, a.offset, validity(a), vals.length, n,
                              starts, lens)
            else:
                bad = extents(<const uint8_t*>a.buffers[1], 8 if c.kind == LARGE_LIST else 4,
                              0, a.offset, validity(a), vals.length, n, starts, lens)
            if bad != -1 or layout(lens, n, p.bits, p.group_size, fixed, p.groups_per_block,
                                   go, co, bo) != -1:
                return DECLINE
            if null_inside(vals, starts, lens, n):
                return DECLINE  # an error, named by the general path
            n_groups, n_codes = go[n], co[n]
            if c.kind != FIXED_SIZE_LIST and (n_groups > INT32_MAX or (
                    c.kind == LIST and n_codes > INT32_MAX)):
                return DECLINE  # int32 offsets cannot hold them: the general path says so
            if <uintptr_t>values % c.itemsize != 0:
                stage = p.group_size
                if stage > STAGE_MAX:
                    return DECLINE
            for r in range(n):
                total += lens[r]
                if fixed >= 0 and lens[r] != fixed:
                    gaps = True  # null rows keep zeroed slots
            codes = alloc(n_codes, gaps)
            scales = alloc(n_groups * 4, gaps)
            if self.asymmetric:
                zps = alloc(n_groups * 4, gaps)
            if c.kind != FIXED_SIZE_LIST:
                numel = alloc(n * 8, False)
            if codes == NULL or scales == NULL or (self.asymmetric and zps == NULL) or (
                    c.kind != FIXED_SIZE_LIST and numel == NULL):
                raise MemoryError()
            if trace is not None:
                trace.append(<uintptr_t>values)
            t0 = now()
            with nogil:
                if c.itemsize == 4:
                    bad = quantize_f32(<const float*>values, starts, lens, go, co, bo, n, p,
                                       <uint8_t*>codes, <float*>scales, <float*>zps, NULL,
                                       NULL, n_threads, stage)
                else:
                    bad = quantize_f64(<const double*>values, starts, lens, go, co, bo, n, p,
                                       <uint8_t*>codes, <float*>scales, <float*>zps, NULL,
                                       NULL, n_threads, stage)
            seconds[0] += now() - t0
            if bad < 0:
                raise MemoryError()
            if bad > 0:
                return DECLINE  # a NaN or Inf: the general path names it
            elements[0] += total
            # codes
            if c.kind == FIXED_SIZE_LIST:
                out = owned_child(root, n, a.null_count if has_nulls(a) else 0, 2, 0)
                out.buffers[1] = codes
            else:
                out = owned_child(root, n, a.null_count if has_nulls(a) else 0, 3, 0)
                offsets_buffer(out, 1, co, n, c.kind == LARGE_LIST)
                out.buffers[2] = codes
            codes = NULL
            copy_bitmap(out, a)
            # scales and zero points: one float32 per group, rows as the input's
            values_column(root, a, c.kind, False, go, &scales, n_groups, 4)
            if self.asymmetric:
                values_column(root, a, c.kind, False, go, &zps, n_groups, 4)
            if c.kind != FIXED_SIZE_LIST:
                memcpy(numel, lens, n * 8)
                out = owned_child(root, n, a.null_count if has_nulls(a) else 0, 2, 0)
                out.buffers[1] = numel
                numel = NULL
                copy_bitmap(out, a)
            return 0
        finally:
            PyMem_RawFree(scratch)
            PyMem_RawFree(codes)  # what no output took over (NULL otherwise)
            PyMem_RawFree(scales)
            PyMem_RawFree(zps)
            PyMem_RawFree(numel)


# ---------------------------------------------------------------------------------------
# dequantize


cdef class DequantizePlan(_Plan):
    """One entry per output column: an input column passed through, or a quantized one
    (codes, scales, zero points, numel) restored."""

    cdef DColumn* cols

    def __cinit__(self, schema, list columns):
        """``columns``: per output column ``int`` (that input column, passed through) or
        ``(codes, kind, itemsize, list_size, scales, zero_points, numel, bits, group_size,
        groups_per_block, offset)`` of a quantized column."""
        cdef Py_ssize_t i
        cdef DColumn* c
        self.schema = schema
        self.n_cols = self.n_out = len(columns)
        self.cols = <DColumn*>PyMem_RawCalloc(max(1, self.n_cols), sizeof(DColumn))
        if self.cols == NULL:
            raise MemoryError()
        for i in range(self.n_cols):
            c = &self.cols[i]
            if isinstance(columns[i], int):
                c.index = columns[i]
                c.kind = PASS
            else:
                (c.index, c.kind, c.itemsize, c.list_size, c.scales, c.zero_points, c.numel,
                 c.bits, c.group_size, c.groups_per_block, c.offset) = columns[i]

    def __dealloc__(self):
        PyMem_RawFree(self.cols)

    cdef int64_t passed(self, Py_ssize_t i) noexcept:
        return self.cols[i].index if self.cols[i].kind == PASS else -1

    cdef int column(self, ArrowArray* src, Py_ssize_t i, ArrowArray* root, int n_threads,
                    int64_t* elements, double* seconds, list trace) except -1:
        """Restore output column ``i`` into root's next child; DECLINE or 0."""
        cdef const DColumn* c = &self.cols[i]
        cdef const ArrowArray* a = src.children[c.index]
        cdef const ArrowArray* sc = src.children[c.scales]
        cdef const ArrowArray* zp = src.children[c.zero_points] if c.zero_points >= 0 else NULL
        cdef const ArrowArray* nm = src.children[c.numel] if c.numel >= 0 else NULL
        cdef int64_t n = a.length, r, bad, limit, first, last, size = 0, slot = 0
        cdef int width = 8 if c.kind == LARGE_LIST else 4
        cdef bint fixed = c.kind == FIXED_SIZE_LIST
        cdef bint gaps = False
        cdef int64_t* scratch = NULL
        cdef int64_t* code_starts
        cdef int64_t* code_lens
        cdef int64_t* lens
        cdef int64_t* s_starts
        cdef int64_t* s_lens
        cdef int64_t* z_starts = NULL
        cdef int64_t* z_lens = NULL
        cdef int64_t* bo
        cdef int64_t* out_starts
        cdef int64_t* out_offsets
        cdef void* values = NULL
        cdef const uint8_t* codes
        cdef const float* scales
        cdef const float* zps = NULL
        cdef float* copied = NULL
        cdef float* zcopied = NULL
        cdef double t0
        cdef int status
        if has_nulls(sc.children[0]) or (zp != NULL and has_nulls(zp.children[0])):
            return DECLINE
        # eight arrays of n rows, two of n + 1 offsets
        scratch = <int64_t*>PyMem_RawMalloc((10 * n + 2) * sizeof(int64_t))
        if scratch == NULL:
            raise MemoryError()
        code_starts, code_lens, lens = scratch, scratch + n, scratch + 2 * n
        s_starts, s_lens = scratch + 3 * n, scratch + 4 * n
        z_starts, z_lens = scratch + 5 * n, scratch + 6 * n
        out_starts, bo, out_offsets = scratch + 7 * n, scratch + 8 * n, scratch + 9 * n + 1
        if zp == NULL:
            z_starts = z_lens = NULL
        try:
            # codes: rows inside the data buffer. Validation saw the last offset inside it
            # when the offsets span anything; otherwise no row may hold a byte.
            if fixed:
                slot = (c.list_size * c.bits + 7) // 8
                bad = extents(NULL, 0, slot, a.offset, validity(a), (a.offset + n) * slot, n,
                              code_starts, code_lens)
            else:
                first = 0
                last = 0
                if n > 0:
                    memcpy(&first, <const uint8_t*>a.buffers[1] + a.offset * width, width)
                    memcpy(&last, <const uint8_t*>a.buffers[1] + (a.offset + n) * width, width)
                    if width == 4:
                        first = <int32_t>first
                        last = <int32_t>last
                limit = last if last > first else 0
                bad = extents(<const uint8_t*>a.buffers[1], width, 0, a.offset, validity(a),
                              limit, n, code_starts, code_lens)
            if bad != -1:
                return DECLINE
            # element counts
            if fixed:
                for r in range(n):
                    lens[r] = c.list_size if is_valid(a, r) else 0
                    gaps = gaps or lens[r] != c.list_size  # null rows keep zeroed slots
            else:
                for r in range(n):
                    if is_valid(a, r) and not is_valid(nm, r):
                        return DECLINE  # a null count where the codes are not null
                read_counts(data_at(nm, 0), nm.offset, validity(a), a.offset, n, lens)
            # scales and zero points
            bad = extents(<const uint8_t*>sc.buffers[1] if not fixed else NULL, 0 if fixed else 4,
                          (c.list_size + c.group_size - 1) // c.group_size if fixed else 0,
                          sc.offset, validity(sc), sc.children[0].length, n, s_starts, s_lens)
            if bad != -1:
                return DECLINE
            if zp != NULL:
                bad = extents(<const uint8_t*>zp.buffers[1] if not fixed else NULL,
                              0 if fixed else 4,
                              (c.list_size + c.group_size - 1) // c.group_size if fixed else 0,
                              zp.offset, validity(zp), zp.children[0].length, n, z_starts,
                              z_lens)
                if bad != -1:
                    return DECLINE
            if check(lens, n, c.bits, c.group_size, fixed, code_lens, s_starts, s_lens,
                     z_starts, z_lens, MAX_NUMEL, c.groups_per_block, bo) != -1:
                return DECLINE  # -3 (zero points apart from their scales) included
            # where each row goes
            if fixed:
                for r in range(n):
                    out_starts[r] = r * c.list_size
                size = n * c.list_size
            else:
                size = concat(lens, n, 8, <uint8_t*>out_offsets, out_starts)
                if c.kind == LIST and size > INT32_MAX:
                    return DECLINE
            values = alloc(size * c.itemsize, gaps)
            if values == NULL:
                raise MemoryError()
            codes = <const uint8_t*>a.buffers[2 if not fixed else 1]
            scales = <const float*>data_at(sc.children[0], 4)
            if zp != NULL:
                zps = <const float*>data_at(zp.children[0], 4)
            # float32 read through a float pointer: an unaligned buffer is copied first
            if <uintptr_t>scales % 4:
                scales = copied = aligned_copy(scales, sc.children[0].length)
            if zps != NULL and <uintptr_t>zps % 4:
                zps = zcopied = aligned_copy(zps, zp.children[0].length)
            t0 = now()
            with nogil:
                if c.itemsize == 4:
                    status = dequantize_f32(codes, lens, s_starts, code_starts, bo, out_starts,
                                            n, c.groups_per_block, c.bits, c.group_size,
                                            scales, zps, c.offset, <float*>values, n_threads)
                else:
                    status = dequantize_f64(codes, lens, s_starts, code_starts, bo, out_starts,
                                            n, c.groups_per_block, c.bits, c.group_size,
                                            scales, zps, c.offset, <double*>values, n_threads)
            seconds[0] += now() - t0
            if status < 0:
                raise MemoryError()
            for r in range(n):
                elements[0] += lens[r]
            values_column(root, a, c.kind, c.kind == LARGE_LIST, out_offsets, &values, size,
                          c.itemsize)
            return 0
        finally:
            PyMem_RawFree(scratch)
            PyMem_RawFree(values)
            PyMem_RawFree(copied)
            PyMem_RawFree(zcopied)
