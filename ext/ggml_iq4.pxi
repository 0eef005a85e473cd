# ggml's non-linear 4-bit blocks IQ4_NL (32 weights) and IQ4_XS (256 weights): block
# functions for _ggml.pyx (contract in its header).
#
# The definition of every rule here is flightquant/reference/ggml_iq4.py (NumPy); this is
# the same arithmetic in C, float32 where ggml uses float, in the same order, so the bytes
# match it (and, for rtn, ggml's quantize_iq4_nl / quantize_iq4_xs) bit for bit. The
# nearest table entry (ggml's best_index_int8, a binary search) is a table lookup on
# floor(2 * v): every midpoint of the table is a multiple of 1/2.

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>

    #define IQ4_EPS 1e-15f   /* ggml's GROUP_MAX_EPS */
    #define IQ4_NTRY 7
    #define IQ4_NGRID 26
    #define IQ4_NPLAIN 12
    #define IQ4_NREFIT 2
    #define IQ4_NXS 4

    static const float IQ4_K[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                    1, 13, 25, 38, 53, 69, 89, 113};
    /* twice the midpoints of consecutive table values */
    static const int IQ4_MID2[15] = {-231, -187, -148, -114, -84, -57, -32, -9,
                                     14, 38, 63, 91, 122, 158, 202};
    /* index and value of the nearest entry for floor(2 v) = i - 256, i in 0..512 */
    static uint8_t IQ4_IDX[513];
    static float IQ4_VAL[513];
    /* mse's inverse scales c/max: with importance -175..-79 and 65..161 in steps of 8,
       without -145..-103 and 107..125 in steps of 6 */
    static float IQ4_GRID[IQ4_NGRID];
    static float IQ4_PLAIN[IQ4_NPLAIN];
    /* rtn's inverse scales (t - 127)/max, t = -7..7 */
    static float IQ4_RTN[2 * IQ4_NTRY + 1];
    /* IQ4_XS mse: super-block scales s_max * num/den */
    static const float IQ4_XS_NUM[IQ4_NXS] = {-1, 1, -2, 2};
    static const float IQ4_XS_DEN[IQ4_NXS] = {32, 31, 63, 61};

    static void iq4_init(void) {
        for (int i = 0; i <= 512; i++) {
            int n = 0;
            for (int k = 0; k < 15; k++) n += (i - 256) >= IQ4_MID2[k];
            IQ4_IDX[i] = (uint8_t)n;
            IQ4_VAL[i] = IQ4_K[n];
        }
        int g = 0;
        for (int c = -175; c <= -79; c += 8) IQ4_GRID[g++] = (float)c;
        for (int c = 65; c <= 161; c += 8) IQ4_GRID[g++] = (float)c;
        g = 0;
        for (int c = -145; c <= -103; c += 6) IQ4_PLAIN[g++] = (float)c;
        for (int c = 107; c <= 125; c += 6) IQ4_PLAIN[g++] = (float)c;
        for (int t = -IQ4_NTRY; t <= IQ4_NTRY; t++) IQ4_RTN[t + IQ4_NTRY] = (float)(t - 127);
    }

    /* the LUT slot of v: floor(2 v) + 256 clamped to 0..512 (NaN: the top, as ggml's
       binary search gives) */
    static inline int iq4_slot(float v) {
        v = 2.0f * v;
        v = v < 256.0f ? v : 256.0f;
        v = v > -256.0f ? v : -256.0f;
        int i = (int)v;
        i -= (float)i > v;
        return i + 256;
    }

    static inline float iq4_inv(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

    static inline float iq4_f16_round(float f) { return fq_fp16_to_fp32(fq_fp32_to_fp16(f)); }

    /* sum((w q) x) and sum((w q) q) in order, q the table values nearest id * x */
    static inline void iq4_fit(const float* x, const float* w, float id, float* sqx,
                               float* sq2) {
        float a = 0.0f, b = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float q = IQ4_VAL[iq4_slot(id * x[j])];
            const float wq = w[j] * q;
            a += wq * x[j];
            b += wq * q;
        }
        *sqx = a;
        *sq2 = b;
    }

    /* the fitted scale of 32 weights: first (rtn) the inverse scale 127/max, then c/max for
       the nc values c; the fit of largest sqx^2/sq2 (first of equals); 0 below IQ4_EPS */
    static float iq4_search(const float* x, const float* w, int first, const float* c,
                            int nc) {
        float amax = 0.0f, max = 0.0f, d = 0.0f, best = 0.0f, sqx, sq2;
        for (int j = 0; j < 32; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        if (amax < IQ4_EPS) return 0.0f;
        if (first) {
            iq4_fit(x, w, 1.0f / (max / 127.0f), &sqx, &sq2);
            d = sq2 > 0.0f ? sqx / sq2 : 0.0f;
            best = d * sqx;
        }
        for (int k = 0; k < nc; k++) {
            iq4_fit(x, w, c[k] / max, &sqx, &sq2);
            if (sq2 > 0.0f && sqx * sqx > best * sq2) {
                d = sqx / sq2;
                best = d * sqx;
            }
        }
        return d;
    }

    /* the codes of 32 weights for 1/dl (dl == 0: 0) */
    static inline void iq4_codes(const float* x, float dl, uint8_t* L) {
        const float id = iq4_inv(dl);
        for (int j = 0; j < 32; j++) L[j] = IQ4_IDX[iq4_slot(id * x[j])];
    }

    /* float64 sum in order of e (x - dl*K[L])^2 */
    static inline double iq4_err(const float* x, const float* e, float dl, const uint8_t* L) {
        double s = 0.0;
        for (int j = 0; j < 32; j++) {
            const double df = (double)x[j] - (double)(dl * IQ4_K[L[j]]);
            s += (double)e[j] * (df * df);
        }
        return s;
    }

    /* iq4_codes then iq4_err, in one pass */
    static inline double iq4_codes_err(const float* x, const float* e, float dl, uint8_t* L) {
        const float id = iq4_inv(dl);
        double s = 0.0;
        for (int j = 0; j < 32; j++) {
            const int k = iq4_slot(id * x[j]);
            L[j] = IQ4_IDX[k];
            const double df = (double)x[j] - (double)(dl * IQ4_VAL[k]);
            s += (double)e[j] * (df * df);
        }
        return s;
    }

    /* rtn's search weights: x^2, or qw sqrt(sigma2 + x^2), sigma2 = 2 mean(x^2) over n */
    static inline void iq4_rtn_weights(const float* x, const float* qw, int n, float* w) {
        if (qw == NULL) {
            for (int j = 0; j < n; j++) w[j] = x[j] * x[j];
            return;
        }
        float sigma2 = 0.0f;
        for (int j = 0; j < n; j++) sigma2 += x[j] * x[j];
        sigma2 *= 2.0f / (float)n;
        for (int j = 0; j < n; j++) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
    }

    static inline void iq4_pack(const uint8_t* L, uint8_t* qs) {
        for (int j = 0; j < 16; j++) qs[j] = (uint8_t)(L[j] | (L[j + 16] << 4));
    }

    static int iq4_nl_quant(const float* x, uint8_t* y, int method, const float* qw) {
        float w[32], ones[32];
        uint8_t L[32];
        iq4_rtn_weights(x, qw, 32, w);
        const float s = iq4_search(x, w, 1, IQ4_RTN, 2 * IQ4_NTRY + 1);
        uint16_t dh = fq_fp32_to_fp16(s);
        iq4_codes(x, s, L);
        if (method == 1) {
            const float* e = qw;
            const float* grid = IQ4_GRID;
            int ng = IQ4_NGRID;
            if (e == NULL) {
                for (int j = 0; j < 32; j++) ones[j] = 1.0f;
                e = ones;
                grid = IQ4_PLAIN;
                ng = IQ4_NPLAIN;
            }
            uint8_t Lb[32], Ln[32];
            float d = iq4_f16_round(iq4_search(x, e, 0, grid, ng));
            double err = iq4_codes_err(x, e, d, Lb);
            if (!(isfinite(d) && d != 0.0f)) err = INFINITY;
            for (int it = 0; it < IQ4_NREFIT; it++) {
                float a = 0.0f, b = 0.0f;
                for (int j = 0; j < 32; j++) {
                    const float q = IQ4_K[Lb[j]];
                    const float wq = e[j] * q;
                    a += wq * x[j];
                    b += wq * q;
                }
                const float dn = iq4_f16_round(b > 0.0f ? a / b : 0.0f);
                if (!isfinite(dn) || dn == 0.0f || dn == d) break;
                const double en = iq4_codes_err(x, e, dn, Ln);
                if (!(en < err)) break;
                d = dn;
                err = en;
                memcpy(Lb, Ln, 32);
            }
            const double er = iq4_err(x, e, fq_fp16_to_fp32(dh), L);
            if (err < er || (isnan(er) && isfinite(err))) {
                dh = fq_fp32_to_fp16(d);
                memcpy(L, Lb, 32);
            }
        }
        memcpy(y, &dh, 2);
        iq4_pack(L, y + 2);
        return 0;
    }

    /* the first sub-block scale of largest magnitude (only |s| > 0 counts; else +0) */
    static inline float iq4_max_scale(const float* s) {
        float amax = 0.0f, max = 0.0f;
        for (int ib = 0; ib < 8; ib++) {
            const float a = fabsf(s[ib]);
            if (a > amax) { amax = a; max = s[ib]; }
        }
        return max;
    }

    static inline int iq4_clamp_l(int64_t l) { return (int)(l < -32 ? -32 : (l > 31 ? 31 : l)); }

    static int iq4_xs_quant(const float* x, uint8_t* y, int method, const float* qw) {
        float w[256], s[8];
        uint8_t L[256];
        int ls[8];
        iq4_rtn_weights(x, qw, 256, w);
        for (int ib = 0; ib < 8; ib++)
            s[ib] = iq4_search(x + 32 * ib, w + 32 * ib, 1, IQ4_RTN, 2 * IQ4_NTRY + 1);
        const float d = -iq4_max_scale(s) / 32.0f;
        uint16_t dh = fq_fp32_to_fp16(d);
        const float id = iq4_inv(d);
        for (int ib = 0; ib < 8; ib++) {
            const int l = iq4_clamp_l(fq_nearest_int(id * s[ib]));
            iq4_codes(x + 32 * ib, d * (float)l, L + 32 * ib);
            ls[ib] = l;
        }
        if (method == 1) {
            const float* e = qw;
            const float* grid = IQ4_GRID;
            int ng = IQ4_NGRID;
            float ones[256];
            if (e == NULL) {
                for (int j = 0; j < 256; j++) ones[j] = 1.0f;
                e = ones;
                grid = IQ4_PLAIN;
                ng = IQ4_NPLAIN;
            }
            float sm[8];
            for (int ib = 0; ib < 8; ib++)
                sm[ib] = iq4_search(x + 32 * ib, e + 32 * ib, 0, grid, ng);
            const float smax = iq4_max_scale(sm);
            double best_err = INFINITY;
            float best_d = 0.0f;
            int best_l[8] = {0};
            uint8_t best_L[256] = {0};
            for (int f = 0; f < IQ4_NXS; f++) {
                const float D = iq4_f16_round(smax * (IQ4_XS_NUM[f] / IQ4_XS_DEN[f]));
                const float iD = iq4_inv(D);
                double tot = 0.0;
                int sub_l[8];
                uint8_t sub_L[256], Lc[32];
                for (int ib = 0; ib < 8; ib++) {
                    const int64_t l0 = fq_nearest_int(iD * sm[ib]);
                    double sub_err = INFINITY;
                    sub_l[ib] = 0;
                    memset(sub_L + 32 * ib, 0, 32);
                    for (int dlt = -1; dlt <= 1; dlt++) {
                        const int l = iq4_clamp_l(l0 + dlt);
                        const float dl = D * (float)l;
                        const double err = iq4_codes_err(x + 32 * ib, e + 32 * ib, dl, Lc);
                        if (err < sub_err) {
                            sub_err = err;
                            sub_l[ib] = l;
                            memcpy(sub_L + 32 * ib, Lc, 32);
                        }
                    }
                    tot += sub_err;
                }
                if (!(isfinite(D) && D != 0.0f)) tot = INFINITY;
                if (tot < best_err) {
                    best_err = tot;
                    best_d = D;
                    memcpy(best_l, sub_l, sizeof(sub_l));
                    memcpy(best_L, sub_L, 256);
                }
            }
            const float d16 = fq_fp16_to_fp32(dh);
            double er = 0.0;
            for (int ib = 0; ib < 8; ib++)
                er += iq4_err(x + 32 * ib, e + 32 * ib, d16 * (float)ls[ib], L + 32 * ib);
            if (best_err < er || (isnan(er) && isfinite(best_err))) {
                dh = fq_fp32_to_fp16(best_d);
                memcpy(ls, best_l, sizeof(ls));
                memcpy(L, best_L, 256);
            }
        }
        uint16_t h = 0;
        memcpy(y, &dh, 2);
        for (int ib = 0; ib < 8; ib++) h |= (uint16_t)(((ls[ib] + 32) >> 4) << (2 * ib));
        memcpy(y + 2, &h, 2);
        for (int k = 0; k < 4; k++)
            y[4 + k] = (uint8_t)(((ls[2 * k] + 32) & 15) | (((ls[2 * k + 1] + 32) & 15) << 4));
        for (int ib = 0; ib < 8; ib++) iq4_pack(L + 32 * ib, y + 8 + 16 * ib);
        return 0;
    }

    static inline void iq4_unpack(const uint8_t* qs, float dl, float* x) {
        for (int j = 0; j < 16; j++) {
            x[j] = dl * IQ4_K[qs[j] & 15];
            x[j + 16] = dl * IQ4_K[qs[j] >> 4];
        }
    }

    static void iq4_nl_dequant(const uint8_t* y, float* x) {
        iq4_unpack(y + 2, fq_load_f16(y), x);
    }

    static void iq4_xs_dequant(const uint8_t* y, float* x) {
        const float d = fq_load_f16(y);
        uint16_t h;
        memcpy(&h, y + 2, 2);
        for (int ib = 0; ib < 8; ib++) {
            const int ls = ((y[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((h >> (2 * ib)) & 3) << 4);
            iq4_unpack(y + 8 + 16 * ib, d * (float)(ls - 32), x + 32 * ib);
        }
    }
    """
    void iq4_init() noexcept nogil
    int iq4_nl_quant(const float* x, uint8_t* y, int method, const float* qw) noexcept nogil
    int iq4_xs_quant(const float* x, uint8_t* y, int method, const float* qw) noexcept nogil
    void iq4_nl_dequant(const uint8_t* y, float* x) noexcept nogil
    void iq4_xs_dequant(const uint8_t* y, float* x) noexcept nogil

iq4_init()


cdef int iq4_nl_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                               float sigma2) noexcept nogil:
    return iq4_nl_quant(x, y, method, qw)


cdef void iq4_nl_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    iq4_nl_dequant(y, x)


cdef int iq4_xs_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                               float sigma2) noexcept nogil:
    return iq4_xs_quant(x, y, method, qw)


cdef void iq4_xs_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    iq4_xs_dequant(y, x)
