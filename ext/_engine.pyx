# The codec engine: a whole RecordBatch quantized or dequantized in one call.
#
# flightquant/codec.py validates the batch (flightquant/validate.py: full Arrow
# validation, so every buffer is as long as its array says) and decides everything that
# depends on the schema once per stream (the plans below). Here one call per batch reads
# the input through one export of the Arrow C data interface, runs the row bookkeeping
# (flightquant._rows) and the kernels (flightquant._kernels for native, flightquant._ggml
# for llama.cpp's block formats) on the exported pointers, and builds the output through
# the same interface, with buffers it allocates and the output owns.
#
# Nothing here raises for bad data: a batch the engine cannot take (a NaN, a null inside
# a tensor, a row that is not whole ggml blocks, an inconsistent quantized row...) ends
# the call with a status and its numbers (column, row, element...); codec.py turns each
# status into its one message, in one function (_fail). MemoryError is the one exception.
#
# Flight buffers may sit at any address: offsets and counts are read with memcpy, float
# values at an address that is not a multiple of their size go through the kernels'
# aligned per-thread stage (or an aligned copy for very long groups), float16 values are
# widened to float32 (the value the kernels define their results on).

import pyarrow as pa

from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uintptr_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from flightquant._arrow cimport (ArrowArray, init_node, new_child, release_node, release_owned,
                                 take_column)
from flightquant._ggml cimport dequantize_rows as ggml_dequantize_rows
from flightquant._ggml cimport quantize_rows as ggml_quantize_rows
from flightquant._kernels cimport (STAGE_MAX, Params, dequantize_f32, dequantize_f64,
                                   quantize_f32, quantize_f64, set_params)
from flightquant._rows cimport check, concat, extents, layout, read_counts

include "ggml_common.pxi"

cdef enum:
    PASS = -1           # a column taken over as it is
    LIST = 0
    LARGE_LIST = 1
    FIXED_SIZE_LIST = 2
    NATIVE = -1         # QColumn.ggml / DColumn.ggml of a native column
    CONSUMED = -2       # an importance column: read by its tensor's column, not output

# statuses (codec._fail has the message of each, by its STATUS_NAMES name)
cdef enum:
    OK = 0
    E_NONFINITE = 1         # row, element (value)
    E_NULL_IN_TENSOR = 2    # row, element
    E_ROW_OUTSIDE = 3       # row
    E_CODES_INT32 = 4       # list codes past 2 GiB
    E_GROUPS_INT32 = 5      # more than 2**31 groups
    E_NOT_BLOCKS = 6        # row, its length (not whole ggml blocks)
    E_BAD_ROW = 7           # row, numel, code bytes, scales, zero points
    E_NUMEL_NULL = 8        # row
    E_SCALE_NULLS = 9
    E_VALUES_INT32 = 10     # more than 2**31 elements in one list batch
    E_GGML_BYTES = 11       # row, code bytes (not whole ggml blocks)
    E_IMP_LENGTH = 12       # row, importance length k, row elements, block size (ggml)
    E_IMP_VALUE = 13        # row, element, null (1) or not (value)

cdef int64_t INT32_MAX = 2147483647
cdef int64_t MAX_NUMEL = 1LL << 40  # more is a corrupt count, not a tensor
cdef int64_t HUGE_MIN = 8 << 20     # outputs this large ask for transparent huge pages

STATUS_NAMES = {OK: "ok", E_NONFINITE: "nonfinite", E_NULL_IN_TENSOR: "null_in_tensor",
                E_ROW_OUTSIDE: "row_outside", E_CODES_INT32: "codes_int32",
                E_GROUPS_INT32: "groups_int32", E_NOT_BLOCKS: "not_blocks",
                E_BAD_ROW: "bad_row", E_NUMEL_NULL: "numel_null", E_SCALE_NULLS: "scale_nulls",
                E_VALUES_INT32: "values_int32", E_GGML_BYTES: "ggml_bytes",
                E_IMP_LENGTH: "importance_length", E_IMP_VALUE: "importance_value"}


cdef struct Failure:
    int status
    int64_t column      # input column index
    int64_t row
    int64_t a           # the status's numbers (see the enum)
    int64_t b
    int64_t c
    int64_t d
    double value


cdef struct QColumn:
    int kind            # PASS, CONSUMED, LIST, LARGE_LIST or FIXED_SIZE_LIST
    int itemsize        # of the float values: 2, 4 or 8
    int64_t list_size   # FIXED_SIZE_LIST
    int ggml            # ggml type code, NATIVE for native
    int block_size      # ggml
    int type_size       # ggml
    int64_t imp         # input column of the rows' importance (list of float32), -1: none
    int imp_kind        # its LIST, LARGE_LIST or FIXED_SIZE_LIST
    int64_t imp_size    # its list size (FIXED_SIZE_LIST)


cdef struct DColumn:
    int64_t index       # of the codes (or passed-through) column in the input batch
    int kind
    int itemsize        # of the restored values: 2, 4 or 8
    int64_t list_size
    int64_t scales      # input column indexes; -1: none
    int64_t zero_points
    int64_t numel
    int bits
    int64_t group_size
    int64_t groups_per_block
    float offset        # the scheme's stored offset (zero point without a column)
    int ggml            # ggml type code, NATIVE for native
    int block_size
    int type_size


cdef inline int fail(Failure* f, int status, int64_t column, int64_t row, int64_t a, int64_t b,
                     int64_t c, int64_t d) noexcept:
    f.status = status
    f.column = column
    f.row = row
    f.a = a
    f.b = b
    f.c = c
    f.d = d
    return status


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


cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* Ask for transparent huge pages over the 2 MiB-aligned interior of a large output
       buffer: a fresh buffer is otherwise filled through one page fault per 4 KiB, and
       page faults of several threads serialise on the process's memory map (measured:
       dequantize into fresh memory ran at 0.43x a memory copy with 2 threads). */
    static void fq_advise_huge(void* p, size_t n) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        const uintptr_t huge = (uintptr_t)2 << 20;
        uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
        uintptr_t b = ((uintptr_t)p + n) & ~(huge - 1);
        if (b > a) madvise((void*)a, b - a, MADV_HUGEPAGE);
    #else
        (void)p; (void)n;
    #endif
    }
    """
    void fq_advise_huge(void* p, size_t n) noexcept nogil


cdef void* alloc(int64_t nbytes, bint zeroed) noexcept nogil:
    """Output memory (freed by release_owned); never NULL for a request of 0 bytes."""
    cdef void* p
    if nbytes < 1:
        nbytes = 1
    p = PyMem_RawCalloc(<size_t>nbytes, 1) if zeroed else PyMem_RawMalloc(<size_t>nbytes)
    if p != NULL and nbytes >= HUGE_MIN:
        fq_advise_huge(p, <size_t>nbytes)
    return p


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


cdef inline int64_t first_null(const ArrowArray* vals, const int64_t* starts,
                               const int64_t* lens, int64_t n, int64_t* element) noexcept nogil:
    """The first row holding a null value inside it (``element`` its index), or -1.
    Fixed-size lists hold nulls under their null rows, which is fine."""
    cdef const uint8_t* bits = validity(vals)
    cdef int64_t r, i, e
    if bits == NULL:
        return -1
    for r in range(n):
        i = vals.offset + starts[r]
        e = i + lens[r]
        while i < e:
            if i % 8 == 0 and e - i >= 8 and bits[i >> 3] == 0xFF:
                i += 8      # a whole byte of valid values
                continue
            if not (bits[i >> 3] >> (i & 7)) & 1:
                element[0] = i - vals.offset - starts[r]
                return r
            i += 1
    return -1


cdef inline double read_value(const uint8_t* values, int itemsize, int64_t i) noexcept nogil:
    cdef float f
    cdef double d
    cdef uint16_t h
    if itemsize == 4:
        memcpy(&f, values + 4 * i, 4)
        return f
    if itemsize == 8:
        memcpy(&d, values + 8 * i, 8)
        return d
    memcpy(&h, values + 2 * i, 2)
    return fq_fp16_to_fp32(h)


cdef int64_t first_non_finite(const uint8_t* values, int itemsize, const int64_t* starts,
                              const int64_t* lens, int64_t n, int64_t* element,
                              double* value) noexcept nogil:
    """The first row holding a NaN or an infinity (or, for float64, a value beyond float32),
    ``element`` its index and ``value`` the value; -1 if none."""
    cdef int64_t r, i
    cdef double v
    for r in range(n):
        for i in range(lens[r]):
            v = read_value(values, itemsize, starts[r] + i)
            if not isfinite(<float>v):
                element[0] = i
                value[0] = v
                return r
    return -1


cdef void* compact_f32(const uint8_t* values, int itemsize, const int64_t* starts,
                       const int64_t* lens, int64_t n, int64_t* new_starts) noexcept nogil:
    """The rows' values, back to back in fresh aligned memory, float16 widened to float32
    (``itemsize`` 4 and 8 are copied as they are); ``new_starts`` gets each row's start.
    NULL when out of memory."""
    cdef int64_t r, i, total = 0
    cdef int width = 4 if itemsize == 2 else itemsize
    for r in range(n):
        new_starts[r] = total
        total += lens[r]
    cdef uint8_t* out = <uint8_t*>alloc(total * width, False)
    cdef uint16_t h
    cdef float* f
    if out == NULL:
        return NULL
    for r in range(n):
        if itemsize == 2:
            f = <float*>out + new_starts[r]
            for i in range(lens[r]):
                memcpy(&h, values + 2 * (starts[r] + i), 2)
                f[i] = fq_fp16_to_fp32(h)
        elif lens[r]:
            memcpy(out + new_starts[r] * width, values + starts[r] * width, lens[r] * width)
    return out


cdef int primitive_column(ArrowArray* parent, const ArrowArray* rows, void** values) except -1:
    """A column of one 8-byte value (float64, int64) per row (taken over), with the
    validity of ``rows``."""
    cdef ArrowArray* out = owned_child(parent, rows.length,
                                       rows.null_count if has_nulls(rows) else 0, 2, 0)
    out.buffers[1] = values[0]
    values[0] = NULL
    copy_bitmap(out, rows)
    return 0


cdef class _Plan:
    """What every batch of one input schema shares (built once per stream by codec.py):
    the output schema and, per output position, a column taken over from the input or
    one the subclass builds."""

    cdef object schema  # of the output batches
    cdef Py_ssize_t n_out
    cdef Py_ssize_t n_cols  # plan entries, walked in output order
    cdef bint stats
    cdef object trace       # tests: a list, during run()

    cdef int64_t passed(self, Py_ssize_t i) noexcept:
        """The input column entry ``i`` takes over as it is, or -1: build it."""
        return -1

    cdef int column(self, ArrowArray* src, Py_ssize_t i, ArrowArray* root, int n_threads,
                    int64_t* elements, double* seconds, double* sse, double* maxerr,
                    Failure* f) except -1:
        """Build entry ``i``'s column(s) as root's next children; OK or a status in ``f``."""
        raise NotImplementedError

    def run(self, batch, int n_threads, list trace=None):
        """``(OK, output batch, elements, kernel seconds, sse, max abs error)`` or
        ``(status, input column, row, a, b, c, d, value)``. ``batch`` has the plan's input
        schema and was validated. ``trace`` (tests) gets the address each quantize kernel
        call read its values from."""
        cdef ArrowArray src
        cdef ArrowArray root
        cdef Py_ssize_t i
        cdef int64_t j, elements = 0
        cdef double seconds = 0.0, sse = 0.0, maxerr = 0.0
        cdef Failure f
        cdef int status = OK
        src.release = NULL
        root.release = NULL
        self.trace = trace
        batch._export_to_c(<uintptr_t>&src)
        try:
            init_node(&root, src.length, 0, 1, self.n_out)
            for i in range(self.n_cols):
                j = self.passed(i)
                if j >= 0:
                    take_column(new_child(&root), &src, j, src.length)
                else:
                    status = self.column(&src, i, &root, n_threads, &elements, &seconds, &sse,
                                         &maxerr, &f)
                    if status != OK:
                        break
        except BaseException:
            release_node(&root)
            raise
        finally:
            self.trace = None
            if src.release != NULL:  # the columns not moved out
                src.release(&src)
        if status != OK:
            release_node(&root)
            return (status, f.column, f.row, f.a, f.b, f.c, f.d, f.value)
        out = pa.RecordBatch._import_from_c(<uintptr_t>&root, self.schema)
        return (OK, out, elements, seconds, sse if self.stats else None,
                maxerr if self.stats else None)


# ---------------------------------------------------------------------------------------
# quantize


cdef class QuantizePlan(_Plan):
    """One entry per input column: passed through or quantized."""

    cdef QColumn* cols
    cdef Params p
    cdef bint asymmetric
    cdef int method

    def __cinit__(self, schema, list columns, int bits, int scheme, int method,
                  int64_t group_size, int64_t groups_per_block, int qmin, int qmax,
                  int offset, bint has_clip, float clip, bint asymmetric, bint stats,
                  int scale_dtype=0):
        """``columns``: per input column ``None`` (passed through), ``"consumed"`` (an
        importance column: read, not output) or ``(kind, itemsize, list_size, ggml code or
        -1, block_size, type_size, importance column or -1, its kind, its list size)`` of a
        float list column."""
        cdef Py_ssize_t i
        cdef QColumn* c
        self.schema = schema
        self.n_cols = len(columns)
        self.cols = <QColumn*>PyMem_RawCalloc(max(1, self.n_cols), sizeof(QColumn))
        if self.cols == NULL:
            raise MemoryError()
        self.n_out = 0
        for i in range(self.n_cols):
            c = &self.cols[i]
            if columns[i] is None:
                c.kind = PASS
                self.n_out += 1
                continue
            if isinstance(columns[i], str):
                c.kind = CONSUMED
                continue
            (c.kind, c.itemsize, c.list_size, c.ggml, c.block_size, c.type_size, c.imp,
             c.imp_kind, c.imp_size) = columns[i]
            if c.ggml == NATIVE:
                # codes, scales, zero points, numel
                self.n_out += 2 + asymmetric + (c.kind != FIXED_SIZE_LIST)
            else:
                self.n_out += 1
            self.n_out += 2 * stats  # mse, max_abs_error
        set_params(&self.p, bits, scheme, method, group_size, groups_per_block, qmin, qmax,
                   offset, has_clip, clip, stats, scale_dtype)
        self.asymmetric = asymmetric
        self.stats = stats
        self.method = method

    def __dealloc__(self):
        PyMem_RawFree(self.cols)

    cdef int64_t passed(self, Py_ssize_t i) noexcept:
        return i if self.cols[i].kind == PASS else -1

    cdef int column(self, ArrowArray* src, Py_ssize_t i, ArrowArray* root, int n_threads,
                    int64_t* elements, double* seconds, double* sse, double* maxerr,
                    Failure* f) except -1:
        """Quantize input column ``i`` into root's next children."""
        cdef const QColumn* c = &self.cols[i]
        cdef const ArrowArray* a
        cdef const ArrowArray* vals
        cdef int64_t n, r, bad, elem = 0
        cdef int64_t* starts
        cdef int64_t* lens
        cdef int64_t* scratch = NULL
        cdef const uint8_t* imp
        if c.kind == CONSUMED:
            return OK
        a = src.children[i]
        vals = a.children[0]
        n = a.length
        # 8n + 4 for the column's layout, 3n for its importance rows
        scratch = <int64_t*>PyMem_RawMalloc((11 * n + 4) * sizeof(int64_t))
        if scratch == NULL:
            raise MemoryError()
        starts, lens = scratch, scratch + n
        try:
            if c.kind == FIXED_SIZE_LIST:
                bad = extents(NULL, 0, c.list_size, a.offset, validity(a), vals.length, n,
                              starts, lens)
            else:
                bad = extents(<const uint8_t*>a.buffers[1], 8 if c.kind == LARGE_LIST else 4,
                              0, a.offset, validity(a), vals.length, n, starts, lens)
            if bad != -1:
                return fail(f, E_ROW_OUTSIDE, i, bad, 0, 0, 0, 0)
            r = first_null(vals, starts, lens, n, &elem)
            if r >= 0:
                return fail(f, E_NULL_IN_TENSOR, i, r, elem, 0, 0, 0)
            imp = NULL
            if c.imp >= 0:
                if self.importance(c, src, i, lens, scratch + 8 * n + 4, f) != OK:
                    return f.status
                for r in range(n):
                    if scratch[8 * n + 4 + r] >= 0:  # a row with importance
                        imp = data_at(src.children[c.imp].children[0], 4)
                        break
            if c.ggml == NATIVE:
                return self.native(c, a, i, scratch, imp, root, n_threads, elements, seconds,
                                   sse, maxerr, f)
            return self.ggml(c, a, i, scratch, imp, root, n_threads, elements, seconds, sse,
                             maxerr, f)
        finally:
            PyMem_RawFree(scratch)

    cdef int importance(self, const QColumn* c, ArrowArray* src, Py_ssize_t i,
                        const int64_t* lens, int64_t* istarts, Failure* f) except -1:
        """Read and check column ``i``'s importance rows: ``istarts[r]`` gets where row r's
        weights start among the importance values (-1: none, a null importance row or a
        null tensor row) and ``istarts[n + r]`` their count k. Every weight is finite and
        non-negative, k >= 1 divides the row's length (a multiple of the block size for
        ggml); OK or a status, before any value of the tensor is read."""
        cdef const ArrowArray* a = src.children[i]
        cdef const ArrowArray* w = src.children[c.imp]
        cdef const ArrowArray* wv = w.children[0]
        cdef int64_t n = a.length, r, j, k, bad, elem = 0
        cdef int64_t* ik = istarts + n
        cdef int64_t* ilens = istarts + 2 * n
        cdef const uint8_t* wvals = data_at(wv, 4)
        cdef float v
        if c.imp_kind == FIXED_SIZE_LIST:
            bad = extents(NULL, 0, c.imp_size, w.offset, validity(w), wv.length, n, istarts,
                          ilens)
        else:
            bad = extents(<const uint8_t*>w.buffers[1], 8 if c.imp_kind == LARGE_LIST else 4,
                          0, w.offset, validity(w), wv.length, n, istarts, ilens)
        if bad != -1:
            return fail(f, E_ROW_OUTSIDE, c.imp, bad, 0, 0, 0, 0)
        for r in range(n):
            if not (is_valid(a, r) and is_valid(w, r)):
                istarts[r] = -1
                ik[r] = 0
                continue
            k = ilens[r]
            ik[r] = k
            if k < 1 or lens[r] % k or (c.ggml != NATIVE and k % c.block_size):
                return fail(f, E_IMP_LENGTH, i, r, k, lens[r],
                            c.block_size if c.ggml != NATIVE else 0, 0)
        r = first_null(wv, istarts, ik, n, &elem)
        if r >= 0:
            return fail(f, E_IMP_VALUE, i, r, elem, 1, 0, 0)
        for r in range(n):
            for j in range(ik[r]):
                memcpy(&v, wvals + 4 * (istarts[r] + j), 4)
                if not (isfinite(v) and v >= 0):
                    f.value = v
                    return fail(f, E_IMP_VALUE, i, r, j, 0, 0, 0)
        return OK

    cdef int codes_column(self, const QColumn* c, const ArrowArray* a, ArrowArray* root,
                          const int64_t* co, void** codes) except -1:
        cdef ArrowArray* out
        cdef int64_t n = a.length
        if c.kind == FIXED_SIZE_LIST:
            out = owned_child(root, n, a.null_count if has_nulls(a) else 0, 2, 0)
            out.buffers[1] = codes[0]
        else:
            out = owned_child(root, n, a.null_count if has_nulls(a) else 0, 3, 0)
            offsets_buffer(out, 1, co, n, c.kind == LARGE_LIST)
            out.buffers[2] = codes[0]
        codes[0] = NULL
        copy_bitmap(out, a)
        return 0

    cdef int stats_columns(self, const ArrowArray* a, ArrowArray* root, const int64_t* lens,
                           const double* row_sse, const double* row_max, double* sse,
                           double* maxerr) except -1:
        """The per-row mse and max_abs_error columns; the batch totals."""
        cdef int64_t n = a.length, r
        cdef void* mse = alloc(n * 8, False)
        cdef void* mx = alloc(n * 8, False)
        try:
            if mse == NULL or mx == NULL:
                raise MemoryError()
            for r in range(n):
                (<double*>mse)[r] = row_sse[r] / lens[r] if lens[r] > 0 else 0.0
                (<double*>mx)[r] = row_max[r]
                sse[0] += row_sse[r]
                if row_max[r] > maxerr[0]:
                    maxerr[0] = row_max[r]
            primitive_column(root, a, &mse)
            primitive_column(root, a, &mx)
        finally:
            PyMem_RawFree(mse)
            PyMem_RawFree(mx)
        return 0

    cdef int native(self, const QColumn* c, const ArrowArray* a, Py_ssize_t i,
                    int64_t* scratch, const uint8_t* imp, ArrowArray* root, int n_threads,
                    int64_t* elements, double* seconds, double* sse, double* maxerr,
                    Failure* f) except -1:
        """Native column ``i``; with ``imp`` (the importance values, float32 at any address)
        the rows whose scratch[8n + 4 + r] is not -1 are importance-weighted (mse)."""
        cdef const Params* p = &self.p
        cdef const ArrowArray* vals = a.children[0]
        cdef int64_t n = a.length, r, g, n_groups, n_codes, stage = 0, fixed = -1, bad
        cdef int64_t total = 0, elem = 0
        cdef int64_t* starts = scratch
        cdef int64_t* lens = scratch + n
        cdef int64_t* go = scratch + 2 * n
        cdef int64_t* co = go + n + 1
        cdef int64_t* bo = go + 2 * (n + 1)
        cdef int64_t* kstarts = go + 3 * (n + 1)    # where the kernel reads each row
        cdef const uint8_t* values = data_at(vals, c.itemsize)
        cdef const uint8_t* kvalues
        cdef int kitemsize = 8 if c.itemsize == 8 else 4
        cdef void* compact = NULL
        cdef void* codes = NULL
        cdef void* scales = NULL
        cdef void* zps = NULL
        cdef void* numel = NULL
        cdef double* gsse = NULL
        cdef double* gmax = NULL
        cdef double* row_sse = NULL
        cdef bint gaps = False
        cdef double t0, value = 0.0
        if c.kind == FIXED_SIZE_LIST:
            fixed = c.list_size
        if layout(lens, n, p.bits, p.group_size, fixed, p.groups_per_block, go, co, bo) != -1:
            return fail(f, E_ROW_OUTSIDE, i, 0, 0, 0, 0, 0)
        n_groups, n_codes = go[n], co[n]
        if c.kind != FIXED_SIZE_LIST and n_groups > INT32_MAX:
            return fail(f, E_GROUPS_INT32, i, 0, n_groups, 0, 0, 0)
        if c.kind == LIST and n_codes > INT32_MAX:
            return fail(f, E_CODES_INT32, i, 0, n_codes, 0, 0, 0)
        try:
            kvalues = values
            memcpy(kstarts, starts, n * sizeof(int64_t))
            if c.itemsize == 2 or (<uintptr_t>values % c.itemsize != 0 and
                                   p.group_size > STAGE_MAX):
                # float16 widened; very long groups at an odd address copied aligned
                compact = compact_f32(values, c.itemsize, starts, lens, n, kstarts)
                if compact == NULL:
                    raise MemoryError()
                kvalues = <const uint8_t*>compact
            elif <uintptr_t>values % c.itemsize != 0:
                stage = p.group_size
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
            if self.stats:
                gsse = <double*>alloc(n_groups * 8, True)
                gmax = <double*>alloc(n_groups * 8, True)
                row_sse = <double*>alloc(2 * n * 8, True)
            if codes == NULL or scales == NULL or (self.asymmetric and zps == NULL) or (
                    c.kind != FIXED_SIZE_LIST and numel == NULL) or (
                    self.stats and (gsse == NULL or gmax == NULL or row_sse == NULL)):
                raise MemoryError()
            if self.trace is not None:
                self.trace.append(<uintptr_t>kvalues)
            t0 = now()
            with nogil:
                if kitemsize == 4:
                    bad = quantize_f32(<const float*>kvalues, kstarts, lens, go, co, bo, n, p,
                                       <uint8_t*>codes, <float*>scales, <float*>zps, gsse,
                                       gmax, n_threads, stage, imp, scratch + 8 * n + 4,
                                       scratch + 9 * n + 4)
                else:
                    bad = quantize_f64(<const double*>kvalues, kstarts, lens, go, co, bo, n, p,
                                       <uint8_t*>codes, <float*>scales, <float*>zps, gsse,
                                       gmax, n_threads, stage, imp, scratch + 8 * n + 4,
                                       scratch + 9 * n + 4)
            seconds[0] += now() - t0
            if bad < 0:
                raise MemoryError()
            if bad > 0:
                r = first_non_finite(values, c.itemsize, starts, lens, n, &elem, &value)
                f.value = value
                return fail(f, E_NONFINITE, i, r, elem, 0, 0, 0)
            elements[0] += total
            self.codes_column(c, a, root, co, &codes)
            # scales and zero points: one float32 per group, rows as the input's
            values_column(root, a, c.kind, False, go, &scales, n_groups, 4)
            if self.asymmetric:
                values_column(root, a, c.kind, False, go, &zps, n_groups, 4)
            if c.kind != FIXED_SIZE_LIST:
                memcpy(numel, lens, n * 8)
                primitive_column(root, a, &numel)
            if self.stats:
                # per row, groups summed in order (the reference's np.bincount)
                for r in range(n):
                    for g in range(go[r], go[r] + (lens[r] + p.group_size - 1) // p.group_size):
                        row_sse[r] += gsse[g]
                        if gmax[g] > row_sse[n + r]:
                            row_sse[n + r] = gmax[g]
                self.stats_columns(a, root, lens, row_sse, row_sse + n, sse, maxerr)
            return OK
        finally:
            PyMem_RawFree(compact)
            PyMem_RawFree(codes)  # what no output took over (NULL otherwise)
            PyMem_RawFree(scales)
            PyMem_RawFree(zps)
            PyMem_RawFree(numel)
            PyMem_RawFree(gsse)
            PyMem_RawFree(gmax)
            PyMem_RawFree(row_sse)

    cdef int ggml(self, const QColumn* c, const ArrowArray* a, Py_ssize_t i,
                  int64_t* scratch, const uint8_t* imp, ArrowArray* root, int n_threads,
                  int64_t* elements, double* seconds, double* sse, double* maxerr,
                  Failure* f) except -1:
        """ggml column ``i``; with ``imp`` as in native(), ggml's importance paths."""
        cdef const ArrowArray* vals = a.children[0]
        cdef int64_t n = a.length, r, b, nb, total = 0, elem = 0, slot = 0
        cdef int64_t* starts = scratch
        cdef int64_t* lens = scratch + n
        cdef int64_t* co = scratch + 2 * n
        cdef int64_t* bo = co + n + 1
        cdef const uint8_t* values = data_at(vals, c.itemsize)
        cdef void* codes = NULL
        cdef double* bsse = NULL
        cdef float* bmax = NULL
        cdef double* row_sse = NULL
        cdef bint gaps = False
        cdef double t0, value = 0.0
        cdef const Params* p = &self.p
        if c.kind == FIXED_SIZE_LIST:
            slot = c.list_size // c.block_size * c.type_size
        co[0] = 0
        bo[0] = 0
        for r in range(n):
            if lens[r] % c.block_size:
                return fail(f, E_NOT_BLOCKS, i, r, lens[r], c.block_size, 0, 0)
            nb = lens[r] // c.block_size
            bo[r + 1] = bo[r] + nb
            co[r + 1] = co[r] + (slot if c.kind == FIXED_SIZE_LIST else nb * c.type_size)
            total += lens[r]
            gaps = gaps or (c.kind == FIXED_SIZE_LIST and lens[r] != c.list_size)
        if c.kind == LIST and co[n] > INT32_MAX:
            return fail(f, E_CODES_INT32, i, 0, co[n], 0, 0, 0)
        try:
            codes = alloc(co[n], gaps)
            if self.stats:
                bsse = <double*>alloc(bo[n] * 8, False)
                bmax = <float*>alloc(bo[n] * 4, False)
                row_sse = <double*>alloc(2 * n * 8, True)
            if codes == NULL or (self.stats and (bsse == NULL or bmax == NULL or
                                                 row_sse == NULL)):
                raise MemoryError()
            if self.trace is not None:
                self.trace.append(<uintptr_t>values)
            t0 = now()
            with nogil:
                b = ggml_quantize_rows(values, c.itemsize, starts, bo, co, n, c.ggml,
                                       c.block_size, c.type_size, self.method, p.has_clip,
                                       p.lo, p.hi, imp, scratch + 8 * n + 4,
                                       scratch + 9 * n + 4, <uint8_t*>codes, bsse, bmax,
                                       n_threads)
            seconds[0] += now() - t0
            if b < 0:
                raise MemoryError()
            if b > 0:
                r = first_non_finite(values, c.itemsize, starts, lens, n, &elem, &value)
                f.value = value
                return fail(f, E_NONFINITE, i, r, elem, 0, 0, 0)
            elements[0] += total
            self.codes_column(c, a, root, co, &codes)
            if self.stats:
                for r in range(n):
                    for b in range(bo[r], bo[r + 1]):
                        row_sse[r] += bsse[b]
                        if bmax[b] > row_sse[n + r]:
                            row_sse[n + r] = bmax[b]
                self.stats_columns(a, root, lens, row_sse, row_sse + n, sse, maxerr)
            return OK
        finally:
            PyMem_RawFree(codes)
            PyMem_RawFree(bsse)
            PyMem_RawFree(bmax)
            PyMem_RawFree(row_sse)


# ---------------------------------------------------------------------------------------
# dequantize


cdef class DequantizePlan(_Plan):
    """One entry per output column: an input column passed through, or a quantized one
    (codes, scales, zero points, numel) restored."""

    cdef DColumn* cols

    def __cinit__(self, schema, list columns):
        """``columns``: per output column ``int`` (that input column, passed through) or
        ``(codes, kind, itemsize, list_size, scales, zero_points, numel, bits, group_size,
        groups_per_block, offset, ggml code or -1, block_size, type_size)``."""
        cdef Py_ssize_t i
        cdef DColumn* c
        self.schema = schema
        self.n_cols = self.n_out = len(columns)
        self.stats = False
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
                 c.bits, c.group_size, c.groups_per_block, c.offset, c.ggml, c.block_size,
                 c.type_size) = columns[i]

    def __dealloc__(self):
        PyMem_RawFree(self.cols)

    cdef int64_t passed(self, Py_ssize_t i) noexcept:
        return self.cols[i].index if self.cols[i].kind == PASS else -1

    cdef int code_extents(self, const DColumn* c, const ArrowArray* a, int64_t slot,
                          int64_t* code_starts, int64_t* code_lens, Failure* f) except -1:
        """Each row's codes inside the data buffer. Validation saw the last offset inside
        it when the offsets span anything; otherwise no row may hold a byte."""
        cdef int64_t n = a.length, bad, limit, first = 0, last = 0
        cdef int width = 8 if c.kind == LARGE_LIST else 4
        if c.kind == FIXED_SIZE_LIST:
            bad = extents(NULL, 0, slot, a.offset, validity(a), (a.offset + n) * slot, n,
                          code_starts, code_lens)
        else:
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
            return fail(f, E_ROW_OUTSIDE, c.index, bad, 0, 0, 0, 0)
        return OK

    cdef int output_rows(self, const DColumn* c, int64_t n, const int64_t* lens,
                         int64_t* out_offsets, int64_t* out_starts, int64_t* size,
                         Failure* f) except -1:
        cdef int64_t r
        if c.kind == FIXED_SIZE_LIST:
            for r in range(n):
                out_starts[r] = r * c.list_size
            size[0] = n * c.list_size
        else:
            size[0] = concat(lens, n, 8, <uint8_t*>out_offsets, out_starts)
            if c.kind == LIST and size[0] > INT32_MAX:
                return fail(f, E_VALUES_INT32, c.index, 0, size[0], 0, 0, 0)
        return OK

    cdef int column(self, ArrowArray* src, Py_ssize_t i, ArrowArray* root, int n_threads,
                    int64_t* elements, double* seconds, double* sse, double* maxerr,
                    Failure* f) except -1:
        """Restore output column ``i`` into root's next child."""
        cdef const DColumn* c = &self.cols[i]
        cdef const ArrowArray* a = src.children[c.index]
        cdef int64_t n = a.length
        # eight arrays of n rows, two of n + 1 offsets
        cdef int64_t* scratch = <int64_t*>PyMem_RawMalloc((10 * n + 2) * sizeof(int64_t))
        if scratch == NULL:
            raise MemoryError()
        try:
            if c.ggml == NATIVE:
                return self.native(c, src, a, scratch, root, n_threads, elements, seconds, f)
            return self.ggml(c, a, scratch, root, n_threads, elements, seconds, f)
        finally:
            PyMem_RawFree(scratch)

    cdef int ggml(self, const DColumn* c, const ArrowArray* a, int64_t* scratch,
                  ArrowArray* root, int n_threads, int64_t* elements, double* seconds,
                  Failure* f) except -1:
        cdef int64_t n = a.length, r, size = 0
        cdef int64_t slot = c.list_size // c.block_size * c.type_size
        cdef bint fixed = c.kind == FIXED_SIZE_LIST
        cdef bint gaps = False
        cdef int64_t* code_starts = scratch
        cdef int64_t* code_lens = scratch + n
        cdef int64_t* lens = scratch + 2 * n
        cdef int64_t* out_starts = scratch + 3 * n
        cdef int64_t* bo = scratch + 4 * n
        cdef int64_t* out_offsets = scratch + 5 * n + 1
        cdef void* values = NULL
        cdef double t0
        cdef int rc
        if self.code_extents(c, a, slot, code_starts, code_lens, f) != OK:
            return f.status
        bo[0] = 0
        for r in range(n):
            if code_lens[r] % c.type_size:
                return fail(f, E_GGML_BYTES, c.index, r, code_lens[r], c.type_size, 0, 0)
            lens[r] = code_lens[r] // c.type_size * c.block_size
            if fixed and not is_valid(a, r):
                lens[r] = 0
                gaps = True
            if lens[r] > MAX_NUMEL:
                return fail(f, E_GGML_BYTES, c.index, r, code_lens[r], c.type_size, 0, 0)
            bo[r + 1] = bo[r] + lens[r] // c.block_size
        if self.output_rows(c, n, lens, out_offsets, out_starts, &size, f) != OK:
            return f.status
        try:
            values = alloc(size * c.itemsize, gaps)
            if values == NULL:
                raise MemoryError()
            t0 = now()
            with nogil:
                rc = ggml_dequantize_rows(<const uint8_t*>a.buffers[2 if not fixed else 1],
                                          code_starts, bo, out_starts, n, c.ggml, c.block_size,
                                          c.type_size, c.itemsize, <uint8_t*>values, n_threads)
            seconds[0] += now() - t0
            if rc < 0:
                raise MemoryError()
            for r in range(n):
                elements[0] += lens[r]
            values_column(root, a, c.kind, c.kind == LARGE_LIST, out_offsets, &values, size,
                          c.itemsize)
            return OK
        finally:
            PyMem_RawFree(values)

    cdef int native(self, const DColumn* c, ArrowArray* src, const ArrowArray* a,
                    int64_t* scratch, ArrowArray* root, int n_threads, int64_t* elements,
                    double* seconds, Failure* f) except -1:
        cdef const ArrowArray* sc = src.children[c.scales]
        cdef const ArrowArray* zp = src.children[c.zero_points] if c.zero_points >= 0 else NULL
        cdef const ArrowArray* nm = src.children[c.numel] if c.numel >= 0 else NULL
        cdef int64_t n = a.length, r, bad, size = 0, slot = 0, need, per_row = 0
        cdef bint fixed = c.kind == FIXED_SIZE_LIST
        cdef bint gaps = False
        cdef int64_t* code_starts = scratch
        cdef int64_t* code_lens = scratch + n
        cdef int64_t* lens = scratch + 2 * n
        cdef int64_t* s_starts = scratch + 3 * n
        cdef int64_t* s_lens = scratch + 4 * n
        cdef int64_t* z_starts = scratch + 5 * n
        cdef int64_t* z_lens = scratch + 6 * n
        cdef int64_t* out_starts = scratch + 7 * n
        cdef int64_t* bo = scratch + 8 * n
        cdef int64_t* out_offsets = scratch + 9 * n + 1
        cdef void* values = NULL
        cdef void* wide = NULL
        cdef const uint8_t* codes
        cdef const float* scales
        cdef const float* zps = NULL
        cdef float* copied = NULL
        cdef float* zcopied = NULL
        cdef double t0
        cdef int status
        if has_nulls(sc.children[0]) or (zp != NULL and has_nulls(zp.children[0])):
            return fail(f, E_SCALE_NULLS, c.index, 0, 0, 0, 0, 0)
        if zp == NULL:
            z_starts = z_lens = NULL
        if fixed:
            slot = (c.list_size * c.bits + 7) // 8
            per_row = (c.list_size + c.group_size - 1) // c.group_size
        if self.code_extents(c, a, slot, code_starts, code_lens, f) != OK:
            return f.status
        # element counts
        if fixed:
            for r in range(n):
                lens[r] = c.list_size if is_valid(a, r) else 0
                gaps = gaps or lens[r] != c.list_size  # null rows keep zeroed slots
        else:
            for r in range(n):
                if is_valid(a, r) and not is_valid(nm, r):
                    return fail(f, E_NUMEL_NULL, c.index, r, 0, 0, 0, 0)
            read_counts(data_at(nm, 0), nm.offset, validity(a), a.offset, n, lens)
        # scales and zero points
        bad = extents(<const uint8_t*>sc.buffers[1] if not fixed else NULL, 0 if fixed else 4,
                      per_row, sc.offset, validity(sc), sc.children[0].length, n, s_starts,
                      s_lens)
        if bad != -1:
            return fail(f, E_ROW_OUTSIDE, c.scales, bad, 0, 0, 0, 0)
        if zp != NULL:
            bad = extents(<const uint8_t*>zp.buffers[1] if not fixed else NULL,
                          0 if fixed else 4, per_row, zp.offset, validity(zp),
                          zp.children[0].length, n, z_starts, z_lens)
            if bad != -1:
                return fail(f, E_ROW_OUTSIDE, c.zero_points, bad, 0, 0, 0, 0)
        bad = check(lens, n, c.bits, c.group_size, fixed, code_lens, s_starts, s_lens,
                    z_starts, z_lens, MAX_NUMEL, c.groups_per_block, bo)
        if bad >= 0:
            return fail(f, E_BAD_ROW, c.index, bad, lens[bad], code_lens[bad], s_lens[bad],
                        z_lens[bad] if zp != NULL else -1)
        if self.output_rows(c, n, lens, out_offsets, out_starts, &size, f) != OK:
            return f.status
        try:
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
            if zps != NULL and (bad == -3 or <uintptr_t>zps % 4):
                # zero points stored at other offsets than the scales (-3), or unaligned:
                # an aligned copy with each row's zero points under its scales
                zcopied = <float*>alloc(sc.children[0].length * 4, True)
                if zcopied == NULL:
                    raise MemoryError()
                for r in range(n):
                    need = (lens[r] + c.group_size - 1) // c.group_size
                    if need:
                        memcpy(zcopied + s_starts[r], <const uint8_t*>zps + 4 * z_starts[r],
                               need * 4)
                zps = zcopied
            if c.itemsize == 2:
                wide = alloc(size * 4, gaps)
                if wide == NULL:
                    raise MemoryError()
            t0 = now()
            with nogil:
                if c.itemsize == 8:
                    status = dequantize_f64(codes, lens, s_starts, code_starts, bo, out_starts,
                                            n, c.groups_per_block, c.bits, c.group_size,
                                            scales, zps, c.offset, <double*>values, n_threads)
                else:
                    status = dequantize_f32(codes, lens, s_starts, code_starts, bo, out_starts,
                                            n, c.groups_per_block, c.bits, c.group_size,
                                            scales, zps, c.offset,
                                            <float*>(wide if c.itemsize == 2 else values),
                                            n_threads)
                    if c.itemsize == 2 and status == 0:
                        for r in range(size):
                            (<uint16_t*>values)[r] = fq_fp32_to_fp16((<float*>wide)[r])
            seconds[0] += now() - t0
            if status < 0:
                raise MemoryError()
            for r in range(n):
                elements[0] += lens[r]
            values_column(root, a, c.kind, c.kind == LARGE_LIST, out_offsets, &values, size,
                          c.itemsize)
            return OK
        finally:
            PyMem_RawFree(values)
            PyMem_RawFree(wide)
            PyMem_RawFree(copied)
            PyMem_RawFree(zcopied)
