# ggml's Q4_K, Q5_K and Q6_K super-blocks (256 weights): block functions for _ggml.pyx.
#
# rtn is ggml's quantize_row_q{4,5,6}_K_ref, byte for byte: the same float32 operations
# in the same order. Its searches (make_qkx2_quants, make_qx_quants) are chains of
# sequential float sums per sub-block, so the sub-blocks of a block run side by side as
# the lanes of SIMD vectors (C vector extensions in ggml_k456_lanes.h, compiled at 4 lanes
# and, on x86, at 8 lanes with AVX2 chosen at run time; one lane at a time elsewhere):
# each lane still does its sub-block's operations in the C's order, so every width gives
# the same bytes. In the lanes a code is rounded as (v + 1.5*2**23) - 1.5*2**23, ggml's
# nearest_int for |v| <= 2**22; a block whose search could leave that range (ranges near
# 0 or past float32) takes the scalar path, a transcription with nearest_int itself.
#
# mse reuses that search's codes for unweighted fits, then searches each sub-block's
# quantized scale (and min) by true error; it keeps rtn's block unless clearly better.
# The reference (the definition these must match bit for bit) is
# flightquant/reference/ggml_k456.py; its docstring describes the formats and the search.

from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    #define K_MAGIC 12582912.0f
    #define K45_USTEP 2     /* mse: fits of every second step's codes */
    #define K45_NSC 3       /* mse: scales tried per round */
    #define K_GROUP_MAX_EPS 1e-15f

    #if (defined(__GNUC__) || defined(__clang__)) && !defined(K456_SCALAR)
    /* vector extensions: 4 lanes (SSE2 on x86-64, NEON on aarch64), and 8 lanes (AVX2,
       chosen at run time) on x86 */
    #if (defined(__x86_64__) || defined(__i386__)) && !defined(K456_NO_AVX2)
    #include <immintrin.h>
    #define K456_HAVE_W8 1
    #else
    #define K456_HAVE_W8 0
    #endif
    typedef float k_v4 __attribute__((vector_size(16)));
    typedef int32_t k_m4 __attribute__((vector_size(16)));
    #define K_W 4
    #define k_v k_v4
    #define k_m k_m4
    #define K_FN(f) f##_w4
    #define K_TGT
    #if K456_HAVE_W8
    #define K_MAX(a, b) ((k_v4)_mm_max_ps((__m128)(a), (__m128)(b)))
    #define K_MIN(a, b) ((k_v4)_mm_min_ps((__m128)(a), (__m128)(b)))
    #else
    #define K_MAX(a, b) K_SEL((a) > (b), (a), (b))
    #define K_MIN(a, b) K_SEL((a) < (b), (a), (b))
    #endif
    #include "ggml_k456_lanes.h"
    #undef K_W
    #undef k_v
    #undef k_m
    #undef K_FN
    #undef K_TGT
    #undef K_MAX
    #undef K_MIN
    #if K456_HAVE_W8
    typedef float k_v8 __attribute__((vector_size(32)));
    typedef int32_t k_m8 __attribute__((vector_size(32)));
    #define K_W 8
    #define k_v k_v8
    #define k_m k_m8
    #define K_FN(f) f##_w8
    #define K_TGT __attribute__((target("avx2")))
    #define K_MAX(a, b) ((k_v8)_mm256_max_ps((__m256)(a), (__m256)(b)))
    #define K_MIN(a, b) ((k_v8)_mm256_min_ps((__m256)(a), (__m256)(b)))
    #include "ggml_k456_lanes.h"
    #endif
    static int k456_w8 = 0;
    static int k456_lane_width(int w) {
        /* w = 4 or 8 picks the width (8 only with AVX2), 0 asks; returns the width */
    #if K456_HAVE_W8
        if (w == 8 && __builtin_cpu_supports("avx2")) k456_w8 = 1;
        if (w == 4) k456_w8 = 0;
    #endif
        return k456_w8 ? 8 : 4;
    }
    #define K456_PICK(f) (k456_w8 ? f##_w8 : f##_w4)
    #if !K456_HAVE_W8
    #define k45_lanes_w8 k45_lanes_w4
    #define k45_requant_w8 k45_requant_w4
    #define k45_pairs_w8 k45_pairs_w4
    #define q6_lanes_w8 q6_lanes_w4
    #define q6_requant_w8 q6_requant_w4
    #define q6_pairs_w8 q6_pairs_w4
    #define kq_qx_lanes_w8 kq_qx_lanes_w4
    #define kq_err_w8 kq_err_w4
    #endif
    #else
    /* other compilers: the same code one lane at a time */
    #define K_W 1
    #define k_v float
    #define k_m int
    #define K_FN(f) f##_w1
    #define K_TGT
    #define K_MAX(a, b) ((a) > (b) ? (a) : (b))
    #define K_MIN(a, b) ((a) < (b) ? (a) : (b))
    #include "ggml_k456_lanes.h"
    static int k456_lane_width(int w) { (void)w; return 1; }
    #define K456_PICK(f) f##_w1
    #endif

    #define k45_lanes K456_PICK(k45_lanes)
    #define k45_requant K456_PICK(k45_requant)
    #define k45_pairs K456_PICK(k45_pairs)
    #define q6_lanes K456_PICK(q6_lanes)
    #define q6_requant K456_PICK(q6_requant)
    #define q6_pairs K456_PICK(q6_pairs)
    #define kq_qx_lanes K456_PICK(kq_qx_lanes)
    #define kq_err K456_PICK(kq_err)

    /* Q4_K/Q5_K: transpose a block (xt[i*8 + s] = x[32*s + i]) and ggml's weights
       av_x + |x|, av_x = sqrtf(sum(x*x)/32) per sub-block (a sequential sum). */
    static void k45_prep(const float* x, float* xt, float* wt) {
        float a[8];
        int i, s;
        for (s = 0; s < 8; s++) a[s] = 0.f;
        for (i = 0; i < 32; i++)
            for (s = 0; s < 8; s++) {
                float v = x[32 * s + i];
                xt[8 * i + s] = v;
                a[s] = a[s] + v * v;
            }
        for (s = 0; s < 8; s++) a[s] = sqrtf(a[s] / 32.f);
        for (i = 0; i < 32; i++)
            for (s = 0; s < 8; s++) wt[8 * i + s] = a[s] + fabsf(xt[8 * i + s]);
    }
    """
    float K_GROUP_MAX_EPS
    int k456_lane_width(int w) noexcept nogil
    int k45_lanes(const float* xt, const float* wt, int ns, int n, int nmax, float rmin,
                  float rdelta, int nstep, float* scales, float* mins, float* l_isc, float* l_mn,
                  float* u_s, float* u_m, float* u_x) noexcept nogil
    void k45_requant(const float* xt, int nmax, const float* d, const float* dm,
                     const float* isc, const float* mn, float* qt, float* err) noexcept nogil
    void k45_pairs(const float* xt, int nmax, float d16, float dmin16, const float* u_s,
                   const float* u_m, const float* u_x, int lloyd, int rounds, float* psc,
                   float* pm, float* be, float* qt) noexcept nogil
    void q6_lanes(const float* xt, float* scales, float* l_isc, float* u_s) noexcept nogil
    void q6_requant(const float* xt, const float* d, const float* isc, float* qt,
                    float* err) noexcept nogil
    void q6_pairs(const float* xt, float d16, const float* u_s, int rounds, float* psc,
                  float* be, float* qt) noexcept nogil
    void k45_prep(const float* x, float* xt, float* wt) noexcept nogil


# ---------------------------------------------------------------------------------------
# importance (qw != NULL): ggml's quantize_row_q{2,3,4,5,6}_K_impl helpers, and the
# weighted search of mse (shared with ggml_k23.pxi, which is included after this file)

cdef extern from *:
    """
    /* ggml's make_qkx3_quants(n, nmax, x, w, L, the_min, Laux, rmin, rdelta, nstep, false)
       with weights, transcribed (n <= 32) */
    static float kq_qkx3(int n, int nmax, const float* x, const float* w, uint8_t* L,
                         float* the_min, float rmin, float rdelta, int nstep) {
        uint8_t Laux[32];
        float mn = x[0], mx = x[0], sum_w = w[0], sum_x = sum_w * x[0];
        int i, is;
        for (i = 1; i < n; i++) {
            if (x[i] < mn) mn = x[i];
            if (x[i] > mx) mx = x[i];
            sum_w += w[i];
            sum_x += w[i] * x[i];
        }
        if (mn > 0) mn = 0;
        if (mx <= mn) {
            memset(L, 0, n);
            *the_min = -mn;
            return 0.f;
        }
        float iscale = nmax / (mx - mn), scale = 1 / iscale, best = 0;
        for (i = 0; i < n; i++) {
            int l = fq_nearest_int(iscale * (x[i] - mn));
            L[i] = l < 0 ? 0 : (l > nmax ? nmax : l);
            float diff = scale * L[i] + mn - x[i];
            best += w[i] * (diff * diff);
        }
        for (is = 0; is <= nstep; is++) {
            iscale = (rmin + rdelta * is + nmax) / (mx - mn);
            float sum_l = 0, sum_l2 = 0, sum_xl = 0;
            for (i = 0; i < n; i++) {
                int l = fq_nearest_int(iscale * (x[i] - mn));
                l = l < 0 ? 0 : (l > nmax ? nmax : l);
                Laux[i] = l;
                sum_l += w[i] * l;
                sum_l2 += w[i] * l * l;
                sum_xl += w[i] * l * x[i];
            }
            float D = sum_w * sum_l2 - sum_l * sum_l;
            if (D > 0) {
                float ts = (sum_w * sum_xl - sum_x * sum_l) / D;
                float tm = (sum_l2 * sum_x - sum_l * sum_xl) / D;
                if (tm > 0) {
                    tm = 0;
                    ts = sum_xl / sum_l2;
                }
                float cur = 0;
                for (i = 0; i < n; i++) {
                    float diff = ts * Laux[i] + tm - x[i];
                    cur += w[i] * (diff * diff);
                }
                if (cur < best) {
                    memcpy(L, Laux, n);
                    best = cur;
                    scale = ts;
                    mn = tm;
                }
            }
        }
        *the_min = -mn;
        return scale;
    }

    /* ggml's make_qp_quants(n, nmax, x, L, qw), transcribed (L is uint8_t as there) */
    static float kq_qp(int n, int nmax, const float* x, uint8_t* L, const float* qw) {
        float mx = 0;
        int i, is, itry;
        for (i = 0; i < n; i++) mx = mx > x[i] ? mx : x[i];
        if (mx < K_GROUP_MAX_EPS) {
            memset(L, 0, n);
            return 0.f;
        }
        float iscale = nmax / mx;
        for (i = 0; i < n; i++) L[i] = (uint8_t)fq_nearest_int(iscale * x[i]);
        float scale = 1 / iscale, best_mse = 0;
        for (i = 0; i < n; i++) {
            float diff = x[i] - scale * L[i];
            best_mse += qw[i] * diff * diff;
        }
        for (is = -4; is <= 4; is++) {
            if (is == 0) continue;
            float iscale_is = (0.1f * is + nmax) / mx, scale_is = 1 / iscale_is, mse = 0;
            for (i = 0; i < n; i++) {
                int l = fq_nearest_int(iscale_is * x[i]);
                l = l < nmax ? l : nmax;
                float diff = x[i] - scale_is * l;
                mse += qw[i] * diff * diff;
            }
            if (mse < best_mse) {
                best_mse = mse;
                iscale = iscale_is;
            }
        }
        float sumlx = 0, suml2 = 0;
        for (i = 0; i < n; i++) {
            int l = fq_nearest_int(iscale * x[i]);
            l = l < nmax ? l : nmax;
            L[i] = (uint8_t)l;
            sumlx += qw[i] * x[i] * l;
            suml2 += qw[i] * l * l;
        }
        for (itry = 0; itry < 5; itry++) {
            int n_changed = 0;
            for (i = 0; i < n; i++) {
                float w = qw[i];
                float slx = sumlx - w * x[i] * L[i];
                float sl2 = suml2 - w * L[i] * L[i];
                if (slx > 0 && sl2 > 0) {
                    int nl = fq_nearest_int(x[i] * sl2 / slx);
                    nl = nl < nmax ? nl : nmax;
                    if (nl != L[i]) {
                        slx += w * x[i] * nl;
                        sl2 += w * nl * nl;
                        if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                            L[i] = (uint8_t)nl;
                            sumlx = slx;
                            suml2 = sl2;
                            n_changed++;
                        }
                    }
                }
            }
            if (!n_changed) break;
        }
        return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
    }

    /* ggml's make_qx_quants(n, nmax, x, L, rmse_type 1, qw) with weights, transcribed */
    static float kq_qx(int n, int nmax, const float* x, int8_t* L, const float* qw) {
        float mx = 0, amax = 0;
        int i, is;
        for (i = 0; i < n; i++) {
            float ax = fabsf(x[i]);
            if (ax > amax) {
                amax = ax;
                mx = x[i];
            }
        }
        if (amax < K_GROUP_MAX_EPS) {
            memset(L, 0, n);
            return 0.f;
        }
        float iscale = -nmax / mx, sumlx = 0, suml2 = 0;
        for (i = 0; i < n; i++) {
            int l = fq_nearest_int(iscale * x[i]);
            l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
            L[i] = (int8_t)(l + nmax);
            sumlx += qw[i] * x[i] * l;
            suml2 += qw[i] * l * l;
        }
        float scale = suml2 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
        for (is = -9; is <= 9; is++) {
            if (is == 0) continue;
            iscale = -(nmax + 0.1f * is) / mx;
            sumlx = suml2 = 0;
            for (i = 0; i < n; i++) {
                int l = fq_nearest_int(iscale * x[i]);
                l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
                sumlx += qw[i] * x[i] * l;
                suml2 += qw[i] * l * l;
            }
            if (suml2 > 0 && sumlx * sumlx > best * suml2) {
                for (i = 0; i < n; i++) {
                    int l = fq_nearest_int(iscale * x[i]);
                    L[i] = (int8_t)(nmax + (l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l)));
                }
                scale = sumlx / suml2;
                best = scale * sumlx;
            }
        }
        return scale;
    }

    /* ggml's per-super-block weights qw*sqrt(sigma2 + x*x), sigma2 = f*sum(x*x)/256 (f = 1
       for Q2_K, 2 for the others), and each sub-block's sum of them (sub-blocks of n) */
    static void kq_weights(const float* x, const float* qw, float f, int n, float* w,
                           float* sw) {
        float sumx2 = 0;
        int i, j;
        for (i = 0; i < 256; i++) sumx2 += x[i] * x[i];
        float sigma2 = f == 1.f ? sumx2 / 256 : f * sumx2 / 256;
        for (i = 0; i < 256; i++) w[i] = qw[i] * sqrtf(sigma2 + x[i] * x[i]);
        for (j = 0; j < 256 / n; j++) {
            float s = 0;
            for (i = 0; i < n; i++) s += w[n * j + i];
            sw[j] = s;
        }
    }

    /* ---- mse with importance: a local search from the impl's block ----
       ns sub-blocks of n, transposed (xt[i*ns + s]; wt: the importance weights alike);
       affine x_hat = (d*sc)*q - dmin*m (q in 0..hi), or (m NULL) symmetric (d*sc)*q (q in
       lo..hi); codes to nearest for a given (sc, m), as floats in qt (transposed). */
    #define KQ_ROUNDS 3    /* rounds of (scale search, d refit) */
    #define KQ_REACH 2     /* scales and mins tried: the current ones +- KQ_REACH */
    #define KQ_REACH_SYM 3 /* scales tried by the symmetric types (no min) */

    /* all sub-blocks' codes for (d, dmin, sc, m); the block's error (the float32
       sub-block errors added in double, in order) */
    static double kq_eval(const float* xt, const float* wt, int ns, int n, int lo, int hi,
                          float d, float dmin, const int* sc, const int* m, float* qt) {
        float ds[16], dm[16], e[16];
        double tot = 0;
        int j;
        for (j = 0; j < ns; j++) {
            ds[j] = d * (float)sc[j];
            dm[j] = m ? dmin * (float)m[j] : 0.f;
        }
        kq_err(xt, wt, ns, n, (float)lo, (float)hi, m != NULL, ds, dm, e, qt);
        for (j = 0; j < ns; j++) tot = tot + (double)e[j];
        return tot;
    }

    /* The search (the reference's kq_search): scales in [smin, smax], mins in [0, mmax];
       starts from (d, dmin, sc, m) and changes them (and the codes qt) only where the
       weighted error drops; returns the block's error. */
    static double kq_search(const float* xt, const float* wt, int ns, int n, int lo, int hi,
                            int smin, int smax, int mmax, float* d, float* dmin, int* sc,
                            int* m, float* qt) {
        float qc[256], ds[16], dm[16], e[16], best[16];
        int bs[16], bm[16];
        int j, r, da, db, i, aff = m != NULL;
        int reach = aff ? KQ_REACH : KQ_REACH_SYM, mreach = aff ? KQ_REACH : 0;
        float dmn = aff ? *dmin : 0.f;
        double tot = kq_eval(xt, wt, ns, n, lo, hi, *d, dmn, sc, m, qt);
        for (r = 0; r < KQ_ROUNDS; r++) {
            /* each sub-block's scale (and min) among its neighbours, all side by side */
            for (j = 0; j < ns; j++) {
                bs[j] = sc[j];
                bm[j] = aff ? m[j] : 0;
                ds[j] = *d * (float)bs[j];
                dm[j] = dmn * (float)bm[j];
            }
            kq_err(xt, wt, ns, n, (float)lo, (float)hi, aff, ds, dm, best, NULL);
            for (da = -reach; da <= reach; da++) {
                for (db = -mreach; db <= mreach; db++) {
                    if (da == 0 && db == 0) continue;
                    for (j = 0; j < ns; j++) {
                        ds[j] = *d * (float)(sc[j] + da);
                        dm[j] = dmn * (float)((aff ? m[j] : 0) + db);
                    }
                    kq_err(xt, wt, ns, n, (float)lo, (float)hi, aff, ds, dm, e, NULL);
                    for (j = 0; j < ns; j++) {
                        int a = sc[j] + da, b = (aff ? m[j] : 0) + db;
                        if (a < smin || a > smax || (aff && (b < 0 || b > mmax))) continue;
                        if (e[j] < best[j]) {
                            best[j] = e[j];
                            bs[j] = a;
                            bm[j] = b;
                        }
                    }
                }
            }
            for (j = 0; j < ns; j++) {
                sc[j] = bs[j];
                if (aff) m[j] = bm[j];
            }
            /* d (and dmin) refit by weighted least squares on those codes */
            tot = kq_eval(xt, wt, ns, n, lo, hi, *d, dmn, sc, m, qt);
            double saa = 0, sab = 0, sbb = 0, sax = 0, sbx = 0, nd, nm = 0;
            for (j = 0; j < ns; j++) {
                double bv = aff ? (double)m[j] : 0.0;
                for (i = 0; i < n; i++) {
                    double wi = wt[ns * i + j], xi = xt[ns * i + j];
                    double av = (double)sc[j] * (double)qt[ns * i + j];
                    saa = saa + wi * av * av;
                    sab = sab + wi * av * bv;
                    sbb = sbb + wi * bv * bv;
                    sax = sax + wi * av * xi;
                    sbx = sbx + wi * bv * xi;
                }
            }
            double det = saa * sbb - sab * sab;
            if (aff && det > 0) {
                nd = (sax * sbb - sab * sbx) / det;
                nm = (sab * sax - saa * sbx) / det;
            } else if (saa > 0) {
                nd = sax / saa;
                nm = aff ? (double)dmn : 0.0;
            } else {
                break;
            }
            float d2 = fq_fp16_to_fp32(fq_fp32_to_fp16((float)nd));
            float m2 = fq_fp16_to_fp32(fq_fp32_to_fp16((float)nm));
            if (!(d2 == d2) || !(m2 == m2) || isinf(d2) || isinf(m2)) break;
            if (d2 == *d && (!aff || m2 == dmn)) break;
            double t2 = kq_eval(xt, wt, ns, n, lo, hi, d2, m2, sc, m, qc);
            if (!(t2 < tot)) break;
            tot = t2;
            *d = d2;
            dmn = m2;
            memcpy(qt, qc, sizeof(float) * ns * n);
        }
        if (aff) *dmin = dmn;
        return tot;
    }
    """
    float kq_qkx3(int n, int nmax, const float* x, const float* w, uint8_t* L,
                  float* the_min, float rmin, float rdelta, int nstep) noexcept nogil
    float kq_qp(int n, int nmax, const float* x, uint8_t* L, const float* qw) noexcept nogil
    float kq_qx(int n, int nmax, const float* x, int8_t* L, const float* qw) noexcept nogil
    void kq_weights(const float* x, const float* qw, float f, int n, float* w,
                    float* sw) noexcept nogil
    double kq_eval(const float* xt, const float* wt, int ns, int n, int lo, int hi, float d,
                   float dmin, const int* sc, const int* m, float* qt) noexcept nogil
    double kq_search(const float* xt, const float* wt, int ns, int n, int lo, int hi,
                     int smin, int smax, int mmax, float* d, float* dmin, int* sc, int* m,
                     float* qt) noexcept nogil
    void kq_qx_lanes(const float* xt, const float* wt, int nmax, float* scales,
                     float* l_isc) noexcept nogil


k456_lane_width(8)


def _k456_lane_width(int w=0):
    """Tests: the lane width of the Q4_K/Q5_K/Q6_K kernels (4, or 8 with AVX2); ``w`` = 4
    or 8 sets it first (the bytes are the same at every width)."""
    return k456_lane_width(w)


cdef enum:
    K45_LLOYD = 1       # mse: code / refit passes on the search's fits before the pairs
    K45_ROUNDS = 4      # mse: rounds of the pair search (it stops early once settled)
    Q6_ROUNDS = 4

# mse keeps its block only when its error is below rtn's by this factor: the float32
# sub-block sums are exact to ~2e-6, so the true error is lower too
cdef double MSE_MARGIN = 1.0 - 1.0 / 65536


cdef inline float k_f16(float v) noexcept nogil:
    """v rounded to float16 and back (the value a stored d or dmin decodes to)."""
    return fq_fp16_to_fp32(fq_fp32_to_fp16(v))


# ---------------------------------------------------------------------------------------
# Q4_K / Q5_K

cdef float k45_qkx2_scalar(const float* x, const float* w, int nmax, float rmin, float rdelta,
                           int nstep, uint8_t* L, float* the_min) noexcept nogil:
    """ggml's make_qkx2_quants (use_mad false, n = 32), transcribed: the path for blocks
    whose search leaves the lanes' exact range."""
    cdef uint8_t Laux[32]
    cdef float mn = x[0], mx = x[0], sum_w = w[0], sum_x = w[0] * x[0]
    cdef float iscale, scale, best, diff, sum_l, sum_l2, sum_xl, D, ts, tm, cur
    cdef int i, k, lv
    for i in range(1, 32):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    if mn > 0:
        mn = 0
    if mx == mn:
        for i in range(32):
            L[i] = 0
        the_min[0] = -mn
        return 0
    iscale = <float>nmax / (mx - mn)
    scale = <float>1 / iscale
    best = 0
    for i in range(32):
        lv = fq_nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, lv))
        diff = (scale * <float>L[i] + mn) - x[i]
        best = best + w[i] * (diff * diff)
    for k in range(nstep + 1):
        iscale = (rmin + rdelta * <float>k + <float>nmax) / (mx - mn)
        sum_l = 0
        sum_l2 = 0
        sum_xl = 0
        for i in range(32):
            lv = max(0, min(nmax, fq_nearest_int(iscale * (x[i] - mn))))
            Laux[i] = lv
            sum_l = sum_l + w[i] * <float>lv
            sum_l2 = sum_l2 + w[i] * <float>lv * <float>lv
            sum_xl = sum_xl + w[i] * <float>lv * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            ts = (sum_w * sum_xl - sum_x * sum_l) / D
            tm = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if tm > 0:
                tm = 0
                ts = sum_xl / sum_l2
            cur = 0
            for i in range(32):
                diff = (ts * <float>Laux[i] + tm) - x[i]
                cur = cur + w[i] * (diff * diff)
            if cur < best:
                for i in range(32):
                    L[i] = Laux[i]
                best = cur
                scale = ts
                mn = tm
    the_min[0] = -mn
    return scale


cdef void k45_pack(const float* d, const float* dmin, const uint8_t* sc, const uint8_t* m,
                   const float* qt, uint8_t* y, int nmax) noexcept nogil:
    """A Q4_K (nmax 15) or Q5_K (nmax 31) block from d, dmin (float16-exact values), the
    6-bit scales and mins and the codes ``qt`` ([i*8 + s])."""
    cdef int c, j, k, q0, q1
    cdef uint8_t* qs = y + 16 if nmax == 15 else y + 48
    fq_store_f16(y, d[0])
    fq_store_f16(y + 2, dmin[0])
    for k in range(4):
        y[4 + k] = sc[k] | ((sc[k + 4] >> 4) << 6)
        y[8 + k] = m[k] | ((m[k + 4] >> 4) << 6)
        y[12 + k] = (sc[k + 4] & 0xF) | ((m[k + 4] & 0xF) << 4)
    for c in range(4):
        for j in range(32):
            q0 = <int>qt[8 * j + 2 * c]
            q1 = <int>qt[8 * j + 2 * c + 1]
            qs[32 * c + j] = <uint8_t>((q0 & 0xF) | ((q1 & 0xF) << 4))
    if nmax == 31:
        for j in range(32):
            c = 0
            for k in range(8):
                c = c | (((<int>qt[8 * j + k]) >> 4) << k)
            y[16 + j] = <uint8_t>c


cdef int k45_quantize(const float* x, uint8_t* y, int method, int nmax, float rmin,
                      float rdelta, int nstep) noexcept nogil:
    """One Q4_K (nmax 15) or Q5_K (nmax 31) block; see the reference for ``method``."""
    cdef float xt[256]
    cdef float wt[256]
    cdef float qt[256]
    cdef float qm[256]
    cdef float wrow[32]
    cdef float scales[8]
    cdef float mins[8]
    cdef float l_isc[8]
    cdef float l_mn[8]
    cdef float u_s[8]
    cdef float u_m[8]
    cdef float u_x[8]
    cdef float dd[8]
    cdef float dm[8]
    cdef float err[8]
    cdef float psc[8]
    cdef float pm[8]
    cdef uint8_t L[256]
    cdef uint8_t sc[8]
    cdef uint8_t m[8]
    cdef int i, s, lv
    cdef bint lanes, mse = method == METHOD_MSE
    cdef float max_scale = 0, max_min = 0, inv_scale, inv_min, d16, dmin16, md16, mdmin16
    cdef double e_rtn = 0, e_mse = 0
    k45_prep(x, xt, wt)
    lanes = k45_lanes(xt, wt, 8, 32, nmax, rmin, rdelta, nstep, scales, mins, l_isc, l_mn,
                      u_s if mse else NULL, u_m, u_x) != 0
    if not lanes:
        for s in range(8):
            for i in range(32):
                wrow[i] = wt[8 * i + s]
            scales[s] = k45_qkx2_scalar(x + 32 * s, wrow, nmax, rmin, rdelta, nstep,
                                        L + 32 * s, mins + s)
    # ggml's quantization of the scales and mins, and its last pass over the codes
    for s in range(8):
        if scales[s] > max_scale:
            max_scale = scales[s]
        if mins[s] > max_min:
            max_min = mins[s]
    inv_scale = <float>63 / max_scale if max_scale > 0 else <float>0
    inv_min = <float>63 / max_min if max_min > 0 else <float>0
    for s in range(8):
        sc[s] = min(<uint8_t>63, <uint8_t>fq_nearest_int(inv_scale * scales[s]))
        m[s] = min(<uint8_t>63, <uint8_t>fq_nearest_int(inv_min * mins[s]))
    d16 = k_f16(max_scale / <float>63)
    dmin16 = k_f16(max_min / <float>63)
    for s in range(8):
        dd[s] = d16 * <float>sc[s]
        dm[s] = dmin16 * <float>m[s]
    if lanes:
        k45_requant(xt, nmax, dd, dm, l_isc, l_mn, qt, err)
    else:
        for s in range(8):
            for i in range(32):
                if dd[s] == 0:
                    lv = L[32 * s + i]
                else:
                    lv = max(0, min(nmax, fq_nearest_int((x[32 * s + i] + dm[s]) / dd[s])))
                qt[8 * i + s] = <float>lv
    if mse and lanes:
        # the search from the unweighted fits; kept only when clearly better than rtn's
        max_scale = 0
        max_min = 0
        for s in range(8):
            e_rtn = e_rtn + err[s]
            if u_s[s] > max_scale:
                max_scale = u_s[s]
            if u_m[s] > max_min:
                max_min = u_m[s]
        md16 = k_f16(max_scale / <float>63)
        mdmin16 = k_f16(max_min / <float>63)
        k45_pairs(xt, nmax, md16, mdmin16, u_s, u_m, u_x, K45_LLOYD, K45_ROUNDS, psc, pm,
                  err, qm)
        for s in range(8):
            e_mse = e_mse + err[s]
        if e_mse < e_rtn * MSE_MARGIN:
            for s in range(8):
                sc[s] = <uint8_t>psc[s]
                m[s] = <uint8_t>pm[s]
            k45_pack(&md16, &mdmin16, sc, m, qm, y, nmax)
            return 0
    k45_pack(&d16, &dmin16, sc, m, qt, y, nmax)
    return 0


cdef void k45_dequantize(const uint8_t* y, float* x, int nmax) noexcept nogil:
    cdef uint8_t sc[8]
    cdef uint8_t m[8]
    cdef float d = fq_load_f16(y), dmin = fq_load_f16(y + 2), ds, dm
    cdef const uint8_t* qs = y + 16 if nmax == 15 else y + 48
    cdef int s, jj, q
    for s in range(4):
        sc[s] = y[4 + s] & 63
        m[s] = y[8 + s] & 63
        sc[s + 4] = (y[12 + s] & 0xF) | ((y[4 + s] >> 6) << 4)
        m[s + 4] = (y[12 + s] >> 4) | ((y[8 + s] >> 6) << 4)
    for s in range(8):
        ds = d * <float>sc[s]
        dm = dmin * <float>m[s]
        for jj in range(32):
            q = (qs[32 * (s >> 1) + jj] >> (4 * (s & 1))) & 0xF
            if nmax == 31:
                q = q | (((y[16 + jj] >> s) & 1) << 4)
            x[32 * s + jj] = ds * <float>q - dm


# ---------------------------------------------------------------------------------------
# Q6_K

cdef void q6_pack(float d, const int8_t* sc, const float* qt, uint8_t* y) noexcept nogil:
    """A Q6_K block from d (float16-exact), the int8 scales and the codes 0..63 ``qt``
    ([i*16 + s], element 16*s + i)."""
    cdef int hf, jj, k, e
    cdef int q[4]
    for hf in range(2):
        for jj in range(32):
            for k in range(4):
                e = 128 * hf + 32 * k + jj
                q[k] = <int>qt[16 * (e & 15) + (e >> 4)]
            y[64 * hf + jj] = <uint8_t>((q[0] & 0xF) | ((q[2] & 0xF) << 4))
            y[64 * hf + 32 + jj] = <uint8_t>((q[1] & 0xF) | ((q[3] & 0xF) << 4))
            y[128 + 32 * hf + jj] = <uint8_t>((q[0] >> 4) | ((q[1] >> 4) << 2)
                                              | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6))
    memcpy(y + 192, sc, 16)
    fq_store_f16(y + 208, d)


cdef int q6_quantize(const float* x, uint8_t* y, int method) noexcept nogil:
    """One Q6_K block; see the reference for ``method``."""
    cdef float xt[256]
    cdef float qt[256]
    cdef float qm[256]
    cdef float scales[16]
    cdef float l_isc[16]
    cdef float u_s[16]
    cdef float dd[16]
    cdef float err[16]
    cdef float psc[16]
    cdef int8_t sc[16]
    cdef int i, s
    cdef bint mse = method == METHOD_MSE
    cdef float max_scale = 0, max_abs = 0, iscale, d16, md16
    cdef double e_rtn = 0, e_mse = 0
    for i in range(16):
        for s in range(16):
            xt[16 * i + s] = x[16 * s + i]
    q6_lanes(xt, scales, l_isc, u_s if mse else NULL)
    for s in range(16):
        if fabsf(scales[s]) > max_abs:
            max_abs = fabsf(scales[s])
            max_scale = scales[s]
    if max_abs < K_GROUP_MAX_EPS:
        memset(y, 0, 210)
        return 0
    iscale = <float>-128 / max_scale
    d16 = k_f16(<float>1 / iscale)
    for s in range(16):
        sc[s] = <int8_t>min(127, fq_nearest_int(iscale * scales[s]))
        dd[s] = d16 * <float>sc[s]
    q6_requant(xt, dd, l_isc, qt, err)
    if mse:
        # the search from the unweighted fits; kept only when clearly better than rtn's
        max_scale = 0
        max_abs = 0
        for s in range(16):
            e_rtn = e_rtn + err[s]
            if fabsf(u_s[s]) > max_abs:
                max_abs = fabsf(u_s[s])
                max_scale = u_s[s]
        md16 = k_f16(max_scale / <float>-128)
        q6_pairs(xt, md16, u_s, Q6_ROUNDS, psc, err, qm)
        for s in range(16):
            e_mse = e_mse + err[s]
        if e_mse < e_rtn * MSE_MARGIN:
            for s in range(16):
                sc[s] = <int8_t>(<int>psc[s])
            q6_pack(md16, sc, qm, y)
            return 0
    q6_pack(d16, sc, qt, y)
    return 0


cdef void q6_dequantize(const uint8_t* y, float* x) noexcept nogil:
    cdef float d = fq_load_f16(y + 208), ds
    cdef int8_t sc
    cdef int hf, k, jj, q, j
    for hf in range(2):
        for k in range(4):
            for jj in range(32):
                j = 128 * hf + 32 * k + jj
                q = ((y[64 * hf + 32 * (k & 1) + jj] >> (4 * (k >> 1))) & 0xF) | (
                    ((y[128 + 32 * hf + jj] >> (2 * k)) & 3) << 4)
                memcpy(&sc, y + 192 + (j >> 4), 1)
                ds = d * <float>sc
                x[j] = ds * <float>(q - 32)


# ---------------------------------------------------------------------------------------
# importance: ggml's quantize_row_q{4,5,6}_K_impl (rtn) and the weighted search (mse)


cdef void k45_unpack_scales(const uint8_t* b, int* sc, int* m) noexcept nogil:
    """ggml's get_scale_min_k4 of all 8 sub-blocks from the 12 packed bytes."""
    cdef int s
    for s in range(4):
        sc[s] = b[s] & 63
        m[s] = b[4 + s] & 63
        sc[s + 4] = (b[8 + s] & 0xF) | ((b[s] >> 6) << 4)
        m[s + 4] = (b[8 + s] >> 4) | ((b[4 + s] >> 6) << 4)


cdef int k45_quantize_imp(const float* x, uint8_t* y, int method, int nmax,
                          const float* qw) noexcept nogil:
    """One Q4_K (nmax 15) or Q5_K (nmax 31) block with importance ``qw``: rtn is ggml's
    quantize_row_q{4,5}_K_impl; mse searches from it (the reference says how)."""
    cdef float w[256]
    cdef float xt[256]
    cdef float wt[256]
    cdef float qt[256]
    cdef float sw[8]
    cdef float scales[8]
    cdef float mins[8]
    cdef float l_isc[8]
    cdef float l_mn[8]
    cdef float dd[8]
    cdef float dm[8]
    cdef float err[8]
    cdef float dummy[8]
    cdef uint8_t L[256]
    cdef uint8_t Ls[8]
    cdef uint8_t Lm[8]
    cdef uint8_t sb[12]
    cdef uint8_t sc8[8]
    cdef uint8_t m8[8]
    cdef int sc[8]
    cdef int m[8]
    cdef int i, s, lv
    cdef uint8_t ls, lm
    cdef bint lanes
    cdef float d16, dmin16
    cdef double e0, e1
    kq_weights(x, qw, 2, 32, w, sw)
    for i in range(32):
        for s in range(8):
            xt[8 * i + s] = x[32 * s + i]
            wt[8 * i + s] = w[32 * s + i]
    lanes = k45_lanes(xt, wt, 8, 32, nmax, <float>-0.9, <float>0.05, 36, scales, mins, l_isc, l_mn,
                      NULL, dummy, dummy) != 0
    if not lanes:
        for s in range(8):
            scales[s] = kq_qkx3(32, nmax, x + 32 * s, w + 32 * s, L + 32 * s, mins + s,
                                <float>-0.9, <float>0.05, 36)
    d16 = k_f16(kq_qp(8, 63, scales, Ls, sw))
    dmin16 = k_f16(kq_qp(8, 63, mins, Lm, sw))
    # the impl's packing, step for step (a scale past 63 spills as it does there)
    memset(sb, 0, 12)
    for s in range(8):
        ls = Ls[s]
        lm = Lm[s]
        if nmax == 31:
            ls = min(<uint8_t>63, ls)
            lm = min(<uint8_t>63, lm)
        if s < 4:
            sb[s] = ls
            sb[s + 4] = lm
        else:
            sb[s + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sb[s - 4] = sb[s - 4] | ((ls >> 4) << 6)
            sb[s] = sb[s] | ((lm >> 4) << 6)
    k45_unpack_scales(sb, sc, m)
    for s in range(8):
        dd[s] = d16 * <float>sc[s]
        dm[s] = dmin16 * <float>m[s]
    if lanes:
        k45_requant(xt, nmax, dd, dm, l_isc, l_mn, qt, err)
    else:
        for s in range(8):
            for i in range(32):
                if dd[s] == 0:
                    lv = L[32 * s + i]
                else:
                    lv = max(0, min(nmax, fq_nearest_int((x[32 * s + i] + dm[s]) / dd[s])))
                qt[8 * i + s] = <float>lv
    for s in range(8):
        sc8[s] = <uint8_t>sc[s]
        m8[s] = <uint8_t>m[s]
    k45_pack(&d16, &dmin16, sc8, m8, qt, y, nmax)
    memcpy(y + 4, sb, 12)
    if method != METHOD_MSE:
        return 0
    for i in range(32):
        for s in range(8):
            wt[8 * i + s] = qw[32 * s + i]
    e0 = kq_eval(xt, wt, 8, 32, 0, nmax, d16, dmin16, sc, m, qt)
    e1 = kq_search(xt, wt, 8, 32, 0, nmax, 0, 63, 63, &d16, &dmin16, sc, m, qt)
    if e1 < e0 * MSE_MARGIN:
        for s in range(8):
            sc8[s] = <uint8_t>sc[s]
            m8[s] = <uint8_t>m[s]
        k45_pack(&d16, &dmin16, sc8, m8, qt, y, nmax)
    return 0


cdef int q6_quantize_imp(const float* x, uint8_t* y, int method, const float* qw) noexcept nogil:
    """One Q6_K block with importance ``qw``: rtn is ggml's quantize_row_q6_K_impl; mse
    searches from it."""
    cdef float xt[256]
    cdef float wt[256]
    cdef float qt[256]
    cdef float scales[16]
    cdef float l_isc[16]
    cdef int8_t sc8[16]
    cdef int sc[16]
    cdef int i, s, lv
    cdef float max_scale = 0, max_abs = 0, a, iscale, d16, ds
    cdef double e0, e1
    for i in range(16):
        for s in range(16):
            xt[16 * i + s] = x[16 * s + i]
            wt[16 * i + s] = qw[16 * s + i]
    kq_qx_lanes(xt, wt, 32, scales, l_isc)
    for s in range(16):
        a = fabsf(scales[s])
        if a > max_abs:
            max_abs = a
            max_scale = scales[s]
    if max_abs < K_GROUP_MAX_EPS:
        memset(y, 0, 210)
        return 0
    iscale = <float>-128 / max_scale
    d16 = k_f16(<float>1 / iscale)
    for s in range(16):
        sc8[s] = <int8_t>min(127, fq_nearest_int(iscale * scales[s]))
        sc[s] = sc8[s]
        ds = d16 * <float>sc8[s]
        for i in range(16):
            if ds != 0:
                lv = max(-32, min(31, fq_nearest_int(xt[16 * i + s] / ds))) + 32
            elif l_isc[s] == 0:
                lv = 0  # ggml's all-zero sub-block
            else:
                lv = max(-32, min(31, fq_nearest_int(l_isc[s] * xt[16 * i + s]))) + 32
            qt[16 * i + s] = <float>lv
    q6_pack(d16, sc8, qt, y)
    if method != METHOD_MSE:
        return 0
    e0 = kq_eval(xt, wt, 16, 16, -32, 31, d16, 0, sc, NULL, qt)
    e1 = kq_search(xt, wt, 16, 16, -32, 31, -128, 127, 0, &d16, NULL, sc, NULL, qt)
    if e1 < e0 * MSE_MARGIN:
        for s in range(16):
            sc8[s] = <int8_t>sc[s]
        for i in range(256):
            qt[i] = qt[i] + 32
        q6_pack(d16, sc8, qt, y)
    return 0


# ---------------------------------------------------------------------------------------
# the block functions

cdef int q4_k_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    if qw != NULL:
        return k45_quantize_imp(x, y, method, 15, qw)
    return k45_quantize(x, y, method, 15, <float>-1.0, <float>0.1, 20)


cdef void q4_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    k45_dequantize(y, x, 15)


cdef int q5_k_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    if qw != NULL:
        return k45_quantize_imp(x, y, method, 31, qw)
    return k45_quantize(x, y, method, 31, <float>-0.5, <float>0.1, 15)


cdef void q5_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    k45_dequantize(y, x, 31)


cdef int q6_k_quantize_block(const float* x, uint8_t* y, int method, const float* qw,
                             float sigma2) noexcept nogil:
    if qw != NULL:
        return q6_quantize_imp(x, y, method, qw)
    return q6_quantize(x, y, method)


cdef void q6_k_dequantize_block(const uint8_t* y, float* x) noexcept nogil:
    q6_dequantize(y, x)
