# Quantization kernels: thin, nogil, OpenMP over blocks of groups.
#
# The arithmetic is a line-by-line port of flightquant/reference.py (read its module
# docstring for the formulas); outputs must match it bit for bit for float32 input at any
# thread count. Rules that keep it so:
#   * float32 where the reference uses float32, float64 where it uses float64; every float
#     constant that meets a float32 value is cast to float first (a bare C literal is double);
#   * x / scale is a division, never a multiplication by an inverse;
#   * float64 sums run strictly in index order (the reference uses np.add.accumulate);
#   * round half to even by the magic-constant trick on clamped values (rint may be a libm
#     call on baseline SSE2, the trick vectorizes);
#   * the build passes -ffp-contract=off: no FMA contraction.
#
# The Python wrapper (flightquant/kernels.py) validates everything and allocates outputs;
# nothing here allocates a Python object, raises or prints. Non-finite input is reported as
# a count of bad blocks; the wrapper finds the exact element with NumPy.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport fabs, fabsf, rint
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from _openmp cimport FLIGHTQUANT_OPENMP, omp_get_max_threads, omp_get_thread_num

cdef extern from *:
    """
    #include <math.h>
    /* compile-time constants (a Cython module global could alias a uint8_t store and
       would be reloaded inside the vector loops) */
    #define FQ_INF_F ((float)INFINITY)
    #define FQ_MAGIC_F 12582912.0f
    #define FQ_MAGIC_I 12582912
    #define FQ_TRUE_MIN_F 1.40129846e-45f
    """
    float FQ_INF_F
    float MAGIC_F "FQ_MAGIC_F"
    int MAGIC_I "FQ_MAGIC_I"
    float TRUE_MIN_F "FQ_TRUE_MIN_F"

cdef enum:
    SCHEME_ASYMMETRIC = 0
    SCHEME_SYMMETRIC = 1
    SCHEME_TERNARY = 2
    METHOD_RTN = 0
    METHOD_MSE = 1
    CHUNK = 4096        # codes per stack scratch chunk (a multiple of 8)
    LANES = 32          # independent min/max accumulators (a vectorizable inner loop)
    MSE_STEPS = 21
    HINT_STRIDE = 8     # int64 slots per thread's row hint (one cache line apart)

# MAGIC_F = 1.5 * 2**23: (v + M) - M rounds half to even for |v| < 2**22.
# TRUE_MIN_F: smallest positive float32 (subnormal), the floor of a non-degenerate scale.


cdef struct GroupQ:
    float base          # subtracted before the division: min (asymmetric) or 0
    float scale
    float zp            # x_hat = (q - zp) * scale; zp = offset for symmetric/ternary


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(FLIGHTQUANT_OPENMP)


def max_threads():
    """omp_get_max_threads() (1 without OpenMP)."""
    return omp_get_max_threads()


# ---------------------------------------------------------------------------------------
# small helpers

cdef inline float clampf(float v, float lo, float hi) noexcept nogil:
    v = lo if v < lo else v
    return hi if v > hi else v


cdef inline float round_f(float v) noexcept nogil:
    return (v + MAGIC_F) - MAGIC_F


cdef inline int64_t find_row(const int64_t* bo, int64_t nrows, int64_t blk,
                             int64_t* hint) noexcept nogil:
    """The row r with bo[r] <= blk < bo[r+1] (rows without blocks are skipped).

    ``hint`` is this thread's last row: with a static schedule a thread's blocks come in
    increasing order, so the row is nearly always the hint or a few rows after it; a
    binary search over block_offsets is the fallback.
    """
    cdef int64_t lo = hint[0], hi, mid, steps
    if 0 <= lo < nrows and bo[lo] <= blk:
        for steps in range(8):
            if blk < bo[lo + 1]:
                hint[0] = lo
                return lo
            lo += 1
            if lo >= nrows:
                break
    lo = 0
    hi = nrows
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if bo[mid] <= blk:
            lo = mid
        else:
            hi = mid
    hint[0] = lo
    return lo


# ---------------------------------------------------------------------------------------
# pass 1: min / max of the (clamped) group and the non-finite check, in one read

cdef inline bint scan_group(const floating* x, int64_t n, const Params* p,
                            float* pmn, float* pmx) noexcept nogil:
    """min and max of the clamped group; returns True when a value is not finite.

    LANES independent accumulators per quantity: a single float min reduction does not
    vectorize without -ffast-math, but the inner loop over lanes has no dependence between
    iterations, so gcc vectorizes it (32 lanes keep it from being fully unrolled first).
    ``nf`` accumulates x - x, which is 0 for finite x and NaN otherwise.
    """
    cdef float mn[LANES]
    cdef float mx[LANES]
    cdef float nf[LANES]
    cdef float w, z, lo = p.lo, hi = p.hi
    cdef int64_t i, j, h, nl = n - n % LANES
    if n >= LANES:          # the first LANES elements seed the lanes
        for j in range(LANES):
            w = <float>x[j]
            nf[j] = w - w
            w = lo if w < lo else w
            w = hi if w > hi else w
            mn[j] = w
            mx[j] = w
    else:
        w = <float>x[0]
        z = w - w           # not a literal 0: gcc would turn that into a slow `rep stos`
        w = clampf(w, lo, hi)
        for j in range(LANES):
            mn[j] = w
            mx[j] = w
            nf[j] = z
    if p.has_clip:
        for i in range(LANES, nl, 32):
            for j in range(LANES):
                w = <float>x[i + j]
                nf[j] = nf[j] + (w - w)
                w = lo if w < lo else w
                w = hi if w > hi else w
                mn[j] = w if w < mn[j] else mn[j]
                mx[j] = w if w > mx[j] else mx[j]
    else:
        for i in range(LANES, nl, 32):
            for j in range(LANES):
                w = <float>x[i + j]
                nf[j] = nf[j] + (w - w)
                mn[j] = w if w < mn[j] else mn[j]
                mx[j] = w if w > mx[j] else mx[j]
    for i in range(nl, n):
        w = <float>x[i]
        nf[0] = nf[0] + (w - w)
        w = clampf(w, lo, hi)
        mn[0] = w if w < mn[0] else mn[0]
        mx[0] = w if w > mx[0] else mx[0]
    # halve the lanes (a loop with a variable trip count, so it vectorizes too)
    h = LANES // 2
    while h >= 4:
        for j in range(h):
            mn[j] = mn[j + h] if mn[j + h] < mn[j] else mn[j]
            mx[j] = mx[j + h] if mx[j + h] > mx[j] else mx[j]
            nf[j] = nf[j] + nf[j + h]
        h = h // 2
    for j in range(1, h * 2):
        mn[0] = mn[j] if mn[j] < mn[0] else mn[0]
        mx[0] = mx[j] if mx[j] > mx[0] else mx[0]
        nf[0] = nf[0] + nf[j]
    # `+ 0.0` turns a -0.0 minimum into +0.0 (the reference does the same): of tied
    # minima +0.0 / -0.0, NumPy's min picks by SIMD lane, which no portable loop can
    # reproduce, and the sign would reach the zero point
    pmn[0] = mn[0] + <float>0.0
    pmx[0] = mx[0]
    return nf[0] != 0


cdef inline double abs_seqsum(const floating* x, int64_t n, const Params* p) noexcept nogil:
    """Sequential float64 sum of |clamped x| in index order (ternary's absmean)."""
    cdef double s = 0.0
    cdef int64_t i
    for i in range(n):
        s += <double>fabsf(clampf(<float>x[i], p.lo, p.hi))
    return s


# ---------------------------------------------------------------------------------------
# rtn parameters of one group

cdef inline GroupQ rtn_params(const floating* x, int64_t n, const Params* p,
                              float mn, float mx) noexcept nogil:
    cdef GroupQ g
    cdef float scale, amax
    if p.scheme == SCHEME_ASYMMETRIC:
        if mn == mx:
            scale = fabsf(mn)
        else:
            scale = <float>((<double>mx - <double>mn) / <double>p.qmax)
            scale = TRUE_MIN_F if scale < TRUE_MIN_F else scale
        g.base = mn
        g.scale = scale
        g.zp = (-mn) / scale if scale > 0 else <float>0.0
    elif p.scheme == SCHEME_SYMMETRIC:
        if mn == mx:
            scale = fabsf(mn)
        else:
            amax = fabsf(mn)
            amax = fabsf(mx) if fabsf(mx) > amax else amax   # max|x| == max(|min|, |max|)
            scale = amax / p.qmax
            scale = TRUE_MIN_F if scale < TRUE_MIN_F else scale
        g.base = 0
        g.scale = scale
        g.zp = p.offset
    else:
        g.base = 0
        g.scale = <float>(abs_seqsum(x, n, p) / <double>n)
        g.zp = p.offset
    return g


# ---------------------------------------------------------------------------------------
# pass 2: codes (and, with stats, the error against the unclamped input)

cdef inline void write_codes(const floating* x, int64_t m, const Params* p, GroupQ g,
                             uint8_t* q) noexcept nogil:
    """q[i] = rint(clamp((clamp(x[i]) - base) / scale, qmin, qmax)) + offset."""
    cdef int64_t i
    cdef float v, lo = p.lo, hi = p.hi, base = g.base, scale = g.scale
    cdef float qmin = p.qmin, qmax = p.qmax
    # v + MAGIC_F is exactly the float 12582912 + rint(v) (|v| < 2**22), so its integer
    # conversion minus 12582912 is rint(v): one int subtraction also adds the offset.
    cdef int ioff = MAGIC_I - <int>p.offset
    if not scale > 0:       # zero scale (all-zero group): every code is the offset
        memset(q, <int>p.offset, m)
        return
    if p.has_clip:
        for i in range(m):
            v = <float>x[i]
            v = lo if v < lo else v
            v = hi if v > hi else v
            v = (v - base) / scale
            v = qmin if v < qmin else v
            v = qmax if v > qmax else v
            q[i] = <uint8_t>(<int>(v + MAGIC_F) - ioff)
    else:
        for i in range(m):
            v = (<float>x[i] - base) / scale
            v = qmin if v < qmin else v
            v = qmax if v > qmax else v
            q[i] = <uint8_t>(<int>(v + MAGIC_F) - ioff)


cdef inline void write_codes_stats(const floating* x, int64_t m, const Params* p, GroupQ g,
                                   uint8_t* q, double* sse, double* maxerr) noexcept nogil:
    """write_codes plus the sequential SSE / max |error| against the unclamped input."""
    cdef int64_t i
    cdef float v, xo, xh
    cdef double d, s = sse[0], me = maxerr[0]
    cdef bint zero = not g.scale > 0
    for i in range(m):
        xo = <float>x[i]
        if zero:
            v = p.offset
        else:
            v = (clampf(xo, p.lo, p.hi) - g.base) / g.scale
            v = clampf(v, p.qmin, p.qmax)
            v = round_f(v) + p.offset
        q[i] = <uint8_t><int>v
        xh = (<float>q[i] - g.zp) * g.scale
        d = <double>xh - <double>xo
        s += d * d
        d = fabs(d)
        me = d if d > me else me
    sse[0] = s
    maxerr[0] = me


cdef inline double group_sse(const floating* x, int64_t n, const Params* p,
                             float base, float scale, float zp, float qmin, float qmax,
                             float off) noexcept nogil:
    """Reference _sse(x, _reconstruct(q, ...)) of a candidate, against the clamped x."""
    cdef int64_t i
    cdef float xc, v, xh
    cdef double d, s = 0.0
    for i in range(n):
        xc = clampf(<float>x[i], p.lo, p.hi)
        if scale > 0:
            v = clampf((xc - base) / scale, qmin, qmax)
            v = <float><uint8_t><int>(round_f(v) + off)
        else:
            v = off
        xh = (v - zp) * scale
        d = <double>xh - <double>xc
        s += d * d
    return s


# ---------------------------------------------------------------------------------------
# method="mse": reference._mse_group, step by step (float64, sequential sums)

cdef GroupQ mse_search(const floating* x, int64_t n, const Params* p, GroupQ g0,
                       float mn, float mx) noexcept nogil:
    cdef GroupQ best = g0
    cdef double best_err, err, iscale, rng, sum_x, sl, sl2, sxl, xd, l, D, s, m
    cdef double qmaxd = p.qmax, qmind = p.qmin, nd = <double>n
    cdef float sc, mc, zp
    cdef int64_t i
    cdef int k
    best_err = group_sse(x, n, p, g0.base, g0.scale, g0.zp, p.qmin, p.qmax, p.offset)
    if best_err == 0.0 or not g0.scale > 0:
        return best
    if p.scheme == SCHEME_ASYMMETRIC:
        rng = <double>mx - <double>mn
        sum_x = <double>clampf(<float>x[0], p.lo, p.hi)
        for i in range(1, n):
            sum_x = sum_x + <double>clampf(<float>x[i], p.lo, p.hi)
        for k in range(MSE_STEPS):
            iscale = ((qmaxd + -1.0) + 0.1 * k) / rng
            sl = 0.0
            sl2 = 0.0
            sxl = 0.0
            for i in range(n):
                xd = <double>clampf(<float>x[i], p.lo, p.hi)
                l = iscale * (xd - <double>mn)
                l = 0.0 if l < 0.0 else l
                l = qmaxd if l > qmaxd else l
                l = rint(l)
                if i == 0:
                    sl = l
                    sl2 = l * l
                    sxl = xd * l
                else:
                    sl = sl + l
                    sl2 = sl2 + l * l
                    sxl = sxl + xd * l
            D = nd * sl2 - sl * sl
            if not D > 0:
                continue
            s = (nd * sxl - sl * sum_x) / D
            m = (sl2 * sum_x - sl * sxl) / D
            sc = <float>s
            if not sc > 0:
                continue
            mc = <float>m
            zp = (-mc) / sc
            err = group_sse(x, n, p, mc, sc, zp, 0, p.qmax, 0)
            if err < best_err:
                best_err = err
                best.base = mc
                best.scale = sc
                best.zp = zp
    else:
        for k in range(MSE_STEPS):
            iscale = (0.5 + 0.05 * k) / <double>g0.scale
            sl2 = 0.0
            sxl = 0.0
            for i in range(n):
                xd = <double>clampf(<float>x[i], p.lo, p.hi)
                l = iscale * xd
                l = qmind if l < qmind else l
                l = qmaxd if l > qmaxd else l
                l = rint(l)
                if i == 0:
                    sl2 = l * l
                    sxl = xd * l
                else:
                    sl2 = sl2 + l * l
                    sxl = sxl + xd * l
            if not sl2 > 0:
                continue
            sc = <float>(sxl / sl2)
            if not sc > 0:
                continue
            err = group_sse(x, n, p, 0, sc, p.offset, p.qmin, p.qmax, p.offset)
            if err < best_err:
                best_err = err
                best.scale = sc
    return best


# ---------------------------------------------------------------------------------------
# one block: up to groups_per_block consecutive groups of one row, starting on a byte

cdef inline void pack_codes(const uint8_t* q, int64_t m, int bits, uint8_t* out) noexcept nogil:
    """Pack m codes LSB-first into ceil(m*bits/8) bytes (padding bits zero)."""
    cdef int64_t j, nb
    cdef int t
    cdef uint8_t b
    if bits == 4:
        nb = m // 2
        for j in range(nb):
            out[j] = <uint8_t>(q[2 * j] | (q[2 * j + 1] << 4))
        if m & 1:
            out[nb] = q[m - 1]
    elif bits == 2:
        nb = m // 4
        for j in range(nb):
            out[j] = <uint8_t>(q[4 * j] | (q[4 * j + 1] << 2) | (q[4 * j + 2] << 4)
                               | (q[4 * j + 3] << 6))
        if m & 3:
            b = 0
            for t in range(<int>(m & 3)):
                b = <uint8_t>(b | (q[4 * nb + t] << (2 * t)))
            out[nb] = b
    else:
        memcpy(out, q, m)


cdef int quant_block(const floating* values, const int64_t* row_starts,
                     const int64_t* row_lens, const int64_t* go, const int64_t* co,
                     const int64_t* bo, int64_t nrows, int64_t blk, int64_t* hint,
                     const Params* p, uint8_t* codes, float* scales, float* zps,
                     double* gsse, double* gmax, floating* stage) noexcept nogil:
    """Quantize one block; returns 1 when it holds a non-finite value (outputs then junk).

    ``stage`` is NULL for aligned input. For input at an address that is not a multiple
    of the item size (Arrow buffers received over Flight), it is this thread's aligned
    scratch of at least one group: each group is copied there (from L1-sized memory, in
    parallel) and read from there, so no misaligned element is ever dereferenced.
    """
    cdef uint8_t qbuf[CHUNK]
    cdef int64_t r, n, ngr, gi0, gi1, gi, gstart, glen, e0, done, m, fill, per_byte
    cdef int64_t gs = p.group_size
    cdef const floating* xg
    cdef uint8_t* out
    cdef float mn, mx
    cdef double sse, maxerr
    cdef GroupQ g
    r = find_row(bo, nrows, blk, hint)
    n = row_lens[r]
    ngr = (n + gs - 1) // gs
    gi0 = (blk - bo[r]) * p.groups_per_block
    gi1 = gi0 + p.groups_per_block
    gi1 = ngr if gi1 > ngr else gi1
    e0 = gi0 * gs
    out = codes + co[r] + (e0 * p.bits) // 8       # a block starts on a byte
    fill = 0
    for gi in range(gi0, gi1):
        gstart = gi * gs
        glen = n - gstart
        glen = gs if glen > gs else glen
        xg = values + row_starts[r] + gstart
        if stage != NULL:
            memcpy(stage, <const void*>xg, glen * sizeof(floating))
            xg = stage
        if scan_group(xg, glen, p, &mn, &mx):
            return 1
        g = rtn_params(xg, glen, p, mn, mx)
        if p.method == METHOD_MSE:
            g = mse_search(xg, glen, p, g, mn, mx)
        scales[go[r] + gi] = g.scale
        if p.scheme == SCHEME_ASYMMETRIC:
            zps[go[r] + gi] = g.zp
        sse = 0.0
        maxerr = 0.0
        if p.bits == 8:                     # codes go straight to the output bytes
            if p.stats:
                write_codes_stats(xg, glen, p, g, out + (gstart - e0), &sse, &maxerr)
            else:
                write_codes(xg, glen, p, g, out + (gstart - e0))
        else:
            done = 0
            while done < glen:
                m = CHUNK - fill
                m = glen - done if m > glen - done else m
                if p.stats:
                    write_codes_stats(xg + done, m, p, g, qbuf + fill, &sse, &maxerr)
                else:
                    write_codes(xg + done, m, p, g, qbuf + fill)
                fill += m
                done += m
                if fill == CHUNK:
                    pack_codes(qbuf, CHUNK, p.bits, out)
                    out += (CHUNK * p.bits) // 8
                    fill = 0
        if p.stats:
            gsse[go[r] + gi] = sse
            gmax[go[r] + gi] = maxerr
    if fill > 0:
        pack_codes(qbuf, fill, p.bits, out)
    return 0


cdef void set_params(Params* p, int bits, int scheme, int method, int64_t group_size,
                     int64_t groups_per_block, int qmin, int qmax, int offset,
                     bint has_clip, float clip, bint stats) noexcept nogil:
    p.bits = bits
    p.scheme = scheme
    p.method = method
    p.stats = stats
    p.has_clip = has_clip
    p.lo = -clip if has_clip else -FQ_INF_F
    p.hi = clip if has_clip else FQ_INF_F
    p.qmin = qmin
    p.qmax = qmax
    p.offset = offset
    p.group_size = group_size
    p.groups_per_block = groups_per_block


cdef int64_t quantize_run(const floating* values, const int64_t* row_starts,
                          const int64_t* row_lens, const int64_t* go, const int64_t* co,
                          const int64_t* bo, int64_t nrows, const Params* p, uint8_t* codes,
                          float* scales, float* zps, double* gsse, double* gmax,
                          int n_threads, int64_t stage_elems) noexcept nogil:
    """Every block of the layout, in parallel; the number of blocks holding a non-finite
    value, or -1 when scratch memory cannot be had."""
    cdef int64_t n_blocks = bo[nrows]
    cdef int64_t blk
    cdef int64_t bad = 0
    cdef int64_t* hints = NULL
    cdef floating* stages = NULL
    cdef int64_t stride = 0
    if n_blocks == 0:
        return 0
    hints = <int64_t*>calloc(HINT_STRIDE * n_threads, sizeof(int64_t))
    if hints == NULL:
        return -1
    if stage_elems > 0:
        stride = (stage_elems + 15) // 16 * 16      # threads' stages on separate lines
        stages = <floating*>malloc(stride * n_threads * sizeof(floating))
        if stages == NULL:
            free(hints)
            return -1
    for blk in prange(n_blocks, schedule="static", num_threads=n_threads):
        bad += quant_block(values, row_starts, row_lens, go, co, bo, nrows, blk,
                           hints + HINT_STRIDE * omp_get_thread_num(), p,
                           codes, scales, zps, gsse, gmax,
                           stages + stride * omp_get_thread_num() if stages != NULL else NULL)
    free(hints)
    free(stages)
    return bad


# the concrete float32/float64 instances other modules cimport (declared in
# ext/flightquant/_kernels.pxd, which names concrete types rather than the fused one)
cdef int64_t quantize_f32(const float* values, const int64_t* row_starts,
                          const int64_t* row_lens, const int64_t* go, const int64_t* co,
                          const int64_t* bo, int64_t nrows, const Params* p, uint8_t* codes,
                          float* scales, float* zps, double* gsse, double* gmax,
                          int n_threads, int64_t stage_elems) noexcept nogil:
    return quantize_run(values, row_starts, row_lens, go, co, bo, nrows, p, codes, scales,
                        zps, gsse, gmax, n_threads, stage_elems)


cdef int64_t quantize_f64(const double* values, const int64_t* row_starts,
                          const int64_t* row_lens, const int64_t* go, const int64_t* co,
                          const int64_t* bo, int64_t nrows, const Params* p, uint8_t* codes,
                          float* scales, float* zps, double* gsse, double* gmax,
                          int n_threads, int64_t stage_elems) noexcept nogil:
    return quantize_run(values, row_starts, row_lens, go, co, bo, nrows, p, codes, scales,
                        zps, gsse, gmax, n_threads, stage_elems)


def quantize_kernel(const floating[::1] values, const int64_t[::1] row_starts,
                    const int64_t[::1] row_lens, const int64_t[::1] group_offsets,
                    const int64_t[::1] code_offsets, const int64_t[::1] block_offsets,
                    int64_t groups_per_block, int bits, int scheme, int method,
                    int64_t group_size, int qmin, int qmax, int offset, bint has_clip,
                    float clip, uint8_t[::1] codes, float[::1] scales,
                    float[::1] zero_points, double[::1] group_sse,
                    double[::1] group_max_err, bint stats, int n_threads,
                    int64_t stage_elems=0):
    """Fill codes/scales/zero_points (and stats) for every block; return the number of
    blocks that hold a non-finite value (0 on success). Inputs are validated by the
    caller: every row lies inside ``values`` and the outputs match the layout.

    ``stage_elems > 0`` (the longest group, for misaligned ``values``) makes every thread
    read its groups through an aligned scratch of that many elements."""
    cdef Params p
    cdef int64_t nrows = row_lens.shape[0]
    cdef int64_t bad
    if block_offsets[nrows] == 0:
        return 0
    set_params(&p, bits, scheme, method, group_size, groups_per_block, qmin, qmax, offset,
               has_clip, clip, stats)
    with nogil:
        bad = quantize_run(&values[0], &row_starts[0], &row_lens[0], &group_offsets[0],
                           &code_offsets[0], &block_offsets[0], nrows, &p, &codes[0],
                           &scales[0], &zero_points[0] if zero_points.shape[0] > 0 else NULL,
                           &group_sse[0] if stats else NULL,
                           &group_max_err[0] if stats else NULL, n_threads, stage_elems)
    if bad < 0:
        raise MemoryError()
    return bad


# ---------------------------------------------------------------------------------------
# dequantize: x_hat = (q - zp) * scale in float32, stored as float32 or float64

cdef void dequant_block(const uint8_t* codes, const int64_t* row_lens, const int64_t* go,
                        const int64_t* co, const int64_t* bo, const int64_t* out_starts,
                        int64_t nrows, int64_t blk, int64_t* hint, int bits, int64_t gs,
                        int64_t gpb,
                        const float* scales, const float* zps, float offset,
                        floating* out) noexcept nogil:
    cdef int64_t r, n, ngr, gi0, gi1, gi, gstart, glen, i, j, nb, e, bit
    cdef const uint8_t* cp
    cdef floating* o
    cdef float s, z
    cdef int mask = (1 << bits) - 1
    cdef uint8_t b
    r = find_row(bo, nrows, blk, hint)
    n = row_lens[r]
    ngr = (n + gs - 1) // gs
    gi0 = (blk - bo[r]) * gpb
    gi1 = gi0 + gpb
    gi1 = ngr if gi1 > ngr else gi1
    cp = codes + co[r]
    for gi in range(gi0, gi1):
        gstart = gi * gs
        glen = n - gstart
        glen = gs if glen > gs else glen
        s = scales[go[r] + gi]
        z = zps[go[r] + gi] if zps != NULL else offset
        o = out + out_starts[r] + gstart
        bit = gstart * bits
        if bits == 8:
            for i in range(glen):
                o[i] = (<float>cp[gstart + i] - z) * s
        elif bit % 8 == 0 and bits == 4:
            e = bit // 8
            nb = glen // 2
            for j in range(nb):
                b = cp[e + j]
                o[2 * j] = (<float>(b & 15) - z) * s
                o[2 * j + 1] = (<float>(b >> 4) - z) * s
            if glen & 1:
                o[glen - 1] = (<float>(cp[e + nb] & 15) - z) * s
        elif bit % 8 == 0 and bits == 2:
            e = bit // 8
            nb = glen // 4
            for j in range(nb):
                b = cp[e + j]
                o[4 * j] = (<float>(b & 3) - z) * s
                o[4 * j + 1] = (<float>((b >> 2) & 3) - z) * s
                o[4 * j + 2] = (<float>((b >> 4) & 3) - z) * s
                o[4 * j + 3] = (<float>(b >> 6) - z) * s
            for i in range(4 * nb, glen):
                o[i] = (<float>((cp[e + nb] >> (2 * (i - 4 * nb))) & 3) - z) * s
        else:                               # a group that starts inside a byte
            for i in range(glen):
                e = bit + i * bits
                o[i] = (<float>((cp[e >> 3] >> (e & 7)) & mask) - z) * s


cdef int dequantize_run(const uint8_t* codes, const int64_t* row_lens, const int64_t* go,
                        const int64_t* co, const int64_t* bo, const int64_t* out_starts,
                        int64_t nrows, int64_t groups_per_block, int bits, int64_t group_size,
                        const float* scales, const float* zps, float offset, floating* out,
                        int n_threads) noexcept nogil:
    """Every block of the layout into ``out``, in parallel; -1 when scratch memory
    cannot be had, else 0."""
    cdef int64_t n_blocks = bo[nrows]
    cdef int64_t blk
    cdef int64_t* hints = NULL
    if n_blocks == 0:
        return 0
    hints = <int64_t*>calloc(HINT_STRIDE * n_threads, sizeof(int64_t))
    if hints == NULL:
        return -1
    for blk in prange(n_blocks, schedule="static", num_threads=n_threads):
        dequant_block(codes, row_lens, go, co, bo, out_starts, nrows, blk,
                      hints + HINT_STRIDE * omp_get_thread_num(), bits, group_size,
                      groups_per_block, scales, zps, offset, out)
    free(hints)
    return 0


cdef int dequantize_f32(const uint8_t* codes, const int64_t* row_lens, const int64_t* go,
                        const int64_t* co, const int64_t* bo, const int64_t* out_starts,
                        int64_t nrows, int64_t groups_per_block, int bits, int64_t group_size,
                        const float* scales, const float* zps, float offset, float* out,
                        int n_threads) noexcept nogil:
    return dequantize_run(codes, row_lens, go, co, bo, out_starts, nrows, groups_per_block,
                          bits, group_size, scales, zps, offset, out, n_threads)


cdef int dequantize_f64(const uint8_t* codes, const int64_t* row_lens, const int64_t* go,
                        const int64_t* co, const int64_t* bo, const int64_t* out_starts,
                        int64_t nrows, int64_t groups_per_block, int bits, int64_t group_size,
                        const float* scales, const float* zps, float offset, double* out,
                        int n_threads) noexcept nogil:
    return dequantize_run(codes, row_lens, go, co, bo, out_starts, nrows, groups_per_block,
                          bits, group_size, scales, zps, offset, out, n_threads)


def dequantize_kernel(const uint8_t[::1] codes, const int64_t[::1] row_lens,
                      const int64_t[::1] group_offsets, const int64_t[::1] code_offsets,
                      const int64_t[::1] block_offsets, const int64_t[::1] out_starts,
                      int64_t groups_per_block, int bits, int64_t group_size,
                      const float[::1] scales, const float[::1] zero_points, int offset,
                      floating[::1] out, int n_threads):
    """Reconstruct every block into ``out`` (validated by the caller)."""
    cdef int64_t nrows = row_lens.shape[0]
    cdef int status
    if block_offsets[nrows] == 0:
        return
    with nogil:
        status = dequantize_run(&codes[0], &row_lens[0], &group_offsets[0], &code_offsets[0],
                                &block_offsets[0], &out_starts[0], nrows, groups_per_block,
                                bits, group_size, &scales[0],
                                &zero_points[0] if zero_points.shape[0] > 0 else NULL,
                                <float>offset, &out[0], n_threads)
    if status < 0:
        raise MemoryError()
