# ggml block kernels: quantize and dequantize rows of llama.cpp's block formats.
#
# Each type contributes two block functions (one block of ``block_size`` weights <->
# ``type_size`` bytes), defined in the included .pxi files; this file runs them over rows
# and threads. Blocks are independent, so the bytes are the same for any thread count.
#
# Block function contract (see ggml_common.pxi for the shared helpers):
#   int  <type>_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
#                              float sigma2) noexcept nogil
#        x: float32[block_size], finite, 32-byte aligned (a per-thread stage);
#        y: type_size bytes at ANY address (write multi-byte fields with memcpy/fq_store_f16);
#        method: METHOD_RTN (ggml's quantize_row_*_ref, byte for byte) or METHOD_MSE
#        (flightquant's search, same bytes format, lower squared error); returns 0.
#        qw: NULL (no importance) or the block's importance weights, float32[block_size],
#        non-negative and finite, 32-byte aligned (a per-thread stage). With qw, METHOD_RTN is
#        ggml's importance path (quantize_row_*_impl with quant_weights, byte for byte) and
#        METHOD_MSE minimises sum(qw[j] * (x[j] - x_hat[j])^2), never worse than that path.
#        sigma2: with qw, the mean square of the block's whole ggml row (ne[0] elements,
#        summed in order in float32, divided by ne[0]) where ROW_SIGMA2[code] says the type's
#        importance path uses it (the legacy types), else 0.
#   void <type>_dequantize_block(const uint8_t* y, float* x) noexcept nogil
#        y: type_size bytes at ANY address; x: float32[block_size], aligned stage;
#        the float32 values gguf-py's quants.dequantize gives, bit for bit.
#
# Type codes, block sizes and type sizes come from flightquant/formats.py (the one owner);
# the wrapper passes them in and the tests check that they fit the block functions.

from cython.parallel cimport prange
from libc.math cimport fabsf, isfinite
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from _openmp cimport FLIGHTQUANT_OPENMP, omp_get_thread_num

import numpy as np

cdef enum:
    METHOD_RTN = 0
    METHOD_MSE = 1
    N_TYPES = 14
    QK_MAX = 256        # the largest block_size
    CHUNK = 64          # blocks a thread takes at a time (one row search per chunk)

ctypedef int (*quant_fn)(const float* x, uint8_t* y, int method, const float* qw,
                         float sigma2) noexcept nogil
ctypedef void (*dequant_fn)(const uint8_t* y, float* x) noexcept nogil

include "block_rows.pxi"
include "ggml_common.pxi"
include "ggml_legacy.pxi"
include "ggml_k456.pxi"
include "ggml_k23.pxi"
include "ggml_iq4.pxi"

# indexed by formats.GgmlType.code
cdef quant_fn QUANT[N_TYPES]
cdef dequant_fn DEQUANT[N_TYPES]
QUANT[:] = [q4_0_quantize_block, q4_1_quantize_block, q5_0_quantize_block,
            q5_1_quantize_block, q8_0_quantize_block, q2_k_quantize_block,
            q3_k_quantize_block, q4_k_quantize_block, q5_k_quantize_block,
            q6_k_quantize_block, tq1_0_quantize_block, tq2_0_quantize_block,
            iq4_nl_quantize_block, iq4_xs_quantize_block]
# whether the type's importance path weighs by the row's mean square (sigma2 above)
cdef bint ROW_SIGMA2[N_TYPES]
ROW_SIGMA2[:] = [True, True, True, True, False, False, False, False, False, False, False, False,
                 False, False]
DEQUANT[:] = [q4_0_dequantize_block, q4_1_dequantize_block, q5_0_dequantize_block,
              q5_1_dequantize_block, q8_0_dequantize_block, q2_k_dequantize_block,
              q3_k_dequantize_block, q4_k_dequantize_block, q5_k_dequantize_block,
              q6_k_dequantize_block, tq1_0_dequantize_block, tq2_0_dequantize_block,
              iq4_nl_dequantize_block, iq4_xs_dequantize_block]


cdef inline bint stage_block(const uint8_t* src, int itemsize, int64_t n, float* st,
                             bint has_clip, float lo, float hi) noexcept nogil:
    """Copy ``n`` values of width ``itemsize`` (2: float16, 4: float32, 8: float64) at any
    address into the float32 stage, clamped to [lo, hi] with ``has_clip``; False if one is
    not finite (before clipping)."""
    cdef int64_t i
    cdef double d
    cdef uint16_t h
    cdef bint ok = True
    cdef uint32_t u, acc = 0
    if itemsize == 4:
        # copy and check in one pass that vectorizes: non-finite <=> all exponent bits set
        # <=> adding one exponent unit carries into the sign bit
        for i in range(n):
            memcpy(&u, src + 4 * i, 4)
            acc = acc | ((u & <uint32_t>0x7F800000) + <uint32_t>0x00800000)
            memcpy(&st[i], &u, 4)
        ok = (acc & <uint32_t>0x80000000) == 0
    else:
        if itemsize == 8:
            for i in range(n):
                memcpy(&d, src + 8 * i, 8)
                st[i] = <float>d
                if not isfinite(d):
                    ok = False
        else:
            for i in range(n):
                memcpy(&h, src + 2 * i, 2)
                st[i] = fq_fp16_to_fp32(h)
        for i in range(n):
            if not isfinite(st[i]):
                ok = False
    if has_clip:
        for i in range(n):
            st[i] = lo if st[i] < lo else (hi if st[i] > hi else st[i])
    return ok


cdef float row_sumsq(const uint8_t* src, int itemsize, int64_t n, bint has_clip, float lo,
                     float hi) noexcept nogil:
    """sum(x[j] * x[j]) of ``n`` values as the kernels stage them (float32, clamped with
    ``has_clip``), added in order in float32 as ggml's importance paths add them."""
    cdef float st[QK_MAX]
    cdef float s = 0
    cdef int64_t i = 0, m, j
    while i < n:
        m = n - i if n - i < QK_MAX else QK_MAX
        stage_block(src + i * itemsize, itemsize, m, st, has_clip, lo, hi)
        for j in range(m):
            s = s + st[j] * st[j]
        i = i + m
    return s


cdef int64_t quantize_rows(const uint8_t* values, int itemsize, const int64_t* row_starts,
                           const int64_t* bo, const int64_t* out_starts, int64_t nrows,
                           int code, int block_size, int type_size, int method,
                           bint has_clip, float lo, float hi,
                           const uint8_t* imp, const int64_t* imp_starts, const int64_t* imp_k,
                           uint8_t* out, double* block_sse, float* block_maxerr,
                           int n_threads) noexcept nogil:
    """Quantize every block of every row (clamped to [lo, hi] first with ``has_clip``).
    Row r's values start at element ``row_starts[r]`` of ``values``; its blocks are the
    global blocks [bo[r], bo[r+1]) and its bytes start at ``out_starts[r]``. With ``imp``
    (float32 values at any address; NULL for none) a row r whose ``imp_starts[r]`` is not
    -1 is quantized as ggml rows of ``imp_k[r]`` elements (a multiple of ``block_size`` that
    divides the row's length: the caller checked), element j of each weighted by
    ``imp[imp_starts[r] + j]``. With ``block_sse`` (and ``block_maxerr``) each block's
    squared error and largest absolute error are stored too (decoded again from the bytes
    just written). Returns the number of blocks holding a non-finite value (their bytes are
    not written), or -1 when out of memory."""
    cdef int64_t total = bo[nrows], nchunks = (total + CHUNK - 1) // CHUNK
    cdef int64_t c, b, r, end, k, j, kr
    cdef int64_t bad = 0
    cdef int t
    cdef float* stage
    cdef float* back
    cdef float* wst
    cdef float* wptr
    cdef float sig
    cdef double s, e
    cdef float m
    cdef quant_fn qf = QUANT[code]
    cdef dequant_fn df = DEQUANT[code]
    cdef int64_t* kbase = NULL    # rows' first index into ksig
    cdef float* ksig = NULL       # each ggml row's mean square (ROW_SIGMA2 types)
    if total == 0:
        return 0
    if imp != NULL and ROW_SIGMA2[code]:
        kbase = <int64_t*>malloc(<size_t>(nrows + 1) * sizeof(int64_t))
        if kbase == NULL:
            return -1
        kbase[0] = 0
        for r in range(nrows):
            kbase[r + 1] = kbase[r]
            if imp_starts[r] >= 0:
                kbase[r + 1] += (bo[r + 1] - bo[r]) * block_size // imp_k[r]
        ksig = <float*>malloc(<size_t>(kbase[nrows] + 1) * sizeof(float))
        if ksig == NULL:
            free(kbase)
            return -1
        for kr in prange(kbase[nrows], nogil=True, schedule="static",
                         num_threads=n_threads if FLIGHTQUANT_OPENMP else 1):
            r = row_of(kbase, nrows, kr)
            while kbase[r + 1] <= kr:
                r = r + 1
            ksig[kr] = row_sumsq(values + (row_starts[r] + (kr - kbase[r]) * imp_k[r]) * itemsize,
                                 itemsize, imp_k[r], has_clip, lo, hi) / <float>imp_k[r]
    # three aligned float stages per thread: values, decoded values, importance
    cdef int nt = n_threads if FLIGHTQUANT_OPENMP else 1
    cdef float* stages = <float*>malloc(<size_t>nt * 3 * QK_MAX * sizeof(float) + 64)
    if stages == NULL:
        free(kbase)
        free(ksig)
        return -1
    cdef float* base = <float*>((<size_t>stages + 63) & ~(<size_t>63))
    for c in prange(nchunks, nogil=True, schedule="static", num_threads=nt):
        t = omp_get_thread_num()
        stage = base + <int64_t>t * 3 * QK_MAX
        back = stage + QK_MAX
        wst = stage + 2 * QK_MAX
        b = c * CHUNK
        end = b + CHUNK
        if end > total:
            end = total
        r = row_of(bo, nrows, b)
        while b < end:
            while bo[r + 1] <= b:
                r = r + 1
            k = b - bo[r]
            if not stage_block(values + (row_starts[r] + k * block_size) * itemsize, itemsize,
                               block_size, stage, has_clip, lo, hi):
                bad += 1
                b = b + 1
                continue
            wptr = NULL
            sig = 0
            if imp != NULL and imp_starts[r] >= 0:
                j = k * block_size % imp_k[r]   # the block's place in its ggml row
                memcpy(wst, imp + (imp_starts[r] + j) * 4, block_size * 4)
                wptr = wst
                if ksig != NULL:
                    sig = ksig[kbase[r] + k * block_size // imp_k[r]]
            qf(stage, out + out_starts[r] + k * type_size, method, wptr, sig)
            if block_sse != NULL:
                # the error against the input as sent (before clip), as native stats are
                df(out + out_starts[r] + k * type_size, back)
                if has_clip:
                    stage_block(values + (row_starts[r] + k * block_size) * itemsize, itemsize,
                                block_size, stage, False, lo, hi)
                s = 0.0
                m = 0.0
                for j in range(block_size):
                    e = <double>stage[j] - <double>back[j]
                    s = s + e * e
                    if fabsf(stage[j] - back[j]) > m:
                        m = fabsf(stage[j] - back[j])
                block_sse[b] = s
                block_maxerr[b] = m
            b = b + 1
    free(stages)
    free(kbase)
    free(ksig)
    return bad


cdef int dequantize_rows(const uint8_t* data, const int64_t* in_starts, const int64_t* bo,
                         const int64_t* out_starts, int64_t nrows, int code, int block_size,
                         int type_size, int itemsize, uint8_t* out,
                         int n_threads) noexcept nogil:
    """Decode every block of every row: row r's bytes start at ``in_starts[r]`` of ``data``
    (any address), its values at element ``out_starts[r]`` of ``out``, whose values are
    ``itemsize`` bytes wide (2, 4 or 8; the output is ours and aligned). 0, or -1 when out
    of memory."""
    cdef int64_t total = bo[nrows], nchunks = (total + CHUNK - 1) // CHUNK
    cdef int64_t c, b, r, end, k, j
    cdef int t
    cdef float* stage
    cdef uint8_t* dst
    cdef double d
    cdef uint16_t h
    cdef dequant_fn df = DEQUANT[code]
    if total == 0:
        return 0
    cdef int nt = n_threads if FLIGHTQUANT_OPENMP else 1
    cdef float* stages = <float*>malloc(<size_t>nt * QK_MAX * sizeof(float) + 64)
    if stages == NULL:
        return -1
    cdef float* base = <float*>((<size_t>stages + 63) & ~(<size_t>63))
    for c in prange(nchunks, nogil=True, schedule="static", num_threads=nt):
        t = omp_get_thread_num()
        stage = base + <int64_t>t * QK_MAX
        b = c * CHUNK
        end = b + CHUNK
        if end > total:
            end = total
        r = row_of(bo, nrows, b)
        while b < end:
            while bo[r + 1] <= b:
                r = r + 1
            k = b - bo[r]
            dst = out + (out_starts[r] + k * block_size) * itemsize
            if itemsize == 4:
                df(data + in_starts[r] + k * type_size, <float*>dst)
            else:
                df(data + in_starts[r] + k * type_size, stage)
                for j in range(block_size):
                    if itemsize == 8:
                        d = stage[j]
                        memcpy(dst + 8 * j, &d, 8)
                    else:
                        h = fq_fp32_to_fp16(stage[j])
                        memcpy(dst + 2 * j, &h, 2)
            b = b + 1
    free(stages)
    return 0


def quantize_blocks(const uint8_t[::1] values, int itemsize, int code, int block_size,
                    int type_size, int method, int threads, bint stats=False,
                    const float[::1] importance=None):
    """Quantize a contiguous buffer of whole blocks (one row): ``(bytes, n_bad, sse,
    maxerr)``. With ``importance`` (``k`` weights) the buffer is ggml rows of ``k``
    elements. The Python wrapper (flightquant/kernels.py) validates the arguments."""
    cdef int64_t n = values.shape[0] // itemsize
    cdef int64_t nblocks = n // block_size
    out = np.empty(nblocks * type_size, np.uint8)
    cdef uint8_t[::1] o = out
    cdef int64_t starts[1]
    cdef int64_t bo[2]
    cdef int64_t ostarts[1]
    cdef int64_t istarts[1]
    cdef int64_t ik[1]
    cdef const uint8_t* imp = NULL
    sse = np.empty(nblocks if stats else 0, np.float64)
    mx = np.empty(nblocks if stats else 0, np.float32)
    cdef double[::1] s = sse
    cdef float[::1] m = mx
    cdef int64_t bad
    starts[0] = 0
    ostarts[0] = 0
    bo[0] = 0
    bo[1] = nblocks
    istarts[0] = 0
    ik[0] = n
    if nblocks == 0:
        return out, 0, sse, mx
    if importance is not None:
        imp = <const uint8_t*>&importance[0]
        ik[0] = importance.shape[0]
    with nogil:
        bad = quantize_rows(&values[0], itemsize, starts, bo, ostarts, 1, code, block_size,
                            type_size, method, False, 0.0, 0.0, imp, istarts, ik, &o[0],
                            &s[0] if stats else NULL, &m[0] if stats else NULL, threads)
    if bad < 0:
        raise MemoryError("no memory for the ggml kernel's stages")
    return out, bad, sse, mx


def dequantize_blocks(const uint8_t[::1] data, int code, int block_size, int type_size,
                      int itemsize, int threads):
    """Decode a contiguous buffer of whole blocks (one row) into values ``itemsize`` wide."""
    cdef int64_t nblocks = data.shape[0] // type_size
    out = np.empty(nblocks * block_size * itemsize, np.uint8)
    cdef uint8_t[::1] o = out
    cdef int64_t starts[1]
    cdef int64_t bo[2]
    cdef int64_t ostarts[1]
    cdef int rc
    starts[0] = 0
    ostarts[0] = 0
    bo[0] = 0
    bo[1] = nblocks
    if nblocks == 0:
        return out
    with nogil:
        rc = dequantize_rows(&data[0], starts, bo, ostarts, 1, code, block_size, type_size,
                             itemsize, &o[0], threads)
    if rc < 0:
        raise MemoryError("no memory for the ggml kernel's stages")
    return out


def fp32_to_fp16_bits(const float[::1] x):
    """Tests: the kernels' float32 -> float16 rounding, as uint16 bit patterns."""
    out = np.empty(x.shape[0], np.uint16)
    cdef uint16_t[::1] o = out
    cdef int64_t i
    for i in range(x.shape[0]):
        o[i] = fq_fp32_to_fp16(x[i])
    return out
