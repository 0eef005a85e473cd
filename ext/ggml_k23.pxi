# Q2_K and Q3_K block functions (included into _ggml.pyx): 256 weights in 16 sub-blocks
# of 16, each sub-block with its own 4-bit scale and min (Q2_K) or 6-bit signed scale
# (Q3_K), those quantized against the block's fp16 super-scales.
#
# Q2_K, 84 bytes: scales[16] (low nibble scale, high nibble min), qs[64] (2-bit codes),
#   d, dmin (fp16).  x = d*sc*q - dmin*m.
# Q3_K, 110 bytes: hmask[32] (bit set = +4 on the code), qs[64] (low 2 bits),
#   scales[12] (16 six-bit scales, offset 32), d (fp16).  x = d*(sc - 32)*(q - 4).
# Element e of a block: 2-bit code in qs[32*(e//128) + e%32] at bit 2*((e%128)//32);
# Q3_K's high bit in hmask[e%32] at bit e//32.
#
# rtn follows ggml's quantize_row_q2_K_ref / quantize_row_q3_K_ref operation for
# operation in float32 (the build has no FMA contraction), so the bytes are llama.cpp's.
# mse is flightquant's search in the same format; flightquant/reference/ggml_k23.py is its
# definition (the docstring there says the steps) and these loops mirror it exactly.

from libc.math cimport INFINITY, fabsf
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t
from libc.string cimport memcmp, memcpy, memset

cdef enum:
    K23_QK = 256
    K23_NSUB = 16
    K23_Q2_SIZE = 84
    K23_Q3_SIZE = 110


# ---------------------------------------------------------------------------------------
# shared packing


cdef inline void k23_pack2(const uint8_t* L, uint8_t* qs) noexcept nogil:
    """The low 2 bits of 256 codes into 64 bytes, ggml's K-quant plane order."""
    cdef int h, li
    for h in range(2):
        for li in range(32):
            qs[32 * h + li] = ((L[128 * h + li] & 3) | ((L[128 * h + li + 32] & 3) << 2)
                               | ((L[128 * h + li + 64] & 3) << 4)
                               | ((L[128 * h + li + 96] & 3) << 6))


# ---------------------------------------------------------------------------------------
# Q2_K rtn


cdef inline float k23_q2_subblock_rtn(const float* x, uint8_t* L, float* the_min) noexcept nogil:
    """One sub-block's (scale, -min) and codes 0..3: weights |x|, weighted absolute error,
    16 grid steps each refit by weighted least squares (ggml's make_qkx2_quants with
    nmax 3, rmin -0.5, rdelta 0.1, nstep 15, use_mad)."""
    cdef float w[16]
    cdef uint8_t Laux[16]
    cdef uint8_t prev[16]
    cdef float rmin = -0.5, rdelta = <float>0.1
    cdef float mn = x[0], mx = x[0], sum_w, sum_x, iscale, scale, best, cur, diff
    cdef float sum_l, sum_l2, sum_xl, D, this_scale, this_min
    cdef int i, step, li
    for i in range(16):
        w[i] = fabsf(x[i])
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, 16):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    if mn > 0:
        mn = 0
    if mx == mn:
        memset(L, 0, 16)
        the_min[0] = -mn
        return 0
    iscale = <float>3 / (mx - mn)
    scale = <float>1 / iscale
    best = 0
    for i in range(16):
        li = fq_nearest_int(iscale * (x[i] - mn))
        li = 0 if li < 0 else (3 if li > 3 else li)
        L[i] = <uint8_t>li
        diff = fabsf(scale * li + mn - x[i])
        best = best + w[i] * diff
    memset(prev, 0xFF, 16)
    for step in range(16):
        iscale = (rmin + rdelta * step + 3) / (mx - mn)
        for i in range(16):
            li = fq_nearest_int(iscale * (x[i] - mn))
            Laux[i] = <uint8_t>(0 if li < 0 else (3 if li > 3 else li))
        # the error of a step depends on its codes alone: codes equal to the step before
        # give that step's error, which is not below the best, so skip the work
        if memcmp(Laux, prev, 16) == 0:
            continue
        memcpy(prev, Laux, 16)
        sum_l = 0
        sum_l2 = 0
        sum_xl = 0
        for i in range(16):
            li = Laux[i]
            sum_l = sum_l + w[i] * li
            sum_l2 = sum_l2 + w[i] * li * li
            sum_xl = sum_xl + w[i] * li * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = 0
                this_scale = sum_xl / sum_l2
            cur = 0
            for i in range(16):
                diff = fabsf(this_scale * Laux[i] + this_min - x[i])
                cur = cur + w[i] * diff
            if cur < best:
                memcpy(L, Laux, 16)
                best = cur
                scale = this_scale
                mn = this_min
    the_min[0] = -mn
    return scale


cdef inline void k23_q2_codes(const float* x, uint8_t* L, const uint8_t* sc, float d,
                              float dmin) noexcept nogil:
    """Codes against the stored scales (d, dmin as decoded); a sub-block whose scale is
    zero keeps the codes it has."""
    cdef int j, i, li
    cdef float dd, dm
    for j in range(K23_NSUB):
        dd = d * (sc[j] & 0xF)
        if dd == 0:
            continue
        dm = dmin * (sc[j] >> 4)
        for i in range(16):
            li = fq_nearest_int((x[16 * j + i] + dm) / dd)
            L[16 * j + i] = <uint8_t>(0 if li < 0 else (3 if li > 3 else li))


cdef inline void k23_q2_rtn(const float* x, uint8_t* y) noexcept nogil:
    cdef uint8_t L[K23_QK]
    cdef float scales[K23_NSUB]
    cdef float mins[K23_NSUB]
    cdef float max_scale = 0, max_min = 0, iscale
    cdef int j, li
    cdef uint16_t hd, hm
    cdef uint8_t* sc = y
    for j in range(K23_NSUB):
        scales[j] = k23_q2_subblock_rtn(x + 16 * j, L + 16 * j, &mins[j])
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    if max_scale > 0:
        iscale = <float>15 / max_scale
        for j in range(K23_NSUB):
            sc[j] = <uint8_t>fq_nearest_int(iscale * scales[j])
        hd = fq_fp32_to_fp16(max_scale / <float>15)
    else:
        memset(sc, 0, K23_NSUB)
        hd = 0
    if max_min > 0:
        iscale = <float>15 / max_min
        for j in range(K23_NSUB):
            li = fq_nearest_int(iscale * mins[j])
            sc[j] = sc[j] | <uint8_t>(li << 4)
        hm = fq_fp32_to_fp16(max_min / <float>15)
    else:
        hm = 0
    k23_q2_codes(x, L, sc, fq_fp16_to_fp32(hd), fq_fp16_to_fp32(hm))
    k23_pack2(L, y + 16)
    memcpy(y + 80, &hd, 2)
    memcpy(y + 82, &hm, 2)


# ---------------------------------------------------------------------------------------
# Q3_K rtn


cdef inline float k23_q3_subblock_rtn(const float* x, int8_t* L) noexcept nogil:
    """One sub-block's signed scale and codes -4..3 (stored +4): weights x*x, then up to 5
    passes that move single codes while the weighted fit improves (ggml's make_q3_quants
    with nmax 4, do_rmse)."""
    cdef float mx = 0, amax = 0, ax, iscale, w, sumlx = 0, suml2 = 0, slx, sl2
    cdef int i, li, itry, n_changed
    for i in range(16):
        ax = fabsf(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < <float>1e-15:
        memset(L, 0, 16)
        return 0
    iscale = <float>-4 / mx
    for i in range(16):
        li = fq_nearest_int(iscale * x[i])
        li = -4 if li < -4 else (3 if li > 3 else li)
        L[i] = <int8_t>li
        w = x[i] * x[i]
        sumlx = sumlx + w * x[i] * li
        suml2 = suml2 + w * li * li
    for itry in range(5):
        n_changed = 0
        for i in range(16):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * L[i]
            if slx > 0:
                sl2 = suml2 - w * L[i] * L[i]
                li = fq_nearest_int(x[i] * sl2 / slx)
                li = -4 if li < -4 else (3 if li > 3 else li)
                if li != L[i]:
                    slx = slx + w * x[i] * li
                    sl2 = sl2 + w * li * li
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = <int8_t>li
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(16):
        L[i] = L[i] + 4
    return sumlx / suml2 if suml2 > 0 else <float>0


cdef inline int k23_q3_get_scale(const uint8_t* s, int j) noexcept nogil:
    """Sub-block j's 6-bit scale (0..63, offset 32) from the 12 packed bytes."""
    cdef int lo = (s[j] & 0xF) if j < 8 else (s[j - 8] >> 4)
    return lo | (((s[8 + (j & 3)] >> (2 * (j >> 2))) & 3) << 4)


cdef inline void k23_q3_put_scales(const int* ls, uint8_t* s) noexcept nogil:
    """16 six-bit scales (0..63) into the 12 packed bytes."""
    cdef int j
    memset(s, 0, 12)
    for j in range(K23_NSUB):
        if j < 8:
            s[j] = ls[j] & 0xF
        else:
            s[j - 8] = s[j - 8] | ((ls[j] & 0xF) << 4)
        s[8 + (j & 3)] = s[8 + (j & 3)] | (((ls[j] >> 4) & 3) << (2 * (j >> 2)))


cdef inline void k23_q3_codes(const float* x, int8_t* L, const uint8_t* s,
                              float d) noexcept nogil:
    """Codes (0..7) against the stored scales; a zero sub-block scale keeps its codes."""
    cdef int j, i, li
    cdef float dd
    for j in range(K23_NSUB):
        dd = d * (k23_q3_get_scale(s, j) - 32)
        if dd == 0:
            continue
        for i in range(16):
            li = fq_nearest_int(x[16 * j + i] / dd)
            L[16 * j + i] = <int8_t>((-4 if li < -4 else (3 if li > 3 else li)) + 4)


cdef inline void k23_q3_store(const int8_t* L, uint8_t* y) noexcept nogil:
    """hmask and qs of codes 0..7 (the scales and d are written by the caller)."""
    cdef uint8_t low[K23_QK]
    cdef uint8_t hm[32]
    cdef int e, b, m
    for m in range(32):
        hm[m] = 0
    for b in range(8):
        for m in range(32):
            hm[m] = hm[m] | <uint8_t>(((L[32 * b + m] >> 2) & 1) << b)
    for e in range(K23_QK):
        low[e] = <uint8_t>(L[e] & 3)
    memcpy(y, hm, 32)
    k23_pack2(low, y + 32)


cdef inline void k23_q3_rtn(const float* x, uint8_t* y) noexcept nogil:
    cdef int8_t L[K23_QK]
    cdef float scales[K23_NSUB]
    cdef int ls[K23_NSUB]
    cdef float max_scale = 0, amax = 0, a, iscale
    cdef int j, li
    cdef uint16_t hd
    for j in range(K23_NSUB):
        scales[j] = k23_q3_subblock_rtn(x + 16 * j, L + 16 * j)
        a = fabsf(scales[j])
        if a > amax:
            amax = a
            max_scale = scales[j]
    if max_scale != 0:
        iscale = <float>-32 / max_scale
        for j in range(K23_NSUB):
            li = <int8_t>fq_nearest_int(iscale * scales[j])
            ls[j] = (-32 if li < -32 else (31 if li > 31 else li)) + 32
        hd = fq_fp32_to_fp16(<float>1 / iscale)
    else:
        memset(ls, 0, sizeof(ls))
        hd = 0
    k23_q3_put_scales(ls, y + 96)
    k23_q3_codes(x, L, y + 96, fq_fp16_to_fp32(hd))
    k23_q3_store(L, y)
    memcpy(y + 108, &hd, 2)


# ---------------------------------------------------------------------------------------
# mse (flightquant/reference/ggml_k23.py: _q2_mse, _q3_mse)

# mse with importance keeps its block only when its error is below rtn's by this factor
# (the float32 sub-block sums are exact to ~2e-6)
cdef double K23_MSE_MARGIN = 1.0 - 1.0 / 65536

cdef enum:
    K23_Q2_STEPS = 4
    K23_Q3_STEPS = 4


cdef inline int k23_clamp(int li, int lo, int hi) noexcept nogil:
    return lo if li < lo else (hi if li > hi else li)


cdef extern from *:
    """
    /* ggml's nearest_int clamped to [lo, hi], as float: plain C conditionals (integer
       min/max) so that the loops across steps and candidates vectorize. */
    static inline float k23_nintc(float v, int lo, int hi) {
        int li = fq_nearest_int(v);
        li = li < lo ? lo : li;
        li = li > hi ? hi : li;
        return (float)li;
    }
    """
    float k23_nintc(float v, int lo, int hi) noexcept nogil


cdef inline double k23_sse16(const float* x, const float* xh) noexcept nogil:
    cdef double e = 0, t
    cdef int i
    for i in range(16):
        t = <double>x[i] - <double>xh[i]
        e = e + t * t
    return e


cdef inline double k23_block_sse(const float* x, const float* xh) noexcept nogil:
    """The selection's measure of a block: each sub-block's float64 squared error summed
    over its elements in order, then the sub-blocks in order (the loop runs across
    sub-blocks, so it vectorizes; the sums are the same)."""
    cdef double e[K23_NSUB]
    cdef double t, total = 0
    cdef int i, j
    for j in range(K23_NSUB):
        e[j] = 0
    for i in range(16):
        for j in range(K23_NSUB):
            t = <double>x[16 * j + i] - <double>xh[16 * j + i]
            e[j] = e[j] + t * t
    for j in range(K23_NSUB):
        total = total + e[j]
    return total


cdef inline void k23_q2_fit(const float* x, float* s_out, float* m_out) noexcept nogil:
    """A sub-block's (scale, min) from the grid step whose least-squares refit has the
    smallest squared error (the steps are independent: loops run across them)."""
    cdef float isc[K23_Q2_STEPS]
    cdef float sxl[K23_Q2_STEPS]
    cdef float ts[K23_Q2_STEPS]
    cdef float tm[K23_Q2_STEPS]
    cdef float err[K23_Q2_STEPS]
    cdef float Lf[16 * K23_Q2_STEPS]
    # sums of small integers, exact in float32 (float keeps the loops vector-friendly)
    cdef float sl[K23_Q2_STEPS]
    cdef float sl2[K23_Q2_STEPS]
    cdef float D[K23_Q2_STEPS]
    cdef float mn = x[0], mx = x[0], rng, sum_x = 0, u, xi, diff, best, s, m, lf
    cdef int i, k
    for i in range(1, 16):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
    if mn > 0:
        mn = 0
    rng = mx - mn
    for i in range(16):
        sum_x = sum_x + x[i]
    if not rng > 0:
        s_out[0] = 0
        m_out[0] = -mn
        return
    for k in range(K23_Q2_STEPS):
        isc[k] = (<float>2.6 + <float>0.3 * k) / rng
        sl[k] = 0
        sl2[k] = 0
        sxl[k] = 0
        err[k] = 0
    for i in range(16):
        u = x[i] - mn
        xi = x[i]
        for k in range(K23_Q2_STEPS):
            lf = k23_nintc(isc[k] * u, 0, 3)
            Lf[K23_Q2_STEPS * i + k] = lf
            sl[k] = sl[k] + lf
            sl2[k] = sl2[k] + lf * lf
            sxl[k] = sxl[k] + xi * lf
    for k in range(K23_Q2_STEPS):
        D[k] = <float>16 * sl2[k] - sl[k] * sl[k]
        ts[k] = (<float>16 * sxl[k] - sum_x * sl[k]) / D[k]
        tm[k] = (sl2[k] * sum_x - sl[k] * sxl[k]) / D[k]
        if tm[k] > 0:
            ts[k] = sxl[k] / sl2[k]
            tm[k] = 0
    for i in range(16):
        xi = x[i]
        for k in range(K23_Q2_STEPS):
            diff = ts[k] * Lf[K23_Q2_STEPS * i + k] + tm[k] - xi
            err[k] = err[k] + diff * diff
    s = rng / <float>3
    m = -mn
    best = INFINITY
    for k in range(K23_Q2_STEPS):
        if D[k] > 0 and err[k] < best:
            best = err[k]
            s = ts[k]
            m = -tm[k]
    s_out[0] = s
    m_out[0] = m


cdef inline int k23_floor_to(float v, int hi) noexcept nogil:
    """floor(v) clamped to [0, hi] (NaN gives 0)."""
    if not v >= 0:
        v = 0
    if v > hi:
        v = hi
    return <int>v


cdef inline double k23_q2_eval(const float* x, const float* s, const float* m, float d,
                               float dmin, uint8_t* sc, uint8_t* L) noexcept nogil:
    """Every sub-block's (scale, min) nibbles with its codes against the stored d, dmin:
    of the four pairs around (s/d, m/dmin), codes to nearest, the one with the smallest
    float32 squared error (the first on ties). The four run side by side. Writes sc (16
    bytes) and L (256 codes); returns the sum of the sub-block errors."""
    cdef float dl[4]
    cdef float ml[4]
    cdef float inv[4]
    cdef float err[4]
    cdef int cs[4]
    cdef int cm[4]
    cdef float q[64]
    cdef const float* xs
    cdef float xi, t, lf
    cdef double total = 0
    cdef int j, i, c, fs, fm, bc
    for j in range(K23_NSUB):
        xs = x + 16 * j
        fs = k23_floor_to(s[j] / d, 15)
        fm = k23_floor_to(m[j] / dmin, 15)
        for c in range(4):
            cs[c] = fs + (c >> 1) if fs + (c >> 1) < 15 else 15
            cm[c] = fm + (c & 1) if fm + (c & 1) < 15 else 15
            dl[c] = d * <float>cs[c]
            ml[c] = dmin * <float>cm[c]
            inv[c] = <float>1 / dl[c]
            err[c] = 0
        # a candidate with dl == 0 stores code 0, but its decoded values are -ml whatever
        # the (finite) code, so the error loop needs no mask
        for i in range(16):
            xi = xs[i]
            for c in range(4):
                lf = k23_nintc((xi + ml[c]) * inv[c], 0, 3)
                q[4 * i + c] = lf
                t = xi - (dl[c] * lf - ml[c])
                err[c] = err[c] + t * t
        bc = 0
        for c in range(1, 4):
            if err[c] < err[bc]:
                bc = c
        sc[j] = <uint8_t>(cs[bc] | (cm[bc] << 4))
        for i in range(16):
            L[16 * j + i] = <uint8_t>q[4 * i + bc] if dl[bc] > 0 else 0
        total = total + <double>err[bc]
    return total


cdef inline bint k23_q2_refit(const float* x, const uint8_t* sc, const uint8_t* L,
                              uint16_t* hd, uint16_t* hm) noexcept nogil:
    """Least squares of x ~ d * scale*L - dmin * min over the block (float64), rounded
    to fp16 through float32; False when there is nothing to fit."""
    cdef int64_t saa = 0, sab = 0, sbb = 0, det
    cdef double sax = 0, sbx = 0, dd = 0, dm = 0
    cdef int e, a, b
    for e in range(K23_QK):
        a = (sc[e >> 4] & 0xF) * L[e]
        b = sc[e >> 4] >> 4
        saa = saa + a * a
        sab = sab + a * b
        sbb = sbb + b * b
        sax = sax + <double>a * <double>x[e]
        sbx = sbx + <double>b * <double>x[e]
    det = saa * sbb - sab * sab
    if det > 0:
        dd = (sax * <double>sbb - <double>sab * sbx) / <double>det
        dm = (<double>sab * sax - <double>saa * sbx) / <double>det
    if not det > 0 or dm < 0:
        dd = sax / <double>saa
        dm = 0
    if not (saa > 0 and dd > 0):
        return False
    hd[0] = fq_fp32_to_fp16(<float>dd)
    hm[0] = fq_fp32_to_fp16(<float>dm)
    return True


cdef inline void k23_q2_mse(const float* x, uint8_t* y) noexcept nogil:
    cdef float xh[K23_QK]
    cdef float s[K23_NSUB]
    cdef float m[K23_NSUB]
    cdef uint8_t sc[K23_NSUB]
    cdef uint8_t L[K23_QK]
    cdef uint8_t sc2[K23_NSUB]
    cdef uint8_t L2[K23_QK]
    cdef uint8_t cand[K23_Q2_SIZE]
    cdef float maxs = 0, maxm = 0
    cdef double e_rtn, e1, e2
    cdef uint16_t hd, hm, hd2, hm2
    cdef int j
    k23_q2_rtn(x, y)
    q2_k_dequantize_block(y, xh)
    e_rtn = k23_block_sse(x, xh)
    for j in range(K23_NSUB):
        k23_q2_fit(x + 16 * j, &s[j], &m[j])
        if s[j] > maxs:
            maxs = s[j]
        if m[j] > maxm:
            maxm = m[j]
    hd = fq_fp32_to_fp16(maxs / <float>15)
    hm = fq_fp32_to_fp16(maxm / <float>15)
    e1 = k23_q2_eval(x, s, m, fq_fp16_to_fp32(hd), fq_fp16_to_fp32(hm), sc, L)
    # (the same stored d, dmin would give the same choice again)
    if k23_q2_refit(x, sc, L, &hd2, &hm2) and (hd2 != hd or hm2 != hm):
        e2 = k23_q2_eval(x, s, m, fq_fp16_to_fp32(hd2), fq_fp16_to_fp32(hm2), sc2, L2)
        if e2 < e1:
            e1 = e2
            memcpy(sc, sc2, K23_NSUB)
            memcpy(L, L2, K23_QK)
            hd = hd2
            hm = hm2
    memcpy(cand, sc, K23_NSUB)
    k23_pack2(L, cand + 16)
    memcpy(cand + 80, &hd, 2)
    memcpy(cand + 82, &hm, 2)
    q2_k_dequantize_block(cand, xh)
    if k23_block_sse(x, xh) < e_rtn:
        memcpy(y, cand, K23_Q2_SIZE)


cdef inline float k23_q3_fit(const float* x) noexcept nogil:
    """A sub-block's signed scale from the grid step with the largest sxl**2 / sl2."""
    cdef float isc[K23_Q3_STEPS]
    cdef float sxl[K23_Q3_STEPS]
    cdef float v[K23_Q3_STEPS]
    cdef float sl2[K23_Q3_STEPS]  # exact small integers
    cdef float amax = 0, mx = 0, ax, xi, s, best, lf
    cdef int i, k
    for i in range(16):
        ax = fabsf(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if not amax > 0:
        return 0
    for k in range(K23_Q3_STEPS):
        isc[k] = -(<float>3.2 + <float>0.4 * k) / mx
        sl2[k] = 0
        sxl[k] = 0
    for i in range(16):
        xi = x[i]
        for k in range(K23_Q3_STEPS):
            lf = k23_nintc(isc[k] * xi, -4, 3)
            sl2[k] = sl2[k] + lf * lf
            sxl[k] = sxl[k] + xi * lf
    for k in range(K23_Q3_STEPS):
        v[k] = sxl[k] * sxl[k] / sl2[k]
    s = mx / <float>-4
    best = -1
    for k in range(K23_Q3_STEPS):
        if v[k] > best:
            best = v[k]
            s = sxl[k] / sl2[k]
    return s


cdef inline double k23_q3_eval(const float* x, const float* s, float d, int* ls,
                               int8_t* L) noexcept nogil:
    """Every sub-block's 6-bit scale with its codes against the stored d: of floor(s/d)
    - 1 .. + 2, codes to nearest, the one with the smallest float32 squared error (the
    first on ties), the four side by side. Writes ls (scale - 32) and L (codes 0..7);
    returns the sum of the sub-block errors."""
    cdef float dl[4]
    cdef float inv[4]
    cdef float err[4]
    cdef int ks[4]
    cdef float q[64]
    cdef const float* xs
    cdef float r, xi, t, lf
    cdef double total = 0
    cdef int j, i, c, f, bc
    for j in range(K23_NSUB):
        xs = x + 16 * j
        r = s[j] / d
        if not r >= -32:
            r = -32
        if r > 31:
            r = 31
        f = <int>r  # floor of r in [-32, 31]
        if <float>f > r:
            f = f - 1
        for c in range(4):
            ks[c] = k23_clamp(f - 1 + c, -32, 31)
            dl[c] = d * <float>ks[c]
            inv[c] = <float>1 / dl[c]
            err[c] = 0
        # dl == 0 stores code 4 (zero), but decodes to +-0 whatever the code: no mask here
        for i in range(16):
            xi = xs[i]
            for c in range(4):
                lf = k23_nintc(xi * inv[c], -4, 3)
                q[4 * i + c] = lf
                t = xi - dl[c] * lf
                err[c] = err[c] + t * t
        bc = 0
        for c in range(1, 4):
            if err[c] < err[bc]:
                bc = c
        ls[j] = ks[bc]
        for i in range(16):
            L[16 * j + i] = <int8_t>(<int>q[4 * i + bc] + 4) if dl[bc] != 0 else 4
        total = total + <double>err[bc]
    return total


cdef inline void k23_q3_mse(const float* x, uint8_t* y) noexcept nogil:
    cdef float xh[K23_QK]
    cdef float s[K23_NSUB]
    cdef int ls[K23_NSUB]
    cdef int ls2[K23_NSUB]
    cdef int8_t L[K23_QK]
    cdef int8_t L2[K23_QK]
    cdef uint8_t cand[K23_Q3_SIZE]
    cdef float amax = 0, smax = 0, a
    cdef double e_rtn, e1, e2, sax = 0
    cdef int64_t saa = 0
    cdef uint16_t hd, hd2
    cdef int j, e, c
    k23_q3_rtn(x, y)
    q3_k_dequantize_block(y, xh)
    e_rtn = k23_block_sse(x, xh)
    for j in range(K23_NSUB):
        s[j] = k23_q3_fit(x + 16 * j)
        a = fabsf(s[j])
        if a > amax:
            amax = a
            smax = s[j]
    if smax == 0:
        return
    hd = fq_fp32_to_fp16(smax / <float>-32)
    e1 = k23_q3_eval(x, s, fq_fp16_to_fp32(hd), ls, L)
    for e in range(K23_QK):
        c = ls[e >> 4] * (L[e] - 4)
        saa = saa + c * c
        sax = sax + <double>c * <double>x[e]
    if saa > 0:
        hd2 = fq_fp32_to_fp16(<float>(sax / <double>saa))
    # the same stored d would give the same choice again
    if saa > 0 and hd2 != hd:
        e2 = k23_q3_eval(x, s, fq_fp16_to_fp32(hd2), ls2, L2)
        if e2 < e1:
            e1 = e2
            memcpy(ls, ls2, sizeof(ls))
            memcpy(L, L2, K23_QK)
            hd = hd2
    for j in range(K23_NSUB):
        ls[j] = ls[j] + 32
    k23_q3_put_scales(ls, cand + 96)
    k23_q3_store(L, cand)
    memcpy(cand + 108, &hd, 2)
    q3_k_dequantize_block(cand, xh)
    if k23_block_sse(x, xh) < e_rtn:
        memcpy(y, cand, K23_Q3_SIZE)


# ---------------------------------------------------------------------------------------
# importance: ggml's quantize_row_q{2,3}_K_impl (rtn) and the weighted search (mse); the
# helpers (kq_*) are in ggml_k456.pxi


cdef inline void k23_transpose(const float* x, float* xt) noexcept nogil:
    """xt[16*i + j] = x[16*j + i]: sub-blocks side by side (the lanes' layout)."""
    cdef int i, j
    for i in range(16):
        for j in range(K23_NSUB):
            xt[16 * i + j] = x[16 * j + i]


cdef inline void k23_q2_imp(const float* x, uint8_t* y, int method, const float* qw) noexcept nogil:
    cdef float w[K23_QK]
    cdef float xt[K23_QK]
    cdef float wt[K23_QK]
    cdef float qt[K23_QK]
    cdef float sw[K23_NSUB]
    cdef float scales[K23_NSUB]
    cdef float mins[K23_NSUB]
    cdef float l_isc[K23_NSUB]
    cdef float l_mn[K23_NSUB]
    cdef float dummy[K23_NSUB]
    cdef uint8_t L[K23_QK]
    cdef uint8_t Ls[K23_NSUB]
    cdef uint8_t Lm[K23_NSUB]
    cdef int sc[K23_NSUB]
    cdef int m[K23_NSUB]
    cdef float dm, mm
    cdef double e0, e1
    cdef uint16_t hd, hm
    cdef int i, j
    kq_weights(x, qw, 1, 16, w, sw)
    k23_transpose(x, xt)
    k23_transpose(w, wt)
    if k45_lanes(xt, wt, 16, 16, 3, <float>-0.9, <float>0.05, 36, scales, mins, l_isc, l_mn,
                 NULL, dummy, dummy):
        # the search's codes (inside the lanes' range, where nearest_int is exact)
        for j in range(K23_NSUB):
            for i in range(16):
                L[16 * j + i] = <uint8_t>k23_clamp(
                    fq_nearest_int(l_isc[j] * (x[16 * j + i] - l_mn[j])), 0, 3)
    else:
        for j in range(K23_NSUB):
            scales[j] = kq_qkx3(16, 3, x + 16 * j, w + 16 * j, L + 16 * j, &mins[j],
                                <float>-0.9, <float>0.05, 36)
    hd = fq_fp32_to_fp16(kq_qp(K23_NSUB, 15, scales, Ls, sw))
    hm = fq_fp32_to_fp16(kq_qp(K23_NSUB, 15, mins, Lm, sw))
    dm = fq_fp16_to_fp32(hd)
    mm = fq_fp16_to_fp32(hm)
    for j in range(K23_NSUB):
        y[j] = <uint8_t>(Ls[j] | (Lm[j] << 4))
    k23_q2_codes(x, L, y, dm, mm)
    k23_pack2(L, y + 16)
    memcpy(y + 80, &hd, 2)
    memcpy(y + 82, &hm, 2)
    if method != METHOD_MSE:
        return
    for j in range(K23_NSUB):
        sc[j] = y[j] & 0xF
        m[j] = y[j] >> 4
    k23_transpose(qw, wt)
    e0 = kq_eval(xt, wt, K23_NSUB, 16, 0, 3, dm, mm, sc, m, qt)
    e1 = kq_search(xt, wt, K23_NSUB, 16, 0, 3, 0, 15, 15, &dm, &mm, sc, m, qt)
    if e1 < e0 * K23_MSE_MARGIN:
        for j in range(K23_NSUB):
            y[j] = <uint8_t>(sc[j] | (m[j] << 4))
            for i in range(16):
                L[16 * j + i] = <uint8_t>qt[16 * i + j]
        k23_pack2(L, y + 16)
        hd = fq_fp32_to_fp16(dm)
        hm = fq_fp32_to_fp16(mm)
        memcpy(y + 80, &hd, 2)
        memcpy(y + 82, &hm, 2)


cdef inline void k23_q3_imp(const float* x, uint8_t* y, int method, const float* qw) noexcept nogil:
    cdef float w[K23_QK]
    cdef float xt[K23_QK]
    cdef float wt[K23_QK]
    cdef float qt[K23_QK]
    cdef float sw[K23_NSUB]
    cdef float scales[K23_NSUB]
    cdef float l_isc[K23_NSUB]
    cdef int8_t L[K23_QK]
    cdef int8_t Ls[K23_NSUB]
    cdef int ls[K23_NSUB]
    cdef float d
    cdef double e0, e1
    cdef uint16_t hd
    cdef int i, j
    kq_weights(x, qw, 2, 16, w, sw)
    k23_transpose(x, xt)
    k23_transpose(w, wt)
    kq_qx_lanes(xt, wt, 4, scales, l_isc)
    for j in range(K23_NSUB):
        for i in range(16):
            if l_isc[j] == 0:
                L[16 * j + i] = 0  # ggml's all-zero sub-block
            else:
                L[16 * j + i] = <int8_t>(k23_clamp(fq_nearest_int(l_isc[j] * x[16 * j + i]),
                                                   -4, 3) + 4)
    hd = fq_fp32_to_fp16(kq_qx(K23_NSUB, 32, scales, Ls, sw))
    for j in range(K23_NSUB):
        ls[j] = Ls[j]
    k23_q3_put_scales(ls, y + 96)
    d = fq_fp16_to_fp32(hd)
    k23_q3_codes(x, L, y + 96, d)
    k23_q3_store(L, y)
    memcpy(y + 108, &hd, 2)
    if method != METHOD_MSE:
        return
    for j in range(K23_NSUB):
        ls[j] = k23_q3_get_scale(y + 96, j) - 32
    k23_transpose(qw, wt)
    e0 = kq_eval(xt, wt, K23_NSUB, 16, -4, 3, d, 0, ls, NULL, qt)
    e1 = kq_search(xt, wt, K23_NSUB, 16, -4, 3, -32, 31, 0, &d, NULL, ls, NULL, qt)
    if e1 < e0 * K23_MSE_MARGIN:
        for j in range(K23_NSUB):
            ls[j] = ls[j] + 32
            for i in range(16):
                L[16 * j + i] = <int8_t>(<int>qt[16 * i + j] + 4)
        k23_q3_put_scales(ls, y + 96)
        k23_q3_store(L, y)
        hd = fq_fp32_to_fp16(d)
        memcpy(y + 108, &hd, 2)


# ---------------------------------------------------------------------------------------
# block functions (the driver's contract)


cdef int q2_k_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    if qw != NULL:
        k23_q2_imp(x, y, method, qw)
    elif method == METHOD_MSE:
        k23_q2_mse(x, y)
    else:
        k23_q2_rtn(x, y)
    return 0


cdef void q2_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    cdef uint8_t qs[64]
    cdef float dl[K23_NSUB]
    cdef float ml[K23_NSUB]
    cdef float d = fq_load_f16(y + 80), dmin = fq_load_f16(y + 82)
    cdef int j, h, p, li
    memcpy(qs, y + 16, 64)
    for j in range(K23_NSUB):
        dl[j] = d * <float>(y[j] & 0xF)
        ml[j] = dmin * <float>(y[j] >> 4)
    # element 128h + 32p + i: bits 2p of qs[32h + i], sub-block 8h + 2p + i // 16
    for h in range(2):
        for p in range(4):
            for li in range(32):
                x[128 * h + 32 * p + li] = (dl[8 * h + 2 * p + (li >> 4)]
                                            * <float>((qs[32 * h + li] >> (2 * p)) & 3)
                                            - ml[8 * h + 2 * p + (li >> 4)])


cdef int q3_k_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    if qw != NULL:
        k23_q3_imp(x, y, method, qw)
    elif method == METHOD_MSE:
        k23_q3_mse(x, y)
    else:
        k23_q3_rtn(x, y)
    return 0


cdef void q3_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    cdef uint8_t hm[32]
    cdef uint8_t qs[64]
    cdef float dl[K23_NSUB]
    cdef float d = fq_load_f16(y + 108)
    cdef int j, h, p, li
    memcpy(hm, y, 32)
    memcpy(qs, y + 32, 64)
    for j in range(K23_NSUB):
        dl[j] = d * <float>(k23_q3_get_scale(y + 96, j) - 32)
    # element 128h + 32p + i: low bits 2p of qs[32h + i], high bit 4h + p of hm[i]
    for h in range(2):
        for p in range(4):
            for li in range(32):
                x[128 * h + 32 * p + li] = dl[8 * h + 2 * p + (li >> 4)] * <float>(
                    ((qs[32 * h + li] >> (2 * p)) & 3) + 4 * ((hm[li] >> (4 * h + p)) & 1) - 4)
