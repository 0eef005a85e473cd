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

from libc.math cimport fabsf
from libc.stdint cimport int8_t, uint8_t, uint16_t
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
    cdef int h, l
    for h in range(2):
        for l in range(32):
            qs[32 * h + l] = ((L[128 * h + l] & 3) | ((L[128 * h + l + 32] & 3) << 2)
                              | ((L[128 * h + l + 64] & 3) << 4)
                              | ((L[128 * h + l + 96] & 3) << 6))


cdef inline void k23_unpack2(const uint8_t* qs, uint8_t* L) noexcept nogil:
    cdef int e
    for e in range(K23_QK):
        L[e] = (qs[32 * (e >> 7) + (e & 31)] >> (2 * ((e & 127) >> 5))) & 3


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
    cdef int i, step, l
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
        l = fq_nearest_int(iscale * (x[i] - mn))
        l = 0 if l < 0 else (3 if l > 3 else l)
        L[i] = <uint8_t>l
        diff = fabsf(scale * l + mn - x[i])
        best = best + w[i] * diff
    memset(prev, 0xFF, 16)
    for step in range(16):
        iscale = (rmin + rdelta * step + 3) / (mx - mn)
        for i in range(16):
            l = fq_nearest_int(iscale * (x[i] - mn))
            Laux[i] = <uint8_t>(0 if l < 0 else (3 if l > 3 else l))
        # the error of a step depends on its codes alone: codes equal to the step before
        # give that step's error, which is not below the best, so skip the work
        if memcmp(Laux, prev, 16) == 0:
            continue
        memcpy(prev, Laux, 16)
        sum_l = 0
        sum_l2 = 0
        sum_xl = 0
        for i in range(16):
            l = Laux[i]
            sum_l = sum_l + w[i] * l
            sum_l2 = sum_l2 + w[i] * l * l
            sum_xl = sum_xl + w[i] * l * x[i]
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
    cdef int j, i, l
    cdef float dd, dm
    for j in range(K23_NSUB):
        dd = d * (sc[j] & 0xF)
        if dd == 0:
            continue
        dm = dmin * (sc[j] >> 4)
        for i in range(16):
            l = fq_nearest_int((x[16 * j + i] + dm) / dd)
            L[16 * j + i] = <uint8_t>(0 if l < 0 else (3 if l > 3 else l))


cdef inline void k23_q2_rtn(const float* x, uint8_t* y) noexcept nogil:
    cdef uint8_t L[K23_QK]
    cdef float scales[K23_NSUB]
    cdef float mins[K23_NSUB]
    cdef float max_scale = 0, max_min = 0, iscale
    cdef int j, l
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
            l = fq_nearest_int(iscale * mins[j])
            sc[j] = sc[j] | <uint8_t>(l << 4)
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
    cdef int i, l, itry, n_changed
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
        l = fq_nearest_int(iscale * x[i])
        l = -4 if l < -4 else (3 if l > 3 else l)
        L[i] = <int8_t>l
        w = x[i] * x[i]
        sumlx = sumlx + w * x[i] * l
        suml2 = suml2 + w * l * l
    for itry in range(5):
        n_changed = 0
        for i in range(16):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * L[i]
            if slx > 0:
                sl2 = suml2 - w * L[i] * L[i]
                l = fq_nearest_int(x[i] * sl2 / slx)
                l = -4 if l < -4 else (3 if l > 3 else l)
                if l != L[i]:
                    slx = slx + w * x[i] * l
                    sl2 = sl2 + w * l * l
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = <int8_t>l
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
    cdef int j, i, l
    cdef float dd
    for j in range(K23_NSUB):
        dd = d * (k23_q3_get_scale(s, j) - 32)
        if dd == 0:
            continue
        for i in range(16):
            l = fq_nearest_int(x[16 * j + i] / dd)
            L[16 * j + i] = <int8_t>((-4 if l < -4 else (3 if l > 3 else l)) + 4)


cdef inline void k23_q3_store(const int8_t* L, uint8_t* y) noexcept nogil:
    """hmask and qs of codes 0..7 (the scales and d are written by the caller)."""
    cdef uint8_t low[K23_QK]
    cdef int e
    memset(y, 0, 32)
    for e in range(K23_QK):
        y[e & 31] = y[e & 31] | <uint8_t>((L[e] >> 2) << (e >> 5))
        low[e] = <uint8_t>(L[e] & 3)
    k23_pack2(low, y + 32)


cdef inline void k23_q3_rtn(const float* x, uint8_t* y) noexcept nogil:
    cdef int8_t L[K23_QK]
    cdef float scales[K23_NSUB]
    cdef int ls[K23_NSUB]
    cdef float max_scale = 0, amax = 0, a, iscale
    cdef int j, l
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
            l = <int8_t>fq_nearest_int(iscale * scales[j])
            ls[j] = (-32 if l < -32 else (31 if l > 31 else l)) + 32
        hd = fq_fp32_to_fp16(<float>1 / iscale)
    else:
        memset(ls, 0, sizeof(ls))
        hd = 0
    k23_q3_put_scales(ls, y + 96)
    k23_q3_codes(x, L, y + 96, fq_fp16_to_fp32(hd))
    k23_q3_store(L, y)
    memcpy(y + 108, &hd, 2)


# ---------------------------------------------------------------------------------------
# block functions (the driver's contract)


cdef int q2_k_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    k23_q2_rtn(x, y)
    return 0


cdef void q2_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    cdef uint8_t L[K23_QK]
    cdef float d = fq_load_f16(y + 80), dmin = fq_load_f16(y + 82), dl, ml
    cdef int j, i
    k23_unpack2(y + 16, L)
    for j in range(K23_NSUB):
        dl = d * <float>(y[j] & 0xF)
        ml = dmin * <float>(y[j] >> 4)
        for i in range(16):
            x[16 * j + i] = dl * <float>L[16 * j + i] - ml


cdef int q3_k_quantize_block(const float* x, uint8_t* y, int method) noexcept nogil:
    k23_q3_rtn(x, y)
    return 0


cdef void q3_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    cdef uint8_t L[K23_QK]
    cdef float d = fq_load_f16(y + 108), dl
    cdef int j, i, e
    k23_unpack2(y + 32, L)
    for j in range(K23_NSUB):
        dl = d * <float>(k23_q3_get_scale(y + 96, j) - 32)
        for i in range(16):
            e = 16 * j + i
            x[e] = dl * <float>(<int>L[e] - (0 if (y[e & 31] >> (e >> 5)) & 1 else 4))
