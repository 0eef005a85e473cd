"""NumPy reference of ggml's Q4_K, Q5_K and Q6_K super-blocks (256 weights each).

Vectorized over blocks (and over the sub-blocks of a block, which are independent);
sequential over the elements of a sub-block wherever ggml's C accumulates, in float32
where the C uses float, so the Cython kernels in ``ext/ggml_k456.pxi`` match it bit for bit.

Layouts (little-endian, ``f16`` = IEEE binary16)::

    Q4_K (144 B): d f16, dmin f16, scales[12], qs[128]     x = d*sc[j]*q - dmin*m[j]
    Q5_K (176 B): d f16, dmin f16, scales[12], qh[32], qs[128]      (q has 5 bits)
    Q6_K (210 B): ql[128], qh[64], scales[16] int8, d f16  x = d*sc[j]*(q - 32)

Q4_K/Q5_K have 8 sub-blocks of 32 weights, each with a 6-bit scale ``sc`` and a 6-bit min
``m`` packed in 12 bytes; Q6_K has 16 sub-blocks of 16 with an int8 scale each.

``method="rtn"`` is ggml's ``quantize_row_q{4,5,6}_K_ref`` (no importance matrix): per
sub-block a weighted search of codes (``make_qkx2_quants`` / ``make_qx_quants``), then the
sub-block scales quantized against the block's largest and the codes recomputed.

``method="mse"`` is flightquant's search, in the same bytes, for the plain squared error:

1. rtn's search runs as usual and also fits every candidate code set it tries (Q4_K/Q5_K:
   the first and every ``K45_USTEP``-th step; Q6_K: all 19) by unweighted least squares,
   ``x ~ s*q - m`` (m >= 0) or ``x ~ s*q``, in closed form from running sums; each
   sub-block keeps its best fit.
2. The block's ``d`` (and ``dmin``) is the largest fitted scale (min) over 63 (Q6_K: the
   scale of largest magnitude over -128), rounded to float16.
3. Q4_K/Q5_K: one pass of codes for the fit and a refit; then rounds that try, per
   sub-block, the 6-bit scales ``floor(s/d) - 1 .. + 1`` each with the mins ``floor(M/dmin)
   + 0, + 1``, M the least-squares min for that scale on the fit's codes, codes
   ``clamp(round((x + dmin*m) / (d*sc)))``; every pair is scored by the true squared error
   of its decoded sub-block, the best so far is kept and refit (s, m) to its codes, which
   starts the next round (``K45_ROUNDS`` at most; a round that would repeat the pairs of
   the one before changes nothing and the kernels stop there). Q6_K does the same with the
   int8 scales ``floor(s/d) + 0, + 1`` (``Q6_ROUNDS``).
4. The block is kept only when its squared error is below rtn's by ``MSE_MARGIN`` (both
   measured the same way), else rtn's block is the result: mse is never worse than rtn.

Rounding in the search is ``(v + 1.5*2**23) - 1.5*2**23`` (half to even) in float32; sums
run from 0 in element order; block errors add the float32 sub-block errors in float64.
"""

from __future__ import annotations

import numpy as np

from ..formats import get as _get_type
from .ggml_common import nearest_int
from .ggml_common import round_f16 as _round_f16
from .ggml_common import seq_sum as _seq_sum

F32 = np.float32
F64 = np.float64
QK = 256
NAMES = ("Q4_K", "Q5_K", "Q6_K")
#: ggml's GROUP_MAX_EPS: make_qx_quants calls a group with max |x| below it all zero
GROUP_MAX_EPS = F32(1e-15)
#: make_qkx2_quants' search grid of Q4_K and Q5_K: (nmax, rmin, rdelta, nstep)
QKX2_GRID = {"Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}

_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def _f32(v) -> np.ndarray:
    return np.asarray(v, F32)


def _f16_to_f32(u: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(u).view(np.float16).astype(F32)


def _f32_to_f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) uint8, round to nearest even (numpy's astype)."""
    with np.errstate(over="ignore"):
        return _f32(v).astype(np.float16).view(np.uint8).reshape(-1, 2)


def _fits(v: np.ndarray) -> np.ndarray:
    """|v| <= 4e6 (False for NaN): where the kernels' float rounding equals nearest_int."""
    lim = F32(4.0e6)
    return (v <= lim) & (-lim <= v)


# ---------------------------------------------------------------------------------------
# ggml's helpers, over many sub-blocks at once (rows of a 2-D array)


def make_qkx2_quants(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    track: bool = False,
):
    """ggml's make_qkx2_quants (use_mad=false) on every row of ``x`` (N, 32) with weights
    ``w``: ``(L uint8 (N, 32), scale (N,), the_min (N,))``, the_min = minus the offset.

    ``track`` (mse) adds ``(u_s, u_m, lanes_ok)``: the best unweighted least-squares fit
    ``x ~ u_s*l - u_m`` over the codes of the first try and of every ``K45_USTEP``-th step
    (:func:`_k45_ucand`), and whether the kernels' lanes could run the row (else the
    kernel's mse keeps rtn)."""
    n = x.shape[1]
    nmax_f = F32(nmax)
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        xi = x[:, i]
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * xi
    xlo = mn
    mn = np.where(mn > 0, F32(0), mn)
    flat = mx == mn
    ux = _seq_sum(x)
    ux2 = _seq_sum(x * x)
    ok = np.ones(x.shape[0], bool)
    ubest = np.full(x.shape[0], np.inf, F32)
    us = np.zeros(x.shape[0], F32)
    um = np.zeros(x.shape[0], F32)

    def guard(isc):
        den = np.where(flat, F32(1), mx - mn)
        return ok & (flat | (_fits(isc * (xlo - mn)) & _fits(isc * den)))

    with np.errstate(all="ignore"):
        iscale = nmax_f / (mx - mn)
        scale = F32(1) / iscale
        ok = guard(nmax_f / np.where(flat, F32(1), mx - mn))
        L = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        lf = L.astype(F32)
        diff = (scale[:, None] * lf + mn[:, None]) - x
        best = _seq_sum(w * (diff * diff))
        if track:
            ubest, us, um = _k45_ucand(lf, x, ux, ux2, ubest, us, um)
        for step in range(nstep + 1):
            # the C steps from the min of the best fit so far, not from min(x)
            isc = (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / (mx - mn)
            ok = guard(
                (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / np.where(flat, F32(1), mx - mn)
            )
            la = np.clip(nearest_int(isc[:, None] * (x - mn[:, None])), 0, nmax)
            laf = la.astype(F32)
            fit = track and step % K45_USTEP == 0
            wl = w * laf
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(wl * laf)
            sum_xl = _seq_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = (this_scale[:, None] * laf + this_min[:, None]) - x
            cur = _seq_sum(w * (diff * diff))
            take = (D > 0) & (cur < best)
            L = np.where(take[:, None], la, L)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
            if fit:
                ubest, us, um = _k45_ucand(laf, x, ux, ux2, ubest, us, um)
    L = np.where(flat[:, None], 0, L).astype(np.uint8)
    scale = np.where(flat, F32(0), scale).astype(F32)
    if track:
        return L, scale, (-mn).astype(F32), us, um, ok
    return L, scale, (-mn).astype(F32)


def _k45_lsfit(sq, sq2, sqx, sx):
    """The least-squares fit x ~ s*q + b, b <= 0, of 32 codes from their sums: (s, b)."""
    n = F32(32)
    with np.errstate(all="ignore"):
        D = n * sq2 - sq * sq
        s = (n * sqx - sq * sx) / D
        b = (sx - s * sq) / n
        good = D > 0
        s = np.where(good, s, F32(0))
        b = np.where(good, b, sx / n)
        pos = b > 0
        s = np.where(pos, np.where(sq2 > 0, sqx / sq2, F32(0)), s)
        b = np.where(pos, F32(0), b)
    return s.astype(F32), b.astype(F32)


def _k45_ucand(lf, x, ux, ux2, ubest, us, um):
    """Keep the unweighted fit of codes ``lf`` (as floats) where its closed-form squared
    error E is below ``ubest``; E = sum(x^2) - 2s sum(lx) - 2b sum(x) + s^2 sum(l^2)
    + 2sb sum(l) + 32 b^2, evaluated left to right in float32."""
    ul = _seq_sum(lf)
    ul2 = _seq_sum(lf * lf)
    uxl = _seq_sum(lf * x)
    s, b = _k45_lsfit(ul, ul2, uxl, ux)
    two = F32(2)
    with np.errstate(all="ignore"):
        E = (
            ux2
            - (two * s) * uxl
            - (two * b) * ux
            + (s * s) * ul2
            + ((two * s) * b) * ul
            + F32(32) * (b * b)
        )
    t = E < ubest
    return np.where(t, E, ubest), np.where(t, s, us), np.where(t, -b, um)


def make_qx_quants_rmse1(x: np.ndarray, nmax: int, track: bool = False):
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) on every row of ``x``:
    ``(L uint8 (N, n) holding l + nmax, scale (N,))``; ``track`` (mse) adds the best
    unweighted least-squares scale over every set of codes it tries."""
    ax = np.abs(x)
    imax = np.argmax(ax, axis=1)  # the first largest |x|, as the C's strict '>' keeps
    rows = np.arange(x.shape[0])
    amax = ax[rows, imax]
    xmax = x[rows, imax]
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    ux2 = _seq_sum(x * x)
    ubest = np.full(x.shape[0], np.inf, F32)
    us = np.zeros(x.shape[0], F32)
    with np.errstate(all="ignore"):

        def codes(iscale):
            return np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

        def sums(codes_):
            lf = codes_.astype(F32)
            if track:
                nonlocal ubest, us
                ul2 = _seq_sum(lf * lf)
                uxl = _seq_sum(lf * x)
                s = np.where(ul2 > 0, uxl / ul2, F32(0))
                E = ux2 - s * uxl
                t = E < ubest
                ubest = np.where(t, E, ubest)
                us = np.where(t, s, us)
            return _seq_sum(wx * lf), _seq_sum((w * lf) * lf)

        iscale = F32(-nmax) / xmax
        L = codes(iscale)
        sumlx, suml2 = sums(L)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            isc = -(F32(nmax) + F32(0.1) * F32(step)) / xmax
            la = codes(isc)
            slx, sl2 = sums(la)
            take = (sl2 > 0) & (slx * slx > best * sl2)
            L = np.where(take[:, None], la, L)
            scale = np.where(take, slx / sl2, scale)
            best = np.where(take, scale * slx, best)
    L = np.where(zero[:, None], 0, L + nmax).astype(np.uint8)
    scale = np.where(zero, F32(0), scale).astype(F32)
    if track:
        return L, scale, np.where(zero, F32(0), us).astype(F32)
    return L, scale


# ---------------------------------------------------------------------------------------
# packing


def pack_scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(B, 8) 6-bit scales and mins -> (B, 12) bytes (ggml's get_scale_min_k4 layout)."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def unpack_scale_min_k4(q: np.ndarray):
    """(B, 12) bytes -> ((B, 8) scales, (B, 8) mins), uint8."""
    sc = np.empty((q.shape[0], 8), np.uint8)
    m = np.empty((q.shape[0], 8), np.uint8)
    sc[:, 0:4] = q[:, 0:4] & 63
    m[:, 0:4] = q[:, 4:8] & 63
    sc[:, 4:8] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, m


def _pack_q4(L: np.ndarray) -> np.ndarray:
    """(B, 256) codes 0..15 -> (B, 128): byte 32*c + l holds L[64c + l] | L[64c + 32 + l] << 4."""
    L = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_q4(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0xF).reshape(-1, 256)


def _pack_q5(L: np.ndarray):
    """(B, 256) codes 0..31 -> (qh (B, 32), qs (B, 128)); bit 4 of L[32k + l] is bit k of qh[l]."""
    L = L.astype(np.uint8)
    qs = _pack_q4(L & 0xF)
    hi = (L >> 4).reshape(-1, 8, 32)
    qh = np.zeros((L.shape[0], 32), np.uint8)
    for k in range(8):
        qh |= hi[:, k] << k
    return qh, qs


def _unpack_q5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    lo = _unpack_q4(qs).reshape(-1, 8, 32)
    hi = (qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return (lo | (hi << 4)).reshape(-1, 256)


def _pack_q6(L: np.ndarray):
    """(B, 256) codes 0..63 -> (ql (B, 128), qh (B, 64)), ggml's quantize_row_q6_K_ref order."""
    L = L.astype(np.uint8).reshape(-1, 2, 4, 32)  # half, quarter, l
    lo = L & 0xF
    ql = np.empty((L.shape[0], 2, 64), np.uint8)
    ql[:, :, 0:32] = lo[:, :, 0] | (lo[:, :, 2] << 4)
    ql[:, :, 32:64] = lo[:, :, 1] | (lo[:, :, 3] << 4)
    hi = L >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _unpack_q6(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    ql = ql.reshape(-1, 2, 64)
    qh = qh.reshape(-1, 2, 32)
    L = np.empty((ql.shape[0], 2, 4, 32), np.uint8)
    L[:, :, 0] = ql[:, :, 0:32] & 0xF
    L[:, :, 1] = ql[:, :, 32:64] & 0xF
    L[:, :, 2] = ql[:, :, 0:32] >> 4
    L[:, :, 3] = ql[:, :, 32:64] >> 4
    for k in range(4):
        L[:, :, k] |= ((qh >> (2 * k)) & 3) << 4
    return L.reshape(-1, 256)


# ---------------------------------------------------------------------------------------
# block assembly


def _assemble_k45(name, d, dmin, sc, m, L) -> np.ndarray:
    """Bytes of Q4_K/Q5_K blocks from f16-rounded d, dmin (float32), 6-bit sc/m, codes L."""
    nb = L.shape[0]
    out = np.empty((nb, _get_type(name).type_size), np.uint8)
    out[:, 0:2] = _f32_to_f16_bytes(d)
    out[:, 2:4] = _f32_to_f16_bytes(dmin)
    out[:, 4:16] = pack_scale_min_k4(sc, m)
    if name == "Q4_K":
        out[:, 16:144] = _pack_q4(L)
    else:
        qh, qs = _pack_q5(L)
        out[:, 16:48] = qh
        out[:, 48:176] = qs
    return out


def _requant_k45(x3, d16, dmin16, sc, m, L, nmax):
    """ggml's last K4/K5 pass: codes against the stored scales; a sub-block whose
    d*sc is 0 keeps its codes ``L``. x3: (B, 8, 32)."""
    with np.errstate(all="ignore"):
        d = d16[:, None] * sc.astype(F32)
        dm = dmin16[:, None] * m.astype(F32)
        q = np.clip(nearest_int((x3 + dm[..., None]) / d[..., None]), 0, nmax)
    return np.where((d != 0)[..., None], q, L.reshape(x3.shape)).astype(np.uint8)


def _rtn_k45(x: np.ndarray, name: str, track: bool = False):
    """ggml's quantize_row_q4_K_ref / quantize_row_q5_K_ref: the bytes, and with ``track``
    also what the mse search starts from (see :func:`_mse_k45`)."""
    nmax, rmin, rdelta, nstep = QKX2_GRID[name]
    nb = x.shape[0]
    x3 = x.reshape(nb, 8, 32)
    xs = x3.reshape(nb * 8, 32)
    sum_x2 = _seq_sum(xs * xs)
    av_x = np.sqrt(sum_x2 / F32(32))
    w = av_x[:, None] + np.abs(xs)
    res = make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, track)
    L, scales, mins = res[:3]
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.zeros(nb, F32)
    max_min = np.zeros(nb, F32)
    for j in range(8):
        max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
        max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        sc = np.minimum(nearest_int(inv_scale[:, None] * scales).astype(np.uint8), 63)
        m = np.minimum(nearest_int(inv_min[:, None] * mins).astype(np.uint8), 63)
        d = _round_f16(max_scale / F32(63))
        dmin = _round_f16(max_min / F32(63))
    q = _requant_k45(x3, d, dmin, sc, m, L, nmax)
    out = _assemble_k45(name, d, dmin, sc, m, q.reshape(nb, 256))
    if not track:
        return out
    u_s, u_m, ok = (a.reshape(nb, 8) for a in res[3:])
    ds = d[:, None] * sc.astype(F32)
    dm = dmin[:, None] * m.astype(F32)
    return out, q, ds, dm, u_s, u_m, ok.all(axis=1)


def _k_grid(v, step, hi):
    """floor(v / step) clamped to [0, hi]; 0 where step is not > 0 or the ratio is NaN."""
    with np.errstate(all="ignore"):
        t = np.floor(v / step[:, None])
    t = np.where(t > F32(hi), F32(hi), np.where(t > 0, t, F32(0)))
    return np.where((step > 0)[:, None], t, F32(0)).astype(F32)


def _k45_eval(x3, nmax, ds, dm):
    """Codes against stored scales ``ds`` (> 0, else codes 0) and mins ``dm``, per
    sub-block: q = clamp(round((x + dm) * (1/ds)), 0, nmax), round(v) = (v + 1.5*2**23)
    - 1.5*2**23 (float32); returns (squared error of ds*q - dm, sum q, sum q*q, sum q*x,
    q), every sum sequential over the 32 elements from 0."""
    nm = F32(nmax)
    with np.errstate(all="ignore"):
        ids = np.where(ds > 0, F32(1) / ds, F32(0))
        v = (x3 + dm[..., None]) * ids[..., None]
    r = (v + _MAGIC) - _MAGIC
    r = np.where(r > 0, r, F32(0))
    r = np.where(r < nm, r, nm)
    e = (ds[..., None] * r - dm[..., None]) - x3
    return _seq_sum(e * e), _seq_sum(r), _seq_sum(r * r), _seq_sum(r * x3), r


def _block_err(err):
    """A block's squared error: the float32 sub-block errors added in float64, in order."""
    tot = np.zeros(err.shape[0], F64)
    for j in range(err.shape[1]):
        tot = tot + err[:, j].astype(F64)
    return tot


#: mse keeps its block only when its error is below rtn's by this factor: the float32
#: sub-block sums are exact to ~2e-6, so the true error is lower too
MSE_MARGIN = 1.0 - 1.0 / 65536
K45_USTEP = 2
K45_LLOYD = 1
K45_NSC = 3
K45_ROUNDS = 4
Q6_ROUNDS = 4


def _mse_k45(x: np.ndarray, name: str) -> np.ndarray:
    nmax = QKX2_GRID[name][0]
    nb = x.shape[0]
    x3 = x.reshape(nb, 8, 32)
    out, q, ds, dm, u_s, u_m, ok = _rtn_k45(x, name, track=True)
    e = (ds[..., None] * q.astype(F32) - dm[..., None]) - x3
    e_rtn = _block_err(_seq_sum(e * e))
    sx = _seq_sum(x3)
    max_scale = np.zeros(nb, F32)
    max_min = np.zeros(nb, F32)
    for j in range(8):
        max_scale = np.where(u_s[:, j] > max_scale, u_s[:, j], max_scale)
        max_min = np.where(u_m[:, j] > max_min, u_m[:, j], max_min)
    d = _round_f16(max_scale / F32(63))
    dmin = _round_f16(max_min / F32(63))
    be = np.full((nb, 8), np.inf, F32)
    psc = np.zeros((nb, 8), F32)
    pm = np.zeros((nb, 8), F32)
    bq = np.zeros((nb, 8), F32)
    bq2 = np.zeros((nb, 8), F32)
    bqx = np.zeros((nb, 8), F32)
    cq = np.zeros((nb, 8), F32)
    for _ in range(K45_LLOYD):
        _, cq, sq2, sqx, _ = _k45_eval(x3, nmax, u_s, u_m)
        u_s, b_ = _k45_lsfit(cq, sq2, sqx, sx)
        u_m = -b_
    for _ in range(K45_ROUNDS):
        sc0 = _k_grid(u_s, d, 62)
        for j in range(K45_NSC):
            sc = np.minimum(np.maximum(sc0 + F32(j - 1), F32(0)), F32(63))
            with np.errstate(all="ignore"):
                mbest = (d[:, None] * sc * cq - sx) / F32(32)
            m0 = _k_grid(mbest, dmin, 62)
            for b in (0, 1):
                m = m0 + F32(b)
                err, sq, sq2, sqx, _ = _k45_eval(x3, nmax, d[:, None] * sc, dmin[:, None] * m)
                t = err < be
                be = np.where(t, err, be)
                psc = np.where(t, sc, psc)
                pm = np.where(t, m, pm)
                bq = np.where(t, sq, bq)
                bq2 = np.where(t, sq2, bq2)
                bqx = np.where(t, sqx, bqx)
        u_s, b_ = _k45_lsfit(bq, bq2, bqx, sx)
        u_m = -b_
        cq = bq
    pick = ok & (_block_err(be) < e_rtn * MSE_MARGIN)
    if pick.any():
        *_, r = _k45_eval(x3, nmax, d[:, None] * psc, dmin[:, None] * pm)
        mine = _assemble_k45(
            name,
            d,
            dmin,
            psc.astype(np.uint8),
            pm.astype(np.uint8),
            r.astype(np.uint8).reshape(nb, 256),
        )
        out[pick] = mine[pick]
    return out


def _assemble_q6(d, sc, L) -> np.ndarray:
    out = np.empty((L.shape[0], 210), np.uint8)
    out[:, 0:128], out[:, 128:192] = _pack_q6(L)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = _f32_to_f16_bytes(d)
    return out


def _requant_q6(x3, d16, sc, L):
    """ggml's last Q6_K pass: codes against the stored scales (d*sc == 0 keeps ``L``)."""
    with np.errstate(all="ignore"):
        d = d16[:, None] * sc.astype(F32)
        q = np.clip(nearest_int(x3 / d[..., None]), -32, 31) + 32
    return np.where((d != 0)[..., None], q, L.reshape(x3.shape)).astype(np.uint8)


def _q6_from_scales(x3, L, scales):
    """ggml's Q6_K tail after the sub-block search (codes ``L``, ``scales`` (B, 16)): the
    scales quantized against the largest, codes recomputed; (bytes, d, int8 scales, the
    all-zero blocks)."""
    nb = x3.shape[0]
    max_scale = np.zeros(nb, F32)
    max_abs = np.zeros(nb, F32)
    for j in range(16):
        a = np.abs(scales[:, j])
        big = a > max_abs
        max_abs = np.where(big, a, max_abs)
        max_scale = np.where(big, scales[:, j], max_scale)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        d = _round_f16(F32(1) / iscale)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    q = _requant_q6(x3, d, sc, L)
    out = _assemble_q6(d, sc, q.reshape(nb, 256))
    out[zero] = 0
    return out, d, sc, zero, q


def _rtn_q6(x: np.ndarray, track: bool = False):
    """ggml's quantize_row_q6_K_ref: the bytes, and with ``track`` also what the mse
    search starts from (see :func:`_mse_q6`)."""
    nb = x.shape[0]
    x3 = x.reshape(nb, 16, 16)
    res = make_qx_quants_rmse1(x3.reshape(nb * 16, 16), 32, track)
    out, d, sc, zero, q = _q6_from_scales(x3, res[0], res[1].reshape(nb, 16))
    if not track:
        return out
    return out, q, d[:, None] * sc.astype(F32), res[2].reshape(nb, 16), zero


def _q6_grid(v, step):
    """floor(v / step) clamped to [-128, 126]; 0 where step is 0 or the ratio is NaN."""
    with np.errstate(all="ignore"):
        t = np.floor(v / step[:, None])
    t = np.where(t > F32(126), F32(126), np.where(t > F32(-128), t, F32(-128)))
    return np.where((step == 0)[:, None], F32(0), t).astype(F32)


def _q6_eval(x3, ds):
    """Codes against stored scales ``ds`` (0: codes 0) per sub-block: q = clamp(round(x *
    (1/ds)), -32, 31); returns (squared error of ds*q, sum q*q, sum q*x, q)."""
    with np.errstate(all="ignore"):
        ids = np.where(ds != 0, F32(1) / ds, F32(0))
        v = x3 * ids[..., None]
    r = (v + _MAGIC) - _MAGIC
    r = np.where(r > F32(-32), r, F32(-32))
    r = np.where(r < F32(31), r, F32(31))
    e = ds[..., None] * r - x3
    return _seq_sum(e * e), _seq_sum(r * r), _seq_sum(r * x3), r


def _mse_q6(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    x3 = x.reshape(nb, 16, 16)
    out, q, ds, u_s, zero = _rtn_q6(x, track=True)
    e = ds[..., None] * (q.astype(F32) - F32(32)) - x3
    e_rtn = _block_err(_seq_sum(e * e))
    max_scale = np.zeros(nb, F32)
    max_abs = np.zeros(nb, F32)
    for j in range(16):
        a = np.abs(u_s[:, j])
        big = a > max_abs
        max_abs = np.where(big, a, max_abs)
        max_scale = np.where(big, u_s[:, j], max_scale)
    d = _round_f16(max_scale / F32(-128))
    be = np.full((nb, 16), np.inf, F32)
    psc = np.zeros((nb, 16), F32)
    bq2 = np.zeros((nb, 16), F32)
    bqx = np.zeros((nb, 16), F32)
    for _ in range(Q6_ROUNDS):
        c0 = _q6_grid(u_s, d)
        for a in (0, 1):
            sc = c0 + F32(a)
            err, sq2, sqx, _ = _q6_eval(x3, d[:, None] * sc)
            t = err < be
            be = np.where(t, err, be)
            psc = np.where(t, sc, psc)
            bq2 = np.where(t, sq2, bq2)
            bqx = np.where(t, sqx, bqx)
        with np.errstate(all="ignore"):
            u_s = np.where(bq2 > 0, bqx / bq2, u_s).astype(F32)
    pick = ~zero & (_block_err(be) < e_rtn * MSE_MARGIN)
    if pick.any():
        *_, r = _q6_eval(x3, d[:, None] * psc)
        mine = _assemble_q6(d, psc.astype(np.int8), (r + F32(32)).astype(np.uint8).reshape(nb, 256))
        out[pick] = mine[pick]
    return out


# ---------------------------------------------------------------------------------------
# importance (qw given): ggml's quantize_row_q{2,3,4,5,6}_K_impl helpers and the weighted
# search of mse; ggml_k23 uses them too (the C twins: ext/ggml_k456.pxi, kq_*)

#: make_qkx3_quants' grid in every K-quant impl: (rmin, rdelta, nstep)
QKX3_GRID = (-0.9, 0.05, 36)
#: mse with importance: rounds of (scale search, d refit), and the scales tried: +- reach
#: (scale and min of Q2_K/Q4_K/Q5_K), +- reach_sym (the scale of Q3_K/Q6_K)
KQ_ROUNDS = 3
KQ_REACH = 2
KQ_REACH_SYM = 3


def imp_weights(x: np.ndarray, qw: np.ndarray, f: int, n: int):
    """ggml's impl weights qw*sqrt(sigma2 + x*x), sigma2 = f*sum(x*x)/256 per block, and
    their sums per sub-block of ``n``: ((B, 256), (B, 256 // n))."""
    sumx2 = _seq_sum(x * x)
    sigma2 = (F32(f) * sumx2) / F32(QK)
    w = (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F32)
    return w, _seq_sum(w.reshape(x.shape[0], QK // n, n))


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray):
    """ggml's make_qp_quants(n, nmax, x, L, qw) on every row of ``x`` (N, n): (L as int32
    holding ggml's uint8 values, scale (N,))."""
    N, n = x.shape
    mx = np.zeros(N, F32)
    for i in range(n):
        mx = np.where(mx > x[:, i], mx, x[:, i])
    zero = mx < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(nmax) / mx
        L = nearest_int(iscale[:, None] * x) & 0xFF
        scale = F32(1) / iscale
        diff = x - scale[:, None] * L.astype(F32)
        best = _seq_sum((qw * diff) * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = (F32(0.1) * F32(step) + F32(nmax)) / mx
            s_is = F32(1) / isc
            lf = np.minimum(nearest_int(isc[:, None] * x), nmax).astype(F32)
            diff = x - s_is[:, None] * lf
            mse = _seq_sum((qw * diff) * diff)
            t = mse < best
            best = np.where(t, mse, best)
            iscale = np.where(t, isc, iscale)
        li = np.minimum(nearest_int(iscale[:, None] * x), nmax)
        L = li & 0xFF
        lf = li.astype(F32)
        sumlx = _seq_sum((qw * x) * lf)
        suml2 = _seq_sum((qw * lf) * lf)
        # five passes of single-code moves (a pass that changes nothing changes nothing next)
        for _ in range(5):
            for i in range(n):
                w = qw[:, i]
                xi = x[:, i]
                cur = L[:, i].astype(F32)
                slx = sumlx - (w * xi) * cur
                sl2 = suml2 - (w * cur) * cur
                nl = np.minimum(nearest_int((xi * sl2) / slx), nmax)
                nf = nl.astype(F32)
                slx2 = slx + (w * xi) * nf
                sl22 = sl2 + (w * nf) * nf
                acc = (slx > 0) & (sl2 > 0) & (nl != L[:, i])
                acc &= (slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22
                L[:, i] = np.where(acc, nl & 0xFF, L[:, i])
                sumlx = np.where(acc, slx2, sumlx)
                suml2 = np.where(acc, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = np.where(zero[:, None], 0, L).astype(np.int32)
    return L, np.where(zero, F32(0), scale).astype(F32)


def make_qx_quants_w(x: np.ndarray, nmax: int, qw: np.ndarray):
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw) on every row of ``x``: (L
    int32 holding l + nmax, or 0 for an all-zero row, scale (N,))."""
    amax = np.zeros(x.shape[0], F32)
    xmax = np.zeros(x.shape[0], F32)
    for i in range(x.shape[1]):  # the C's strict '>' (a NaN never wins)
        ax = np.abs(x[:, i])
        t = ax > amax
        amax = np.where(t, ax, amax)
        xmax = np.where(t, x[:, i], xmax)
    zero = amax < GROUP_MAX_EPS
    wx = qw * x
    with np.errstate(all="ignore"):

        def codes(isc):
            return np.clip(nearest_int(isc[:, None] * x), -nmax, nmax - 1)

        def sums(c):
            lf = c.astype(F32)
            return _seq_sum(wx * lf), _seq_sum((qw * lf) * lf)

        L = codes(F32(-nmax) / xmax)
        sumlx, suml2 = sums(L)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            la = codes(-(F32(nmax) + F32(0.1) * F32(step)) / xmax)
            slx, sl2 = sums(la)
            take = (sl2 > 0) & (slx * slx > best * sl2)
            L = np.where(take[:, None], la, L)
            scale = np.where(take, slx / sl2, scale)
            best = np.where(take, scale * slx, best)
    L = np.where(zero[:, None], 0, L + nmax).astype(np.int32)
    return L, np.where(zero, F32(0), scale).astype(F32)


def _kq_err(x3, w3, lo, hi, ds, dm):
    """Codes to nearest against sub-block scales ``ds`` (0: code 0) and mins ``dm`` (None:
    symmetric codes lo..hi), and each sub-block's weighted squared error, float32 in order:
    (err (B, S), codes int32 (B, S, n))."""
    with np.errstate(all="ignore"):
        v = x3 + dm[..., None] if dm is not None else x3
        q = np.clip(nearest_int(v / ds[..., None]), lo, hi)
        q = np.where((ds != 0)[..., None], q, 0)
        xh = ds[..., None] * q.astype(F32)
        if dm is not None:
            xh = xh - dm[..., None]
        t = xh - x3
        return _seq_sum(w3 * (t * t)), q


def _kq_eval(x3, w3, lo, hi, d, dmin, sc, m):
    ds = d[:, None] * sc.astype(F32)
    dm = dmin[:, None] * m.astype(F32) if m is not None else None
    err, q = _kq_err(x3, w3, lo, hi, ds, dm)
    return _block_err(err), q


def kq_search(x3, w3, lo, hi, smin, smax, mmax, d, dmin, sc, m):
    """mse's weighted search with importance (``w3`` = qw, (B, S, n)), from a block's
    stored parameters: d, dmin (float16-exact float32 (B,)), scales ``sc`` and mins ``m``
    (int32 (B, S); m None: symmetric x_hat = d*sc*q, q in lo..hi; else x_hat = d*sc*q -
    dmin*m, q in 0..hi). ``KQ_ROUNDS`` rounds of:

    1. each sub-block's (sc, m) among sc +- KQ_REACH, m +- KQ_REACH (in range; symmetric:
       sc +- KQ_REACH_SYM), codes to
       nearest, the smallest float32 weighted error (the current pair first, then the
       others in order, each kept only when strictly lower);
    2. d (and dmin) refit by weighted least squares on those codes (float64 sums in element
       order; x ~ d*a + e*b with a = sc*q, b = m, dmin = -e; with no 2x2 solution d alone),
       rounded through float32 to float16, kept only when the block's error drops; a block
       stops at a refit it cannot use.

    Returns (error of the result (B,) float64, d, dmin, sc, m, codes (B, S, n) int32)."""
    B, S, n = x3.shape
    d = d.copy()
    dmin = dmin.copy() if m is not None else np.zeros(B, F32)
    sc = sc.copy()
    m = m.copy() if m is not None else None
    aff = m is not None
    live = np.ones(B, bool)
    reach = (
        range(-KQ_REACH, KQ_REACH + 1) if m is not None else range(-KQ_REACH_SYM, KQ_REACH_SYM + 1)
    )
    for _ in range(KQ_ROUNDS):
        best, _q = _kq_err(
            x3,
            w3,
            lo,
            hi,
            d[:, None] * sc.astype(F32),
            dmin[:, None] * m.astype(F32) if aff else None,
        )
        bs = sc.copy()
        bm = m.copy() if aff else None
        for da in reach:
            a = sc + da
            for db in reach if aff else (0,):
                if da == 0 and db == 0:
                    continue
                ok = (a >= smin) & (a <= smax)
                if aff:
                    b = m + db
                    ok &= (b >= 0) & (b <= mmax)
                    e, _q = _kq_err(
                        x3, w3, lo, hi, d[:, None] * a.astype(F32), dmin[:, None] * b.astype(F32)
                    )
                else:
                    e, _q = _kq_err(x3, w3, lo, hi, d[:, None] * a.astype(F32), None)
                t = ok & (e < best) & live[:, None]
                best = np.where(t, e, best)
                bs = np.where(t, a, bs)
                if aff:
                    bm = np.where(t, b, bm)
        sc = bs
        m = bm
        tot, q = _kq_eval(x3, w3, lo, hi, d, dmin, sc, m)
        saa = np.zeros(B, F64)
        sab = np.zeros(B, F64)
        sbb = np.zeros(B, F64)
        sax = np.zeros(B, F64)
        sbx = np.zeros(B, F64)
        for j in range(S):
            bv = m[:, j].astype(F64) if aff else np.zeros(B, F64)
            for i in range(n):
                wi = w3[:, j, i].astype(F64)
                xi = x3[:, j, i].astype(F64)
                av = sc[:, j].astype(F64) * q[:, j, i].astype(F64)
                saa = saa + (wi * av) * av
                sab = sab + (wi * av) * bv
                sbb = sbb + (wi * bv) * bv
                sax = sax + (wi * av) * xi
                sbx = sbx + (wi * bv) * xi
        with np.errstate(all="ignore"):
            det = saa * sbb - sab * sab
            two = aff & (det > 0)
            nd = np.where(two, (sax * sbb - sab * sbx) / det, sax / saa)
            nm = np.where(two, (sab * sax - saa * sbx) / det, dmin.astype(F64) if aff else 0.0)
            d2 = _round_f16(nd.astype(F32))
            m2 = _round_f16(nm.astype(F32))
        live &= two | (saa > 0)
        live &= np.isfinite(d2) & np.isfinite(m2)
        live &= ~((d2 == d) & ((m2 == dmin) | (not aff)))
        t2, q2 = _kq_eval(x3, w3, lo, hi, d2, m2, sc, m)
        live &= t2 < tot
        d = np.where(live, d2, d)
        if aff:
            dmin = np.where(live, m2, dmin)
    tot, q = _kq_eval(x3, w3, lo, hi, d, dmin, sc, m)
    return tot, d, dmin, sc, m, q


def _imp_k45(x: np.ndarray, name: str, qw: np.ndarray, method: str) -> np.ndarray:
    """ggml's quantize_row_q4_K_impl / quantize_row_q5_K_impl (and mse's search from it)."""
    nmax = QKX2_GRID[name][0]
    nb = x.shape[0]
    x3 = x.reshape(nb, 8, 32)
    w, sw = imp_weights(x, qw, 2, 32)
    L, scales, mins = make_qkx2_quants(
        x.reshape(nb * 8, 32), w.reshape(nb * 8, 32), nmax, *QKX3_GRID
    )
    Ls, d_block = make_qp_quants(scales.reshape(nb, 8), 63, sw)
    Lm, m_block = make_qp_quants(mins.reshape(nb, 8), 63, sw)
    d = _round_f16(d_block)
    dmin = _round_f16(m_block)
    if name == "Q5_K":
        Ls = np.minimum(Ls, 63)
        Lm = np.minimum(Lm, 63)
    # the impl's packing, step for step (a scale past 63 spills as it does there)
    sb = np.zeros((nb, 12), np.int32)
    for j in range(8):
        if j < 4:
            sb[:, j] = Ls[:, j]
            sb[:, j + 4] = Lm[:, j]
        else:
            sb[:, j + 4] = (Ls[:, j] & 0xF) | ((Lm[:, j] & 0xF) << 4)
            sb[:, j - 4] |= (Ls[:, j] >> 4) << 6
            sb[:, j] |= (Lm[:, j] >> 4) << 6
    sb = (sb & 0xFF).astype(np.uint8)
    sc, m = unpack_scale_min_k4(sb)
    q = _requant_k45(x3, d, dmin, sc, m, L, nmax)
    out = _assemble_k45(name, d, dmin, sc, m, q.reshape(nb, 256))
    out[:, 4:16] = sb
    if method == "rtn":
        return out
    w3 = qw.reshape(nb, 8, 32)
    sc = sc.astype(np.int32)
    m = m.astype(np.int32)
    e0, _ = _kq_eval(x3, w3, 0, nmax, d, dmin, sc, m)
    e1, d, dmin, sc, m, q = kq_search(x3, w3, 0, nmax, 0, 63, 63, d, dmin, sc, m)
    pick = e1 < e0 * MSE_MARGIN
    if pick.any():
        mine = _assemble_k45(name, d, dmin, sc, m, q.reshape(nb, 256))
        out[pick] = mine[pick]
    return out


def _imp_q6(x: np.ndarray, qw: np.ndarray, method: str) -> np.ndarray:
    """ggml's quantize_row_q6_K_impl (and mse's search from it)."""
    nb = x.shape[0]
    x3 = x.reshape(nb, 16, 16)
    L, scales = make_qx_quants_w(x3.reshape(nb * 16, 16), 32, qw.reshape(nb * 16, 16))
    out, d, sc, zero, _ = _q6_from_scales(x3, L, scales.reshape(nb, 16))
    if method == "rtn":
        return out
    w3 = qw.reshape(nb, 16, 16)
    sc = sc.astype(np.int32)
    e0, _ = _kq_eval(x3, w3, -32, 31, d, None, sc, None)
    e1, d, _, sc, _, q = kq_search(x3, w3, -32, 31, -128, 127, 0, d, None, sc, None)
    pick = ~zero & (e1 < e0 * MSE_MARGIN)
    if pick.any():
        mine = _assemble_q6(d, sc.astype(np.int8), (q + 32).astype(np.uint8).reshape(nb, 256))
        out[pick] = mine[pick]
    return out


# ---------------------------------------------------------------------------------------
# public API


def _check(x: np.ndarray, name: str) -> np.ndarray:
    if name not in NAMES:
        raise ValueError(f"this module holds {', '.join(NAMES)}, not {name!r}")
    x = np.ascontiguousarray(x, F32)
    if x.ndim != 2 or x.shape[1] != QK:
        raise ValueError(f"x must be float32 (n_blocks, {QK}), got {list(x.shape)}")
    return x


def quantize_blocks(
    x: np.ndarray, name: str, method: str = "rtn", qw=None, sigma2=None
) -> np.ndarray:
    """Quantize float32 blocks ``x`` (n_blocks, 256) into ggml ``name`` bytes
    (n_blocks, type_size); ``method`` is ``"rtn"`` (ggml's reference) or ``"mse"``.

    Examples
    --------
    >>> quantize_blocks(np.zeros((1, 256), np.float32), "Q6_K").shape
    (1, 210)
    """
    x = _check(x, name)
    if qw is not None:
        if method not in ("rtn", "mse"):
            raise ValueError(f"method must be 'rtn' or 'mse', got {method!r}")
        qw = np.ascontiguousarray(qw, F32).reshape(x.shape)
        return _imp_q6(x, qw, method) if name == "Q6_K" else _imp_k45(x, name, qw, method)
    if method == "rtn":
        return _rtn_q6(x) if name == "Q6_K" else _rtn_k45(x, name)
    if method == "mse":
        return _mse_q6(x) if name == "Q6_K" else _mse_k45(x, name)
    raise ValueError(f"method must be 'rtn' or 'mse', got {method!r}")


def dequantize_blocks(data: np.ndarray, name: str) -> np.ndarray:
    """Decode ggml ``name`` blocks (n_blocks, type_size) uint8 into float32 (n_blocks, 256),
    the values gguf-py's ``quants.dequantize`` gives."""
    if name not in NAMES:
        raise ValueError(f"this module holds {', '.join(NAMES)}, not {name!r}")
    data = np.ascontiguousarray(data, np.uint8).reshape(-1, _get_type(name).type_size)
    nb = data.shape[0]
    if name == "Q6_K":
        L = _unpack_q6(data[:, 0:128], data[:, 128:192]).reshape(nb, 16, 16)
        sc = data[:, 192:208].view(np.int8).astype(F32)
        d = _f16_to_f32(data[:, 208:210]).reshape(nb, 1)
        q = (L.astype(np.int8) - np.int8(32)).astype(F32)
        with np.errstate(all="ignore"):
            return ((d * sc)[..., None] * q).reshape(nb, QK)
    d = _f16_to_f32(data[:, 0:2]).reshape(nb, 1)
    dmin = _f16_to_f32(data[:, 2:4]).reshape(nb, 1)
    sc, m = unpack_scale_min_k4(data[:, 4:16])
    if name == "Q4_K":
        L = _unpack_q4(data[:, 16:144])
    else:
        L = _unpack_q5(data[:, 16:48], data[:, 48:176])
    with np.errstate(all="ignore"):
        ds = (d * sc.astype(F32))[..., None]
        dm = (dmin * m.astype(F32))[..., None]
        return (ds * L.reshape(nb, 8, 32).astype(F32) - dm).reshape(nb, QK)
