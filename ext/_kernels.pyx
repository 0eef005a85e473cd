# Quantization kernels: thin, nogil, OpenMP over blocks of groups.
#
# The arithmetic is a port of flightquant/reference/__init__.py (its docstring has the
# formulas; the mse search is reordered for speed, see its section); outputs must match it
# bit for bit for float32 input at any thread count. Rules that keep it so:
#   * float32 where the reference uses float32, float64 where it uses float64; every float
#     constant that meets a float32 value is cast to float first (a bare C literal is double);
#   * x / scale is a division, never a multiplication by an inverse;
#   * float64 sums run strictly in index order (the reference uses np.add.accumulate);
#   * round half to even by the magic-constant trick on clamped values, float32 and float64
#     (rint may be a libm call on baseline SSE2, the trick vectorizes);
#   * the build passes -ffp-contract=off: no FMA contraction.
#
# The Python wrapper (flightquant/kernels.py) validates everything and allocates outputs;
# nothing here allocates a Python object, raises or prints. Non-finite input is reported as
# a count of bad blocks; the wrapper finds the exact element with NumPy.

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport fabs, fabsf
from libc.stdint cimport int64_t, uint8_t, uint32_t
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
    #define FQ_MAGIC_D 6755399441055744.0
    """
    float FQ_INF_F
    float MAGIC_F "FQ_MAGIC_F"
    int MAGIC_I "FQ_MAGIC_I"
    float TRUE_MIN_F "FQ_TRUE_MIN_F"

# The mse search's hot loops, in C: a portable version (plain loops over the candidate
# lanes, which compilers vectorize) and, on x86-64 with GCC or Clang, one template written
# with intrinsics and compiled for SSE2 (the x86-64 baseline) and for AVX2, picked at run
# time (never -march=native: the extension must load on any x86-64). Every version does
# the same IEEE operations lane by lane, lanes being candidates, never elements, and no
# FMA (-ffp-contract=off; the AVX2 target leaves FMA out), so all give identical results;
# the tests run each one this CPU has (mse_isa()).
cdef extern from *:
    """
    #include <stdint.h>
    #if defined(_MSC_VER)
    #define FQ_INLINE static __forceinline
    #else
    #define FQ_INLINE static inline __attribute__((always_inline))
    #endif
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    #define FQ_X86 1
    #include <immintrin.h>
    #else
    #define FQ_X86 0
    #endif
    #define FQ_STEPS 21             /* grids searched (reference.MSE_STEPS) */
    #define FQ_LSQ 24               /* grid lanes: FQ_STEPS padded to whole vectors */
    #define FQ_CAND 24              /* candidate lanes: 1 + FQ_STEPS, padded likewise */

    /* ---- portable: plain loops that compilers vectorize over the lanes ---------------- */

    /* sum(L), sum(L*L), sum(x*L) of the FQ_LSQ grids and sum(x), each in index order, for
       L = rint(min(isc[k] * (x - mn), qmax)) (x - mn >= 0: the clamp at 0 never acts) */
    static void fq_lsq_asym_portable(const double* xd, int64_t m, double mn, double qmax,
                                     const double* isc, double* sl, double* sl2, double* sxl,
                                     double* sx)
    {
        double a[FQ_LSQ], a2[FQ_LSQ], ax[FQ_LSQ], ic[FQ_LSQ], s = *sx;
        int64_t i;
        int k;
        for (k = 0; k < FQ_LSQ; k++) {
            a[k] = sl[k]; a2[k] = sl2[k]; ax[k] = sxl[k]; ic[k] = isc[k];
        }
        for (i = 0; i < m; i++) {
            double v = xd[i], t = v - mn;
            s = s + v;
            for (k = 0; k < FQ_LSQ; k++) {
                double l = ic[k] * t;
                l = l > qmax ? qmax : l;
                l = (l + FQ_MAGIC_D) - FQ_MAGIC_D;
                a[k] = a[k] + l;
                a2[k] = a2[k] + l * l;
                ax[k] = ax[k] + v * l;
            }
        }
        for (k = 0; k < FQ_LSQ; k++) {
            sl[k] = a[k]; sl2[k] = a2[k]; sxl[k] = ax[k];
        }
        *sx = s;
    }

    /* sum(L*L), sum(x*L) of the FQ_LSQ grids, L = rint(clamp(isc[k] * x, qmin, qmax)) */
    static void fq_lsq_symm_portable(const double* xd, int64_t m, double qmin, double qmax,
                                     const double* isc, double* sl2, double* sxl)
    {
        double a2[FQ_LSQ], ax[FQ_LSQ], ic[FQ_LSQ];
        int64_t i;
        int k;
        for (k = 0; k < FQ_LSQ; k++) {
            a2[k] = sl2[k]; ax[k] = sxl[k]; ic[k] = isc[k];
        }
        for (i = 0; i < m; i++) {
            double v = xd[i];
            for (k = 0; k < FQ_LSQ; k++) {
                double l = ic[k] * v;
                l = l < qmin ? qmin : l;
                l = l > qmax ? qmax : l;
                l = (l + FQ_MAGIC_D) - FQ_MAGIC_D;
                a2[k] = a2[k] + l * l;
                ax[k] = ax[k] + v * l;
            }
        }
        for (k = 0; k < FQ_LSQ; k++) {
            sl2[k] = a2[k]; sxl[k] = ax[k];
        }
    }

    /* isc[k] = (c0 + step * k) / rng for the FQ_STEPS grids; the padding lanes repeat the
       last grid (FQ_KK holds k as float64) */
    static const double FQ_KK[FQ_LSQ] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                         16, 17, 18, 19, 20, 20, 20, 20};

    static void fq_grids_portable(double c0, double step, double rng, double* isc)
    {
        int k;
        for (k = 0; k < FQ_LSQ; k++)
            isc[k] = (c0 + step * FQ_KK[k]) / rng;
    }

    /* every grid's least-squares fit: asymmetric (sl given) d = n*sl2 - sl*sl,
       s = (n*sxl - sl*sum_x) / d, m = (sl2*sum_x - sl*sxl) / d; symmetric d = sl2,
       s = sxl / sl2, m = 0 */
    static void fq_fits_portable(double nd, const double* sl, const double* sl2,
                                 const double* sxl, double sum_x, int asym, double* d,
                                 double* s, double* m)
    {
        int k;
        if (asym) {
            for (k = 0; k < FQ_LSQ; k++) {
                d[k] = nd * sl2[k] - sl[k] * sl[k];
                s[k] = (nd * sxl[k] - sl[k] * sum_x) / d[k];
                m[k] = (sl2[k] * sum_x - sl[k] * sxl[k]) / d[k];
            }
        } else {
            for (k = 0; k < FQ_LSQ; k++) {
                d[k] = sl2[k];
                s[k] = sxl[k] / sl2[k];
                m[k] = 0;
            }
        }
    }

    /* The candidates in the reference's order after lane 0 (the rtn one, already in cb, cs,
       cz): grid k gives scale f32(s[k]) and base f32(m[k]) when d[k] > 0 and the scale > 0.
       A grid equal to the valid grid before it is left out: its error would be the same,
       and only a strictly lower error replaces the best (equal grids come in runs, as L
       grows with k). No branch on the data: which grids are distinct is unpredictable.
       Lanes from the returned count up to FQ_CAND are copies of lane 0; cz = -cb / cs
       (asymmetric) or 0. Returns the candidate count, lane 0 included. */
    static int fq_candidates(const double* d, const double* s, const double* m, int asym,
                             float* cb, float* cs, float* cz)
    {
        int k, j, nc = 1, valid, prev_valid = 0;
        float sc, mc, prev_sc = 0, prev_mc = 0;
        for (k = 0; k < FQ_STEPS; k++) {
            sc = (float)s[k];
            mc = (float)m[k];
            valid = (d[k] > 0) & (sc > 0);
            cb[nc] = mc;
            cs[nc] = sc;
            nc += valid & !(prev_valid & (sc == prev_sc) & (mc == prev_mc));
            prev_valid = valid;
            prev_sc = sc;
            prev_mc = mc;
        }
        for (j = nc; j < FQ_CAND; j++) {
            cb[j] = cb[0];
            cs[j] = cs[0];
        }
        for (j = 1; j < FQ_CAND; j++)
            cz[j] = asym ? (-cb[j]) / cs[j] : 0.0f;
        return nc;
    }

    /* The reference _sse of the FQ_CAND candidates (b, s, z): q = rint(clamp((x - b) / s,
       qmin, qmax)), x_hat = (q - z) * s in float32, sum((f64(x_hat) - f64(x))**2) in index
       order. Symmetric / ternary candidates have b = z = 0 (x - 0 and q - 0 are exact). */
    static void fq_sse_portable(const float* xs, const double* xd, int64_t m, float qmin,
                                float qmax, const float* b, const float* s, const float* z,
                                double* e, int nc, int symm)
    {
        float cb[FQ_CAND], cs[FQ_CAND], cz[FQ_CAND];
        double ce[FQ_CAND];
        int64_t i;
        int j;
        (void)nc; (void)symm;       /* all lanes: a fixed count keeps the loop vectorized */
        for (j = 0; j < FQ_CAND; j++) {
            cb[j] = b[j]; cs[j] = s[j]; cz[j] = z[j]; ce[j] = e[j];
        }
        for (i = 0; i < m; i++) {
            float xc = xs[i];
            double xv = xd[i];
            for (j = 0; j < FQ_CAND; j++) {
                float v = (xc - cb[j]) / cs[j];
                v = v < qmin ? qmin : v;
                v = v > qmax ? qmax : v;
                v = (v + FQ_MAGIC_F) - FQ_MAGIC_F;
                v = (v - cz[j]) * cs[j];
                double d = (double)v - xv;
                ce[j] = ce[j] + d * d;
            }
        }
        for (j = 0; j < FQ_CAND; j++)
            e[j] = ce[j];
    }

    #if FQ_X86
    /* ---- x86-64: the same arithmetic with SSE2 and AVX2 intrinsics ------------------------
       One template (FQ_X86_LOOPS) instantiated for both; accumulators stay in registers,
       NB vectors of lanes at a time. C's `v < lo ? lo : v` is max(lo, v) and
       `v > hi ? hi : v` is min(hi, v) with the operands in that order (x86 min / max return
       the second operand on ties and NaN, as the C expressions do). */
    #define S2_F __m128
    #define S2_D __m128d
    #define S2_FW 4
    #define S2_DW 2
    #define S2_FLOAD _mm_loadu_ps
    #define S2_FSET _mm_set1_ps
    #define S2_FADD _mm_add_ps
    #define S2_FSUB _mm_sub_ps
    #define S2_FMUL _mm_mul_ps
    #define S2_FDIV _mm_div_ps
    #define S2_FMIN _mm_min_ps
    #define S2_FMAX _mm_max_ps
    #define S2_DLOAD _mm_loadu_pd
    #define S2_DSTORE _mm_storeu_pd
    #define S2_DSET _mm_set1_pd
    #define S2_DADD _mm_add_pd
    #define S2_DSUB _mm_sub_pd
    #define S2_DMUL _mm_mul_pd
    #define S2_DDIV _mm_div_pd
    #define S2_DMIN _mm_min_pd
    #define S2_DMAX _mm_max_pd
    #define S2_DLO(f) _mm_cvtps_pd(f)
    #define S2_DHI(f) _mm_cvtps_pd(_mm_movehl_ps(f, f))
    #define S2_ATTR

    #define AV_F __m256
    #define AV_D __m256d
    #define AV_FW 8
    #define AV_DW 4
    #define AV_FLOAD _mm256_loadu_ps
    #define AV_FSET _mm256_set1_ps
    #define AV_FADD _mm256_add_ps
    #define AV_FSUB _mm256_sub_ps
    #define AV_FMUL _mm256_mul_ps
    #define AV_FDIV _mm256_div_ps
    #define AV_FMIN _mm256_min_ps
    #define AV_FMAX _mm256_max_ps
    #define AV_DLOAD _mm256_loadu_pd
    #define AV_DSTORE _mm256_storeu_pd
    #define AV_DSET _mm256_set1_pd
    #define AV_DADD _mm256_add_pd
    #define AV_DSUB _mm256_sub_pd
    #define AV_DMUL _mm256_mul_pd
    #define AV_DDIV _mm256_div_pd
    #define AV_DMIN _mm256_min_pd
    #define AV_DMAX _mm256_max_pd
    #define AV_DLO(f) _mm256_cvtps_pd(_mm256_castps256_ps128(f))
    #define AV_DHI(f) _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1))
    #define AV_ATTR __attribute__((target("avx2")))

    #define FQ_SSE_BLK(NAME, NB, SYMM)                                                         \\
        fq_sse_blk_##NAME(xs, xd, m, qmin, qmax, cb, cs, cz, e, j0, NB, SYMM)

    #define FQ_X86_LOOPS(I, NAME)                                                              \\
    I##_ATTR static void fq_grids_##NAME(double c0, double step, double rng, double* isc)      \\
    {                                                                                          \\
        I##_D vc = I##_DSET(c0), vs = I##_DSET(step), vr = I##_DSET(rng);                      \\
        int k;                                                                                 \\
        for (k = 0; k < FQ_LSQ; k += I##_DW)                                                   \\
            I##_DSTORE(isc + k, I##_DDIV(I##_DADD(vc, I##_DMUL(vs, I##_DLOAD(FQ_KK + k))), vr)); \\
    }                                                                                          \\
    I##_ATTR static void fq_fits_##NAME(double nd, const double* sl, const double* sl2,        \\
            const double* sxl, double sum_x, int asym, double* d, double* s, double* m)        \\
    {                                                                                          \\
        I##_D vn = I##_DSET(nd), vx = I##_DSET(sum_x);                                         \\
        int k;                                                                                 \\
        if (!asym) {                                                                           \\
            fq_fits_portable(nd, sl, sl2, sxl, sum_x, 0, d, s, m);                             \\
            return;                                                                            \\
        }                                                                                      \\
        for (k = 0; k < FQ_LSQ; k += I##_DW) {                                                 \\
            I##_D a = I##_DLOAD(sl + k), a2 = I##_DLOAD(sl2 + k), ax = I##_DLOAD(sxl + k);     \\
            I##_D dd = I##_DSUB(I##_DMUL(vn, a2), I##_DMUL(a, a));                             \\
            I##_DSTORE(d + k, dd);                                                             \\
            I##_DSTORE(s + k, I##_DDIV(I##_DSUB(I##_DMUL(vn, ax), I##_DMUL(a, vx)), dd));      \\
            I##_DSTORE(m + k, I##_DDIV(I##_DSUB(I##_DMUL(a2, vx), I##_DMUL(a, ax)), dd));      \\
        }                                                                                      \\
    }                                                                                          \\
    /* NB vectors of grids from lane k0 */                                                     \\
    I##_ATTR FQ_INLINE void fq_lsq_asym_blk_##NAME(const double* xd, int64_t m, double mn,     \\
            double qmax, const double* isc, double* sl, double* sl2, double* sxl, double* sx,  \\
            const int k0, const int NB)                                                        \\
    {                                                                                          \\
        I##_D a[3], a2[3], ax[3], ic[3];                                                       \\
        I##_D vq = I##_DSET(qmax), vm = I##_DSET(FQ_MAGIC_D), vmn = I##_DSET(mn);              \\
        double s = *sx;                                                                        \\
        int64_t i;                                                                             \\
        int b;                                                                                 \\
        for (b = 0; b < NB; b++) {                                                             \\
            a[b] = I##_DLOAD(sl + k0 + b * I##_DW);                                            \\
            a2[b] = I##_DLOAD(sl2 + k0 + b * I##_DW);                                          \\
            ax[b] = I##_DLOAD(sxl + k0 + b * I##_DW);                                          \\
            ic[b] = I##_DLOAD(isc + k0 + b * I##_DW);                                          \\
        }                                                                                      \\
        for (i = 0; i < m; i++) {                                                              \\
            I##_D v = I##_DSET(xd[i]), t = I##_DSUB(v, vmn);                                   \\
            s = s + xd[i];                                                                     \\
            for (b = 0; b < NB; b++) {                                                         \\
                I##_D l = I##_DMIN(vq, I##_DMUL(ic[b], t));                                    \\
                l = I##_DSUB(I##_DADD(l, vm), vm);                                             \\
                a[b] = I##_DADD(a[b], l);                                                      \\
                a2[b] = I##_DADD(a2[b], I##_DMUL(l, l));                                       \\
                ax[b] = I##_DADD(ax[b], I##_DMUL(v, l));                                       \\
            }                                                                                  \\
        }                                                                                      \\
        for (b = 0; b < NB; b++) {                                                             \\
            I##_DSTORE(sl + k0 + b * I##_DW, a[b]);                                            \\
            I##_DSTORE(sl2 + k0 + b * I##_DW, a2[b]);                                          \\
            I##_DSTORE(sxl + k0 + b * I##_DW, ax[b]);                                          \\
        }                                                                                      \\
        *sx = s;                                                                               \\
    }                                                                                          \\
    I##_ATTR static void fq_lsq_asym_##NAME(const double* xd, int64_t m, double mn,            \\
            double qmax, const double* isc, double* sl, double* sl2, double* sxl, double* sx)  \\
    {                                                                                          \\
        double unused = 0;                                                                     \\
        int k0;                                                                                \\
        fq_lsq_asym_blk_##NAME(xd, m, mn, qmax, isc, sl, sl2, sxl, sx, 0, 3);                  \\
        for (k0 = 3 * I##_DW; k0 < FQ_LSQ; k0 += 3 * I##_DW)                                   \\
            fq_lsq_asym_blk_##NAME(xd, m, mn, qmax, isc, sl, sl2, sxl, &unused, k0, 3);        \\
    }                                                                                          \\
    I##_ATTR FQ_INLINE void fq_lsq_symm_blk_##NAME(const double* xd, int64_t m, double qmin,   \\
            double qmax, const double* isc, double* sl2, double* sxl, const int k0,            \\
            const int NB)                                                                      \\
    {                                                                                          \\
        I##_D a2[3], ax[3], ic[3];                                                             \\
        I##_D vlo = I##_DSET(qmin), vq = I##_DSET(qmax), vm = I##_DSET(FQ_MAGIC_D);            \\
        int64_t i;                                                                             \\
        int b;                                                                                 \\
        for (b = 0; b < NB; b++) {                                                             \\
            a2[b] = I##_DLOAD(sl2 + k0 + b * I##_DW);                                          \\
            ax[b] = I##_DLOAD(sxl + k0 + b * I##_DW);                                          \\
            ic[b] = I##_DLOAD(isc + k0 + b * I##_DW);                                          \\
        }                                                                                      \\
        for (i = 0; i < m; i++) {                                                              \\
            I##_D v = I##_DSET(xd[i]);                                                         \\
            for (b = 0; b < NB; b++) {                                                         \\
                I##_D l = I##_DMIN(vq, I##_DMAX(vlo, I##_DMUL(ic[b], v)));                     \\
                l = I##_DSUB(I##_DADD(l, vm), vm);                                             \\
                a2[b] = I##_DADD(a2[b], I##_DMUL(l, l));                                       \\
                ax[b] = I##_DADD(ax[b], I##_DMUL(v, l));                                       \\
            }                                                                                  \\
        }                                                                                      \\
        for (b = 0; b < NB; b++) {                                                             \\
            I##_DSTORE(sl2 + k0 + b * I##_DW, a2[b]);                                          \\
            I##_DSTORE(sxl + k0 + b * I##_DW, ax[b]);                                          \\
        }                                                                                      \\
    }                                                                                          \\
    I##_ATTR static void fq_lsq_symm_##NAME(const double* xd, int64_t m, double qmin,          \\
            double qmax, const double* isc, double* sl2, double* sxl)                          \\
    {                                                                                          \\
        int k0;                                                                                \\
        for (k0 = 0; k0 < FQ_LSQ; k0 += 3 * I##_DW)                                            \\
            fq_lsq_symm_blk_##NAME(xd, m, qmin, qmax, isc, sl2, sxl, k0, 3);                   \\
    }                                                                                          \\
    /* NB float vectors of candidates from lane j0; SYMM leaves out b and z (both 0) */        \\
    I##_ATTR FQ_INLINE void fq_sse_blk_##NAME(const float* xs, const double* xd, int64_t m,    \\
            float qmin, float qmax, const float* cb, const float* cs, const float* cz,         \\
            double* e, const int j0, const int NB, const int SYMM)                             \\
    {                                                                                          \\
        I##_D e0[3], e1[3];                                                                    \\
        I##_F bb[3], ss[3], zz[3];                                                             \\
        I##_F vlo = I##_FSET(qmin), vhi = I##_FSET(qmax), vm = I##_FSET(FQ_MAGIC_F);           \\
        int64_t i;                                                                             \\
        int b;                                                                                 \\
        for (b = 0; b < NB; b++) {                                                             \\
            bb[b] = I##_FLOAD(cb + j0 + b * I##_FW);                                           \\
            ss[b] = I##_FLOAD(cs + j0 + b * I##_FW);                                           \\
            zz[b] = I##_FLOAD(cz + j0 + b * I##_FW);                                           \\
            e0[b] = I##_DLOAD(e + j0 + b * I##_FW);                                            \\
            e1[b] = I##_DLOAD(e + j0 + b * I##_FW + I##_DW);                                   \\
        }                                                                                      \\
        for (i = 0; i < m; i++) {                                                              \\
            I##_F xc = I##_FSET(xs[i]);                                                        \\
            I##_D xv = I##_DSET(xd[i]);                                                        \\
            for (b = 0; b < NB; b++) {                                                         \\
                I##_F v = SYMM ? I##_FDIV(xc, ss[b]) : I##_FDIV(I##_FSUB(xc, bb[b]), ss[b]);   \\
                I##_D d0, d1;                                                                  \\
                v = I##_FMIN(vhi, I##_FMAX(vlo, v));                                           \\
                v = I##_FSUB(I##_FADD(v, vm), vm);                                             \\
                v = SYMM ? I##_FMUL(v, ss[b]) : I##_FMUL(I##_FSUB(v, zz[b]), ss[b]);           \\
                d0 = I##_DSUB(I##_DLO(v), xv);                                                 \\
                d1 = I##_DSUB(I##_DHI(v), xv);                                                 \\
                e0[b] = I##_DADD(e0[b], I##_DMUL(d0, d0));                                     \\
                e1[b] = I##_DADD(e1[b], I##_DMUL(d1, d1));                                     \\
            }                                                                                  \\
        }                                                                                      \\
        for (b = 0; b < NB; b++) {                                                             \\
            I##_DSTORE(e + j0 + b * I##_FW, e0[b]);                                            \\
            I##_DSTORE(e + j0 + b * I##_FW + I##_DW, e1[b]);                                   \\
        }                                                                                      \\
    }                                                                                          \\
    I##_ATTR static void fq_sse_##NAME(const float* xs, const double* xd, int64_t m,           \\
            float qmin, float qmax, const float* cb, const float* cs, const float* cz,         \\
            double* e, int nc, int symm)                                                       \\
    {                                                                                          \\
        /* whole vectors in blocks of up to 3; with AVX2 a last 1..4 lanes take an SSE one */  \\
        int nvec = nc / I##_FW, rest = nc % I##_FW, j0 = 0, nv;                                \\
        if (rest > 4 || I##_FW == 4) {                                                         \\
            nvec += rest > 0;                                                                  \\
            rest = 0;                                                                          \\
        }                                                                                      \\
        for (; nvec > 0; nvec -= nv, j0 += nv * I##_FW) {                                      \\
            nv = nvec > 3 ? 3 : nvec;                                                          \\
            if (symm && nv == 3) FQ_SSE_BLK(NAME, 3, 1);                                       \\
            else if (symm && nv == 2) FQ_SSE_BLK(NAME, 2, 1);                                  \\
            else if (symm) FQ_SSE_BLK(NAME, 1, 1);                                             \\
            else if (nv == 3) FQ_SSE_BLK(NAME, 3, 0);                                          \\
            else if (nv == 2) FQ_SSE_BLK(NAME, 2, 0);                                          \\
            else FQ_SSE_BLK(NAME, 1, 0);                                                       \\
        }                                                                                      \\
        if (rest > 0 && symm) FQ_SSE_BLK(sse2, 1, 1);                                          \\
        else if (rest > 0) FQ_SSE_BLK(sse2, 1, 0);                                             \\
    }

    FQ_X86_LOOPS(S2, sse2)
    FQ_X86_LOOPS(AV, avx2)
    #endif  /* FQ_X86 */

    /* ---- importance-weighted search (element i weighted by wd[i]): plain loops over the
       lanes, the same operations whatever the ISA. The least-squares sums become
       sum(w), sum(w*x), sum(w*L), sum(w*(L*L)), sum(w*(x*L)) and the error
       sum(w*(d*d)), each in index order (reference._mse_group with w). ------------------ */

    #define FQ_WEIGHTED(NAME, ATTR)                                                            \\
    ATTR static void fq_wlsq_asym_##NAME(const double* xd, const double* wd, int64_t m,        \\
            double mn, double qmax, const double* isc, double* sl, double* sl2,                \\
            double* sxl, double* sw, double* swx)                                              \\
    {                                                                                          \\
        double a[FQ_LSQ], a2[FQ_LSQ], ax[FQ_LSQ], ic[FQ_LSQ], s = *swx, t0 = *sw;              \\
        int64_t i;                                                                             \\
        int k;                                                                                 \\
        for (k = 0; k < FQ_LSQ; k++) {                                                         \\
            a[k] = sl[k]; a2[k] = sl2[k]; ax[k] = sxl[k]; ic[k] = isc[k];                      \\
        }                                                                                      \\
        for (i = 0; i < m; i++) {                                                              \\
            double v = xd[i], w = wd[i], t = v - mn;                                           \\
            t0 = t0 + w;                                                                       \\
            s = s + w * v;                                                                     \\
            for (k = 0; k < FQ_LSQ; k++) {                                                     \\
                double l = ic[k] * t;                                                          \\
                l = l > qmax ? qmax : l;                                                       \\
                l = (l + FQ_MAGIC_D) - FQ_MAGIC_D;                                             \\
                a[k] = a[k] + w * l;                                                           \\
                a2[k] = a2[k] + w * (l * l);                                                   \\
                ax[k] = ax[k] + w * (v * l);                                                   \\
            }                                                                                  \\
        }                                                                                      \\
        for (k = 0; k < FQ_LSQ; k++) {                                                         \\
            sl[k] = a[k]; sl2[k] = a2[k]; sxl[k] = ax[k];                                      \\
        }                                                                                      \\
        *sw = t0;                                                                              \\
        *swx = s;                                                                              \\
    }                                                                                          \\
                                                                                               \\
    ATTR static void fq_wlsq_symm_##NAME(const double* xd, const double* wd, int64_t m,        \\
            double qmin, double qmax, const double* isc, double* sl2, double* sxl)             \\
    {                                                                                          \\
        double a2[FQ_LSQ], ax[FQ_LSQ], ic[FQ_LSQ];                                             \\
        int64_t i;                                                                             \\
        int k;                                                                                 \\
        for (k = 0; k < FQ_LSQ; k++) {                                                         \\
            a2[k] = sl2[k]; ax[k] = sxl[k]; ic[k] = isc[k];                                    \\
        }                                                                                      \\
        for (i = 0; i < m; i++) {                                                              \\
            double v = xd[i], w = wd[i];                                                       \\
            for (k = 0; k < FQ_LSQ; k++) {                                                     \\
                double l = ic[k] * v;                                                          \\
                l = l < qmin ? qmin : l;                                                       \\
                l = l > qmax ? qmax : l;                                                       \\
                l = (l + FQ_MAGIC_D) - FQ_MAGIC_D;                                             \\
                a2[k] = a2[k] + w * (l * l);                                                   \\
                ax[k] = ax[k] + w * (v * l);                                                   \\
            }                                                                                  \\
        }                                                                                      \\
        for (k = 0; k < FQ_LSQ; k++) {                                                         \\
            sl2[k] = a2[k]; sxl[k] = ax[k];                                                    \\
        }                                                                                      \\
    }                                                                                          \\
                                                                                               \\
    ATTR static void fq_wsse_##NAME(const float* xs, const double* xd, const double* wd,       \\
            int64_t m, float qmin, float qmax, const float* b, const float* s,                 \\
            const float* z, double* e)                                                         \\
    {                                                                                          \\
        float cb[FQ_CAND], cs[FQ_CAND], cz[FQ_CAND];                                           \\
        double ce[FQ_CAND];                                                                    \\
        int64_t i;                                                                             \\
        int j;                                                                                 \\
        for (j = 0; j < FQ_CAND; j++) {                                                        \\
            cb[j] = b[j]; cs[j] = s[j]; cz[j] = z[j]; ce[j] = e[j];                            \\
        }                                                                                      \\
        for (i = 0; i < m; i++) {                                                              \\
            float xc = xs[i];                                                                  \\
            double xv = xd[i], w = wd[i];                                                      \\
            for (j = 0; j < FQ_CAND; j++) {                                                    \\
                float v = (xc - cb[j]) / cs[j];                                                \\
                v = v < qmin ? qmin : v;                                                       \\
                v = v > qmax ? qmax : v;                                                       \\
                v = (v + FQ_MAGIC_F) - FQ_MAGIC_F;                                             \\
                v = (v - cz[j]) * cs[j];                                                       \\
                double d = (double)v - xv;                                                     \\
                ce[j] = ce[j] + w * (d * d);                                                   \\
            }                                                                                  \\
        }                                                                                      \\
        for (j = 0; j < FQ_CAND; j++)                                                          \\
            e[j] = ce[j];                                                                      \\
    }                                                                                          \\

    FQ_WEIGHTED(portable, )
    #if FQ_X86
    /* the same loops compiled for AVX2 (wider vectors over the lanes, no FMA) */
    FQ_WEIGHTED(avx2, __attribute__((target("avx2"))))
    #endif

    /* which loops the mse search runs: FQ_ISA_PORTABLE, _SSE2 or _AVX2 (set at import to the
       best this CPU runs, changed only by tests and benchmarks between calls) */
    #define FQ_ISA_PORTABLE 0
    #define FQ_ISA_SSE2 1
    #define FQ_ISA_AVX2 2
    static int fq_isa = FQ_ISA_PORTABLE;

    static int fq_isa_supported(int isa)
    {
        if (isa == FQ_ISA_PORTABLE)
            return 1;
    #if FQ_X86
        if (isa == FQ_ISA_SSE2)
            return 1;
        if (isa == FQ_ISA_AVX2) {
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx2") != 0;
        }
    #endif
        return 0;
    }

    #if FQ_X86
    #define FQ_DISPATCH(FN, ARGS)                                                              \\
        if (fq_isa == FQ_ISA_AVX2) { FN##_avx2 ARGS; return; }                                 \\
        if (fq_isa == FQ_ISA_SSE2) { FN##_sse2 ARGS; return; }                                 \\
        FN##_portable ARGS;
    #else
    #define FQ_DISPATCH(FN, ARGS) FN##_portable ARGS;
    #endif

    static void fq_lsq_asym(const double* xd, int64_t m, double mn, double qmax,
                            const double* isc, double* sl, double* sl2, double* sxl, double* sx)
    {
        FQ_DISPATCH(fq_lsq_asym, (xd, m, mn, qmax, isc, sl, sl2, sxl, sx))
    }

    static void fq_lsq_symm(const double* xd, int64_t m, double qmin, double qmax,
                            const double* isc, double* sl2, double* sxl)
    {
        FQ_DISPATCH(fq_lsq_symm, (xd, m, qmin, qmax, isc, sl2, sxl))
    }

    static void fq_grids(double c0, double step, double rng, double* isc)
    {
        FQ_DISPATCH(fq_grids, (c0, step, rng, isc))
    }

    static void fq_fits(double nd, const double* sl, const double* sl2, const double* sxl,
                        double sum_x, int asym, double* d, double* s, double* m)
    {
        FQ_DISPATCH(fq_fits, (nd, sl, sl2, sxl, sum_x, asym, d, s, m))
    }

    static void fq_sse(const float* xs, const double* xd, int64_t m, float qmin, float qmax,
                       const float* b, const float* s, const float* z, double* e, int nc,
                       int symm)
    {
        FQ_DISPATCH(fq_sse, (xs, xd, m, qmin, qmax, b, s, z, e, nc, symm))
    }

    #if FQ_X86
    #define FQ_WDISPATCH(FN, ARGS)                                                             \\
        if (fq_isa == FQ_ISA_AVX2) { FN##_avx2 ARGS; return; }                                 \\
        FN##_portable ARGS;
    #else
    #define FQ_WDISPATCH(FN, ARGS) FN##_portable ARGS;
    #endif

    static void fq_wlsq_asym(const double* xd, const double* wd, int64_t m, double mn,
                             double qmax, const double* isc, double* sl, double* sl2,
                             double* sxl, double* sw, double* swx)
    {
        FQ_WDISPATCH(fq_wlsq_asym, (xd, wd, m, mn, qmax, isc, sl, sl2, sxl, sw, swx))
    }

    static void fq_wlsq_symm(const double* xd, const double* wd, int64_t m, double qmin,
                             double qmax, const double* isc, double* sl2, double* sxl)
    {
        FQ_WDISPATCH(fq_wlsq_symm, (xd, wd, m, qmin, qmax, isc, sl2, sxl))
    }

    static void fq_wsse(const float* xs, const double* xd, const double* wd, int64_t m,
                        float qmin, float qmax, const float* b, const float* s, const float* z,
                        double* e)
    {
        FQ_WDISPATCH(fq_wsse, (xs, xd, wd, m, qmin, qmax, b, s, z, e))
    }
    """
    enum:
        MSE_STEPS "FQ_STEPS"
        LSQ_PAD "FQ_LSQ"
        SSE_PAD "FQ_CAND"
    int fq_isa
    int fq_isa_supported(int isa) noexcept nogil
    int fq_candidates(const double* d, const double* s, const double* m, bint asym,
                      float* cb, float* cs, float* cz) noexcept nogil
    void fq_grids(double c0, double step, double rng, double* isc) noexcept nogil
    void fq_fits(double nd, const double* sl, const double* sl2, const double* sxl,
                 double sum_x, bint asym, double* d, double* s, double* m) noexcept nogil
    void fq_lsq_asym(const double* xd, int64_t m, double mn, double qmax, const double* isc,
                     double* sl, double* sl2, double* sxl, double* sx) noexcept nogil
    void fq_lsq_symm(const double* xd, int64_t m, double qmin, double qmax,
                     const double* isc, double* sl2, double* sxl) noexcept nogil
    void fq_sse(const float* xs, const double* xd, int64_t m, float qmin, float qmax,
                const float* b, const float* s, const float* z, double* e, int nc,
                bint symm) noexcept nogil
    void fq_wlsq_asym(const double* xd, const double* wd, int64_t m, double mn, double qmax,
                      const double* isc, double* sl, double* sl2, double* sxl, double* sw,
                      double* swx) noexcept nogil
    void fq_wlsq_symm(const double* xd, const double* wd, int64_t m, double qmin,
                      double qmax, const double* isc, double* sl2, double* sxl) noexcept nogil
    void fq_wsse(const float* xs, const double* xd, const double* wd, int64_t m, float qmin,
                 float qmax, const float* b, const float* s, const float* z,
                 double* e) noexcept nogil

cdef enum:
    SCHEME_ASYMMETRIC = 0
    SCHEME_SYMMETRIC = 1
    SCHEME_TERNARY = 2
    METHOD_RTN = 0
    METHOD_MSE = 1
    SCALE_F32 = 1       # options.SCALE_DTYPE_CODES
    SCALE_F16 = 2
    SCALE_BF16 = 3
    CHUNK = 4096        # codes per stack scratch chunk (a multiple of 8)
    LANES = 32          # independent min/max accumulators (a vectorizable inner loop)
    HINT_STRIDE = 8     # int64 slots per thread's row hint (one cache line apart)
    MSE_CHUNK = 512     # elements of a group staged at a time by the mse search
    MSE_BLOCKS_PER_CHUNK = 64   # blocks a thread takes at a time in the mse search
    STATS_CHUNK = 256   # elements per pass of write_codes_stats' error buffers
    SSE_LANES = 8       # partial sums of a group's SSE (reference._lanesum)

# MAGIC_F = 1.5 * 2**23: (v + M) - M rounds half to even for |v| < 2**22 (FQ_MAGIC_D,
# 1.5 * 2**52, does the same for float64 and |v| < 2**51 in the C loops).
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


def stage_max():
    """The longest group (elements) the kernels stage through a thread's scratch."""
    return STAGE_MAX


_ISA_NAMES = ("portable", "sse2", "avx2")     # the FQ_ISA_* codes


def _best_isa():
    cdef int isa = len(_ISA_NAMES) - 1
    while not fq_isa_supported(isa):
        isa -= 1
    return isa


fq_isa = _best_isa()


def mse_isa(name=None):
    """The vector loops the mse search runs: "avx2" or "sse2" on x86-64 (the best this CPU
    has is chosen at import), "portable" elsewhere. ``name`` switches to another one this
    CPU runs and the previous name is returned (tests compare them: results are the same
    bit for bit). Not thread-safe: switch only between calls."""
    global fq_isa
    previous = _ISA_NAMES[fq_isa]
    if name is not None:
        if name not in _ISA_NAMES or not fq_isa_supported(_ISA_NAMES.index(name)):
            available = [n for i, n in enumerate(_ISA_NAMES) if fq_isa_supported(i)]
            raise ValueError(f"mse_isa must be one of {available} here, got {name!r}")
        fq_isa = _ISA_NAMES.index(name)
    return previous


# ---------------------------------------------------------------------------------------
# small helpers

cdef inline float clampf(float v, float lo, float hi) noexcept nogil:
    v = lo if v < lo else v
    return hi if v > hi else v


cdef inline float round_f(float v) noexcept nogil:
    return (v + MAGIC_F) - MAGIC_F


include "block_rows.pxi"


cdef inline int64_t find_row(const int64_t* bo, int64_t nrows, int64_t blk,
                             int64_t* hint) noexcept nogil:
    """The row r with bo[r] <= blk < bo[r+1] (rows without blocks are skipped).

    ``hint`` is this thread's last row: a thread's blocks come in increasing order (a
    static schedule, or the dynamic one's chunks), so the row is nearly always the hint
    or a few rows after it; a binary search over block_offsets is the fallback.
    """
    cdef int64_t lo = hint[0], _steps
    if 0 <= lo < nrows and bo[lo] <= blk:
        for _steps in range(8):
            if blk < bo[lo + 1]:
                hint[0] = lo
                return lo
            lo += 1
            if lo >= nrows:
                break
    lo = row_of(bo, nrows, blk)
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


cdef inline float round_scale(float s, int dtype) noexcept nogil:
    """A scale (>= 0, finite) rounded to the dtype it is stored in, to nearest, ties to
    even (reference.round_scale: ml_dtypes' bfloat16, NumPy's float16)."""
    cdef uint32_t u
    cdef float r
    if dtype == SCALE_BF16:
        memcpy(&u, &s, 4)
        u = (u + <uint32_t>0x7FFF + ((u >> 16) & 1)) & <uint32_t>0xFFFF0000
        memcpy(&r, &u, 4)
        return r
    if dtype == SCALE_F16:
        if s < <float>6.103515625e-05:    # below 2**-14: float16 subnormals, steps of 2**-24
            return round_f(s * <float>16777216.0) * <float>5.9604644775390625e-08
        memcpy(&u, &s, 4)
        u = (u + <uint32_t>0xFFF + ((u >> 13) & 1)) & <uint32_t>0xFFFFE000
        memcpy(&r, &u, 4)
        return FQ_INF_F if r > <float>65504.0 else r
    return s


cdef inline void store_params(GroupQ* g, const Params* p) noexcept nogil:
    """The group's parameters as stored (reference._stored): the scale rounded to its
    dtype; an asymmetric zero point the integer rint(clamp(zp, 0, qmax)), base -(Z * s)."""
    cdef float s = round_scale(g.scale, p.scale_dtype), z = 0
    g.scale = s
    if p.scheme == SCHEME_ASYMMETRIC:
        if s > 0:
            z = g.zp
            z = 0 if z < 0 else z
            z = p.qmax if z > p.qmax else z
            z = round_f(z)
        g.zp = z
        g.base = -(z * s)


cdef inline void store_candidate(float* b, float* s, float* z, bint asym,
                                 const Params* p) noexcept nogil:
    """An mse candidate (base, scale, zero point) as store_params stores it."""
    cdef GroupQ g
    g.base = b[0]
    g.scale = s[0]
    g.zp = z[0]
    store_params(&g, p)
    s[0] = g.scale
    if asym:
        b[0] = g.base
        z[0] = g.zp


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
                                   uint8_t* q, double* lanes, int64_t base,
                                   double* maxerr) noexcept nogil:
    """write_codes plus the SSE / max |error| against the unclamped input.

    ``x[0]`` is element ``base`` of its group. The squared errors go to SSE_LANES partial
    sums, element i of the group to lane i % SSE_LANES, each lane in index order; the
    caller adds the lanes in lane order at the end of the group (reference._lanesum). Eight
    independent sums instead of one chain: a group of up to eight elements gets exactly
    the sequential sum. The errors are computed STATS_CHUNK at a time in loops that
    vectorize (a maximum has no order)."""
    cdef double dd[STATS_CHUNK]
    cdef double ae[STATS_CHUNK]
    cdef double mxl[LANES]
    cdef int64_t c0, i, j, k
    cdef float xh, zp = g.zp, scale = g.scale
    cdef double d, me = maxerr[0]
    cdef int64_t lane = base % SSE_LANES
    write_codes(x, m, p, g, q)
    for j in range(LANES):
        mxl[j] = me
    c0 = 0
    while c0 < m:
        k = m - c0
        k = STATS_CHUNK if k > STATS_CHUNK else k
        for i in range(k):
            xh = (<float>q[c0 + i] - zp) * scale
            d = <double>xh - <double><float>x[c0 + i]
            dd[i] = d * d
            ae[i] = fabs(d)
        i = 0
        while i < k and lane != 0:          # up to the next lane-0 element
            lanes[lane] = lanes[lane] + dd[i]
            lane = (lane + 1) % SSE_LANES
            i += 1
        while i + SSE_LANES <= k:           # whole rounds of the lanes: vectorizes
            for j in range(SSE_LANES):
                lanes[j] = lanes[j] + dd[i + j]
            i += SSE_LANES
        while i < k:
            lanes[lane] = lanes[lane] + dd[i]
            lane = (lane + 1) % SSE_LANES
            i += 1
        i = 0
        while i + LANES <= k:
            for j in range(LANES):
                mxl[j] = ae[i + j] if ae[i + j] > mxl[j] else mxl[j]
            i += LANES
        for i in range(i, k):
            mxl[0] = ae[i] if ae[i] > mxl[0] else mxl[0]
        c0 += k
    for j in range(LANES):
        me = mxl[j] if mxl[j] > me else me
    maxerr[0] = me


# ---------------------------------------------------------------------------------------
# method="mse": reference._mse_group, restructured for speed with the same arithmetic.
#
# The search is two sweeps over the group, each on float32 / float64 copies of the clamped
# values staged MSE_CHUNK at a time:
#   1. the least-squares sums of all 21 grids at once (fq_lsq_*);
#   2. the squared error of every distinct candidate, the rtn one included (fq_sse).
# Each sum is still a float64 sum in index order, as in the reference: the lanes of the
# vector loops are candidates, never elements, so vectorizing changes no rounding. Sums
# start from -0.0, the identity of IEEE addition (0.0 + -0.0 would be +0.0). rint on
# float64 is the exact magic-constant round half to even, (v + 1.5*2**52) - 1.5*2**52, on
# values already clamped to [qmin, qmax].

cdef inline void stage_chunk(const floating* x, int64_t m, const Params* p, float* xs,
                             double* xd) noexcept nogil:
    cdef int64_t i
    cdef float v, lo = p.lo, hi = p.hi
    for i in range(m):
        v = <float>x[i]
        v = lo if v < lo else v
        v = hi if v > hi else v
        xs[i] = v
        xd[i] = v


cdef inline void stage_weights(const uint8_t* wrow, int64_t k, int64_t e, int64_t m,
                               double* wd) noexcept nogil:
    """wd[i] = the weight of row element e + i: float32 wrow[(e + i) % k] (any address)."""
    cdef int64_t i, j = e % k
    cdef float v
    for i in range(m):
        memcpy(&v, wrow + 4 * j, 4)
        wd[i] = v
        j += 1
        if j == k:
            j = 0


cdef GroupQ mse_search(const floating* x, int64_t n, const Params* p, GroupQ g0,
                       float mn, float mx, const uint8_t* wrow, int64_t wk,
                       int64_t e0) noexcept nogil:
    """The mse search of one group; with ``wrow`` (the row's ``wk`` importance weights,
    float32 at any address; ``x[0]`` is element ``e0`` of the row) every sum and error is
    importance-weighted."""
    cdef float xs[MSE_CHUNK]
    cdef double xd[MSE_CHUNK]
    cdef double wd[MSE_CHUNK]
    cdef double isc[LSQ_PAD]
    cdef double sl[LSQ_PAD]
    cdef double sl2[LSQ_PAD]
    cdef double sxl[LSQ_PAD]
    cdef double cd[LSQ_PAD]
    cdef double cs_d[LSQ_PAD]
    cdef double cm_d[LSQ_PAD]
    cdef float cb[SSE_PAD]
    cdef float cs[SSE_PAD]
    cdef float cz[SSE_PAD]
    cdef double err[SSE_PAD]
    cdef double qmaxd = p.qmax, qmind = p.qmin, nd = <double>n, sum_x = -0.0, sum_w = -0.0
    cdef double rng, step0, step, best_err
    cdef float qlo
    cdef int64_t c0, m
    cdef int k, j, nc, best = 0, better
    cdef bint asym = p.scheme == SCHEME_ASYMMETRIC
    cdef GroupQ g = g0
    if not g0.scale > 0:
        return g0
    if mn == mx and p.scheme != SCHEME_TERNARY:
        return g0           # a constant group reconstructs exactly: nothing can beat it
    # sweep 1: the grids' least-squares sums (lanes past MSE_STEPS repeat the last grid)
    if asym:
        rng = <double>mx - <double>mn
        step0 = qmaxd + -1.0
        step = 0.1
    else:
        rng = <double>g0.scale
        step0 = 0.5
        step = 0.05
    fq_grids(step0, step, rng, isc)
    for k in range(LSQ_PAD):
        sl[k] = -0.0
        sl2[k] = -0.0
        sxl[k] = -0.0
    c0 = 0
    while c0 < n:
        m = n - c0
        m = MSE_CHUNK if m > MSE_CHUNK else m
        stage_chunk(x + c0, m, p, xs, xd)
        if wrow != NULL:
            stage_weights(wrow, wk, e0 + c0, m, wd)
            if asym:
                fq_wlsq_asym(xd, wd, m, <double>mn, qmaxd, isc, sl, sl2, sxl, &sum_w, &sum_x)
            else:
                fq_wlsq_symm(xd, wd, m, qmind, qmaxd, isc, sl2, sxl)
        elif asym:
            fq_lsq_asym(xd, m, <double>mn, qmaxd, isc, sl, sl2, sxl, &sum_x)
        else:
            fq_lsq_symm(xd, m, qmind, qmaxd, isc, sl2, sxl)
        c0 += m
    if wrow != NULL:
        nd = sum_w          # the weighted fit: n -> sum(w), sum(x) -> sum(w*x)
    # the candidates (lane 0: the rtn result), each distinct one once
    cb[0] = g0.base if asym else 0
    cs[0] = g0.scale
    cz[0] = g0.zp if asym else 0
    qlo = 0 if asym else p.qmin
    fq_fits(nd, sl, sl2, sxl, sum_x, asym, cd, cs_d, cm_d)
    nc = fq_candidates(cd, cs_d, cm_d, asym, cb, cs, cz)
    if nc == 1:
        return g0
    if p.scale_dtype:       # every candidate as it would be stored (store_params)
        if not round_scale(g0.scale, p.scale_dtype) > 0:
            return g0
        for j in range(nc):
            store_candidate(&cb[j], &cs[j], &cz[j], asym, p)
            if not cs[j] > 0:   # its scale underflows: lane 0's again (never better)
                cb[j] = cb[0]
                cs[j] = cs[0]
                cz[j] = cz[0]
    for j in range(SSE_PAD):
        err[j] = -0.0
    # sweep 2: the squared error of every candidate against the clamped input
    c0 = 0
    while c0 < n:
        m = n - c0
        m = MSE_CHUNK if m > MSE_CHUNK else m
        if n > MSE_CHUNK:   # else xs / xd (and wd) still hold the whole group
            stage_chunk(x + c0, m, p, xs, xd)
            if wrow != NULL:
                stage_weights(wrow, wk, e0 + c0, m, wd)
        if wrow != NULL:
            fq_wsse(xs, xd, wd, m, qlo, p.qmax, cb, cs, cz, err)
        else:
            fq_sse(xs, xd, m, qlo, p.qmax, cb, cs, cz, err, nc, not asym)
        c0 += m
    best_err = err[0]
    for j in range(1, nc):
        better = err[j] < best_err
        best += (j - best) * better
        best_err = err[j] if better else best_err
    if best > 0:
        g.scale = cs[best]
        if asym:
            g.base = cb[best]
            g.zp = cz[best]
    return g


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
                     double* gsse, double* gmax, floating* stage, const uint8_t* imp,
                     const int64_t* imp_starts, const int64_t* imp_k) noexcept nogil:
    """Quantize one block; returns 1 when it holds a non-finite value (outputs then junk).

    ``stage`` is NULL for aligned input. For input at an address that is not a multiple
    of the item size (Arrow buffers received over Flight), it is this thread's aligned
    scratch of at least one group: each group is copied there (from L1-sized memory, in
    parallel) and read from there, so no misaligned element is ever dereferenced.
    """
    cdef uint8_t qbuf[CHUNK]
    cdef int64_t r, n, ngr, gi0, gi1, gi, gstart, glen, e0, done, m, fill
    cdef int64_t gs = p.group_size
    cdef const floating* xg
    cdef uint8_t* out
    cdef float mn, mx
    cdef double sse, maxerr
    cdef double lanes[SSE_LANES]
    cdef int j
    cdef GroupQ g
    cdef const uint8_t* wrow = NULL
    r = find_row(bo, nrows, blk, hint)
    if imp != NULL and imp_starts[r] >= 0:
        wrow = imp + 4 * imp_starts[r]
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
        if p.scale_dtype and p.scheme == SCHEME_ASYMMETRIC:  # integer zero points: span 0
            mn = 0 if mn > 0 else mn
            mx = 0 if mx < 0 else mx
        g = rtn_params(xg, glen, p, mn, mx)
        if p.method == METHOD_MSE:
            g = mse_search(xg, glen, p, g, mn, mx, wrow, imp_k[r] if wrow != NULL else 1,
                           gstart)
        if p.scale_dtype:
            store_params(&g, p)
        scales[go[r] + gi] = g.scale
        if p.scheme == SCHEME_ASYMMETRIC:
            zps[go[r] + gi] = g.zp
        for j in range(SSE_LANES):
            lanes[j] = 0.0
        maxerr = 0.0
        if p.bits == 8:                     # codes go straight to the output bytes
            if p.stats:
                write_codes_stats(xg, glen, p, g, out + (gstart - e0), lanes, 0, &maxerr)
            else:
                write_codes(xg, glen, p, g, out + (gstart - e0))
        else:
            done = 0
            while done < glen:
                m = CHUNK - fill
                m = glen - done if m > glen - done else m
                if p.stats:
                    write_codes_stats(xg + done, m, p, g, qbuf + fill, lanes, done, &maxerr)
                else:
                    write_codes(xg + done, m, p, g, qbuf + fill)
                fill += m
                done += m
                if fill == CHUNK:
                    pack_codes(qbuf, CHUNK, p.bits, out)
                    out += (CHUNK * p.bits) // 8
                    fill = 0
        if p.stats:
            sse = lanes[0]
            for j in range(1, SSE_LANES):
                sse = sse + lanes[j]
            gsse[go[r] + gi] = sse
            gmax[go[r] + gi] = maxerr
    if fill > 0:
        pack_codes(qbuf, fill, p.bits, out)
    return 0


cdef void set_params(Params* p, int bits, int scheme, int method, int64_t group_size,
                     int64_t groups_per_block, int qmin, int qmax, int offset,
                     bint has_clip, float clip, bint stats, int scale_dtype) noexcept nogil:
    p.scale_dtype = scale_dtype
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
                          int n_threads, int64_t stage_elems, const uint8_t* imp,
                          const int64_t* imp_starts, const int64_t* imp_k) noexcept nogil:
    """Every block of the layout, in parallel; the number of blocks holding a non-finite
    value, or -1 when scratch memory cannot be had."""
    cdef int64_t n_blocks = bo[nrows]
    cdef int64_t blk, chunk
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
    if p.method == METHOD_MSE:
        # the search costs ~2 us a block: chunks handed out as threads free up, so a
        # thread that the OS preempts (a busy machine) does not hold up the whole call;
        # at least 8 chunks a thread, at most MSE_BLOCKS_PER_CHUNK blocks a chunk
        chunk = n_blocks // (8 * n_threads)
        chunk = MSE_BLOCKS_PER_CHUNK if chunk > MSE_BLOCKS_PER_CHUNK else chunk
        chunk = 1 if chunk < 1 else chunk
        for blk in prange(n_blocks, schedule="dynamic", chunksize=chunk,
                          num_threads=n_threads):
            bad += quant_block(values, row_starts, row_lens, go, co, bo, nrows, blk,
                               hints + HINT_STRIDE * omp_get_thread_num(), p,
                               codes, scales, zps, gsse, gmax,
                               stages + stride * omp_get_thread_num() if stages != NULL
                               else NULL, imp, imp_starts, imp_k)
    else:
        for blk in prange(n_blocks, schedule="static", num_threads=n_threads):
            bad += quant_block(values, row_starts, row_lens, go, co, bo, nrows, blk,
                               hints + HINT_STRIDE * omp_get_thread_num(), p,
                               codes, scales, zps, gsse, gmax,
                               stages + stride * omp_get_thread_num() if stages != NULL
                               else NULL, imp, imp_starts, imp_k)
    free(hints)
    free(stages)
    return bad


# the concrete float32/float64 instances other modules cimport (declared in
# ext/flightquant/_kernels.pxd, which names concrete types rather than the fused one)
cdef int64_t quantize_f32(const float* values, const int64_t* row_starts,
                          const int64_t* row_lens, const int64_t* go, const int64_t* co,
                          const int64_t* bo, int64_t nrows, const Params* p, uint8_t* codes,
                          float* scales, float* zps, double* gsse, double* gmax,
                          int n_threads, int64_t stage_elems, const uint8_t* imp,
                          const int64_t* imp_starts, const int64_t* imp_k) noexcept nogil:
    return quantize_run(values, row_starts, row_lens, go, co, bo, nrows, p, codes, scales,
                        zps, gsse, gmax, n_threads, stage_elems, imp, imp_starts, imp_k)


cdef int64_t quantize_f64(const double* values, const int64_t* row_starts,
                          const int64_t* row_lens, const int64_t* go, const int64_t* co,
                          const int64_t* bo, int64_t nrows, const Params* p, uint8_t* codes,
                          float* scales, float* zps, double* gsse, double* gmax,
                          int n_threads, int64_t stage_elems, const uint8_t* imp,
                          const int64_t* imp_starts, const int64_t* imp_k) noexcept nogil:
    return quantize_run(values, row_starts, row_lens, go, co, bo, nrows, p, codes, scales,
                        zps, gsse, gmax, n_threads, stage_elems, imp, imp_starts, imp_k)


def quantize_kernel(const floating[::1] values, const int64_t[::1] row_starts,
                    const int64_t[::1] row_lens, const int64_t[::1] group_offsets,
                    const int64_t[::1] code_offsets, const int64_t[::1] block_offsets,
                    int64_t groups_per_block, int bits, int scheme, int method,
                    int64_t group_size, int qmin, int qmax, int offset, bint has_clip,
                    float clip, uint8_t[::1] codes, float[::1] scales,
                    float[::1] zero_points, double[::1] group_sse,
                    double[::1] group_max_err, bint stats, int n_threads,
                    int64_t stage_elems=0, const float[::1] importance=None,
                    const int64_t[::1] imp_starts=None, const int64_t[::1] imp_k=None,
                    int scale_dtype=0):
    """Fill codes/scales/zero_points (and stats) for every block; return the number of
    blocks that hold a non-finite value (0 on success). Inputs are validated by the
    caller: every row lies inside ``values`` and the outputs match the layout.

    ``stage_elems > 0`` (the longest group, for misaligned ``values``) makes every thread
    read its groups through an aligned scratch of that many elements. With ``importance``
    (and per row ``imp_starts``, -1 for none, and ``imp_k``) the mse search of row r
    weighs element e by ``importance[imp_starts[r] + e % imp_k[r]]``. ``scale_dtype``
    (``options.SCALE_DTYPE_CODES``, 0: none) stores scales in that dtype (see the
    reference's *Stored scales*)."""
    cdef Params p
    cdef int64_t nrows = row_lens.shape[0]
    cdef int64_t bad
    cdef const uint8_t* imp = NULL
    if importance is not None and importance.shape[0] > 0:
        imp = <const uint8_t*>&importance[0]
    if block_offsets[nrows] == 0:
        return 0
    set_params(&p, bits, scheme, method, group_size, groups_per_block, qmin, qmax, offset,
               has_clip, clip, stats, scale_dtype)
    with nogil:
        bad = quantize_run(&values[0], &row_starts[0], &row_lens[0], &group_offsets[0],
                           &code_offsets[0], &block_offsets[0], nrows, &p, &codes[0],
                           &scales[0], &zero_points[0] if zero_points.shape[0] > 0 else NULL,
                           &group_sse[0] if stats else NULL,
                           &group_max_err[0] if stats else NULL, n_threads, stage_elems,
                           imp, &imp_starts[0] if imp != NULL else NULL,
                           &imp_k[0] if imp != NULL else NULL)
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
