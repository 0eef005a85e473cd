"""NumPy reference of ggml's Q2_K and Q3_K super-blocks: the definition the kernels
(``ext/ggml_k23.pxi``) are held to, bit for bit.

Both types cut a block of 256 weights into 16 sub-blocks of 16. Arithmetic is float32 in
the C's order; sums run element after element (the loops over a sub-block's elements are
sequential, the block axis is vectorized). ``nint`` is ggml's ``nearest_int`` (round half
to even through the 1.5 * 2**23 trick, including what that trick gives out of range).

Q2_K (84 bytes: ``scales[16]``, ``qs[64]``, ``d``, ``dmin``)::

    x_hat = d * (scales & 15) * q - dmin * (scales >> 4),   q in 0..3

Q3_K (110 bytes: ``hmask[32]``, ``qs[64]``, ``scales[12]``, ``d``)::

    x_hat = d * (s - 32) * (q - 4),   s the 6-bit scale, q in 0..7 (high bit in hmask)

``method="rtn"`` is ggml's ``quantize_row_q2_K_ref`` / ``quantize_row_q3_K_ref`` (no
importance matrix): per sub-block a weighted fit (Q2_K: weights |x|, absolute error, 16
grid steps each refit by least squares; Q3_K: weights x*x, single-code moves), the
sub-block scales rounded against the largest one, then codes recomputed against what is
stored.

``method="mse"`` is flightquant's search in the same bytes, minimizing the plain squared
error of the decoded block; see :func:`_q2_mse` and :func:`_q3_mse` for the steps. The rtn
result is always one of its candidates, so mse is never worse than rtn on any block.
"""

from __future__ import annotations

import numpy as np

from .. import formats
from . import ggml_k456 as k456
from .ggml_common import nearest_int as nint
from .ggml_common import seq_sum as _seq_sum

F32 = np.float32
QK = 256
NSUB = 16
_TYPE_SIZE = {n: formats.get(n).type_size for n in ("Q2_K", "Q3_K")}


def nintc(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """nint clamped to [lo, hi], as float32."""
    return _clamp(nint(v), lo, hi).astype(F32)


def _f16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 bits as uint16, the value they decode to as float32)."""
    with np.errstate(over="ignore"):
        h = np.asarray(v, F32).astype(np.float16)
    return h.view(np.uint16), h.astype(F32)


def _pack2(L: np.ndarray) -> np.ndarray:
    """(n, 256) codes -> (n, 64) bytes: the low 2 bits, ggml's plane order."""
    q = (L.astype(np.uint8) & 3).reshape(-1, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(q << shifts, axis=2).reshape(-1, 64)


def _unpack2(qs: np.ndarray) -> np.ndarray:
    """(n, 64) bytes -> (n, 256) codes 0..3."""
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK)


def _clamp(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.minimum(np.maximum(a, np.int32(lo)), np.int32(hi))


# ---------------------------------------------------------------------------------------
# Q2_K


def _q2_subblocks_rtn(x: np.ndarray):
    """ggml's make_qkx2_quants(16, 3, x, |x|, rmin=-0.5, rdelta=0.1, nstep=15, use_mad)
    on (n, 16) sub-blocks. Returns (scale, the_min, L) with L uint8 (n, 16)."""
    n = x.shape[0]
    w = np.abs(x)
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, 16):
        mn = np.where(x[:, i] < mn, x[:, i], mn)
        mx = np.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = np.where(mn > 0, F32(0), mn)
    flat = mx == mn
    L = np.zeros((n, 16), np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(3) / (mx - mn)
        scale = F32(1) / iscale
        best = np.zeros(n, F32)
        for i in range(16):
            li = _clamp(nint(iscale * (x[:, i] - mn)), 0, 3)
            L[:, i] = li
            best = best + w[:, i] * np.abs(scale * li.astype(F32) + mn - x[:, i])
        for step in range(16):
            iscale = (F32(-0.5) + F32(0.1) * F32(step) + F32(3)) / (mx - mn)
            La = _clamp(nint(iscale[:, None] * (x - mn[:, None])), 0, 3).astype(F32)
            terms = w * La
            sum_l = _seq_sum(terms)
            sum_l2 = _seq_sum(terms * La)
            sum_xl = _seq_sum(terms * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            ts = (sum_w * sum_xl - sum_x * sum_l) / D
            tm = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = tm > 0
            ts = np.where(pos, sum_xl / sum_l2, ts)
            tm = np.where(pos, F32(0), tm)
            cur = _seq_sum(w * np.abs(ts[:, None] * La + tm[:, None] - x))
            win = (D > 0) & (cur < best) & ~flat
            L[win] = La[win].astype(np.uint8)
            best = np.where(win, cur, best)
            scale = np.where(win, ts, scale)
            mn = np.where(win, tm, mn)
    scale = np.where(flat, F32(0), scale)
    L[flat] = 0
    return scale, -mn, L


def _q2_codes(x: np.ndarray, L: np.ndarray, sc: np.ndarray, d: np.ndarray, dmin: np.ndarray):
    """Codes against the stored scales (x: (n, 16, 16), sc: (n, 16) uint8, d/dmin (n,));
    a sub-block whose scale decodes to zero keeps the codes in L."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        dd = d[:, None] * (sc & 15).astype(F32)
        dm = dmin[:, None] * (sc >> 4).astype(F32)
        new = _clamp(nint((x + dm[..., None]) / dd[..., None]), 0, 3).astype(np.uint8)
    return np.where((dd != 0)[..., None], new, L)


def _q2_assemble(sc, L, hd, hm) -> np.ndarray:
    n = sc.shape[0]
    out = np.empty((n, _TYPE_SIZE["Q2_K"]), np.uint8)
    out[:, :16] = sc
    out[:, 16:80] = _pack2(L.reshape(n, QK))
    out[:, 80:82] = hd.reshape(n, 1).view(np.uint8)
    out[:, 82:84] = hm.reshape(n, 1).view(np.uint8)
    return out


def _q2_rtn(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    xs = x.reshape(n, NSUB, 16)
    scales, mins, L = _q2_subblocks_rtn(xs.reshape(-1, 16))
    scales = scales.reshape(n, NSUB)
    mins = mins.reshape(n, NSUB)
    L = L.reshape(n, NSUB, 16)
    max_scale = np.zeros(n, F32)
    max_min = np.zeros(n, F32)
    for j in range(NSUB):
        max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
        max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ls = nint((F32(15) / max_scale)[:, None] * scales)
        lm = nint((F32(15) / max_min)[:, None] * mins)
        hd, d = _f16_round(max_scale / F32(15))
        hm, dmin = _f16_round(max_min / F32(15))
    has_s = max_scale > 0
    has_m = max_min > 0
    sc = np.where(has_s[:, None], ls & 0xFF, 0) | np.where(has_m[:, None], (lm << 4) & 0xFF, 0)
    sc = sc.astype(np.uint8)
    hd = np.where(has_s, hd, np.uint16(0))
    d = np.where(has_s, d, F32(0))
    hm = np.where(has_m, hm, np.uint16(0))
    dmin = np.where(has_m, dmin, F32(0))
    L = _q2_codes(xs, L, sc, d, dmin)
    return _q2_assemble(sc, L, hd, hm)


def _q2_decode_parts(data: np.ndarray):
    sc = data[:, :16]
    L = _unpack2(data[:, 16:80])
    d = data[:, 80:82].copy().view(np.float16).astype(F32).reshape(-1)
    dmin = data[:, 82:84].copy().view(np.float16).astype(F32).reshape(-1)
    return sc, L, d, dmin


def _q2_decode(data: np.ndarray) -> np.ndarray:
    sc, L, d, dmin = _q2_decode_parts(data)
    q = L.reshape(-1, NSUB, 16).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        dl = d[:, None] * (sc & 15).astype(F32)
        ml = dmin[:, None] * (sc >> 4).astype(F32)
        return (dl[..., None] * q - ml[..., None]).reshape(-1, QK)


# ---------------------------------------------------------------------------------------
# Q3_K


def _q3_subblocks_rtn(x: np.ndarray):
    """ggml's make_q3_quants(16, 4, x, do_rmse=True) on (n, 16) sub-blocks. Returns
    (scale, L) with L int32 (n, 16) in 0..7 (all zero for a sub-block below 1e-15)."""
    n = x.shape[0]
    ax = np.abs(x)
    amax = np.zeros(n, F32)
    mx = np.zeros(n, F32)
    for i in range(16):
        gt = ax[:, i] > amax
        amax = np.where(gt, ax[:, i], amax)
        mx = np.where(gt, x[:, i], mx)
    zero = amax < F32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-4) / mx
        L = _clamp(nint(iscale[:, None] * x), -4, 3)
        w = x * x
        Lf = L.astype(F32)
        sumlx = _seq_sum(w * x * Lf)
        suml2 = _seq_sum(w * Lf * Lf)
        active = ~zero
        for _ in range(5):
            changed = np.zeros(n, bool)
            for i in range(16):
                wi = w[:, i]
                xi = x[:, i]
                li = L[:, i].astype(F32)
                slx = sumlx - wi * xi * li
                ok = active & (slx > 0)
                sl2 = suml2 - wi * li * li
                new = _clamp(nint(xi * sl2 / slx), -4, 3)
                newf = new.astype(F32)
                slx2 = slx + wi * xi * newf
                sl22 = sl2 + wi * newf * newf
                acc = (
                    ok
                    & (new != L[:, i])
                    & (sl22 > 0)
                    & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                )
                L[:, i] = np.where(acc, new, L[:, i])
                sumlx = np.where(acc, slx2, sumlx)
                suml2 = np.where(acc, sl22, suml2)
                changed |= acc
            active = active & changed
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    L = np.where(zero[:, None], 0, L + 4)
    scale = np.where(zero, F32(0), scale)
    return scale, L


def _q3_pack_scales(ls: np.ndarray) -> np.ndarray:
    """(n, 16) six-bit scales -> (n, 12) bytes."""
    ls = ls.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, :8] = (ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4)
    hi = (ls >> 4) & 3
    for j in range(NSUB):
        out[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    return out


def _q3_unpack_scales(s: np.ndarray) -> np.ndarray:
    """(n, 12) bytes -> (n, 16) six-bit scales as int32."""
    lo = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1).astype(np.int32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
    hi = ((s[:, None, 8:12] >> shifts) & 3).reshape(-1, NSUB).astype(np.int32)
    return lo | (hi << 4)


def _q3_codes(x: np.ndarray, L: np.ndarray, ls: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes 0..7 against the stored scales; a zero sub-block scale keeps L."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        dd = d[:, None] * (ls - 32).astype(F32)
        new = _clamp(nint(x / dd[..., None]), -4, 3) + 4
    return np.where((dd != 0)[..., None], new, L)


def _q3_assemble(ls, L, hd) -> np.ndarray:
    n = ls.shape[0]
    L = L.reshape(n, QK).astype(np.uint8)
    out = np.empty((n, _TYPE_SIZE["Q3_K"]), np.uint8)
    high = (L >> 2).reshape(n, 8, 32)
    out[:, :32] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    out[:, 32:96] = _pack2(L)
    out[:, 96:108] = _q3_pack_scales(ls)
    out[:, 108:110] = hd.reshape(n, 1).view(np.uint8)
    return out


def _q3_rtn(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    xs = x.reshape(n, NSUB, 16)
    scales, L = _q3_subblocks_rtn(xs.reshape(-1, 16))
    scales = scales.reshape(n, NSUB)
    L = L.reshape(n, NSUB, 16)
    amax = np.zeros(n, F32)
    max_scale = np.zeros(n, F32)
    for j in range(NSUB):
        a = np.abs(scales[:, j])
        gt = a > amax
        amax = np.where(gt, a, amax)
        max_scale = np.where(gt, scales[:, j], max_scale)
    has = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-32) / max_scale
        l8 = nint(iscale[:, None] * scales).astype(np.int8).astype(np.int32)
        hd, d = _f16_round(F32(1) / iscale)
    ls = np.where(has[:, None], _clamp(l8, -32, 31) + 32, 0)
    hd = np.where(has, hd, np.uint16(0))
    d = np.where(has, d, F32(0))
    L = _q3_codes(xs, L, ls, d)
    return _q3_assemble(ls, L, hd)


def _q3_decode_parts(data: np.ndarray):
    hmask = data[:, :32]
    L = _unpack2(data[:, 32:96]).astype(np.int32)
    high = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    L = L | (high.reshape(-1, QK).astype(np.int32) << 2)
    ls = _q3_unpack_scales(data[:, 96:108])
    d = data[:, 108:110].copy().view(np.float16).astype(F32).reshape(-1)
    return ls, L, d


def _q3_decode(data: np.ndarray) -> np.ndarray:
    ls, L, d = _q3_decode_parts(data)
    q = (L - 4).reshape(-1, NSUB, 16).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        dl = d[:, None] * (ls - 32).astype(F32)
        return (dl[..., None] * q).reshape(-1, QK)


# ---------------------------------------------------------------------------------------
# mse: flightquant's search (same bytes)

F64 = np.float64
Q2_STEPS = 4  # sub-block fits tried per sub-block, iscale (2.6 + 0.3 k) / (max - min)
Q3_STEPS = 4  # iscale -(3.2 + 0.4 k) / max


def _sse16(x: np.ndarray, xh: np.ndarray) -> np.ndarray:
    """Squared error of (..., 16) float32 sub-blocks: float64 terms summed in order."""
    e = x.astype(F64) - xh.astype(F64)
    e = e * e
    acc = np.zeros(e.shape[:-1], F64)
    for i in range(e.shape[-1]):
        acc = acc + e[..., i]
    return acc


def _seq_sum64(a: np.ndarray) -> np.ndarray:
    acc = np.zeros(a.shape[:-1], F64)
    for i in range(a.shape[-1]):
        acc = acc + a[..., i]
    return acc


def _keep(mask: np.ndarray, new, old):
    """Per-block select between candidate tuples (mask over the leading axis)."""
    out = []
    for a, b in zip(new, old, strict=True):
        m = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))
        out.append(np.where(m, a, b))
    return tuple(out)


def _q2_fit(x: np.ndarray):
    """Per (n, 16) sub-block, the scale and min (x ~ s*L - m, L in 0..3) of the grid step
    whose least-squares refit has the smallest squared error (float32 throughout)."""
    n = x.shape[0]
    mn = x[:, 0].copy()
    mx = x[:, 0].copy()
    for i in range(1, 16):
        mn = np.where(x[:, i] < mn, x[:, i], mn)
        mx = np.where(x[:, i] > mx, x[:, i], mx)
    mn = np.where(mn > 0, F32(0), mn)
    rng = mx - mn
    sum_x = _seq_sum(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = rng / F32(3)
        m = -mn
        best = np.full(n, np.inf, F32)
        k = np.arange(Q2_STEPS, dtype=F32)
        iscale = (F32(2.6) + F32(0.3) * k)[None, :] / rng[:, None]  # (n, steps)
        u = x - mn[:, None]
        Lf = nintc(iscale[:, None, :] * u[:, :, None], 0, 3)  # (n, 16, steps)
        L = Lf.astype(np.int32)
        sl = L.sum(axis=1)
        sl2 = (L * L).sum(axis=1)
        sxl = _seq_sum(np.moveaxis(x[:, :, None] * Lf, 1, -1))
        D = 16 * sl2 - sl * sl
        Df = D.astype(F32)
        slf = sl.astype(F32)
        sl2f = sl2.astype(F32)
        ts = (F32(16) * sxl - sum_x[:, None] * slf) / Df
        tm = (sl2f * sum_x[:, None] - slf * sxl) / Df
        pos = tm > 0
        ts = np.where(pos, sxl / sl2f, ts)
        tm = np.where(pos, F32(0), tm)
        diff = ts[:, None, :] * Lf + tm[:, None, :] - x[:, :, None]
        err = _seq_sum(np.moveaxis(diff * diff, 1, -1))
        for j in range(Q2_STEPS):
            win = (D[:, j] > 0) & (err[:, j] < best)
            best = np.where(win, err[:, j], best)
            s = np.where(win, ts[:, j], s)
            m = np.where(win, -tm[:, j], m)
    flat = ~(rng > 0)
    return np.where(flat, F32(0), s), np.where(flat, -mn, m)


def _q2_eval(xs: np.ndarray, s: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray):
    """Best (scale, min) nibbles of every sub-block against the stored d, dmin: of the
    four pairs around (s/d, m/dmin), codes to nearest, the one with the smallest float32
    squared error (the first on ties). Returns (sum of the sub-block errors, sc, mc, L)."""

    def floor_nibble(v):
        v = np.where(v >= 0, v, F32(0))
        return np.where(v > 15, F32(15), v).astype(np.int32)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fs = floor_nibble(s / d[:, None])
        fm = floor_nibble(m / dmin[:, None])
    best = None
    for c in range(4):
        sc = np.minimum(fs + (c >> 1), 15)
        mc = np.minimum(fm + (c & 1), 15)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            dl = d[:, None] * sc.astype(F32)
            ml = dmin[:, None] * mc.astype(F32)
            inv = F32(1) / dl
            q = nintc((xs + ml[..., None]) * inv[..., None], 0, 3).astype(np.int32)
            q = np.where((dl > 0)[..., None], q, 0)
            t = xs - (dl[..., None] * q.astype(F32) - ml[..., None])
            e = _seq_sum(t * t)
        best = (e, sc, mc, q) if best is None else _keep(e < best[0], (e, sc, mc, q), best)
    e, sc, mc, q = best
    return _seq_sum64(e.astype(F64)), sc, mc, q


def _q2_refit(x: np.ndarray, sc: np.ndarray, mc: np.ndarray, q: np.ndarray):
    """Least squares of x ~ d * sc*q - dmin * mc over the block (float64), rounded to
    fp16 through float32. Returns (ok, d, dmin, hd, hm)."""
    n = x.shape[0]
    a = (sc[..., None] * q).reshape(n, QK).astype(np.int64)
    b = np.repeat(mc, 16, axis=1).astype(np.int64)
    saa = (a * a).sum(axis=1)
    sab = (a * b).sum(axis=1)
    sbb = (b * b).sum(axis=1)
    xd = x.astype(F64)
    sax = _seq_sum64(a.astype(F64) * xd)
    sbx = _seq_sum64(b.astype(F64) * xd)
    det = saa * sbb - sab * sab
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        dd = (sax * sbb.astype(F64) - sab.astype(F64) * sbx) / det.astype(F64)
        dm = (sab.astype(F64) * sax - saa.astype(F64) * sbx) / det.astype(F64)
        single = ~(det > 0) | (dm < 0)
        dd = np.where(single, sax / saa.astype(F64), dd)
        dm = np.where(single, F64(0), dm)
    ok = (saa > 0) & (dd > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        hd, d = _f16_round(dd.astype(F32))
        hm, dmin = _f16_round(dm.astype(F32))
    return ok, d, dmin, hd, hm


def _q2_mse(x: np.ndarray) -> np.ndarray:
    """Q2_K search: per sub-block an unweighted least-squares fit (s, m) (``_q2_fit``);
    d, dmin = fp16(max s / 15), fp16(max m / 15); every sub-block's nibbles chosen jointly
    with its codes against those (``_q2_eval``); d, dmin refit by least squares to the
    chosen nibbles and codes, the nibbles and codes chosen again against the refit; of
    the two and rtn's own bytes, the one with the smallest squared error (rtn on ties)."""
    n = x.shape[0]
    xs = x.reshape(n, NSUB, 16)
    rtn = _q2_rtn(x)
    rtn_err = _seq_sum64(_sse16(xs, _q2_decode(rtn).reshape(n, NSUB, 16)))
    s, m = _q2_fit(xs.reshape(-1, 16))
    s = s.reshape(n, NSUB)
    m = m.reshape(n, NSUB)
    maxs = np.zeros(n, F32)
    maxm = np.zeros(n, F32)
    for j in range(NSUB):
        maxs = np.where(s[:, j] > maxs, s[:, j], maxs)
        maxm = np.where(m[:, j] > maxm, m[:, j], maxm)
    with np.errstate(over="ignore"):
        hd, d = _f16_round(maxs / F32(15))
        hm, dmin = _f16_round(maxm / F32(15))
    e1, sc, mc, q = _q2_eval(xs, s, m, d, dmin)
    ok, d2, dmin2, hd2, hm2 = _q2_refit(x, sc, mc, q)
    e2, sc2, mc2, q2 = _q2_eval(xs, s, m, d2, dmin2)
    take2 = ok & (e2 < e1)
    e, sc, mc, q, hd, hm = _keep(take2, (e2, sc2, mc2, q2, hd2, hm2), (e1, sc, mc, q, hd, hm))
    packed = _q2_assemble((sc | (mc << 4)).astype(np.uint8), q.astype(np.uint8), hd, hm)
    err = _seq_sum64(_sse16(xs, _q2_decode(packed).reshape(n, NSUB, 16)))
    return np.where((err < rtn_err)[:, None], packed, rtn)


def _q3_fit(x: np.ndarray) -> np.ndarray:
    """Per (n, 16) sub-block the signed scale (x ~ s*L, L in -4..3) of the grid step with
    the largest sxl**2 / sl2 (the smallest least-squares error), float32."""
    n = x.shape[0]
    ax = np.abs(x)
    amax = np.zeros(n, F32)
    mx = np.zeros(n, F32)
    for i in range(16):
        gt = ax[:, i] > amax
        amax = np.where(gt, ax[:, i], amax)
        mx = np.where(gt, x[:, i], mx)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = mx / F32(-4)
        best = np.full(n, F32(-1))
        k = np.arange(Q3_STEPS, dtype=F32)
        iscale = -(F32(3.2) + F32(0.4) * k)[None, :] / mx[:, None]
        L = nintc(iscale[:, None, :] * x[:, :, None], -4, 3).astype(np.int32)
        sl2 = (L * L).sum(axis=1).astype(F32)
        sxl = _seq_sum(np.moveaxis(x[:, :, None] * L.astype(F32), 1, -1))
        v = sxl * sxl / sl2
        for j in range(Q3_STEPS):
            win = v[:, j] > best
            best = np.where(win, v[:, j], best)
            s = np.where(win, sxl[:, j] / sl2[:, j], s)
    return np.where(amax > 0, s, F32(0))


def _q3_eval(xs: np.ndarray, s: np.ndarray, d: np.ndarray):
    """Best 6-bit scale of every sub-block against the stored d: of floor(s/d) - 1 .. + 2,
    codes to nearest, the one with the smallest float32 squared error (the first on ties).
    Returns (sum of the sub-block errors, k = scale - 32, L in -4..3)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = s / d[:, None]
    r = np.where(r >= -32, r, F32(-32))
    r = np.where(r > 31, F32(31), r)
    f = np.floor(r).astype(np.int32)
    best = None
    for c in range(4):
        k = _clamp(f - 1 + c, -32, 31)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            dl = d[:, None] * k.astype(F32)
            inv = F32(1) / dl
            q = nintc(xs * inv[..., None], -4, 3).astype(np.int32)
            q = np.where((dl != 0)[..., None], q, 0)
            t = xs - dl[..., None] * q.astype(F32)
            e = _seq_sum(t * t)
        best = (e, k, q) if best is None else _keep(e < best[0], (e, k, q), best)
    e, k, q = best
    return _seq_sum64(e.astype(F64)), k, q


def _q3_mse(x: np.ndarray) -> np.ndarray:
    """Q3_K search: per sub-block an unweighted least-squares scale (``_q3_fit``); d =
    fp16(s_max / -32) with s_max the scale of largest magnitude; every sub-block's 6-bit
    scale chosen with its codes against d (``_q3_eval``); d refit by least squares to the
    chosen scales and codes, scales and codes chosen again; of the two and rtn's own
    bytes, the one with the smallest squared error (rtn on ties)."""
    n = x.shape[0]
    xs = x.reshape(n, NSUB, 16)
    rtn = _q3_rtn(x)
    rtn_err = _seq_sum64(_sse16(xs, _q3_decode(rtn).reshape(n, NSUB, 16)))
    s = _q3_fit(xs.reshape(-1, 16)).reshape(n, NSUB)
    amax = np.zeros(n, F32)
    smax = np.zeros(n, F32)
    for j in range(NSUB):
        a = np.abs(s[:, j])
        gt = a > amax
        amax = np.where(gt, a, amax)
        smax = np.where(gt, s[:, j], smax)
    with np.errstate(over="ignore"):
        hd, d = _f16_round(smax / F32(-32))
    e1, k1, q1 = _q3_eval(xs, s, d)
    a = (k1[..., None] * q1).reshape(n, QK).astype(np.int64)
    saa = (a * a).sum(axis=1)
    sax = _seq_sum64(a.astype(F64) * x.astype(F64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        hd2, d2 = _f16_round((sax / saa.astype(F64)).astype(F32))
    e2, k2, q2 = _q3_eval(xs, s, d2)
    take2 = (saa > 0) & (e2 < e1)
    e, k, q, hd = _keep(take2, (e2, k2, q2, hd2), (e1, k1, q1, hd))
    packed = _q3_assemble(k + 32, q + 4, hd)
    err = _seq_sum64(_sse16(xs, _q3_decode(packed).reshape(n, NSUB, 16)))
    better = (err < rtn_err) & (smax != 0)
    return np.where(better[:, None], packed, rtn)


# ---------------------------------------------------------------------------------------
# importance: ggml's quantize_row_q{2,3}_K_impl (rtn) and mse's weighted search from it
# (the shared helpers live in ggml_k456, as their C twins do in ext/ggml_k456.pxi)


def _q2_imp(x: np.ndarray, qw: np.ndarray, method: str) -> np.ndarray:
    n = x.shape[0]
    xs = x.reshape(n, NSUB, 16)
    w, sw = k456.imp_weights(x, qw, 1, 16)
    L, scales, mins = k456.make_qkx2_quants(
        x.reshape(-1, 16), w.reshape(-1, 16), 3, *k456.QKX3_GRID
    )
    Ls, dm = k456.make_qp_quants(scales.reshape(n, NSUB), 15, sw)
    Lm, mm = k456.make_qp_quants(mins.reshape(n, NSUB), 15, sw)
    hd, d = _f16_round(dm)
    hm, dmin = _f16_round(mm)
    sc = ((Ls | (Lm << 4)) & 0xFF).astype(np.uint8)
    L = _q2_codes(xs, L.reshape(n, NSUB, 16), sc, d, dmin)
    out = _q2_assemble(sc, L, hd, hm)
    if method == "rtn":
        return out
    w3 = qw.reshape(n, NSUB, 16)
    s = (sc & 0xF).astype(np.int32)
    m = (sc >> 4).astype(np.int32)
    e0, _ = k456._kq_eval(xs, w3, 0, 3, d, dmin, s, m)
    e1, d, dmin, s, m, q = k456.kq_search(xs, w3, 0, 3, 0, 15, 15, d, dmin, s, m)
    pick = e1 < e0 * k456.MSE_MARGIN
    if pick.any():
        hd, _ = _f16_round(d)
        hm, _ = _f16_round(dmin)
        mine = _q2_assemble((s | (m << 4)).astype(np.uint8), q.astype(np.uint8), hd, hm)
        out[pick] = mine[pick]
    return out


def _q3_imp(x: np.ndarray, qw: np.ndarray, method: str) -> np.ndarray:
    n = x.shape[0]
    xs = x.reshape(n, NSUB, 16)
    w, sw = k456.imp_weights(x, qw, 2, 16)
    L, scales = k456.make_qx_quants_w(x.reshape(-1, 16), 4, w.reshape(-1, 16))
    ls, d_block = k456.make_qx_quants_w(scales.reshape(n, NSUB), 32, sw)
    hd, d = _f16_round(d_block)
    L = _q3_codes(xs, L.reshape(n, NSUB, 16), ls, d)
    out = _q3_assemble(ls, L, hd)
    if method == "rtn":
        return out
    w3 = qw.reshape(n, NSUB, 16)
    s = ls.astype(np.int32) - 32
    e0, _ = k456._kq_eval(xs, w3, -4, 3, d, None, s, None)
    e1, d, _, s, _, q = k456.kq_search(xs, w3, -4, 3, -32, 31, 0, d, None, s, None)
    pick = e1 < e0 * k456.MSE_MARGIN
    if pick.any():
        hd, _ = _f16_round(d)
        mine = _q3_assemble(s + 32, q + 4, hd)
        out[pick] = mine[pick]
    return out


# ---------------------------------------------------------------------------------------
# public entry points


def _check_name(name: str) -> None:
    if name not in _TYPE_SIZE:
        raise ValueError(f"this reference holds Q2_K and Q3_K, not {name!r}")


def quantize_blocks(
    x: np.ndarray, name: str, method: str = "rtn", qw=None, sigma2=None
) -> np.ndarray:
    """Quantize float32 blocks ``x`` of shape (n_blocks, 256) into (n_blocks, type_size)
    bytes of ggml type ``name`` ("Q2_K" or "Q3_K") with ``method`` "rtn" or "mse".

    Examples
    --------
    >>> import numpy as np
    >>> quantize_blocks(np.zeros((2, 256), np.float32), "Q3_K").shape
    (2, 110)
    """
    _check_name(name)
    x = np.ascontiguousarray(x, F32).reshape(-1, QK)
    if method not in ("rtn", "mse"):
        raise ValueError(f"method must be 'rtn' or 'mse', got {method!r}")
    if qw is not None:
        qw = np.ascontiguousarray(qw, F32).reshape(x.shape)
        return _q2_imp(x, qw, method) if name == "Q2_K" else _q3_imp(x, qw, method)
    if name == "Q2_K":
        return _q2_rtn(x) if method == "rtn" else _q2_mse(x)
    return _q3_rtn(x) if method == "rtn" else _q3_mse(x)


def dequantize_blocks(data: np.ndarray, name: str) -> np.ndarray:
    """Decode (n_blocks, type_size) bytes of ``name`` into float32 (n_blocks, 256)."""
    _check_name(name)
    data = np.ascontiguousarray(data, np.uint8).reshape(-1, _TYPE_SIZE[name])
    return _q2_decode(data) if name == "Q2_K" else _q3_decode(data)
