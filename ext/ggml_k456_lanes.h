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

/* ggml's make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, false)
   (= make_qkx3_quants with weights) on all ns sub-blocks of n <= 32 (xt[i*ns + s]; the
   unweighted fits of mse need ns 8, n 32): scale, the_min and the (iscale, min) their codes L came from
   (L = clamp(round(iscale*(x - min)), 0, nmax)). With u_s (mse), also the best unweighted
   fit over the codes of the first try and of every K45_USTEP-th step, and the sums of x.
   0 when a lane could leave K_FN(rnd)'s exact range (the caller then takes the scalar
   path). */
static K_TGT int K_FN(k45_lanes)(const float* xt, const float* wt, int ns, int n, int nmax,
                                 float rmin, float rdelta, int nstep, float* scales,
                                 float* mins, float* l_isc, float* l_mn, float* u_s,
                                 float* u_m, float* u_x) {
    float la[32 * K_W];
    const k_v zero = K_FN(set)(0.f), one = K_FN(set)(1.f), nm = K_FN(set)((float)nmax);
    int i, k, h, u, track = u_s != NULL;
    for (h = 0; h < ns; h += K_W) {
        k_v mn = K_FN(ld)(xt + h), mx = mn, sw = K_FN(ld)(wt + h), sx = sw * mn;
        k_v ux = mn, ux2 = mn * mn;
        for (i = 1; i < n; i++) {
            k_v v = K_FN(ld)(xt + ns * i + h), w = K_FN(ld)(wt + ns * i + h);
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
        u = track;
        for (i = 0; i < n; i++) {
            k_v x = K_FN(ld)(xt + ns * i + h), w = K_FN(ld)(wt + ns * i + h);
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
            u = track && k % K45_USTEP == 0;
            k_v sl = zero, sl2 = zero, sxl = zero, cur = zero;
            ul = zero;
            ul2 = zero;
            uxl = zero;
            for (i = 0; i < n; i++) {
                k_v x = K_FN(ld)(xt + ns * i + h), w = K_FN(ld)(wt + ns * i + h);
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
            for (i = 0; i < n; i++) {
                k_v d = (ts * K_FN(ld)(la + K_W * i) + tm) - K_FN(ld)(xt + ns * i + h);
                cur = cur + K_FN(ld)(wt + ns * i + h) * (d * d);
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
        if (track) {
            K_FN(st)(u_s + h, us);
            K_FN(st)(u_m + h, um);
            K_FN(st)(u_x + h, ux);
        }
    }
    return 1;
}

/* ggml's last Q4_K/Q5_K pass: codes clamp(nearest_int((x + dm)/d), 0, nmax) where
   d = d16*sc != 0, else the search's codes clamp(round(isc*(x - mn))); and the squared
   error of the decoded d*q - dm per sub-block. */
static K_TGT void K_FN(k45_requant)(const float* xt, int nmax, const float* d_,
                                    const float* dm_, const float* isc_, const float* mn_,
                                    float* qt, float* err) {
    const k_v zero = K_FN(set)(0.f), nm = K_FN(set)((float)nmax);
    for (int h = 0; h < 8; h += K_W) {
        k_v d = K_FN(ld)(d_ + h), dm = K_FN(ld)(dm_ + h);
        k_v isc = K_FN(ld)(isc_ + h), mn = K_FN(ld)(mn_ + h), e2 = zero;
        k_m keep = d == zero;
        for (int i = 0; i < 32; i++) {
            k_v x = K_FN(ld)(xt + 8 * i + h);
            k_v r = K_SEL(keep, K_FN(rnd)(isc * (x - mn)), K_FN(nearest)((x + dm) / d));
            r = K_MIN(K_MAX(r, zero), nm);
            K_FN(st)(qt + 8 * i + h, r);
            k_v e = (d * r - dm) - x;
            e2 = e2 + e * e;
        }
        K_FN(st)(err + h, e2);
    }
}

/* floor(v / step) clamped to [0, hi], 0 where step is not > 0 or the ratio is NaN (floor
   as round-then-fix, exact for |t| <= 2**22; past that the clamp decides alike) */
static inline K_TGT k_v K_FN(k45_grid)(k_v v, k_v step, float hi) {
    const k_v zero = K_FN(set)(0.f), top = K_FN(set)(hi);
    k_v t = v / step, r = K_FN(rnd)(t);
    r = K_SEL(r > t, r - K_FN(set)(1.f), r);
    r = K_SEL(r > top, top, K_SEL(r > zero, r, zero));
    return K_SEL(step > zero, r, zero);
}

/* Codes of K_W sub-blocks against stored scales ds > 0 and mins dm (ds <= 0: codes 0),
   q = clamp(round((x + dm) * (1/ds)), 0, nmax): the squared error of the decoded
   ds*q - dm and the sums of q, q*q, q*x; the codes too when qt != NULL. */
static inline K_TGT void K_FN(k45_eval)(const float* xt, int h, k_v nm, k_v ds, k_v dm,
                                        k_v* e2, k_v* s1, k_v* s2, k_v* s3, float* qt) {
    const k_v zero = K_FN(set)(0.f);
    k_v ids = K_SEL(ds > zero, K_FN(set)(1.f) / ds, zero);
    k_v a = zero, b = zero, c = zero, d = zero;
    for (int i = 0; i < 32; i++) {
        k_v x = K_FN(ld)(xt + 8 * i + h);
        k_v r = K_MIN(K_MAX(K_FN(rnd)((x + dm) * ids), zero), nm);
        k_v e = (ds * r - dm) - x;
        a = a + e * e;
        b = b + r;
        c = c + r * r;
        d = d + r * x;
        if (qt) K_FN(st)(qt + 8 * i + h, r);
    }
    *e2 = a;
    *s1 = b;
    *s2 = c;
    *s3 = d;
}

/* The least-squares fit x ~ s*q + b, b <= 0, of 32 codes from their sums: (s, -b). */
static inline K_TGT void K_FN(k45_lsfit)(k_v sq, k_v sq2, k_v sqx, k_v sx, k_v* us, k_v* um) {
    const k_v zero = K_FN(set)(0.f), n = K_FN(set)(32.f);
    k_v D = n * sq2 - sq * sq;
    k_v s = (n * sqx - sq * sx) / D;
    k_v b = (sx - s * sq) / n;
    k_m ok = D > zero;
    s = K_SEL(ok, s, zero);
    b = K_SEL(ok, b, sx / n);
    k_m pos = b > zero;
    *us = K_SEL(pos, K_SEL(sq2 > zero, sqx / sq2, zero), s);
    *um = -K_SEL(pos, zero, b);
}

/* mse's search of the 8 sub-blocks' 6-bit (scale, min) pairs given the block's d and dmin.
   From the fits (u_s, u_m), first refined by `lloyd` code / refit passes, each round tries
   the scales sc = floor(u_s/d) - 1, + 0, + 1 (clamped to 0..63), each with the two mins
   m = floor(M/dmin) + 0, + 1, where M = (d*sc*sum(q) - sum(x))/32 is the best min for that
   scale on the codes q the fit came from; every pair by true error. It keeps the best pair
   so far and refits (u_s, u_m) to its codes. A round that would try the pairs of the round
   before changes nothing, so the search stops there. Gives the best pairs (psc, pm), their
   error be and (qt != NULL) their codes. */
static K_TGT void K_FN(k45_pairs)(const float* xt, int nmax, float d16, float dmin16,
                                  const float* us_, const float* um_, const float* ux_,
                                  int lloyd, int rounds, float* psc_, float* pm_, float* be_,
                                  float* qt) {
    const k_v zero = K_FN(set)(0.f), nm = K_FN(set)((float)nmax), top = K_FN(set)(63.f);
    const k_v d = K_FN(set)(d16), dmn = K_FN(set)(dmin16), n32 = K_FN(set)(32.f);
    for (int h = 0; h < 8; h += K_W) {
        k_v us = K_FN(ld)(us_ + h), um = K_FN(ld)(um_ + h), sx = K_FN(ld)(ux_ + h);
        k_v be = K_FN(set)(INFINITY), psc = zero, pm = zero, bq = zero, bq2 = zero;
        k_v bqx = zero, sc0 = zero, e2, s1, s2, s3;
        k_v cq = zero, mc[K45_NSC], nmc[K45_NSC];
        for (int j = 0; j < K45_NSC; j++) mc[j] = zero;
        for (int r = 0; r < lloyd; r++) {
            K_FN(k45_eval)(xt, h, nm, us, um, &e2, &s1, &s2, &s3, NULL);
            K_FN(k45_lsfit)(s1, s2, s3, sx, &us, &um);
            cq = s1;
        }
        for (int r = 0; r < rounds; r++) {
            k_v nsc = K_FN(k45_grid)(us, d, 62.f);
            k_m same = nsc == sc0;
            for (int j = 0; j < K45_NSC; j++) {
                k_v sc = K_MIN(K_MAX(nsc + K_FN(set)((float)(j - 1)), zero), top);
                nmc[j] = K_FN(k45_grid)((d * sc * cq - sx) / n32, dmn, 62.f);
                same = same & (nmc[j] == mc[j]);
            }
            if (r > 0 && K_FN(all)(same)) break;
            sc0 = nsc;
            for (int j = 0; j < K45_NSC; j++) {
                mc[j] = nmc[j];
                k_v sc = K_MIN(K_MAX(sc0 + K_FN(set)((float)(j - 1)), zero), top);
                for (int b = 0; b < 2; b++) {
                    k_v m = mc[j] + K_FN(set)((float)b);
                    K_FN(k45_eval)(xt, h, nm, d * sc, dmn * m, &e2, &s1, &s2, &s3, NULL);
                    k_m t = e2 < be;
                    be = K_SEL(t, e2, be);
                    psc = K_SEL(t, sc, psc);
                    pm = K_SEL(t, m, pm);
                    bq = K_SEL(t, s1, bq);
                    bq2 = K_SEL(t, s2, bq2);
                    bqx = K_SEL(t, s3, bqx);
                }
            }
            K_FN(k45_lsfit)(bq, bq2, bqx, sx, &us, &um);
            cq = bq;
        }
        K_FN(st)(psc_ + h, psc);
        K_FN(st)(pm_ + h, pm);
        K_FN(st)(be_ + h, be);
        if (qt) K_FN(k45_eval)(xt, h, nm, d * psc, dmn * pm, &e2, &s1, &s2, &s3, qt);
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
   else the search's codes (iscale 0: all-zero sub-block, code 0); and the squared error of
   the decoded d*(q - 32) per sub-block. */
static K_TGT void K_FN(q6_requant)(const float* xt, const float* d_, const float* isc_,
                                   float* qt, float* err) {
    const k_v zero = K_FN(set)(0.f), lo = K_FN(set)(-32.f), hi = K_FN(set)(31.f);
    const k_v off = K_FN(set)(32.f);
    for (int h = 0; h < 16; h += K_W) {
        k_v d = K_FN(ld)(d_ + h), isc = K_FN(ld)(isc_ + h), e2 = zero;
        k_m keep = d == zero, none = isc == zero;
        for (int i = 0; i < 16; i++) {
            k_v x = K_FN(ld)(xt + 16 * i + h);
            k_v r = K_SEL(keep, K_FN(rnd)(isc * x), K_FN(nearest)(x / d));
            r = K_SEL(keep & none, zero, K_MIN(K_MAX(r, lo), hi) + off);
            K_FN(st)(qt + 16 * i + h, r);
            k_v e = d * (r - off) - x;
            e2 = e2 + e * e;
        }
        K_FN(st)(err + h, e2);
    }
}

/* floor(v / step) clamped to [-128, 126], 0 where step is 0 (-128 where the ratio is NaN) */
static inline K_TGT k_v K_FN(q6_grid)(k_v v, k_v step) {
    const k_v lo = K_FN(set)(-128.f), top = K_FN(set)(126.f);
    k_v t = v / step, r = K_FN(rnd)(t);
    r = K_SEL(r > t, r - K_FN(set)(1.f), r);
    r = K_SEL(r > top, top, K_SEL(r > lo, r, lo));
    return K_SEL(step == K_FN(set)(0.f), K_FN(set)(0.f), r);
}

/* mse's search of the 16 sub-blocks' int8 scales given the block's d: each round tries
   floor(u_s/d) + a, a in {0, 1}, by true error (codes q = clamp(round(x * (1/ds)), -32, 31),
   ds = d*sc, 0 codes where ds is 0), keeps the best and refits u_s = sum(qx)/sum(qq) to its
   codes, stopping when a round would try the scales of the round before. Gives the best
   scales psc, their error be and (qt != NULL) their codes + 32. */
static K_TGT void K_FN(q6_pairs)(const float* xt, float d16, const float* us_, int rounds,
                                 float* psc_, float* be_, float* qt) {
    const k_v zero = K_FN(set)(0.f), lo = K_FN(set)(-32.f), hi = K_FN(set)(31.f);
    const k_v d = K_FN(set)(d16);
    for (int h = 0; h < 16; h += K_W) {
        k_v us = K_FN(ld)(us_ + h), be = K_FN(set)(INFINITY), psc = zero, bq2 = zero;
        k_v bqx = zero, c0 = zero;
        for (int r = 0; r <= rounds; r++) {
            k_v nc = K_FN(q6_grid)(us, d);
            if (r == rounds || (r > 0 && K_FN(all)(nc == c0))) {
                if (!qt) break;
                /* the codes of the best scales */
                k_v ds = d * psc, ids = K_SEL(ds != zero, K_FN(set)(1.f) / ds, zero);
                for (int i = 0; i < 16; i++) {
                    k_v x = K_FN(ld)(xt + 16 * i + h);
                    k_v q = K_MIN(K_MAX(K_FN(rnd)(x * ids), lo), hi);
                    K_FN(st)(qt + 16 * i + h, q + K_FN(set)(32.f));
                }
                break;
            }
            c0 = nc;
            for (int a = 0; a < 2; a++) {
                k_v sc = c0 + K_FN(set)((float)a), ds = d * sc;
                k_v ids = K_SEL(ds != zero, K_FN(set)(1.f) / ds, zero);
                k_v e2 = zero, s2 = zero, s3 = zero;
                for (int i = 0; i < 16; i++) {
                    k_v x = K_FN(ld)(xt + 16 * i + h);
                    k_v q = K_MIN(K_MAX(K_FN(rnd)(x * ids), lo), hi);
                    k_v e = ds * q - x;
                    e2 = e2 + e * e;
                    s2 = s2 + q * q;
                    s3 = s3 + q * x;
                }
                k_m t = e2 < be;
                be = K_SEL(t, e2, be);
                psc = K_SEL(t, sc, psc);
                bq2 = K_SEL(t, s2, bq2);
                bqx = K_SEL(t, s3, bqx);
            }
            us = K_SEL(bq2 > zero, bqx / bq2, us);
        }
        K_FN(st)(psc_ + h, psc);
        K_FN(st)(be_ + h, be);
    }
}

/* ---- importance (ggml_k456.pxi's kq_*) ---- */

/* ggml's make_qx_quants(16, nmax, x, L, 1, qw) with weights on 16 sub-blocks of 16
   (xt[i*16 + s], wt alike): scale and the iscale their codes came from (L = clamp(round(
   iscale*x), -nmax, nmax - 1) + nmax; iscale 0: all-zero sub-block, L = 0). |iscale*x|
   <= nmax + 1, so K_FN(rnd) is nearest_int here. */
static K_TGT void K_FN(kq_qx_lanes)(const float* xt, const float* wt, int nmax, float* scales,
                                    float* l_isc) {
    const k_v zero = K_FN(set)(0.f), lo = K_FN(set)((float)-nmax);
    const k_v hi = K_FN(set)((float)(nmax - 1));
    int i, k, h;
    for (h = 0; h < 16; h += K_W) {
        k_v amax = zero, xmax = zero, scl = zero, best = zero, bisc = zero;
        for (i = 0; i < 16; i++) {
            k_v v = K_FN(ld)(xt + 16 * i + h);
            k_v a = K_SEL(v < zero, -v, v);
            k_m big = a > amax;
            xmax = K_SEL(big, v, xmax);
            amax = K_SEL(big, a, amax);
        }
        k_m zm = amax < K_FN(set)(K_GROUP_MAX_EPS);
        xmax = K_SEL(zm, K_FN(set)(1.f), xmax);
        for (k = -10; k < 10; k++) {
            if (k == 0) continue;
            float num = k == -10 ? (float)-nmax : -((float)nmax + 0.1f * (float)k);
            k_v isc = K_FN(set)(num) / xmax;
            k_v slx = zero, sl2 = zero;
            for (i = 0; i < 16; i++) {
                k_v x = K_FN(ld)(xt + 16 * i + h), w = K_FN(ld)(wt + 16 * i + h);
                k_v r = K_MIN(K_MAX(K_FN(rnd)(isc * x), lo), hi);
                slx = slx + (w * x) * r;
                sl2 = sl2 + (w * r) * r;
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
        }
        K_FN(st)(scales + h, K_SEL(zm, zero, scl));
        K_FN(st)(l_isc + h, K_SEL(zm, zero, bisc));
    }
}

/* Each of ns sub-blocks of n (xt[i*ns + s], wt alike): codes to nearest against its scale
   ds (ds 0: code 0) and min dm (aff; else symmetric), clamped to [lo, hi], and the
   weighted squared error sum w*(x_hat - x)^2 in element order; codes into qt if given. */
static K_TGT void K_FN(kq_err)(const float* xt, const float* wt, int ns, int n, float lo_,
                               float hi_, int aff, const float* ds_, const float* dm_,
                               float* err, float* qt) {
    const k_v zero = K_FN(set)(0.f), lo = K_FN(set)(lo_), hi = K_FN(set)(hi_);
    for (int h = 0; h < ns; h += K_W) {
        k_v ds = K_FN(ld)(ds_ + h), dm = aff ? K_FN(ld)(dm_ + h) : zero, e = zero;
        k_m none = ds == zero;
        for (int i = 0; i < n; i++) {
            k_v x = K_FN(ld)(xt + ns * i + h), w = K_FN(ld)(wt + ns * i + h);
            k_v r = K_FN(nearest)((aff ? x + dm : x) / ds);
            r = K_SEL(none, zero, K_MIN(K_MAX(r, lo), hi));
            if (qt) K_FN(st)(qt + ns * i + h, r);
            k_v t = aff ? (ds * r - dm) - x : ds * r - x;
            e = e + w * (t * t);
        }
        K_FN(st)(err + h, e);
    }
}

#undef K_SEL
