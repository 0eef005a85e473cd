/* Lane kernels of ext/ggml_k456.pxi (Q4_K, Q5_K, Q6_K), included once per vector width.
 *
 * The sub-blocks of a block run side by side, K_W of them in one vector k_v (lanes), with
 * the data transposed: xt[i*NS + s] is element i of sub-block s (NS = 8 for Q4_K/Q5_K,
 * 16 for Q6_K). Each lane performs exactly the scalar float32 operations of the C it
 * mirrors, in the same order, so no vector width changes a result; the includer defines:
 *   K_W (lanes), k_v / k_m (float / int32 vector types of K_W lanes, or float / int for
 *   K_W 1), K_FN(name) (the name suffixed with the width), K_TGT (a target attribute),
 *   K_MAX(a, b) / K_MIN(a, b) (a > b ? a : b / a < b ? a : b, lane by lane). */

#define K_SEL(m, a, b) K_FN(sel)((m), (a), (b))

static inline K_TGT k_v K_FN(sel)(k_m m, k_v a, k_v b) {
#if K_W > 1
    return (k_v)((m & (k_m)a) | (~m & (k_m)b));
#else
    return m ? a : b;
#endif
}

static inline K_TGT k_v K_FN(set)(float a) {
#if K_W == 8
    k_v v = {a, a, a, a, a, a, a, a};
#elif K_W == 4
    k_v v = {a, a, a, a};
#else
    k_v v = a;
#endif
    return v;
}

static inline K_TGT int K_FN(all)(k_m m) {
    int r = 1;
#if K_W > 1
    for (int i = 0; i < K_W; i++) r &= m[i] != 0;
#else
    r = m != 0;
#endif
    return r;
}

static inline K_TGT k_v K_FN(ld)(const float* p) { k_v v; memcpy(&v, p, sizeof v); return v; }
static inline K_TGT void K_FN(st)(float* p, k_v v) { memcpy(p, &v, sizeof v); }

/* nearest_int(v) as a float for |v| <= 2**22 (ggml's 1.5*2**23 trick, done in float) */
static inline K_TGT k_v K_FN(rnd)(k_v v) {
    const k_v m = K_FN(set)(K_MAGIC);
    return (v + m) - m;
}

/* nearest_int(v) itself (ggml's bit trick, right for every float32), as a float */
static inline K_TGT k_v K_FN(nearest)(k_v v) {
    k_v t = v + K_FN(set)(K_MAGIC);
#if K_W > 1
    k_m b;
    memcpy(&b, &t, sizeof b);
    return __builtin_convertvector((b & 0x007fffff) - 0x00400000, k_v);
#else
    int32_t b;
    memcpy(&b, &t, sizeof b);
    return (float)((b & 0x007fffff) - 0x00400000);
#endif
}

/* |v| <= 4e6 (false for NaN): K_FN(rnd) equals nearest_int there */
static inline K_TGT k_m K_FN(fits)(k_v v) {
    const k_v lim = K_FN(set)(4.0e6f);
    return (v <= lim) & (-lim <= v);
}

/* ---- Q4_K / Q5_K: 8 sub-blocks of 32 ---- */

/* The unweighted least-squares fit x ~ s*l + b, b <= 0, of codes l from their sums
   (ul = sum l, ul2 = sum l*l, uxl = sum l*x; ux, ux2: sums of x, x*x), kept as (s, -b)
   where its squared error (closed form) is below *ubest. */
static inline K_TGT void K_FN(k45_ucand)(k_v ul, k_v ul2, k_v uxl, k_v ux, k_v ux2,
                                         k_v* ubest, k_v* us, k_v* um) {
    const k_v zero = K_FN(set)(0.f), n = K_FN(set)(32.f), two = K_FN(set)(2.f);
    k_v D = n * ul2 - ul * ul;
    k_v s = (n * uxl - ul * ux) / D;
    k_v b = (ux - s * ul) / n;
    k_m ok = D > zero;
    s = K_SEL(ok, s, zero);
    b = K_SEL(ok, b, ux / n);
    k_m pos = b > zero;
    s = K_SEL(pos, K_SEL(ul2 > zero, uxl / ul2, zero), s);
    b = K_SEL(pos, zero, b);
    k_v E = ux2 - (two * s) * uxl - (two * b) * ux + (s * s) * ul2 + ((two * s) * b) * ul
            + n * (b * b);
    k_m t = E < *ubest;
    *ubest = K_SEL(t, E, *ubest);
    *us = K_SEL(t, s, *us);
    *um = K_SEL(t, -b, *um);
}

/* ggml's make_qkx2_quants(32, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, false)
   on all 8 sub-blocks: scale, the_min and the (iscale, min) their codes L came from
   (L = clamp(round(iscale*(x - min)), 0, nmax)). With u_s (mse), also the best unweighted
   fit over every set of codes it tries and the sums of x. 0 when a lane could leave
   K_FN(rnd)'s exact range (the caller then takes the scalar path). */
static K_TGT int K_FN(k45_lanes)(const float* xt, const float* wt, int nmax, float rmin,
                                 float rdelta, int nstep, float* scales, float* mins,
                                 float* l_isc, float* l_mn, float* u_s, float* u_m,
                                 float* u_x) {
    float la[32 * K_W];
    const k_v zero = K_FN(set)(0.f), one = K_FN(set)(1.f), nm = K_FN(set)((float)nmax);
    int i, k, h, u = u_s != NULL;
    for (h = 0; h < 8; h += K_W) {
        k_v mn = K_FN(ld)(xt + h), mx = mn, sw = K_FN(ld)(wt + h), sx = sw * mn;
        k_v ux = mn, ux2 = mn * mn;
        for (i = 1; i < 32; i++) {
            k_v v = K_FN(ld)(xt + 8 * i + h), w = K_FN(ld)(wt + 8 * i + h);
            mn = K_MIN(v, mn);
            mx = K_MAX(v, mx);
            sw = sw + w;
            sx = sx + w * v;
            ux = ux + v;
            ux2 = ux2 + v * v;
        }
        k_v xlo = mn;
        mn = K_SEL(mn > zero, zero, mn);
        k_m flat = mx == mn;
        k_v den = K_SEL(flat, one, mx - mn);
        k_v isc = nm / den, scl = one / isc, best = zero, bisc = isc, bmn = mn;
        k_v ul = zero, ul2 = zero, uxl = zero, us = zero, um = zero;
        k_v ubest = K_FN(set)(INFINITY);
        if (!K_FN(all)(flat | (K_FN(fits)(isc * (xlo - mn)) & K_FN(fits)(isc * den))))
            return 0;
        for (i = 0; i < 32; i++) {
            k_v x = K_FN(ld)(xt + 8 * i + h), w = K_FN(ld)(wt + 8 * i + h);
            k_v r = K_MIN(K_MAX(K_FN(rnd)(isc * (x - mn)), zero), nm);
            k_v d = (scl * r + mn) - x;
            best = best + w * (d * d);
            if (u) {
                ul = ul + r;
                ul2 = ul2 + r * r;
                uxl = uxl + r * x;
            }
        }
        if (u) K_FN(k45_ucand)(ul, ul2, uxl, ux, ux2, &ubest, &us, &um);
        for (k = 0; k <= nstep; k++) {
            isc = K_FN(set)(rmin + rdelta * (float)k + (float)nmax) / den;
            if (!K_FN(all)(flat | (K_FN(fits)(isc * (xlo - mn)) & K_FN(fits)(isc * den))))
                return 0;
            k_v sl = zero, sl2 = zero, sxl = zero, cur = zero;
            ul = zero;
            ul2 = zero;
            uxl = zero;
            for (i = 0; i < 32; i++) {
                k_v x = K_FN(ld)(xt + 8 * i + h), w = K_FN(ld)(wt + 8 * i + h);
                k_v r = K_MIN(K_MAX(K_FN(rnd)(isc * (x - mn)), zero), nm);
                K_FN(st)(la + K_W * i, r);
                k_v wl = w * r;
                sl = sl + wl;
                sl2 = sl2 + wl * r;
                sxl = sxl + wl * x;
                if (u) {
                    ul = ul + r;
                    ul2 = ul2 + r * r;
                    uxl = uxl + r * x;
                }
            }
            k_v D = sw * sl2 - sl * sl;
            k_v ts = (sw * sxl - sx * sl) / D;
            k_v tm = (sl2 * sx - sl * sxl) / D;
            k_m pos = tm > zero;
            tm = K_SEL(pos, zero, tm);
            ts = K_SEL(pos, sxl / sl2, ts);
            for (i = 0; i < 32; i++) {
                k_v d = (ts * K_FN(ld)(la + K_W * i) + tm) - K_FN(ld)(xt + 8 * i + h);
                cur = cur + K_FN(ld)(wt + 8 * i + h) * (d * d);
            }
            k_m take = (D > zero) & (cur < best);
            best = K_SEL(take, cur, best);
            scl = K_SEL(take, ts, scl);
            bisc = K_SEL(take, isc, bisc);
            bmn = K_SEL(take, mn, bmn);
            mn = K_SEL(take, tm, mn);
            den = K_SEL(flat, one, mx - mn);
            if (u) K_FN(k45_ucand)(ul, ul2, uxl, ux, ux2, &ubest, &us, &um);
        }
        K_FN(st)(scales + h, K_SEL(flat, zero, scl));
        K_FN(st)(mins + h, -mn);
        K_FN(st)(l_isc + h, K_SEL(flat, zero, bisc));
        K_FN(st)(l_mn + h, bmn);
        if (u) {
            K_FN(st)(u_s + h, us);
            K_FN(st)(u_m + h, um);
            K_FN(st)(u_x + h, ux);
        }
    }
    return 1;
}

/* ggml's last Q4_K/Q5_K pass: codes clamp(nearest_int((x + dm)/d), 0, nmax) where
   d = d16*sc != 0, else the search's codes clamp(round(isc*(x - mn))). */
static K_TGT void K_FN(k45_requant)(const float* xt, int nmax, const float* d_,
                                    const float* dm_, const float* isc_, const float* mn_,
                                    float* qt) {
    const k_v zero = K_FN(set)(0.f), nm = K_FN(set)((float)nmax);
    for (int h = 0; h < 8; h += K_W) {
        k_v d = K_FN(ld)(d_ + h), dm = K_FN(ld)(dm_ + h);
        k_v isc = K_FN(ld)(isc_ + h), mn = K_FN(ld)(mn_ + h);
        k_m keep = d == zero;
        for (int i = 0; i < 32; i++) {
            k_v x = K_FN(ld)(xt + 8 * i + h);
            k_v r = K_SEL(keep, K_FN(rnd)(isc * (x - mn)), K_FN(nearest)((x + dm) / d));
            K_FN(st)(qt + 8 * i + h, K_MIN(K_MAX(r, zero), nm));
        }
    }
}

/* Codes of the 8 sub-blocks against stored scales ds > 0 and mins dm (ds <= 0: codes 0):
   q = clamp(round((x + dm) * (1/ds)), 0, nmax); the squared error of the decoded ds*q - dm
   and the sums of q, q*q, q*x (a refit); the codes too when qt != NULL. */
static K_TGT void K_FN(k45_eval)(const float* xt, int nmax, const float* ds_,
                                 const float* dm_, float* err, float* sq, float* sq2,
                                 float* sqx, float* qt) {
    const k_v zero = K_FN(set)(0.f), nm = K_FN(set)((float)nmax);
    for (int h = 0; h < 8; h += K_W) {
        k_v ds = K_FN(ld)(ds_ + h), dm = K_FN(ld)(dm_ + h);
        k_v ids = K_SEL(ds > zero, K_FN(set)(1.f) / ds, zero);
        k_v e2 = zero, s1 = zero, s2 = zero, s3 = zero;
        for (int i = 0; i < 32; i++) {
            k_v x = K_FN(ld)(xt + 8 * i + h);
            k_v r = K_MIN(K_MAX(K_FN(rnd)((x + dm) * ids), zero), nm);
            k_v e = (ds * r - dm) - x;
            e2 = e2 + e * e;
            s1 = s1 + r;
            s2 = s2 + r * r;
            s3 = s3 + r * x;
            if (qt) K_FN(st)(qt + 8 * i + h, r);
        }
        K_FN(st)(err + h, e2);
        K_FN(st)(sq + h, s1);
        K_FN(st)(sq2 + h, s2);
        K_FN(st)(sqx + h, s3);
    }
}

/* The squared error of the 8 decoded sub-blocks ds*q - dm (codes qt). */
static K_TGT void K_FN(k45_err)(const float* xt, const float* qt, const float* ds_,
                                const float* dm_, float* err) {
    for (int h = 0; h < 8; h += K_W) {
        k_v ds = K_FN(ld)(ds_ + h), dm = K_FN(ld)(dm_ + h), e2 = K_FN(set)(0.f);
        for (int i = 0; i < 32; i++) {
            k_v e = (ds * K_FN(ld)(qt + 8 * i + h) - dm) - K_FN(ld)(xt + 8 * i + h);
            e2 = e2 + e * e;
        }
        K_FN(st)(err + h, e2);
    }
}

/* ---- Q6_K: 16 sub-blocks of 16 ---- */

/* ggml's make_qx_quants(16, 32, x, L, 1, NULL) on all 16 sub-blocks: scale and the iscale
   their codes came from (L = clamp(round(iscale*x), -32, 31) + 32; iscale 0: all-zero
   sub-block, L = 0). With u_s (mse), also the best unweighted least-squares scale over
   every set of codes it tries. */
static K_TGT void K_FN(q6_lanes)(const float* xt, float* scales, float* l_isc, float* u_s) {
    float w[16 * K_W], wx[16 * K_W];
    const k_v zero = K_FN(set)(0.f), lo = K_FN(set)(-32.f), hi = K_FN(set)(31.f);
    int i, k, h, u = u_s != NULL;
    for (h = 0; h < 16; h += K_W) {
        k_v amax = zero, xmax = zero, ux2 = zero;
        k_v scl = zero, best = zero, bisc = zero, us = zero, ubest = K_FN(set)(INFINITY);
        for (i = 0; i < 16; i++) {
            k_v v = K_FN(ld)(xt + 16 * i + h);
            k_v a = K_SEL(v < zero, -v, v);
            k_m big = a > amax;
            xmax = K_SEL(big, v, xmax);
            amax = K_SEL(big, a, amax);
            K_FN(st)(w + K_W * i, v * v);
            K_FN(st)(wx + K_W * i, (v * v) * v);
            ux2 = ux2 + v * v;
        }
        k_m zm = amax < K_FN(set)(K_GROUP_MAX_EPS);
        xmax = K_SEL(zm, K_FN(set)(1.f), xmax);
        for (k = -10; k < 10; k++) {
            if (k == 0) continue;
            /* k = -10: the first try, iscale = -nmax/max; then is = -9..9 without 0 */
            float num = k == -10 ? -32.f : -(32.f + 0.1f * (float)k);
            k_v isc = K_FN(set)(num) / xmax;
            k_v slx = zero, sl2 = zero, ul2 = zero, uxl = zero;
            for (i = 0; i < 16; i++) {
                k_v x = K_FN(ld)(xt + 16 * i + h);
                k_v r = K_MIN(K_MAX(K_FN(rnd)(isc * x), lo), hi);
                slx = slx + K_FN(ld)(wx + K_W * i) * r;
                sl2 = sl2 + (K_FN(ld)(w + K_W * i) * r) * r;
                if (u) {
                    ul2 = ul2 + r * r;
                    uxl = uxl + r * x;
                }
            }
            if (k == -10) {
                scl = K_SEL(sl2 != zero, slx / sl2, zero);
                best = scl * slx;
                bisc = isc;
            } else {
                k_m take = (sl2 > zero) & (slx * slx > best * sl2);
                scl = K_SEL(take, slx / sl2, scl);
                best = K_SEL(take, scl * slx, best);
                bisc = K_SEL(take, isc, bisc);
            }
            if (u) {
                k_v s = K_SEL(ul2 > zero, uxl / ul2, zero);
                k_v E = ux2 - s * uxl;
                k_m t = E < ubest;
                ubest = K_SEL(t, E, ubest);
                us = K_SEL(t, s, us);
            }
        }
        K_FN(st)(scales + h, K_SEL(zm, zero, scl));
        K_FN(st)(l_isc + h, K_SEL(zm, zero, bisc));
        if (u) K_FN(st)(u_s + h, K_SEL(zm, zero, us));
    }
}

/* ggml's last Q6_K pass: codes clamp(nearest_int(x/d), -32, 31) + 32 where d = d16*sc != 0,
   else the search's codes (iscale 0: all-zero sub-block, code 0). */
static K_TGT void K_FN(q6_requant)(const float* xt, const float* d_, const float* isc_,
                                   float* qt) {
    const k_v zero = K_FN(set)(0.f), lo = K_FN(set)(-32.f), hi = K_FN(set)(31.f);
    const k_v off = K_FN(set)(32.f);
    for (int h = 0; h < 16; h += K_W) {
        k_v d = K_FN(ld)(d_ + h), isc = K_FN(ld)(isc_ + h);
        k_m keep = d == zero, none = isc == zero;
        for (int i = 0; i < 16; i++) {
            k_v x = K_FN(ld)(xt + 16 * i + h);
            k_v r = K_SEL(keep, K_FN(rnd)(isc * x), K_FN(nearest)(x / d));
            r = K_MIN(K_MAX(r, lo), hi);
            K_FN(st)(qt + 16 * i + h, K_SEL(keep & none, zero, r + off));
        }
    }
}

/* Codes of the 16 sub-blocks against stored scales ds (0: codes 0):
   q = clamp(round(x * (1/ds)), -32, 31); the squared error of ds*q and the sums of q*q and
   q*x (a refit); the codes too when qt != NULL. */
static K_TGT void K_FN(q6_eval)(const float* xt, const float* ds_, float* err, float* sq2,
                                float* sqx, float* qt) {
    const k_v zero = K_FN(set)(0.f), lo = K_FN(set)(-32.f), hi = K_FN(set)(31.f);
    for (int h = 0; h < 16; h += K_W) {
        k_v ds = K_FN(ld)(ds_ + h);
        k_v ids = K_SEL(ds != zero, K_FN(set)(1.f) / ds, zero);
        k_v e2 = zero, s2 = zero, s3 = zero;
        for (int i = 0; i < 16; i++) {
            k_v x = K_FN(ld)(xt + 16 * i + h);
            k_v r = K_MIN(K_MAX(K_FN(rnd)(x * ids), lo), hi);
            k_v e = ds * r - x;
            e2 = e2 + e * e;
            s2 = s2 + r * r;
            s3 = s3 + r * x;
            if (qt) K_FN(st)(qt + 16 * i + h, r);
        }
        K_FN(st)(err + h, e2);
        K_FN(st)(sq2 + h, s2);
        K_FN(st)(sqx + h, s3);
    }
}

/* The squared error of the 16 decoded sub-blocks ds*q (codes qt). */
static K_TGT void K_FN(q6_err)(const float* xt, const float* qt, const float* ds_, float* err) {
    for (int h = 0; h < 16; h += K_W) {
        k_v ds = K_FN(ld)(ds_ + h), e2 = K_FN(set)(0.f);
        for (int i = 0; i < 16; i++) {
            k_v e = ds * K_FN(ld)(qt + 16 * i + h) - K_FN(ld)(xt + 16 * i + h);
            e2 = e2 + e * e;
        }
        K_FN(st)(err + h, e2);
    }
}

#undef K_SEL
