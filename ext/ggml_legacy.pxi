# ggml's legacy blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; 32 weights) and ternary blocks (TQ1_0,
# TQ2_0; 256 weights): block functions for _ggml.pyx (contract in its header).
#
# The definition of every rule here is flightquant/reference/ggml_legacy.py (NumPy); this is
# the same arithmetic in C, float32 where ggml uses float, in the same order, so the bytes
# match it (and, for rtn, ggml's quantize_row_*_ref, or with importance its
# quantize_row_*_impl) bit for bit. The block functions are C
# (a verbatim block) rather than Cython so that gcc vectorizes them at baseline SSE2: fixed
# trip counts over 32 or 256 elements, no branches inside the loops, sums kept in 8 lanes.

cdef extern from *:
    """
    #include <float.h>
    #include <math.h>
    #include <stdint.h>
    #include <string.h>

    #define LEG_LANES 8
    /* float32 lane sums of squares are within ~3e-6 (relative) of the exact sum */
    #define LEG_MARGIN (1.0f - 0x1p-13f)
    #define LEG_TINY 0x1p-100f

    /* Four float lanes. Sums run in 8 lanes (element i adds to lane i % 8, two vectors),
       then lane 0 + lane 1 + ... + lane 7 in order: the reference sums the same way. gcc
       and clang get vector extensions (SSE2 / NEON; gcc's auto-vectorizer turns the
       clamps of a scalar loop into branches under its default -ftrapping-math); other
       compilers get the same arithmetic lane by lane (LEG_SCALAR forces that path, for
       testing it). */
    #if defined(__GNUC__) && !defined(LEG_SCALAR)
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    typedef float leg_f4 __attribute__((vector_size(16)));
    typedef int32_t leg_i4 __attribute__((vector_size(16)));
    static inline leg_f4 leg_ld(const float* p) { leg_f4 v; memcpy(&v, p, 16); return v; }
    static inline void leg_st(float* p, leg_f4 v) { memcpy(p, &v, 16); }
    static inline leg_f4 leg_set(float s) { leg_f4 v = {s, s, s, s}; return v; }
    static inline leg_f4 leg_add(leg_f4 a, leg_f4 b) { return a + b; }
    static inline leg_f4 leg_sub(leg_f4 a, leg_f4 b) { return a - b; }
    static inline leg_f4 leg_mul(leg_f4 a, leg_f4 b) { return a * b; }
    /* min: a where a < b, else b; max: a where a > b, else b (SSE's minps / maxps) */
    #if defined(__SSE2__)
    static inline leg_f4 leg_min(leg_f4 a, leg_f4 b) { return (leg_f4)_mm_min_ps(a, b); }
    static inline leg_f4 leg_max(leg_f4 a, leg_f4 b) { return (leg_f4)_mm_max_ps(a, b); }
    #else
    static inline leg_f4 leg_min(leg_f4 a, leg_f4 b) {
        leg_i4 m = a < b;
        return (leg_f4)(((leg_i4)a & m) | ((leg_i4)b & ~m));
    }
    static inline leg_f4 leg_max(leg_f4 a, leg_f4 b) {
        leg_i4 m = b < a;
        return (leg_f4)(((leg_i4)a & m) | ((leg_i4)b & ~m));
    }
    #endif
    /* v where a > t, else +0.0 */
    static inline leg_f4 leg_where_gt(leg_f4 a, leg_f4 t, leg_f4 v) {
        leg_i4 m = a > t;
        return (leg_f4)((leg_i4)v & m);
    }
    static inline leg_f4 leg_abs(leg_f4 a) { return (leg_f4)((leg_i4)a & 0x7fffffff); }
    static inline float leg_lane(leg_f4 a, int i) { return a[i]; }
    #else
    typedef struct { float v[4]; } leg_f4;
    static inline leg_f4 leg_ld(const float* p) { leg_f4 r; memcpy(r.v, p, 16); return r; }
    static inline void leg_st(float* p, leg_f4 v) { memcpy(p, v.v, 16); }
    static inline leg_f4 leg_set(float s) { leg_f4 r = {{s, s, s, s}}; return r; }
    #define LEG_OP(name, expr) \
        static inline leg_f4 name(leg_f4 a, leg_f4 b) { \
            leg_f4 r; for (int i = 0; i < 4; i++) r.v[i] = (expr); return r; }
    LEG_OP(leg_add, a.v[i] + b.v[i])
    LEG_OP(leg_sub, a.v[i] - b.v[i])
    LEG_OP(leg_mul, a.v[i] * b.v[i])
    LEG_OP(leg_min, a.v[i] < b.v[i] ? a.v[i] : b.v[i])
    LEG_OP(leg_max, b.v[i] < a.v[i] ? a.v[i] : b.v[i])
    #undef LEG_OP
    static inline leg_f4 leg_where_gt(leg_f4 a, leg_f4 t, leg_f4 v) {
        leg_f4 r; for (int i = 0; i < 4; i++) r.v[i] = a.v[i] > t.v[i] ? v.v[i] : 0.0f;
        return r;
    }
    static inline leg_f4 leg_abs(leg_f4 a) {
        leg_f4 r; for (int i = 0; i < 4; i++) r.v[i] = fabsf(a.v[i]); return r;
    }
    static inline float leg_lane(leg_f4 a, int i) { return a.v[i]; }
    #endif

    static inline leg_f4 leg_clamp(leg_f4 v, leg_f4 lo, leg_f4 hi) {
        return leg_min(leg_max(v, lo), hi);
    }
    /* round half to even for |v| <= 2**22 (ggml's nearest_int trick) */
    static inline leg_f4 leg_rint4(leg_f4 v) {
        const leg_f4 m = leg_set(12582912.f);
        return leg_sub(leg_add(v, m), m);
    }
    static inline float leg_rint(float v) { return (v + 12582912.f) - 12582912.f; }

    /* lane 0 + lane 1 + ... + lane 7 of the two halves */
    static inline float leg_hsum(const leg_f4* acc) {
        float s = leg_lane(acc[0], 0);
        for (int l = 1; l < 4; l++) s += leg_lane(acc[0], l);
        for (int l = 0; l < 4; l++) s += leg_lane(acc[1], l);
        return s;
    }

    /* roundf (half away from zero) for |v| < 2**31, branch-free */
    static inline float leg_roundf(float v) {
        float a = fabsf(v);
        float t = (float)(int32_t)a;
        t += (a - t >= 0.5f) ? 1.0f : 0.0f;
        return copysignf(t, v);
    }

    static inline float leg_f16_round(float f) { return fq_fp16_to_fp32(fq_fp32_to_fp16(f)); }

    static inline float leg_absmax(const float* x, int n) {
        leg_f4 m = leg_set(0.0f);
        for (int j = 0; j < n; j += 4) m = leg_max(m, leg_abs(leg_ld(x + j)));
        float r = leg_lane(m, 0);
        for (int l = 1; l < 4; l++) r = r < leg_lane(m, l) ? leg_lane(m, l) : r;
        return r;
    }

    static inline void leg_minmax32(const float* x, float* pmin, float* pmax);

    /* ggml's signed absmax: the first element of largest magnitude (+0.0 when all are 0);
       from the min and max, scanning only when -min == max */
    static inline float leg_signed_absmax(const float* x, int n) {
        float mn, mx;
        leg_minmax32(x, &mn, &mx);
        if (mx > -mn) return mx;
        if (-mn > mx) return mn;
        if (mx == 0.0f) return 0.0f;
        for (int j = 0; j < n; j++)
            if (fabsf(x[j]) == mx) return x[j];
        return mx;
    }

    /* the first zero of x (its sign), for a min or max that came out zero: ggml keeps the
       first of equal extremes, and -0.0 == +0.0 */
    static inline float leg_first_zero(const float* x, int n) {
        for (int j = 0; j < n; j++)
            if (x[j] == 0.0f) return x[j];
        return 0.0f;
    }

    static inline void leg_minmax32(const float* x, float* pmin, float* pmax) {
        leg_f4 lo = leg_ld(x), hi = lo;
        for (int j = 4; j < 32; j += 4) {
            leg_f4 v = leg_ld(x + j);
            lo = leg_min(v, lo);
            hi = leg_max(v, hi);
        }
        float mn = leg_lane(lo, 0), mx = leg_lane(hi, 0);
        for (int l = 1; l < 4; l++) {
            mn = leg_lane(lo, l) < mn ? leg_lane(lo, l) : mn;
            mx = leg_lane(hi, l) > mx ? leg_lane(hi, l) : mx;
        }
        if (mn == 0.0f) mn = leg_first_zero(x, 32);
        if (mx == 0.0f) mx = leg_first_zero(x, 32);
        *pmin = mn;
        *pmax = mx;
    }

    /* ---- rtn: ggml's quantize_row_*_ref. Codes c[] are the stored unsigned values.
       When 1/d overflows (a block of subnormals), x*id is inf or NaN and ggml's casts give
       code 0 on x86: that is written here without the undefined conversion. ---- */

    /* Q4_0 (nmax 8) / Q5_0 (nmax 16): d = max / -nmax, c = min(2*nmax-1, (int)(x/d + nmax + .5)) */
    static inline float leg_rtn_sym(const float* x, float nmax, int32_t* c) {
        const float max = leg_signed_absmax(x, 32);
        const float d = max / -nmax;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const int32_t cmax = 2 * (int32_t)nmax - 1;
        const float off = nmax + 0.5f;
        if (!isfinite(id)) {
            for (int j = 0; j < 32; j++) c[j] = 0;
            return d;
        }
        for (int j = 0; j < 32; j++) {
            int32_t i = (int32_t)(x[j] * id + off);
            c[j] = i < cmax ? i : cmax;
        }
        return d;
    }

    /* Q4_1 (qmax 15) / Q5_1 (qmax 31): d = (max - min) / qmax, c = (int)((x - min)/d + .5) */
    static inline float leg_rtn_asym(const float* x, float qmax, int32_t* c, float* pmin,
                                     float* pmax) {
        float mn, mx;
        leg_minmax32(x, &mn, &mx);
        *pmax = mx;
        const float d = (mx - mn) / qmax;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const int32_t cmax = (int32_t)qmax;
        *pmin = mn;
        if (!isfinite(id)) {
            for (int j = 0; j < 32; j++) c[j] = 0;
            return d;
        }
        for (int j = 0; j < 32; j++) {
            int32_t i = (int32_t)((x[j] - mn) * id + 0.5f);
            c[j] = i < cmax ? i : cmax;
        }
        return d;
    }

    /* Q8_0: d = amax / 127, q = roundf(x/d) (signed) */
    static inline float leg_rtn_q8(const float* x, int32_t* c) {
        const float d = leg_absmax(x, 32) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (!isfinite(id)) {
            for (int j = 0; j < 32; j++) c[j] = 0;
            return d;
        }
        for (int j = 0; j < 32; j++) c[j] = (int32_t)leg_roundf(x[j] * id);
        return d;
    }

    /* TQ1_0 / TQ2_0: d = amax, c = lroundf(x/d) + 1 in {0, 1, 2} */
    static inline float leg_rtn_tern(const float* x, int32_t* c) {
        const float d = leg_absmax(x, 256);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        if (!isfinite(id)) {
            for (int j = 0; j < 256; j++) c[j] = 1;
            return d;
        }
        for (int j = 0; j < 256; j++) c[j] = (int32_t)leg_roundf(x[j] * id) + 1;
        return d;
    }

    /* ---- mse: a search in the same format; every candidate's error is measured on the
       fp16 scale (and min) as stored. See the reference module for the rules. With
       importance weights w (NULL: none, every weight 1) the errors and the least-squares
       fits are weighted: w*(e*e), (w*x)*q, (w*q)*q (a weight of 1 changes no bit). ---- */

    static inline int leg_ok(float d) { return fabsf(d) > 0.0f && isfinite(d); }

    /* squared error (lane sums) of q = rint(clamp(x/d, lo, hi)), x_hat = q*d */
    static inline float leg_sym_err(const float* x, const float* w, float d, float lo,
                                    float hi) {
        const leg_f4 id = leg_set(1.0f / d), vd = leg_set(d);
        const leg_f4 vlo = leg_set(lo), vhi = leg_set(hi);
        leg_f4 acc[2] = {leg_set(0.0f), leg_set(0.0f)};
        for (int j = 0; j < 32; j += 4) {
            leg_f4 xv = leg_ld(x + j);
            leg_f4 q = leg_rint4(leg_clamp(leg_mul(xv, id), vlo, vhi));
            leg_f4 e = leg_sub(xv, leg_mul(q, vd));
            e = leg_mul(e, e);
            if (w) e = leg_mul(leg_ld(w + j), e);
            acc[(j >> 2) & 1] = leg_add(acc[(j >> 2) & 1], e);
        }
        return leg_hsum(acc);
    }

    /* least-squares scale sum(x*q)/sum(q*q) for the codes of scale d (0 if all q are 0) */
    static inline float leg_sym_refit(const float* x, const float* w, float d, float lo,
                                      float hi) {
        const leg_f4 id = leg_set(1.0f / d), vlo = leg_set(lo), vhi = leg_set(hi);
        leg_f4 sxq[2] = {leg_set(0.0f), leg_set(0.0f)}, sqq[2] = {leg_set(0.0f), leg_set(0.0f)};
        for (int j = 0; j < 32; j += 4) {
            leg_f4 xv = leg_ld(x + j);
            leg_f4 q = leg_rint4(leg_clamp(leg_mul(xv, id), vlo, vhi));
            leg_f4 wx = xv, wq = q;
            if (w) {
                wx = leg_mul(leg_ld(w + j), xv);
                wq = leg_mul(leg_ld(w + j), q);
            }
            sxq[(j >> 2) & 1] = leg_add(sxq[(j >> 2) & 1], leg_mul(wx, q));
            sqq[(j >> 2) & 1] = leg_add(sqq[(j >> 2) & 1], leg_mul(wq, q));
        }
        float a = leg_hsum(sxq), b = leg_hsum(sqq);
        return b > 0.0f ? a / b : 0.0f;
    }

    /* Candidates dfirst (a stored fp16 scale; 0: none), then d0*f[k] and d1*f[k] (d1 == 0:
       none) for each k, then up to nref least-squares refits of the best; returns the best
       fp16 scale (0: none valid). */
    static float leg_sym_search(const float* x, const float* w, float dfirst, float d0,
                                float d1, const float* f, int nf, float lo, float hi, int nref,
                                float* err) {
        float best = 0.0f, be = INFINITY;
        if (leg_ok(dfirst)) {
            be = leg_sym_err(x, w, dfirst, lo, hi);
            best = dfirst;
        }
        for (int k = 0; k < nf; k++) {
            for (int o = 0; o < 2; o++) {
                float b = o ? d1 : d0;
                if (b == 0.0f) continue;
                float d = leg_f16_round(b * f[k]);
                if (!leg_ok(d)) continue;
                float e = leg_sym_err(x, w, d, lo, hi);
                if (e < be) { be = e; best = d; }
            }
        }
        for (int it = 0; it < nref && best != 0.0f; it++) {
            float d = leg_f16_round(leg_sym_refit(x, w, best, lo, hi));
            if (!leg_ok(d) || d == best) break;
            float e = leg_sym_err(x, w, d, lo, hi);
            if (!(e < be)) break;
            be = e;
            best = d;
        }
        *err = be;
        return best;
    }

    /* the signed codes of scale d, as int32 */
    static inline void leg_sym_codes(const float* x, float d, float lo, float hi, int32_t* q) {
        const float id = 1.0f / d;
        for (int j = 0; j < 32; j++) {
            float v = x[j] * id;
            v = v < lo ? lo : v;
            v = v > hi ? hi : v;
            q[j] = (int32_t)leg_rint(v);
        }
    }

    /* asymmetric: q = rint(clamp((x - m)/d, 0, qmax)), x_hat = d*q + m */
    static inline float leg_asym_err(const float* x, const float* w, float d, float m,
                                     float qmax) {
        const leg_f4 id = leg_set(1.0f / d), vd = leg_set(d), vm = leg_set(m);
        const leg_f4 zero = leg_set(0.0f), vq = leg_set(qmax);
        leg_f4 acc[2] = {zero, zero};
        for (int j = 0; j < 32; j += 4) {
            leg_f4 xv = leg_ld(x + j);
            leg_f4 q = leg_rint4(leg_clamp(leg_mul(leg_sub(xv, vm), id), zero, vq));
            leg_f4 e = leg_sub(xv, leg_add(leg_mul(vd, q), vm));
            e = leg_mul(e, e);
            if (w) e = leg_mul(leg_ld(w + j), e);
            acc[(j >> 2) & 1] = leg_add(acc[(j >> 2) & 1], e);
        }
        return leg_hsum(acc);
    }

    /* least-squares (d, m) for the codes of (d, m), given sw = sum(w) and sx = sum(w*x);
       0 when the fit is singular (all codes equal) */
    static inline int leg_asym_refit(const float* x, const float* w, float d, float m,
                                     float qmax, float sw, float sx, float* dn, float* mn) {
        const leg_f4 id = leg_set(1.0f / d), vm = leg_set(m);
        const leg_f4 zero = leg_set(0.0f), vq = leg_set(qmax);
        leg_f4 sl[2] = {zero, zero}, sl2[2] = {zero, zero}, sxl[2] = {zero, zero};
        for (int j = 0; j < 32; j += 4) {
            const int h = (j >> 2) & 1;
            leg_f4 xv = leg_ld(x + j);
            leg_f4 q = leg_rint4(leg_clamp(leg_mul(leg_sub(xv, vm), id), zero, vq));
            leg_f4 wq = q, wx = xv;
            if (w) {
                wq = leg_mul(leg_ld(w + j), q);
                wx = leg_mul(leg_ld(w + j), xv);
            }
            sl[h] = leg_add(sl[h], wq);
            sl2[h] = leg_add(sl2[h], leg_mul(wq, q));
            sxl[h] = leg_add(sxl[h], leg_mul(wx, q));
        }
        float a = leg_hsum(sl), b = leg_hsum(sl2), c = leg_hsum(sxl);
        float den = sw * b - a * a;  /* unweighted: exact (integers below 2**24) */
        if (!(den > 0.0f)) return 0;
        *dn = (sw * c - a * sx) / den;
        *mn = (b * sx - a * c) / den;
        return 1;
    }

    /* the candidate m = mn + a*r, d = ((mx - b*r) - m)/qmax in fp16: its error (INFINITY
       when invalid), kept in (bd, bm, be) when lower */
    static inline float leg_asym_try(const float* x, const float* w, float mn, float mx,
                                     float r, float a, float b, float qmax, float* bd,
                                     float* bm, float* be) {
        float m0 = mn + a * r;
        float t0 = mx - b * r;
        float d = leg_f16_round((t0 - m0) / qmax);
        float m = leg_f16_round(m0);
        if (!leg_ok(d) || !isfinite(m)) return INFINITY;
        float e = leg_asym_err(x, w, d, m, qmax);
        if (e < *be) { *be = e; *bd = d; *bm = m; }
        return e;
    }

    /* the 8 neighbours of a grid pair, in steps of the refinement */
    static const float LEG_NB_A[8] = {-1, 1, 0, 0, -1, 1, -1, 1};
    static const float LEG_NB_B[8] = {0, 0, -1, 1, -1, 1, 1, -1};

    /* Candidates (dfirst, mfirst) (stored fp16 values; dfirst 0: none), then the clip
       fractions (ga[k], gb[k]) of the range [mn, mx], then (step > 0) the 8 neighbours at
       +-step of the best of those pairs, then up to nref least-squares refits of the best. */
    static float leg_asym_search(const float* x, const float* w, float dfirst, float mfirst,
                                 float mn, float mx, float qmax, const float* ga,
                                 const float* gb, int ng, float step, int nref, float* pd,
                                 float* pm, float* err) {
        const float r = mx - mn;
        float bd = 0.0f, bm = 0.0f, be = INFINITY, bge = INFINITY;
        int bk = -1;
        if (leg_ok(dfirst) && isfinite(mfirst)) {
            be = leg_asym_err(x, w, dfirst, mfirst, qmax);
            bd = dfirst;
            bm = mfirst;
        }
        for (int k = 0; k < ng; k++) {
            float e = leg_asym_try(x, w, mn, mx, r, ga[k], gb[k], qmax, &bd, &bm, &be);
            if (e < bge) { bge = e; bk = k; }
        }
        if (step > 0.0f && bk >= 0)
            for (int i = 0; i < 8; i++)
                leg_asym_try(x, w, mn, mx, r, ga[bk] + LEG_NB_A[i] * step,
                             gb[bk] + LEG_NB_B[i] * step, qmax, &bd, &bm, &be);
        if (bd != 0.0f) {
            leg_f4 acc[2] = {leg_set(0.0f), leg_set(0.0f)};
            leg_f4 accw[2] = {leg_set(0.0f), leg_set(0.0f)};
            for (int j = 0; j < 32; j += 4) {
                leg_f4 v = leg_ld(x + j);
                if (w) {
                    v = leg_mul(leg_ld(w + j), v);
                    accw[(j >> 2) & 1] = leg_add(accw[(j >> 2) & 1], leg_ld(w + j));
                }
                acc[(j >> 2) & 1] = leg_add(acc[(j >> 2) & 1], v);
            }
            const float sx = leg_hsum(acc), sw = w ? leg_hsum(accw) : 32.0f;
            for (int it = 0; it < nref; it++) {
                float d, m;
                if (!leg_asym_refit(x, w, bd, bm, qmax, sw, sx, &d, &m)) break;
                d = leg_f16_round(d);
                m = leg_f16_round(m);
                if (!leg_ok(d) || !isfinite(m) || (d == bd && m == bm)) break;
                float e = leg_asym_err(x, w, d, m, qmax);
                if (!(e < be)) break;
                be = e;
                bd = d;
                bm = m;
            }
        }
        *pd = bd;
        *pm = bm;
        *err = be;
        return bd;
    }

    /* ternary: one pass at scale d (threshold d/2): error of x_hat = sign(x)*d where
       |x| > d/2 (else 0), and the count and sum of |x| over those elements */
    static inline float leg_tern_pass(const float* x, float d, float* pk, float* ps) {
        const leg_f4 vh = leg_set(0.5f * d), vd = leg_set(d), one = leg_set(1.0f);
        const leg_f4 zero = leg_set(0.0f);
        leg_f4 acc[2] = {zero, zero}, k[2] = {zero, zero}, s[2] = {zero, zero};
        for (int j = 0; j < 256; j += 4) {
            const int h = (j >> 2) & 1;
            leg_f4 a = leg_abs(leg_ld(x + j));
            leg_f4 e = leg_sub(a, leg_where_gt(a, vh, vd));  /* a - d where kept, else a */
            acc[h] = leg_add(acc[h], leg_mul(e, e));
            k[h] = leg_add(k[h], leg_where_gt(a, vh, one));
            s[h] = leg_add(s[h], leg_where_gt(a, vh, a));
        }
        *pk = leg_hsum(k);
        *ps = leg_hsum(s);
        return leg_hsum(acc);
    }

    /* count and sum of |x| over |x| > t */
    static inline void leg_tern_scan(const float* x, float t, float* pk, float* ps) {
        const leg_f4 vt = leg_set(t), zero = leg_set(0.0f), one = leg_set(1.0f);
        leg_f4 k[2] = {zero, zero}, s[2] = {zero, zero};
        for (int j = 0; j < 256; j += 4) {
            const int h = (j >> 2) & 1;
            leg_f4 a = leg_abs(leg_ld(x + j));
            k[h] = leg_add(k[h], leg_where_gt(a, vt, one));
            s[h] = leg_add(s[h], leg_where_gt(a, vt, a));
        }
        *pk = leg_hsum(k);
        *ps = leg_hsum(s);
    }

    /* thresholds (times amax) of the ternary scan, dyadic so C and NumPy agree exactly */
    #define LEG_TERN_NG 6
    static const float LEG_TERN_G[LEG_TERN_NG] = {
        32.f / 64, 16.f / 64, 8.f / 64, 4.f / 64, 2.f / 64, 1.f / 64};

    /* Best set {|x| > t} over the thresholds (largest sum^2/count: the error of its
       optimal scale sum/count), then up to 3 Lloyd steps d <- mean{|x| > d/2}. */
    static float leg_tern_search(const float* x, float amax, float* err) {
        float bk = 0.0f, bs = 0.0f, bg = -1.0f, k, s;
        for (int i = 0; i < LEG_TERN_NG; i++) {
            leg_tern_scan(x, amax * LEG_TERN_G[i], &k, &s);
            if (k > 0.0f) {
                float g = s * s / k;
                if (g > bg) { bg = g; bk = k; bs = s; }
            }
        }
        float best = 0.0f, be = INFINITY;
        if (!(bk > 0.0f)) { *err = be; return best; }
        float d = leg_f16_round(bs / bk);
        for (int it = 0; it < 3; it++) {
            if (!leg_ok(d)) break;
            float e = leg_tern_pass(x, d, &k, &s);
            if (!(e < be)) break;
            be = e;
            best = d;
            if (!(k > 0.0f)) break;
            float dn = leg_f16_round(s / k);
            if (dn == d) break;
            d = dn;
        }
        *err = be;
        return best;
    }

    static inline void leg_tern_codes(const float* x, float d, int32_t* c) {
        const float h = 0.5f * d;
        for (int j = 0; j < 256; j++) {
            float a = fabsf(x[j]);
            c[j] = a > h ? (x[j] < 0.0f ? 0 : 2) : 1;
        }
    }

    /* Keep the candidate (reconstruction xb, float32 lane error eb) over rtn (xr) only when
       its (weighted) squared error is lower, in float64 summed in order (what the driver's
       stats report without weights); the float32 sums decide alone when they are far enough
       apart. */
    static inline int leg_better(const float* x, const float* w, const float* xr,
                                 const float* xb, int n, float eb) {
        leg_f4 acc[2] = {leg_set(0.0f), leg_set(0.0f)};
        for (int j = 0; j < n; j += 4) {
            leg_f4 e = leg_sub(leg_ld(x + j), leg_ld(xr + j));
            e = leg_mul(e, e);
            if (w) e = leg_mul(leg_ld(w + j), e);
            acc[(j >> 2) & 1] = leg_add(acc[(j >> 2) & 1], e);
        }
        const float er = leg_hsum(acc);
        if (!(eb < er)) return 0;
        if (eb < er * LEG_MARGIN && er > LEG_TINY) return 1;
        double sr = 0.0, sb = 0.0;
        for (int j = 0; j < n; j++) {
            double a = (double)x[j] - (double)xr[j];
            double b = (double)x[j] - (double)xb[j];
            double wj = w ? (double)w[j] : 1.0;
            sr += wj * (a * a);
            sb += wj * (b * b);
        }
        return sb < sr;
    }

    /* ---- packing ---- */

    static inline void leg_pack_nibbles(const int32_t* c, uint8_t* qs) {
        for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((c[j] & 15) | ((c[j + 16] & 15) << 4));
    }

    /* bit j of qh = bit 4 of c[j] */
    static inline void leg_pack_qh(const int32_t* c, uint8_t* qh) {
        uint32_t h = 0;
    #if defined(__SSE2__) && !defined(LEG_SCALAR)
        for (int j = 0; j < 32; j += 4) {
            __m128i v = _mm_slli_epi32(_mm_loadu_si128((const __m128i*)(c + j)), 27);
            h |= (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(v)) << j;
        }
    #else
        for (int j = 0; j < 32; j++) h |= (uint32_t)((c[j] >> 4) & 1) << j;
    #endif
        memcpy(qh, &h, 4);
    }

    static inline void leg_pack_tq2(const int32_t* c, uint8_t* qs) {
        for (int g = 0; g < 2; g++)
            for (int m = 0; m < 32; m++) {
                const int32_t* p = c + 128 * g + m;
                qs[32 * g + m] = (uint8_t)(p[0] | (p[32] << 2) | (p[64] << 4) | (p[96] << 6));
            }
    }

    /* base 3, first trit most significant, then ceil(q * 256 / 243) so that the decoder's
       (q * 3**n * 3) >> 8 reads trit n back */
    static inline uint8_t leg_tq1_byte(int32_t q) { return (uint8_t)((q * 256 + 242) / 243); }

    static inline void leg_pack_tq1(const int32_t* c, uint8_t* y) {
        for (int m = 0; m < 32; m++) {
            const int32_t* p = c + m;
            y[m] = leg_tq1_byte(
                (((p[0] * 3 + p[32]) * 3 + p[64]) * 3 + p[96]) * 3 + p[128]);
        }
        for (int m = 0; m < 16; m++) {
            const int32_t* p = c + 160 + m;
            y[32 + m] = leg_tq1_byte(
                (((p[0] * 3 + p[16]) * 3 + p[32]) * 3 + p[48]) * 3 + p[64]);
        }
        for (int m = 0; m < 4; m++) {
            const int32_t* p = c + 240 + m;
            y[48 + m] = leg_tq1_byte((((p[0] * 3 + p[4]) * 3 + p[8]) * 3 + p[12]) * 3);
        }
    }

    /* ---- importance: llama.cpp's quantize_row_*_impl with quant_weights, whose block
       weights are w[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]). Each candidate scale's sums run
       in element order, as ggml's loops add them; the candidates sit in the lanes of a
       vector (four scales at a time), so the vector code gives ggml's float32 sums. ---- */

    static inline void leg_imp_weights(const float* x, const float* qw, float sigma2,
                                       float* w) {
        for (int j = 0; j < 32; j++) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
    }

    /* make_qx_quants(32, nmax, x, L, 1, w): iscale = -nmax/max, then -(nmax + is/10)/max
       for is = -9..-1, 1..9, each kept when its least-squares fit explains more; codes
       c = clamp(nearest_int(iscale*x), -nmax, nmax-1) + nmax of the kept one (all 0 when
       |max| < 1e-15). Returns the fitted scale. */
    #define LEG_QX_N 19
    static float leg_qx_impl(const float* x, const float* w, float nmax, int32_t* c) {
        const float max = leg_signed_absmax(x, 32);
        if (fabsf(max) < 1e-15f) {
            for (int j = 0; j < 32; j++) c[j] = 0;
            return 0.0f;
        }
        float isc[20], sx[20], s2[20];
        isc[0] = -nmax / max;
        for (int k = 1; k < LEG_QX_N; k++)
            isc[k] = -(nmax + 0.1f * (float)(k <= 9 ? k - 10 : k - 9)) / max;
        isc[LEG_QX_N] = isc[0];
        leg_f4 vx[32], vwx[32], vw[32];
        for (int j = 0; j < 32; j++) {
            vx[j] = leg_set(x[j]);
            vwx[j] = leg_set(w[j] * x[j]);
            vw[j] = leg_set(w[j]);
        }
        const leg_f4 lo = leg_set(-nmax), hi = leg_set(nmax - 1.0f);
        for (int v = 0; v < 20; v += 4) {
            const leg_f4 s = leg_ld(isc + v);
            leg_f4 a = leg_set(0.0f), b = leg_set(0.0f);
            for (int j = 0; j < 32; j++) {
                /* nearest_int then clamp == clamp then round: the bounds are integers */
                leg_f4 l = leg_rint4(leg_clamp(leg_mul(s, vx[j]), lo, hi));
                a = leg_add(a, leg_mul(vwx[j], l));
                b = leg_add(b, leg_mul(leg_mul(vw[j], l), l));
            }
            leg_st(sx + v, a);
            leg_st(s2 + v, b);
        }
        float scale = s2[0] != 0.0f ? sx[0] / s2[0] : 0.0f;
        float best = scale * sx[0];
        int win = 0;
        for (int k = 1; k < LEG_QX_N; k++) {
            if (s2[k] > 0.0f && sx[k] * sx[k] > best * s2[k]) {
                scale = sx[k] / s2[k];
                best = scale * sx[k];
                win = k;
            }
        }
        const float s = isc[win], hs = nmax - 1.0f;
        for (int j = 0; j < 32; j++) {
            float v = s * x[j];
            v = v < -nmax ? -nmax : v;
            v = v > hs ? hs : v;
            c[j] = (int32_t)leg_rint(v) + (int32_t)nmax;
        }
        return scale;
    }

    /* make_qkx3_quants(32, nmax, x, w, L, &min, Laux, -0.9f, 0.05f, 36, false): min =
       min(x, 0); iscale = nmax/(max - min), then (nmax - 0.9 + 0.05*is)/(max - min) for
       is = 0..36, each refitted (scale, min) by weighted least squares and kept when its
       weighted error is lower. A kept candidate moves min, which the next ones start from:
       four are scored at a time from the same min, and after a kept one the rest of its
       vector is scored again. Returns the scale, the min in *pmin. */
    #define LEG_QKX3_N 37
    static float leg_qkx3_impl(const float* x, const float* w, float nmax, int32_t* c,
                               float* pmin) {
        float mn, mx;
        leg_minmax32(x, &mn, &mx);
        if (mn > 0.0f) mn = 0.0f;
        float sum_w = w[0], sum_x = w[0] * x[0];
        for (int j = 1; j < 32; j++) {
            sum_w += w[j];
            sum_x += w[j] * x[j];
        }
        *pmin = mn;
        if (mx <= mn) {
            for (int j = 0; j < 32; j++) c[j] = 0;
            return 0.0f;
        }
        const leg_f4 zero = leg_set(0.0f), top = leg_set(nmax);
        float bisc = nmax / (mx - mn), boff = mn;  /* the kept codes: bisc*(x - boff) */
        float scale = 1.0f / bisc, best = 0.0f;
        for (int j = 0; j < 32; j++) {
            float v = bisc * (x[j] - mn);
            v = v < 0.0f ? 0.0f : v;
            v = v > nmax ? nmax : v;
            float diff = scale * leg_rint(v) + mn - x[j];
            best += w[j] * (diff * diff);
        }
        leg_f4 vx[32], vw[32], vxm[32], vl[32];
        for (int j = 0; j < 32; j++) {
            vx[j] = leg_set(x[j]);
            vw[j] = leg_set(w[j]);
        }
        float cur = mn, xmof = NAN;
        int is = 0;
        while (is < LEG_QKX3_N) {
            if (!(cur == xmof)) {
                for (int j = 0; j < 32; j++) vxm[j] = leg_set(x[j] - cur);
                xmof = cur;
            }
            const float r = mx - cur;
            float isc[4], sl[4], sl2[4], sxl[4], ts[4], tm[4], mad[4];
            int ok[4];
            for (int k = 0; k < 4; k++) isc[k] = (-0.9f + 0.05f * (float)(is + k) + nmax) / r;
            const leg_f4 vi = leg_ld(isc);
            leg_f4 a = zero, b = zero, d = zero;
            for (int j = 0; j < 32; j++) {
                leg_f4 l = leg_rint4(leg_clamp(leg_mul(vi, vxm[j]), zero, top));
                leg_f4 wl = leg_mul(vw[j], l);
                vl[j] = l;
                a = leg_add(a, wl);
                b = leg_add(b, leg_mul(wl, l));
                d = leg_add(d, leg_mul(wl, vx[j]));
            }
            leg_st(sl, a);
            leg_st(sl2, b);
            leg_st(sxl, d);
            for (int k = 0; k < 4; k++) {
                const float den = sum_w * sl2[k] - sl[k] * sl[k];
                ok[k] = den > 0.0f;
                ts[k] = 0.0f;
                tm[k] = 0.0f;
                if (ok[k]) {
                    ts[k] = (sum_w * sxl[k] - sum_x * sl[k]) / den;
                    tm[k] = (sl2[k] * sum_x - sl[k] * sxl[k]) / den;
                    if (tm[k] > 0.0f) {
                        tm[k] = 0.0f;
                        ts[k] = sxl[k] / sl2[k];
                    }
                }
            }
            const leg_f4 vs = leg_ld(ts), vm = leg_ld(tm);
            leg_f4 acc = zero;
            for (int j = 0; j < 32; j++) {
                leg_f4 diff = leg_sub(leg_add(leg_mul(vs, vl[j]), vm), vx[j]);
                acc = leg_add(acc, leg_mul(vw[j], leg_mul(diff, diff)));
            }
            leg_st(mad, acc);
            const int n = LEG_QKX3_N - is < 4 ? LEG_QKX3_N - is : 4;
            int k = 0;
            for (; k < n; k++) {
                if (ok[k] && mad[k] < best) {
                    best = mad[k];
                    scale = ts[k];
                    bisc = isc[k];
                    boff = cur;
                    cur = tm[k];
                    break;
                }
            }
            is += k < n ? k + 1 : n;
        }
        for (int j = 0; j < 32; j++) {
            float v = bisc * (x[j] - boff);
            v = v < 0.0f ? 0.0f : v;
            v = v > nmax ? nmax : v;
            c[j] = (int32_t)leg_rint(v);
        }
        *pmin = cur;
        return scale;
    }

    /* ---- the block functions ---- */

    static const float LEG_F_Q4_0[3] = {65.f / 64, 62.f / 64, 58.f / 64};
    static const float LEG_F_Q5_0[4] = {68.f / 64, 66.f / 64, 64.f / 64, 62.f / 64};
    /* with importance: a wider span, for a block whose largest value weighs little */
    #define LEG_NWF 6
    static const float LEG_WF[LEG_NWF] = {72.f / 64, 66.f / 64, 60.f / 64, 54.f / 64,
                                          48.f / 64, 42.f / 64};

    /* Q4_0 / Q5_0: levels -nmax .. nmax-1 times d; mse also tries the flipped orientation
       d1 = max/(nmax-1) that puts the largest magnitude on the short side */
    static inline void leg_sym_block(const float* x, uint8_t* y, int method, const float* qw,
                                     float sigma2, float nmax, const float* f, int nf,
                                     int32_t* c) {
        float d, w[32];
        if (qw) {
            leg_imp_weights(x, qw, sigma2, w);
            d = leg_qx_impl(x, w, nmax, c);
        } else {
            d = leg_rtn_sym(x, nmax, c);
        }
        uint16_t dh = fq_fp32_to_fp16(d);
        if (method == 1) {
            const float max = leg_signed_absmax(x, 32);
            const float d16 = fq_fp16_to_fp32(dh);
            float e, xr[32], xb[32];
            const float lo = -nmax, hi = nmax - 1.0f;
            float b = qw ? leg_sym_search(x, qw, d16, max / -nmax, max / hi, LEG_WF, LEG_NWF,
                                          lo, hi, 2, &e)
                         : leg_sym_search(x, NULL, 0.0f, d, max / hi, f, nf, lo, hi, 2, &e);
            if (b != 0.0f) {
                int32_t q[32];
                leg_sym_codes(x, b, lo, hi, q);
                for (int j = 0; j < 32; j++) {
                    xr[j] = (float)(c[j] - (int32_t)nmax) * d16;
                    xb[j] = (float)q[j] * b;
                }
                if (leg_better(x, qw, xr, xb, 32, e)) {
                    for (int j = 0; j < 32; j++) c[j] = q[j] + (int32_t)nmax;
                    dh = fq_fp32_to_fp16(b);
                }
            }
        }
        memcpy(y, &dh, 2);
    }

    static int leg_q4_0_quant(const float* x, uint8_t* y, int method, const float* qw,
                              float sigma2) {
        int32_t c[32];
        leg_sym_block(x, y, method, qw, sigma2, 8.0f, LEG_F_Q4_0, 3, c);
        leg_pack_nibbles(c, y + 2);
        return 0;
    }

    static int leg_q5_0_quant(const float* x, uint8_t* y, int method, const float* qw,
                              float sigma2) {
        int32_t c[32];
        leg_sym_block(x, y, method, qw, sigma2, 16.0f, LEG_F_Q5_0, 4, c);
        leg_pack_qh(c, y + 2);
        leg_pack_nibbles(c, y + 6);
        return 0;
    }

    /* (min, top) clip fractions of the range tried by Q4_1's / Q5_1's search */
    static const float LEG_GA_Q4_1[4] = {0, 1.f / 32, 0, 1.f / 32};
    static const float LEG_GB_Q4_1[4] = {0, 0, 1.f / 32, 1.f / 32};
    static const float LEG_GA_Q5_1[4] = {0, 1.f / 64, 0, 1.f / 64};
    static const float LEG_GB_Q5_1[4] = {0, 0, 1.f / 64, 1.f / 64};
    /* with importance: 0..4 half-steps (h = 1/32, 1/64) at the bottom (ga) and at the top
       (gb) of the range, 25 pairs, then the neighbours of the best at +-h/2 */
    #define LEG_NWG 25
    #define LEG_ROW5(a) a, a, a, a, a
    #define LEG_STEP5(h) 0.f, h, 2 * h, 3 * h, 4 * h
    static const float LEG_WGA_Q4_1[LEG_NWG] = {LEG_ROW5(0.f), LEG_ROW5(1.f / 32),
        LEG_ROW5(2.f / 32), LEG_ROW5(3.f / 32), LEG_ROW5(4.f / 32)};
    static const float LEG_WGB_Q4_1[LEG_NWG] = {LEG_STEP5(1.f / 32), LEG_STEP5(1.f / 32),
        LEG_STEP5(1.f / 32), LEG_STEP5(1.f / 32), LEG_STEP5(1.f / 32)};
    static const float LEG_WGA_Q5_1[LEG_NWG] = {LEG_ROW5(0.f), LEG_ROW5(1.f / 64),
        LEG_ROW5(2.f / 64), LEG_ROW5(3.f / 64), LEG_ROW5(4.f / 64)};
    static const float LEG_WGB_Q5_1[LEG_NWG] = {LEG_STEP5(1.f / 64), LEG_STEP5(1.f / 64),
        LEG_STEP5(1.f / 64), LEG_STEP5(1.f / 64), LEG_STEP5(1.f / 64)};
    #undef LEG_ROW5
    #undef LEG_STEP5

    static inline void leg_asym_block(const float* x, uint8_t* y, int method, const float* qw,
                                      float sigma2, float qmax, const float* ga,
                                      const float* gb, int ng, const float* wga,
                                      const float* wgb, float wstep, int32_t* c) {
        float mn, mx, d, m, w[32];
        if (qw) {
            leg_imp_weights(x, qw, sigma2, w);
            d = leg_qkx3_impl(x, w, qmax, c, &m);
            if (method == 1) leg_minmax32(x, &mn, &mx);
        } else {
            d = leg_rtn_asym(x, qmax, c, &mn, &mx);
            m = mn;
        }
        uint16_t dh = fq_fp32_to_fp16(d), mh = fq_fp32_to_fp16(m);
        if (method == 1) {
            const float d16 = fq_fp16_to_fp32(dh), m16 = fq_fp16_to_fp32(mh);
            float bd, bm, e, xr[32], xb[32];
            if (qw)
                leg_asym_search(x, qw, d16, m16, mn, mx, qmax, wga, wgb, LEG_NWG, wstep,
                                2, &bd, &bm, &e);
            else
                leg_asym_search(x, NULL, 0.0f, 0.0f, mn, mx, qmax, ga, gb, ng, 0.0f, 2, &bd,
                                &bm, &e);
            if (bd != 0.0f) {
                const float id = 1.0f / bd;
                int32_t q[32];
                for (int j = 0; j < 32; j++) {
                    float v = (x[j] - bm) * id;
                    v = v < 0.0f ? 0.0f : v;
                    v = v > qmax ? qmax : v;
                    q[j] = (int32_t)leg_rint(v);
                    xr[j] = d16 * (float)c[j] + m16;
                    xb[j] = bd * (float)q[j] + bm;
                }
                if (leg_better(x, qw, xr, xb, 32, e)) {
                    for (int j = 0; j < 32; j++) c[j] = q[j];
                    dh = fq_fp32_to_fp16(bd);
                    mh = fq_fp32_to_fp16(bm);
                }
            }
        }
        memcpy(y, &dh, 2);
        memcpy(y + 2, &mh, 2);
    }

    static int leg_q4_1_quant(const float* x, uint8_t* y, int method, const float* qw,
                              float sigma2) {
        int32_t c[32];
        leg_asym_block(x, y, method, qw, sigma2, 15.0f, LEG_GA_Q4_1, LEG_GB_Q4_1, 4,
                       LEG_WGA_Q4_1, LEG_WGB_Q4_1, 1.f / 64, c);
        leg_pack_nibbles(c, y + 4);
        return 0;
    }

    static int leg_q5_1_quant(const float* x, uint8_t* y, int method, const float* qw,
                              float sigma2) {
        int32_t c[32];
        leg_asym_block(x, y, method, qw, sigma2, 31.0f, LEG_GA_Q5_1, LEG_GB_Q5_1, 4,
                       LEG_WGA_Q5_1, LEG_WGB_Q5_1, 1.f / 128, c);
        leg_pack_qh(c, y + 4);
        leg_pack_nibbles(c, y + 8);
        return 0;
    }

    /* Q8_0's search: scales d*(256+k)/256, k = 0, 2, .., 10 (then the refits), codes
       -128..127; a slightly coarser grid often rounds the 32 values better */
    static const float LEG_F_Q8_0[6] = {256.f / 256, 258.f / 256, 260.f / 256,
                                        262.f / 256, 264.f / 256, 266.f / 256};

    static int leg_q8_0_quant(const float* x, uint8_t* y, int method) {
        int32_t c[32];
        const float d = leg_rtn_q8(x, c);
        uint16_t dh = fq_fp32_to_fp16(d);
        if (method == 1) {
            float e, xr[32], xb[32];
            float b = leg_sym_search(x, NULL, 0.0f, d, 0.0f, LEG_F_Q8_0, 6, -128.0f, 127.0f, 2,
                                     &e);
            if (b != 0.0f) {
                const float d16 = fq_fp16_to_fp32(dh);
                int32_t q[32];
                leg_sym_codes(x, b, -128.0f, 127.0f, q);
                for (int j = 0; j < 32; j++) {
                    xr[j] = (float)c[j] * d16;
                    xb[j] = (float)q[j] * b;
                }
                if (leg_better(x, NULL, xr, xb, 32, e)) {
                    for (int j = 0; j < 32; j++) c[j] = q[j];
                    dh = fq_fp32_to_fp16(b);
                }
            }
        }
        memcpy(y, &dh, 2);
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)c[j];
        return 0;
    }

    /* TQ1_0 / TQ2_0 share the codes (0, 1, 2 = -1, 0, +1) and the fp16 scale */
    static inline uint16_t leg_tern_block(const float* x, int method, int32_t* c) {
        const float d = leg_rtn_tern(x, c);
        uint16_t dh = fq_fp32_to_fp16(d);
        if (method == 1 && d > 0.0f) {
            float e, xr[256], xb[256];
            float b = leg_tern_search(x, d, &e);
            if (b != 0.0f) {
                const float d16 = fq_fp16_to_fp32(dh);
                int32_t q[256];
                leg_tern_codes(x, b, q);
                for (int j = 0; j < 256; j++) {
                    xr[j] = (float)(c[j] - 1) * d16;
                    xb[j] = (float)(q[j] - 1) * b;
                }
                if (leg_better(x, NULL, xr, xb, 256, e)) {
                    for (int j = 0; j < 256; j++) c[j] = q[j];
                    dh = fq_fp32_to_fp16(b);
                }
            }
        }
        return dh;
    }

    static int leg_tq1_0_quant(const float* x, uint8_t* y, int method) {
        int32_t c[256];
        uint16_t dh = leg_tern_block(x, method, c);
        leg_pack_tq1(c, y);
        memcpy(y + 52, &dh, 2);
        return 0;
    }

    static int leg_tq2_0_quant(const float* x, uint8_t* y, int method) {
        int32_t c[256];
        uint16_t dh = leg_tern_block(x, method, c);
        leg_pack_tq2(c, y);
        memcpy(y + 64, &dh, 2);
        return 0;
    }

    /* ---- dequantize: the float32 products gguf-py computes ---- */

    static void leg_q4_0_dequant(const uint8_t* y, float* x) {
        const float d = fq_load_f16(y);
        for (int j = 0; j < 16; j++) {
            x[j] = d * (float)((y[2 + j] & 15) - 8);
            x[j + 16] = d * (float)((y[2 + j] >> 4) - 8);
        }
    }

    static void leg_q4_1_dequant(const uint8_t* y, float* x) {
        const float d = fq_load_f16(y), m = fq_load_f16(y + 2);
        for (int j = 0; j < 16; j++) {
            x[j] = d * (float)(y[4 + j] & 15) + m;
            x[j + 16] = d * (float)(y[4 + j] >> 4) + m;
        }
    }

    /* bit 4 of code j of a Q5 block: bit j of qh as 16 or 0 (a table, not a per-lane
       shift, which SSE2 lacks) */
    static const uint32_t LEG_BIT[32] = {
        1u << 0, 1u << 1, 1u << 2, 1u << 3, 1u << 4, 1u << 5, 1u << 6, 1u << 7,
        1u << 8, 1u << 9, 1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
        1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
        1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

    static inline void leg_q5_high(const uint8_t* qh, int32_t* hb) {
        uint32_t h;
        memcpy(&h, qh, 4);
        for (int j = 0; j < 32; j++) hb[j] = (h & LEG_BIT[j]) ? 16 : 0;
    }

    static void leg_q5_0_dequant(const uint8_t* y, float* x) {
        const float d = fq_load_f16(y);
        int32_t hb[32];
        leg_q5_high(y + 2, hb);
        for (int j = 0; j < 16; j++) {
            x[j] = d * (float)(((y[6 + j] & 15) | hb[j]) - 16);
            x[j + 16] = d * (float)(((y[6 + j] >> 4) | hb[j + 16]) - 16);
        }
    }

    static void leg_q5_1_dequant(const uint8_t* y, float* x) {
        const float d = fq_load_f16(y), m = fq_load_f16(y + 2);
        int32_t hb[32];
        leg_q5_high(y + 4, hb);
        for (int j = 0; j < 16; j++) {
            x[j] = d * (float)((y[8 + j] & 15) | hb[j]) + m;
            x[j + 16] = d * (float)((y[8 + j] >> 4) | hb[j + 16]) + m;
        }
    }

    static void leg_q8_0_dequant(const uint8_t* y, float* x) {
        const float d = fq_load_f16(y);
        for (int j = 0; j < 32; j++) x[j] = d * (float)(int8_t)y[2 + j];
    }

    static inline float leg_trit(uint8_t q, uint8_t pow3) {
        uint8_t v = (uint8_t)(q * pow3);
        return (float)((((uint16_t)v * 3) >> 8) - 1);
    }

    static void leg_tq1_0_dequant(const uint8_t* y, float* x) {
        static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
        const float d = fq_load_f16(y + 52);
        for (int n = 0; n < 5; n++) {
            for (int m = 0; m < 32; m++) x[32 * n + m] = d * leg_trit(y[m], pow3[n]);
            for (int m = 0; m < 16; m++) x[160 + 16 * n + m] = d * leg_trit(y[32 + m], pow3[n]);
        }
        for (int n = 0; n < 4; n++)
            for (int m = 0; m < 4; m++) x[240 + 4 * n + m] = d * leg_trit(y[48 + m], pow3[n]);
    }

    static void leg_tq2_0_dequant(const uint8_t* y, float* x) {
        const float d = fq_load_f16(y + 64);
        for (int g = 0; g < 2; g++)
            for (int n = 0; n < 4; n++)
                for (int m = 0; m < 32; m++)
                    x[128 * g + 32 * n + m] = d * (float)(((y[32 * g + m] >> (2 * n)) & 3) - 1);
    }
    """
    int leg_q4_0_quant(const float* x, uint8_t* y, int method, const float* qw,
                       float sigma2) noexcept nogil
    int leg_q4_1_quant(const float* x, uint8_t* y, int method, const float* qw,
                       float sigma2) noexcept nogil
    int leg_q5_0_quant(const float* x, uint8_t* y, int method, const float* qw,
                       float sigma2) noexcept nogil
    int leg_q5_1_quant(const float* x, uint8_t* y, int method, const float* qw,
                       float sigma2) noexcept nogil
    int leg_q8_0_quant(const float* x, uint8_t* y, int method) noexcept nogil
    int leg_tq1_0_quant(const float* x, uint8_t* y, int method) noexcept nogil
    int leg_tq2_0_quant(const float* x, uint8_t* y, int method) noexcept nogil
    void leg_q4_0_dequant(const uint8_t* y, float* x) noexcept nogil
    void leg_q4_1_dequant(const uint8_t* y, float* x) noexcept nogil
    void leg_q5_0_dequant(const uint8_t* y, float* x) noexcept nogil
    void leg_q5_1_dequant(const uint8_t* y, float* x) noexcept nogil
    void leg_q8_0_dequant(const uint8_t* y, float* x) noexcept nogil
    void leg_tq1_0_dequant(const uint8_t* y, float* x) noexcept nogil
    void leg_tq2_0_dequant(const uint8_t* y, float* x) noexcept nogil


cdef int q4_0_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    return leg_q4_0_quant(x, y, method, qw, sigma2)


cdef void q4_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    leg_q4_0_dequant(y, x)


cdef int q4_1_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    return leg_q4_1_quant(x, y, method, qw, sigma2)


cdef void q4_1_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    leg_q4_1_dequant(y, x)


cdef int q5_0_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    return leg_q5_0_quant(x, y, method, qw, sigma2)


cdef void q5_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    leg_q5_0_dequant(y, x)


cdef int q5_1_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    return leg_q5_1_quant(x, y, method, qw, sigma2)


cdef void q5_1_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    leg_q5_1_dequant(y, x)


# Q8_0 and the ternary types ignore importance, as llama.cpp's quantize_q8_0 / quantize_tq*
# do: their bytes with qw are the bytes without.
cdef int q8_0_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    return leg_q8_0_quant(x, y, method)


cdef void q8_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    leg_q8_0_dequant(y, x)


cdef int tq1_0_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                              float sigma2) noexcept nogil:
    return leg_tq1_0_quant(x, y, method)


cdef void tq1_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    leg_tq1_0_dequant(y, x)


cdef int tq2_0_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                              float sigma2) noexcept nogil:
    return leg_tq2_0_quant(x, y, method)


cdef void tq2_0_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    leg_tq2_0_dequant(y, x)
