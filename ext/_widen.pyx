# Widening for the jobs that read model files: a tensor's stored values (float32, bfloat16
# or float16, at any address) become float32 written straight into a batch's value buffer,
# and the same pass returns the tensor's sum of squares (the signal of its SNR). One pass
# over the tensor instead of three (widen, concatenate into the batch, sum of squares).
#
# The widening is exact and bit-identical to NumPy's ``astype(np.float32)`` (bfloat16 is
# the top half of a float32; float16 follows NumPy's npy_halfbits_to_floatbits, NaN
# payloads included). The sum of squares is defined independently of the thread count
# (flightquant.modelfiles.tensors.signal_reference is the definition in NumPy): the values
# are cut into chunks of CHUNK elements; within a chunk, eight float64 accumulators take
# the squares of the elements 8k+j in order, are added together in lane order, and the
# chunk's last n % 8 squares follow one by one; the chunks' sums are then added in order.
# Threads split the chunks, never a chunk, so any thread count gives the same bits.
#
# Loads and stores go through memcpy: source and destination may sit at any address.

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from _openmp cimport omp_get_max_threads

cdef enum:
    CHUNK = 65536  # elements per partial sum (the unit the threads share out)

#: source kinds
KIND_F32 = 0
KIND_BF16 = 1
KIND_F16 = 2


cdef inline int64_t itemsize(int kind) noexcept nogil:
    return 4 if kind == 0 else 2


cdef inline uint32_t half_bits(uint16_t h) noexcept nogil:
    """float16 bits -> float32 bits, exactly (subnormals normalised, NaN payload kept).

    Branch-free, so that loops over it vectorise: a normal value moves its exponent by
    127 - 15; infinities and NaNs get exponent 255; a subnormal (or zero) m * 2**-24 is
    computed exactly as (1 + m/1024) * 2**-14 - 2**-14."""
    cdef uint32_t em = h & 0x7fff
    cdef uint32_t sign = (<uint32_t>(h & 0x8000)) << 16
    cdef uint32_t normal = (em << 13) + 0x38000000
    cdef uint32_t special = (em << 13) + 0x70000000
    cdef uint32_t sub = (em << 13) | 0x38800000
    cdef float f
    cdef uint32_t tiny
    memcpy(&f, &sub, 4)
    f = f - <float>6.103515625e-05
    memcpy(&tiny, &f, 4)
    return sign | (tiny if em < 0x400 else (special if em >= 0x7c00 else normal))


cdef inline float load(const uint8_t* src, int kind, int64_t i) noexcept nogil:
    cdef float f
    cdef uint16_t h
    cdef uint32_t b
    if kind == 0:
        memcpy(&f, src + 4 * i, 4)
        return f
    memcpy(&h, src + 2 * i, 2)
    if kind == 1:
        b = (<uint32_t>h) << 16
    else:
        b = half_bits(h)
    memcpy(&f, &b, 4)
    return f


cdef inline void lanes(const uint8_t* src, int kind, uint8_t* dst, int64_t m,
                       double* acc) noexcept nogil:
    """The first m (a multiple of 8) values: widen, and add the square of value 8k+j to
    acc[j]. One loop per kind, so that the compiler vectorises each; the accumulators are
    locals (``dst`` is bytes, which may alias anything the compiler cannot see is local)."""
    cdef float x[8]
    cdef uint16_t h[8]
    cdef uint32_t b[8]
    cdef double a[8]
    cdef int64_t i
    cdef int j
    for j in range(8):
        a[j] = 0.0
    if kind == 0:
        for i in range(0, m, 8):
            memcpy(x, src + 4 * i, 32)
            memcpy(dst + 4 * i, x, 32)
            for j in range(8):
                a[j] = a[j] + <double>x[j] * <double>x[j]
    elif kind == 1:
        for i in range(0, m, 8):
            memcpy(h, src + 2 * i, 16)
            for j in range(8):
                b[j] = (<uint32_t>h[j]) << 16
            memcpy(x, b, 32)
            memcpy(dst + 4 * i, x, 32)
            for j in range(8):
                a[j] = a[j] + <double>x[j] * <double>x[j]
    else:
        for i in range(0, m, 8):
            memcpy(h, src + 2 * i, 16)
            for j in range(8):
                b[j] = half_bits(h[j])
            memcpy(x, b, 32)
            memcpy(dst + 4 * i, x, 32)
            for j in range(8):
                a[j] = a[j] + <double>x[j] * <double>x[j]
    for j in range(8):
        acc[j] = a[j]


cdef double widen_chunk(const uint8_t* src, int kind, uint8_t* dst, int64_t n) noexcept nogil:
    """Widen n values (src -> dst float32); their sum of squares in the defined order."""
    cdef double acc[8]
    cdef double s, d
    cdef float f
    cdef int64_t i, m = n - n % 8
    cdef int j
    lanes(src, kind, dst, m, acc)
    s = acc[0]
    for j in range(1, 8):
        s = s + acc[j]
    for i in range(m, n):
        f = load(src, kind, i)
        memcpy(dst + 4 * i, &f, 4)
        d = f
        s = s + d * d
    return s


# ---------------------------------------------------------------------------------------
# C level: pointers, sizes checked by the caller

cdef int widen_values(const uint8_t* src, int kind, uint8_t* dst, int64_t n, int n_threads,
                      double* signal) noexcept nogil:
    """Widen n values of ``kind`` at src into n float32 at dst (src == dst for float32 is
    fine: each value is loaded before it is stored); add their chunks' sums of squares,
    in order, to ``signal[0]``. Returns 0, or -1 when out of memory."""
    cdef int64_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef int64_t c, start, size = itemsize(kind)
    cdef double* parts
    cdef double total = signal[0]
    if n <= CHUNK or n_threads <= 1:
        for c in range(nchunks):
            start = c * CHUNK
            total = total + widen_chunk(src + start * size, kind, dst + start * 4,
                                        min(CHUNK, n - start))
        signal[0] = total
        return 0
    parts = <double*>malloc(nchunks * sizeof(double))
    if parts == NULL:
        return -1
    for c in prange(nchunks, num_threads=n_threads, schedule="static"):
        parts[c] = widen_chunk(src + c * CHUNK * size, kind, dst + c * CHUNK * 4,
                               min(CHUNK, n - c * CHUNK))
    for c in range(nchunks):
        total = total + parts[c]
    free(parts)
    signal[0] = total
    return 0


# ---------------------------------------------------------------------------------------
# Python level


def chunk_elements():
    """CHUNK: elements per partial sum of the signal (part of its definition)."""
    return CHUNK


def default_threads():
    """Threads a call with ``n_threads=0`` uses (OpenMP's maximum; 1 without OpenMP)."""
    return omp_get_max_threads()


def widen(const uint8_t[::1] src, int kind, uint8_t[::1] dst, int n_threads=0,
          double signal=0.0):
    """Widen the values in ``src`` (bytes of float32, bfloat16 or float16: ``kind`` 0, 1 or
    2, any address) into ``dst`` (bytes of as many float32, any address; the same memory as
    ``src`` for float32 computes the signal in place) and return their sum of squares
    (float, in the order the module header defines) added to ``signal``.

    A tensor widened in pieces of whole chunks (``chunk_elements()``), each call given the
    last one's result as ``signal``, gets the bits of one call over all of it.
    ``n_threads`` 0 means all of OpenMP's threads; the result does not depend on it."""
    cdef int64_t n
    cdef int rc
    if kind < 0 or kind > 2:
        raise ValueError(f"kind must be 0 (float32), 1 (bfloat16) or 2 (float16), got {kind}")
    if src.shape[0] % itemsize(kind):
        raise ValueError(f"{src.shape[0]} source bytes are not whole values of kind {kind}")
    n = src.shape[0] // itemsize(kind)
    if dst.shape[0] != 4 * n:
        raise ValueError(f"dst holds {dst.shape[0]} bytes; {n} float32 values need {4 * n}")
    if n == 0:
        return signal
    if n_threads < 1:
        n_threads = omp_get_max_threads()
    with nogil:
        rc = widen_values(&src[0], kind, &dst[0], n, n_threads, &signal)
    if rc != 0:
        raise MemoryError()
    return signal


# ---------------------------------------------------------------------------------------
# Narrowing: float32 -> bfloat16, rounded to nearest even (as ml_dtypes casts: a NaN
# becomes the quiet NaN 0x7fc0 with its sign), for writing dequantized tensors back.

cdef inline uint16_t bf16_bits(uint32_t b) noexcept nogil:
    """Branch-free (so that loops over it vectorise)."""
    cdef uint32_t rounded = (b + 0x7fff + ((b >> 16) & 1)) >> 16
    cdef uint32_t nan = ((b >> 16) & 0x8000) | 0x7fc0
    return <uint16_t>(nan if (b & 0x7fffffff) > 0x7f800000 else rounded)


cdef void narrow_chunk(const uint8_t* src, uint8_t* dst, int64_t n) noexcept nogil:
    cdef uint32_t b[8]
    cdef uint16_t h[8]
    cdef int64_t i, m = n - n % 8
    cdef int j
    for i in range(0, m, 8):
        memcpy(b, src + 4 * i, 32)
        for j in range(8):
            h[j] = bf16_bits(b[j])
        memcpy(dst + 2 * i, h, 16)
    for i in range(m, n):
        memcpy(b, src + 4 * i, 4)
        h[0] = bf16_bits(b[0])
        memcpy(dst + 2 * i, h, 2)


def narrow_bf16(const uint8_t[::1] src, uint8_t[::1] dst, int n_threads=0):
    """Narrow the float32 values in ``src`` (bytes, any address) to bfloat16 in ``dst``
    (bytes of as many bfloat16, any address), rounding to nearest even; bit-identical to
    ``astype(ml_dtypes.bfloat16)``. ``n_threads`` 0: all of OpenMP's threads."""
    cdef int64_t n, nchunks, c
    if src.shape[0] % 4:
        raise ValueError(f"{src.shape[0]} source bytes are not whole float32 values")
    n = src.shape[0] // 4
    if dst.shape[0] != 2 * n:
        raise ValueError(f"dst holds {dst.shape[0]} bytes; {n} bfloat16 values need {2 * n}")
    if n == 0:
        return
    if n_threads < 1:
        n_threads = omp_get_max_threads()
    nchunks = (n + CHUNK - 1) // CHUNK
    cdef const uint8_t* s = &src[0]
    cdef uint8_t* d = &dst[0]
    with nogil:
        if n_threads == 1 or nchunks == 1:
            narrow_chunk(s, d, n)
        else:
            for c in prange(nchunks, num_threads=n_threads, schedule="static"):
                narrow_chunk(s + c * CHUNK * 4, d + c * CHUNK * 2, min(CHUNK, n - c * CHUNK))
