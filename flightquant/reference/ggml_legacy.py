"""NumPy reference of ggml's legacy blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and ternary
blocks (TQ1_0, TQ2_0): the definition the kernels in ``ext/ggml_legacy.pxi`` match bit for
bit, rtn and mse, with and without importance, for float32 input.

Layouts (little-endian, ``d`` and ``m`` are IEEE float16; code ``c`` of element ``i``):

=======  =====  =============================================  ===========================
type     bytes  fields                                         value of element i
=======  =====  =============================================  ===========================
Q4_0     18     d, qs[16]: c[i] | c[i+16] << 4                 d * (c - 8)
Q4_1     20     d, m, qs[16]                                   d * c + m
Q5_0     22     d, qh (bit i = bit 4 of c[i]), qs[16]          d * (c - 16)
Q5_1     24     d, m, qh, qs[16]                               d * c + m
Q8_0     34     d, qs[32] int8                                 d * c
TQ1_0    54     qs[48] (5 trits a byte), qh[4] (4), d          d * (c - 1), c in {0,1,2}
TQ2_0    66     qs[64] (4 codes of 2 bits a byte), d           d * (c - 1)
=======  =====  =============================================  ===========================

``method="rtn"`` is ggml's ``quantize_row_*_ref`` (so the bytes also equal gguf-py's
``quants.quantize``, except in the sign of a zero scale or minimum when a block's extreme
values are zeros of both signs: ggml keeps the first, NumPy's ``min`` does not say):

* Q4_0 / Q5_0 (``nmax`` 8 / 16): ``max`` = the first element of largest magnitude (+0.0
  when all are zero), ``d = max / -nmax``, ``c = min(2*nmax - 1, trunc(x/d + nmax + 0.5))``.
* Q4_1 / Q5_1 (``qmax`` 15 / 31): ``d = (max - min) / qmax``, ``m = min``,
  ``c = min(qmax, trunc((x - min)/d + 0.5))``.
* Q8_0: ``d = amax / 127``, ``c = roundf(x/d)``. TQ1_0 / TQ2_0: ``d = amax``,
  ``c = roundf(x/d) + 1``. (``roundf`` rounds half away from zero.)

  Here ``x/d`` is ``x * (1/d)`` in float32 with ``1/d`` taken as 0 when ``d == 0``; when
  ``1/d`` overflows (a block of subnormals) every code is the one ggml's casts give on
  x86 (0; 1 for the ternary types).

``method="mse"`` searches the same format for a lower squared error. Every candidate is
scored on its scale (and minimum) rounded to float16 as stored, with codes
``rint(clamp(x/d, lo, hi))`` (nearest level); the search keeps a candidate only on a
strictly lower score. Scores are float32 sums in 8 lanes (element ``i`` adds to lane
``i % 8`` in order, then lane 0 + ... + lane 7), which is how the kernel vectorizes them.

* Q4_0 / Q5_0: scales ``d_rtn * f`` and ``(max / (nmax-1)) * f`` (the largest magnitude on
  the short side of the code range) for the factors ``f`` in ``SYM_FACTORS``, then up to
  two least-squares refits ``d = sum(x*q) / sum(q*q)`` of the best one's codes.
* Q8_0: scales ``d_rtn * f`` for ``f`` in ``SYM_FACTORS["Q8_0"]``, codes -128..127, refits.
* Q4_1 / Q5_1: ``m = min + a*r``, ``d = ((max - b*r) - m) / qmax`` (``r = max - min``) for
  the clip fractions ``(a, b)`` in ``ASYM_GRID``, then up to two least-squares refits of
  ``(d, m)`` on the best one's codes.
* TQ1_0 / TQ2_0 (codes stay ternary): over the thresholds ``t = amax * g``, ``g`` in
  ``TERN_THRESHOLDS``, the set ``{|x| > t}`` of largest ``sum(|x|)**2 / count`` (whose best
  scale is the mean of ``|x|`` over it), ``d`` = that mean; then up to three Lloyd steps
  ``d <- mean{|x| : |x| > d/2}`` while the error drops. Codes: ``sign(x)`` where
  ``|x| > d/2``, else 0.

Importance (``qw``: a weight per element, ``sigma2``: the mean square of the block's ggml
row; Q8_0 and the ternary types ignore both, as ggml's ``quantize_q8_0`` / ``quantize_tq*``
do):

* ``rtn`` is ggml's ``quantize_row_*_impl`` with ``quant_weights``: weights
  ``w = qw * sqrt(sigma2 + x*x)``; Q4_0 / Q5_0 take ``make_qx_quants(32, nmax, x, L, 1, w)``
  (19 scales ``-(nmax + is/10) / max``, the one whose weighted least-squares fit explains
  most, codes all 0 when ``|max| < 1e-15``), Q4_1 / Q5_1 ``make_qkx3_quants(32, qmax, x,
  w, ...)`` (``min = min(x, 0)``, 37 scales ``(qmax - 0.9 + 0.05*is) / (max - min)`` each
  refitted by weighted least squares and kept on a lower weighted error; a kept one moves
  the ``min`` the next start from). Every sum runs in element order in float32, as ggml
  adds it.
* ``mse`` minimises ``sum(qw * (x - x_hat)**2)`` (``qw`` itself, not ggml's ``w``): the
  same searches with every error term ``qw * e*e`` and every least-squares sum weighted by
  ``qw``, and as first candidate rtn's stored scale (and minimum) with nearest codes.
  Q4_0 / Q5_0 try the factors ``WSYM_FACTORS`` of both bases (wider than without
  importance: a block whose largest value weighs little does better clipped); Q4_1 / Q5_1
  the clip fractions ``WASYM_GRID``, then the ``ASYM_NEIGHBOURS`` of the best of those
  pairs at ``WASYM_STEP``. Up to ``REFITS`` least-squares refits follow, as without
  importance.

The best candidate replaces rtn's bytes only when its squared error (with importance: its
weighted squared error) is strictly lower:
judged by the float32 scores when they differ by more than their rounding can explain
(``eb < er * MARGIN`` and ``er > 2**-100``), else by float64 sums in index order of
``(x - x_hat)**2`` (the driver's per-block ``stats``; with importance ``qw * (x -
x_hat)**2``). So mse is never worse than rtn on any block.
"""

from __future__ import annotations

import numpy as np

from .. import formats
from .ggml_common import f16_bits as _f16_bits
from .ggml_common import nearest_int as _nint
from .ggml_common import round_f16 as _f16
from .ggml_common import seq_sum as _seq_sum

F32 = np.float32
F64 = np.float64
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds half to even for |v| <= 2**22
_LANES = 8
MARGIN = F32(1.0 - 2.0**-13)
_TINY = F32(2.0**-100)

#: the types this module defines
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")

#: scale factors of the symmetric searches (dyadic, so C and NumPy read the same floats)
SYM_FACTORS = {
    "Q4_0": tuple(k / 64 for k in (65, 62, 58)),
    "Q5_0": tuple(k / 64 for k in (68, 66, 64, 62)),
    "Q8_0": tuple(k / 256 for k in (256, 258, 260, 262, 264, 266)),
}
#: (a, b) clip fractions of the range at the bottom and the top, Q4_1 / Q5_1: about half
#: a step (r / qmax) at one end, the other, or both
ASYM_GRID = {
    "Q4_1": ((0.0, 0.0), (1 / 32, 0.0), (0.0, 1 / 32), (1 / 32, 1 / 32)),
    "Q5_1": ((0.0, 0.0), (1 / 64, 0.0), (0.0, 1 / 64), (1 / 64, 1 / 64)),
}
#: with importance, Q4_0 / Q5_0: factors of both bases, wider (a block whose largest value
#: weighs little does better clipped)
WSYM_FACTORS = tuple(k / 64 for k in (72, 66, 60, 54, 48, 42))
#: with importance, Q4_1 / Q5_1: 0..4 half steps at the bottom and at the top (25 pairs)
WASYM_GRID = {
    name: tuple((a * h, b * h) for a in range(5) for b in range(5))
    for name, h in (("Q4_1", 1 / 32), ("Q5_1", 1 / 64))
}
#: with importance, Q4_1 / Q5_1: then the 8 neighbours (a + da*s, b + db*s) of the best grid
#: pair, s = half the grid's step
ASYM_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, 1), (-1, 1), (1, -1))
WASYM_STEP = {"Q4_1": 1 / 64, "Q5_1": 1 / 128}
#: least-squares refits of the best candidate, at most
REFITS = 2
#: thresholds (times amax) of the ternary scan
TERN_THRESHOLDS = tuple(k / 64 for k in (32, 16, 8, 4, 2, 1))
_SYM = {"Q4_0": 8, "Q5_0": 16}
_ASYM = {"Q4_1": 15, "Q5_1": 31}


def _rint(v: np.ndarray) -> np.ndarray:
    return (v + _MAGIC) - _MAGIC


def _lanesum(a: np.ndarray) -> np.ndarray:
    """float32 sum along axis 1 as the kernel adds: 8 lanes, then the lanes in order."""
    acc = np.zeros((a.shape[0], _LANES), F32)
    for j in range(0, a.shape[1], _LANES):
        acc = acc + a[:, j : j + _LANES]
    s = acc[:, 0]
    for lane in range(1, _LANES):
        s = s + acc[:, lane]
    return s


def _seqsum64(a: np.ndarray) -> np.ndarray:
    """float64 sum along axis 1 strictly in index order."""
    return np.add.accumulate(a.astype(F64), axis=1)[:, -1]


def _valid(d: np.ndarray) -> np.ndarray:
    return (np.abs(d) > 0) & np.isfinite(d)


def _safe_inv(d: np.ndarray) -> np.ndarray:
    """1/d where d != 0, else 0 (ggml's ``id``), float32; may overflow to inf."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero) for |v| < 2**31, as the kernel computes it."""
    a = np.abs(v)
    t = a.astype(np.int32).astype(F32)
    t = t + np.where(a - t >= F32(0.5), F32(1), F32(0))
    return np.copysign(t, v)


def _first(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[np.arange(x.shape[0]), np.argmax(mask, axis=1)]


# ---------------------------------------------------------------------------- rtn


def _rtn_sym(x, nmax):
    amax = np.abs(x).max(axis=1)
    mx = np.where(amax == 0, F32(0), _first(x, np.abs(x) == amax[:, None]))
    d = (mx / F32(-nmax)).astype(F32)
    idv = _safe_inv(d)
    bad = ~np.isfinite(idv)
    v = x * np.where(bad, F32(0), idv)[:, None] + F32(nmax + 0.5)
    c = np.minimum(v.astype(np.int32), 2 * nmax - 1)
    c[bad] = 0
    return d, c, mx


def _minmax(x):
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    # ggml keeps the first of equal extremes: that decides the sign of a zero
    zero = _first(x, x == 0)
    mn = np.where(mn == 0, zero, mn)
    mx = np.where(mx == 0, zero, mx)
    return mn, mx


def _rtn_asym(x, qmax):
    mn, mx = _minmax(x)
    d = ((mx - mn) / F32(qmax)).astype(F32)
    idv = _safe_inv(d)
    bad = ~np.isfinite(idv)
    with np.errstate(invalid="ignore", over="ignore"):
        v = (x - mn[:, None]) * np.where(bad, F32(0), idv)[:, None] + F32(0.5)
        c = np.minimum(v.astype(np.int32), qmax)
    c[bad] = 0
    return d, mn, mx, c


def _rtn_round(x, d):
    idv = _safe_inv(d)
    bad = ~np.isfinite(idv)
    c = _roundf(x * np.where(bad, F32(0), idv)[:, None]).astype(np.int32)
    return c, bad


# ---------------------------------------------------------------------------- mse


def _sym_codes(x, d, lo, hi):
    return _rint(np.clip(x * (F32(1) / d)[:, None], F32(lo), F32(hi)))


def _sym_err(x, d, lo, hi, qw):
    e = x - _sym_codes(x, d, lo, hi) * d[:, None]
    return _lanesum(qw * (e * e))


def _sym_refit(x, d, lo, hi, qw):
    q = _sym_codes(x, d, lo, hi)
    a = _lanesum((qw * x) * q)
    b = _lanesum((qw * q) * q)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, F32(1)), F32(0)).astype(F32)


def _sym_search(x, d0, d1, factors, lo, hi, qw, first=None):
    """Best fp16 scale (0 where none) and its float32 score, see the module docs."""
    nb = x.shape[0]
    best = np.zeros(nb, F32)
    be = np.full(nb, np.inf, F32)
    one = F32(1)
    if first is not None:
        ok = _valid(first)
        be = np.where(ok, _sym_err(x, np.where(ok, first, one), lo, hi, qw), be)
        best = np.where(ok, first, best)
    bases = (d0,) if d1 is None else (d0, d1)
    for f in factors:
        for b in bases:
            d = _f16(b * F32(f))
            ok = (b != 0) & _valid(d)
            e = _sym_err(x, np.where(ok, d, one), lo, hi, qw)
            take = ok & (e < be)
            be = np.where(take, e, be)
            best = np.where(take, d, best)
    active = best != 0
    for _ in range(REFITS):
        if not active.any():
            break
        d = _f16(_sym_refit(x, np.where(active, best, one), lo, hi, qw))
        ok = active & _valid(d) & (d != best)
        e = _sym_err(x, np.where(ok, d, one), lo, hi, qw)
        take = ok & (e < be)
        be = np.where(take, e, be)
        best = np.where(take, d, best)
        active = take
    return best, be


def _asym_codes(x, d, m, qmax):
    v = (x - m[:, None]) * (F32(1) / d)[:, None]
    return _rint(np.clip(v, F32(0), F32(qmax)))


def _asym_err(x, d, m, qmax, qw):
    q = _asym_codes(x, d, m, qmax)
    e = x - (d[:, None] * q + m[:, None])
    return _lanesum(qw * (e * e))


def _asym_search(x, mn, mx, qmax, grid, qw, first=None, step=None):
    nb = x.shape[0]
    r = mx - mn
    bd = np.zeros(nb, F32)
    bm = np.zeros(nb, F32)
    be = np.full(nb, np.inf, F32)
    one = F32(1)

    def try_pair(a, b):
        m0 = mn + a * r
        t0 = mx - b * r
        d = _f16((t0 - m0) / F32(qmax))
        m = _f16(m0)
        ok = _valid(d) & np.isfinite(m)
        e = _asym_err(x, np.where(ok, d, one), np.where(ok, m, F32(0)), qmax, qw)
        e = np.where(ok, e, F32(np.inf))
        take = e < be
        return e, take, np.where(take, e, be), np.where(take, d, bd), np.where(take, m, bm)

    with np.errstate(over="ignore", invalid="ignore"):
        if first is not None:
            d, m = first
            ok = _valid(d) & np.isfinite(m)
            be = np.where(
                ok, _asym_err(x, np.where(ok, d, one), np.where(ok, m, F32(0)), qmax, qw), be
            )
            bd = np.where(ok, d, bd)
            bm = np.where(ok, m, bm)
        bge = np.full(nb, np.inf, F32)  # the best grid pair, for the refinement
        ga = np.zeros(nb, F32)
        gb = np.zeros(nb, F32)
        for a, b in grid:
            e, _, be, bd, bm = try_pair(F32(a), F32(b))
            tg = e < bge
            bge = np.where(tg, e, bge)
            ga = np.where(tg, F32(a), ga)
            gb = np.where(tg, F32(b), gb)
        if step is not None:
            has = bge < np.inf
            for da, db in ASYM_NEIGHBOURS:
                a = ga + F32(da) * F32(step)
                b = gb + F32(db) * F32(step)
                e, take, be2, bd2, bm2 = try_pair(a, b)
                be = np.where(has, be2, be)
                bd = np.where(has, bd2, bd)
                bm = np.where(has, bm2, bm)
        sx = _lanesum(qw * x)
        sw = _lanesum(qw)
        active = bd != 0
        for _ in range(REFITS):
            if not active.any():
                break
            q = _asym_codes(x, np.where(active, bd, one), np.where(active, bm, F32(0)), qmax)
            wq = qw * q
            sl, sl2, sxl = _lanesum(wq), _lanesum(wq * q), _lanesum((qw * x) * q)
            den = sw * sl2 - sl * sl
            fit = active & (den > 0)
            den1 = np.where(fit, den, one)
            d = _f16((sw * sxl - sl * sx) / den1)
            m = _f16((sl2 * sx - sl * sxl) / den1)
            ok = fit & _valid(d) & np.isfinite(m) & ~((d == bd) & (m == bm))
            e = _asym_err(x, np.where(ok, d, one), np.where(ok, m, F32(0)), qmax, qw)
            take = ok & (e < be)
            be = np.where(take, e, be)
            bd = np.where(take, d, bd)
            bm = np.where(take, m, bm)
            active = take
    return bd, bm, be


def _tern_pass(a, d):
    h = (F32(0.5) * d)[:, None]
    on = a > h
    e = a - np.where(on, d[:, None], F32(0))
    k = _lanesum(np.where(on, F32(1), F32(0)))
    s = _lanesum(np.where(on, a, F32(0)))
    return _lanesum(e * e), k, s


def _tern_search(x, amax):
    nb = x.shape[0]
    a = np.abs(x)
    bk = np.zeros(nb, F32)
    bs = np.zeros(nb, F32)
    bg = np.full(nb, F32(-1))
    one = F32(1)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for g in TERN_THRESHOLDS:
            on = a > (amax * F32(g))[:, None]
            k = _lanesum(np.where(on, one, F32(0)))
            s = _lanesum(np.where(on, a, F32(0)))
            gain = s * s / np.where(k > 0, k, one)
            take = (k > 0) & (gain > bg)
            bg = np.where(take, gain, bg)
            bk = np.where(take, k, bk)
            bs = np.where(take, s, bs)
        best = np.zeros(nb, F32)
        be = np.full(nb, np.inf, F32)
        active = bk > 0
        d = _f16(bs / np.where(active, bk, one))
        for _ in range(3):
            active = active & _valid(d)
            if not active.any():
                break
            e, k, s = _tern_pass(a, np.where(active, d, one))
            take = active & (e < be)
            be = np.where(take, e, be)
            best = np.where(take, d, best)
            dn = _f16(s / np.where(k > 0, k, one))
            active = take & (k > 0) & (dn != d)
            d = np.where(active, dn, d)
    return best, be


def _better(x, xr, xb, eb, cand, qw=None):
    """Per block: does the candidate (reconstruction xb, score eb) beat rtn's xr? (Errors
    weighted by ``qw`` when given.)"""
    e = x - xr
    er = _lanesum(e * e if qw is None else qw * (e * e))
    better = cand & (eb < er)
    sure = better & (eb < er * MARGIN) & (er > _TINY)
    unsure = better & ~sure
    if unsure.any():
        x64 = x.astype(F64)
        w64 = F64(1) if qw is None else qw.astype(F64)
        sr = _seqsum64(w64 * (x64 - xr.astype(F64)) ** 2)
        sb = _seqsum64(w64 * (x64 - xb.astype(F64)) ** 2)
        better = sure | (unsure & (sb < sr))
    return better


# ---------------------------------------------------------------------------- importance


def _imp_weights(x, qw, sigma2):
    """ggml's weights of the importance path: qw * sqrt(sigma2 + x*x), float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        return qw * np.sqrt(sigma2[:, None] + x * x)


def _impl_sym(x, w, nmax):
    """ggml's make_qx_quants(32, nmax, x, L, 1, w): (scale, codes 0..2*nmax-1)."""
    nb = x.shape[0]
    ax = np.abs(x)
    amax = ax.max(axis=1)
    mx = _first(x, ax == amax[:, None])
    zero = amax < F32(1e-15)
    m1 = np.where(zero, F32(1), mx)
    iscales = [F32(-nmax) / m1] + [
        -(F32(nmax) + F32(0.1) * F32(i)) / m1 for i in (*range(-9, 0), *range(1, 10))
    ]
    wx = w * x

    def sums(iscale):
        lv = np.clip(_nint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        return _seq_sum(wx * lv), _seq_sum((w * lv) * lv)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        sx, s2 = sums(iscales[0])
        scale = np.where(s2 != 0, sx / np.where(s2 != 0, s2, F32(1)), F32(0)).astype(F32)
        best = scale * sx
        win = np.zeros(nb, np.intp)
        for k in range(1, len(iscales)):
            sx, s2 = sums(iscales[k])
            take = (s2 > 0) & (sx * sx > best * s2)
            sk = sx / np.where(take, s2, F32(1))
            scale = np.where(take, sk, scale)
            best = np.where(take, sk * sx, best)
            win = np.where(take, k, win)
    iw = np.stack(iscales, axis=1)[np.arange(nb), win]
    c = np.clip(_nint(iw[:, None] * x), -nmax, nmax - 1) + nmax
    c[zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), c.astype(np.int32)


def _impl_asym(x, w, nmax):
    """ggml's make_qkx3_quants(32, nmax, x, w, L, &min, Laux, -0.9, 0.05, 36, false):
    (scale, min, codes 0..nmax); ggml stores d = scale and m = min."""
    mn, mx = _minmax(x)
    mn = np.where(mn > 0, F32(0), mn)
    flat = ~(mx > mn)
    sum_w = _seq_sum_first(w)
    sum_x = _seq_sum_first(w * x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        c = np.clip(_nint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
        diff = (scale[:, None] * c + mn[:, None]) - x
        best = _seq_sum(w * (diff * diff))
        for i in range(37):
            iscale = (F32(-0.9) + F32(0.05) * F32(i) + F32(nmax)) / (mx - mn)
            lv = np.clip(_nint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
            wl = w * lv
            sl, sl2, sxl = _seq_sum(wl), _seq_sum(wl * lv), _seq_sum(wl * x)
            den = sum_w * sl2 - sl * sl
            ok = den > 0
            den1 = np.where(ok, den, F32(1))
            ts = (sum_w * sxl - sum_x * sl) / den1
            tm = (sl2 * sum_x - sl * sxl) / den1
            pos = tm > 0
            tm = np.where(pos, F32(0), tm)
            ts = np.where(pos, sxl / sl2, ts)
            diff = (ts[:, None] * lv + tm[:, None]) - x
            mad = _seq_sum(w * (diff * diff))
            take = ok & (mad < best) & ~flat
            best = np.where(take, mad, best)
            scale = np.where(take, ts, scale)
            mn = np.where(take, tm, mn)
            c = np.where(take[:, None], lv, c)
    c = c.astype(np.int32)
    c[flat] = 0
    return np.where(flat, F32(0), scale).astype(F32), mn.astype(F32), c


def _seq_sum_first(t):
    """float32 sum over axis 1 in index order starting from element 0 (ggml's sum_w)."""
    acc = t[:, 0].copy()
    for i in range(1, t.shape[1]):
        acc = acc + t[:, i]
    return acc


# ---------------------------------------------------------------------------- packing


def _nibbles(c):
    return ((c[:, :16] & 15) | ((c[:, 16:] & 15) << 4)).astype(np.uint8)


def _qh(c):
    bits = ((c >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _u16(bits):
    return np.asarray(bits, "<u2").view(np.uint8).reshape(-1, 2)


def _tq1_bytes(trits):
    """trits: (nb, groups, 5 or 4) codes 0..2, first most significant -> ceil(q*256/243)."""
    q = np.zeros(trits.shape[:2], np.int32)
    for n in range(trits.shape[2]):
        q = q * 3 + trits[:, :, n]
    if trits.shape[2] == 4:
        q = q * 3
    return ((q * 256 + 242) // 243).astype(np.uint8)


def _pack_tq1(c):
    nb = c.shape[0]
    a = c[:, :160].reshape(nb, 5, 32).transpose(0, 2, 1)
    b = c[:, 160:240].reshape(nb, 5, 16).transpose(0, 2, 1)
    h = c[:, 240:].reshape(nb, 4, 4).transpose(0, 2, 1)
    return np.concatenate([_tq1_bytes(a), _tq1_bytes(b), _tq1_bytes(h)], axis=1)


def _pack_tq2(c):
    nb = c.shape[0]
    g = c.reshape(nb, 2, 4, 32)
    qs = g[:, :, 0] | (g[:, :, 1] << 2) | (g[:, :, 2] << 4) | (g[:, :, 3] << 6)
    return qs.reshape(nb, 64).astype(np.uint8)


# ---------------------------------------------------------------------------- types


def _signed_absmax(x):
    """The first element of largest magnitude (+0.0 when all are zero)."""
    amax = np.abs(x).max(axis=1)
    return np.where(amax == 0, F32(0), _first(x, np.abs(x) == amax[:, None]))


def _quant_sym(x, name, mse, qw, sigma2):
    nmax = _SYM[name]
    mx = _signed_absmax(x)
    if qw is None:
        d, c, _ = _rtn_sym(x, nmax)
    else:
        d, c = _impl_sym(x, _imp_weights(x, qw, sigma2), nmax)
    dh = _f16_bits(d)
    if mse:
        lo, hi = -nmax, nmax - 1
        d16 = dh.view(np.float16).astype(F32)
        d1 = (mx / F32(hi)).astype(F32)
        if qw is None:
            best, eb = _sym_search(x, d, d1, SYM_FACTORS[name], lo, hi, np.ones_like(x))
        else:
            d0 = (mx / F32(-nmax)).astype(F32)
            best, eb = _sym_search(x, d0, d1, WSYM_FACTORS, lo, hi, qw, first=d16)
        cand = best != 0
        b1 = np.where(cand, best, F32(1))
        q = _sym_codes(x, b1, lo, hi)
        xr = (c - nmax).astype(F32) * d16[:, None]
        xb = q * b1[:, None]
        take = _better(x, xr, xb, eb, cand, qw)
        c = np.where(take[:, None], q.astype(np.int32) + nmax, c)
        dh = np.where(take, _f16_bits(b1), dh)
    if name == "Q4_0":
        return np.concatenate([_u16(dh), _nibbles(c)], axis=1)
    return np.concatenate([_u16(dh), _qh(c), _nibbles(c)], axis=1)


def _quant_asym(x, name, mse, qw, sigma2):
    qmax = _ASYM[name]
    if qw is None:
        d, mn, mx, c = _rtn_asym(x, qmax)
        m = mn
    else:
        d, m, c = _impl_asym(x, _imp_weights(x, qw, sigma2), qmax)
        mn, mx = _minmax(x)
    dh, mh = _f16_bits(d), _f16_bits(m)
    if mse:
        d16 = dh.view(np.float16).astype(F32)
        m16 = mh.view(np.float16).astype(F32)
        if qw is None:
            bd, bm, eb = _asym_search(x, mn, mx, qmax, ASYM_GRID[name], np.ones_like(x))
        else:
            grid = WASYM_GRID[name]
            first = (d16, m16)
            bd, bm, eb = _asym_search(x, mn, mx, qmax, grid, qw, first, WASYM_STEP[name])
        cand = bd != 0
        bd1 = np.where(cand, bd, F32(1))
        bm1 = np.where(cand, bm, F32(0))
        q = _asym_codes(x, bd1, bm1, qmax)
        with np.errstate(invalid="ignore", over="ignore"):
            xr = d16[:, None] * c.astype(F32) + m16[:, None]
        xb = bd1[:, None] * q + bm1[:, None]
        take = _better(x, xr, xb, eb, cand, qw)
        c = np.where(take[:, None], q.astype(np.int32), c)
        dh = np.where(take, _f16_bits(bd1), dh)
        mh = np.where(take, _f16_bits(bm1), mh)
    parts = [_u16(dh), _u16(mh)]
    if name == "Q5_1":
        parts.append(_qh(c))
    return np.concatenate(parts + [_nibbles(c)], axis=1)


def _quant_q8(x, mse):
    d = (np.abs(x).max(axis=1) / F32(127)).astype(F32)
    c, bad = _rtn_round(x, d)
    c[bad] = 0
    dh = _f16_bits(d)
    if mse:
        best, eb = _sym_search(x, d, None, SYM_FACTORS["Q8_0"], -128, 127, np.ones_like(x))
        cand = best != 0
        b1 = np.where(cand, best, F32(1))
        q = _sym_codes(x, b1, -128, 127)
        with np.errstate(invalid="ignore"):
            xr = c.astype(F32) * dh.view(np.float16).astype(F32)[:, None]
        take = _better(x, xr, q * b1[:, None], eb, cand)
        c = np.where(take[:, None], q.astype(np.int32), c)
        dh = np.where(take, _f16_bits(b1), dh)
    return np.concatenate([_u16(dh), c.astype(np.int8).view(np.uint8)], axis=1)


def _quant_tern(x, name, mse):
    d = np.abs(x).max(axis=1)
    c, bad = _rtn_round(x, d)
    c = c + 1
    c[bad] = 1
    dh = _f16_bits(d)
    if mse:
        act = d > 0
        best, eb = _tern_search(x[act], d[act])
        full_best = np.zeros(x.shape[0], F32)
        full_eb = np.full(x.shape[0], np.inf, F32)
        full_best[act] = best
        full_eb[act] = eb
        cand = full_best != 0
        b1 = np.where(cand, full_best, F32(1))
        on = np.abs(x) > (F32(0.5) * b1)[:, None]
        q = np.where(on, np.where(x < 0, 0, 2), 1).astype(np.int32)
        with np.errstate(invalid="ignore"):
            xr = (c - 1).astype(F32) * dh.view(np.float16).astype(F32)[:, None]
        xb = (q - 1).astype(F32) * b1[:, None]
        take = _better(x, xr, xb, full_eb, cand)
        c = np.where(take[:, None], q, c)
        dh = np.where(take, _f16_bits(b1), dh)
    packed = _pack_tq1(c) if name == "TQ1_0" else _pack_tq2(c)
    return np.concatenate([packed, _u16(dh)], axis=1)


def quantize_blocks(
    x: np.ndarray, name: str, method: str = "rtn", qw=None, sigma2=None
) -> np.ndarray:
    """Quantize ``x`` (float32, shape ``(n_blocks, block_size)``) into ggml blocks of type
    ``name``: uint8 ``(n_blocks, type_size)``. ``qw`` (same shape, non-negative) are the
    importance weights of the elements and ``sigma2`` (``(n_blocks,)``) the mean square of
    each block's ggml row; Q8_0 and the ternary types ignore them, as ggml does.

    Examples
    --------
    >>> import numpy as np
    >>> quantize_blocks(np.ones((1, 32), np.float32), "Q8_0")[0, :4].tolist()
    [8, 32, 127, 127]
    """
    t = formats.get(name)
    if name not in TYPES:
        raise ValueError(f"{name} is not one of this module's types {TYPES}")
    if method not in ("rtn", "mse"):
        raise ValueError(f"method must be 'rtn' or 'mse', got {method!r}")
    x = np.asarray(x, F32)
    if x.ndim != 2 or x.shape[1] != t.block_size:
        raise ValueError(f"x must have shape (n_blocks, {t.block_size}), got {x.shape}")
    if qw is not None:
        qw = np.asarray(qw, F32)
        sigma2 = np.asarray(sigma2, F32)
        if qw.shape != x.shape or sigma2.shape != x.shape[:1]:
            raise ValueError(
                f"qw must have shape {x.shape} and sigma2 {x.shape[:1]}, "
                f"got {qw.shape} and {sigma2.shape}"
            )
    if x.shape[0] == 0:
        return np.zeros((0, t.type_size), np.uint8)
    mse = method == "mse"
    # a scale past the float16 range stores inf (as ggml does) and decodes to inf/NaN
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name in _SYM:
            out = _quant_sym(x, name, mse, qw, sigma2)
        elif name in _ASYM:
            out = _quant_asym(x, name, mse, qw, sigma2)
        elif name == "Q8_0":
            out = _quant_q8(x, mse)
        else:
            out = _quant_tern(x, name, mse)
    assert out.shape == (x.shape[0], t.type_size)
    return np.ascontiguousarray(out, np.uint8)


def _unpack_nibbles(qs):
    return np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32)


def _unpack_qh(qh):
    h = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1)
    return ((h >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4


def _d(b):
    return np.ascontiguousarray(b).view("<f2").astype(F32).reshape(-1, 1)


def dequantize_blocks(data: np.ndarray, name: str) -> np.ndarray:
    """Decode uint8 ``(n_blocks, type_size)`` blocks of type ``name`` into float32
    ``(n_blocks, block_size)``: the float32 values of gguf-py's ``quants.dequantize``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)
    >>> float(np.abs(dequantize_blocks(quantize_blocks(x, "Q8_0"), "Q8_0") - x).max()) < 0.01
    True
    """
    t = formats.get(name)
    if name not in TYPES:
        raise ValueError(f"{name} is not one of this module's types {TYPES}")
    y = np.asarray(data, np.uint8)
    if y.ndim != 2 or y.shape[1] != t.type_size:
        raise ValueError(f"data must have shape (n_blocks, {t.type_size}), got {y.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        if name == "Q4_0":
            return _d(y[:, :2]) * (_unpack_nibbles(y[:, 2:]) - 8).astype(F32)
        if name == "Q4_1":
            return _d(y[:, :2]) * _unpack_nibbles(y[:, 4:]).astype(F32) + _d(y[:, 2:4])
        if name == "Q5_0":
            c = _unpack_nibbles(y[:, 6:]) | _unpack_qh(y[:, 2:6])
            return _d(y[:, :2]) * (c - 16).astype(F32)
        if name == "Q5_1":
            c = _unpack_nibbles(y[:, 8:]) | _unpack_qh(y[:, 4:8])
            return _d(y[:, :2]) * c.astype(F32) + _d(y[:, 2:4])
        if name == "Q8_0":
            return _d(y[:, :2]) * y[:, 2:].view(np.int8).astype(F32)
        if name == "TQ2_0":
            qs = y[:, :64].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(
                1, 1, 4, 1
            )
            c = (qs & 3).reshape(-1, 256).astype(np.int32)
            return _d(y[:, 64:]) * (c - 1).astype(F32)
        # TQ1_0: trit n of a byte q is ((q * 3**n mod 256) * 3) >> 8
        pow3 = np.array([1, 3, 9, 27, 81], np.uint8)
        a = (y[:, None, :32] * pow3[None, :, None]).reshape(-1, 160)
        b = (y[:, None, 32:48] * pow3[None, :, None]).reshape(-1, 80)
        h = (y[:, None, 48:52] * pow3[None, :4, None]).reshape(-1, 16)
        q = np.concatenate([a, b, h], axis=1).astype(np.uint16)
        c = ((q * 3) >> 8).astype(np.int32)
        return _d(y[:, 52:]) * (c - 1).astype(F32)
