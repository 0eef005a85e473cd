"""NumPy reference of ggml's legacy blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and ternary
blocks (TQ1_0, TQ2_0): the definition the kernels in ``ext/ggml_legacy.pxi`` match bit for
bit, rtn and mse, for float32 input.

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

The best candidate replaces rtn's bytes only when its squared error is strictly lower:
judged by the float32 scores when they differ by more than their rounding can explain
(``eb < er * MARGIN`` and ``er > 2**-100``), else by float64 sums in index order of
``(x - x_hat)**2`` (the driver's per-block ``stats``). So mse is never worse than rtn on
any block.
"""

from __future__ import annotations

import numpy as np

from .. import formats
from .ggml_common import f16_bits as _f16_bits
from .ggml_common import round_f16 as _f16

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


def _sym_err(x, d, lo, hi):
    e = x - _sym_codes(x, d, lo, hi) * d[:, None]
    return _lanesum(e * e)


def _sym_refit(x, d, lo, hi):
    q = _sym_codes(x, d, lo, hi)
    a = _lanesum(x * q)
    b = _lanesum(q * q)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, F32(1)), F32(0)).astype(F32)


def _sym_search(x, d0, d1, factors, lo, hi):
    """Best fp16 scale (0 where none) and its float32 score, see the module docs."""
    nb = x.shape[0]
    best = np.zeros(nb, F32)
    be = np.full(nb, np.inf, F32)
    one = F32(1)
    bases = (d0,) if d1 is None else (d0, d1)
    for f in factors:
        for b in bases:
            d = _f16(b * F32(f))
            ok = (b != 0) & _valid(d)
            e = _sym_err(x, np.where(ok, d, one), lo, hi)
            take = ok & (e < be)
            be = np.where(take, e, be)
            best = np.where(take, d, best)
    active = best != 0
    for _ in range(2):
        if not active.any():
            break
        d = _f16(_sym_refit(x, np.where(active, best, one), lo, hi))
        ok = active & _valid(d) & (d != best)
        e = _sym_err(x, np.where(ok, d, one), lo, hi)
        take = ok & (e < be)
        be = np.where(take, e, be)
        best = np.where(take, d, best)
        active = take
    return best, be


def _asym_codes(x, d, m, qmax):
    v = (x - m[:, None]) * (F32(1) / d)[:, None]
    return _rint(np.clip(v, F32(0), F32(qmax)))


def _asym_err(x, d, m, qmax):
    q = _asym_codes(x, d, m, qmax)
    e = x - (d[:, None] * q + m[:, None])
    return _lanesum(e * e)


def _asym_search(x, mn, mx, qmax, grid):
    nb = x.shape[0]
    r = mx - mn
    bd = np.zeros(nb, F32)
    bm = np.zeros(nb, F32)
    be = np.full(nb, np.inf, F32)
    one = F32(1)
    with np.errstate(over="ignore", invalid="ignore"):
        for a, b in grid:
            m0 = mn + F32(a) * r
            t0 = mx - F32(b) * r
            d = _f16((t0 - m0) / F32(qmax))
            m = _f16(m0)
            ok = _valid(d) & np.isfinite(m)
            e = _asym_err(x, np.where(ok, d, one), np.where(ok, m, F32(0)), qmax)
            take = ok & (e < be)
            be = np.where(take, e, be)
            bd = np.where(take, d, bd)
            bm = np.where(take, m, bm)
        sx = _lanesum(x)
        active = bd != 0
        for _ in range(2):
            if not active.any():
                break
            q = _asym_codes(x, np.where(active, bd, one), np.where(active, bm, F32(0)), qmax)
            sl, sl2, sxl = _lanesum(q), _lanesum(q * q), _lanesum(x * q)
            den = F32(32) * sl2 - sl * sl
            fit = active & (den > 0)
            den1 = np.where(fit, den, one)
            d = _f16((F32(32) * sxl - sl * sx) / den1)
            m = _f16((sl2 * sx - sl * sxl) / den1)
            ok = fit & _valid(d) & np.isfinite(m) & ~((d == bd) & (m == bm))
            e = _asym_err(x, np.where(ok, d, one), np.where(ok, m, F32(0)), qmax)
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


def _better(x, xr, xb, eb, cand):
    """Per block: does the candidate (reconstruction xb, score eb) beat rtn's xr?"""
    e = x - xr
    er = _lanesum(e * e)
    better = cand & (eb < er)
    sure = better & (eb < er * MARGIN) & (er > _TINY)
    unsure = better & ~sure
    if unsure.any():
        x64 = x.astype(F64)
        sr = _seqsum64((x64 - xr.astype(F64)) ** 2)
        sb = _seqsum64((x64 - xb.astype(F64)) ** 2)
        better = sure | (unsure & (sb < sr))
    return better


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


def _quant_sym(x, name, mse):
    nmax = _SYM[name]
    d, c, mx = _rtn_sym(x, nmax)
    dh = _f16_bits(d)
    if mse:
        lo, hi = -nmax, nmax - 1
        best, eb = _sym_search(x, d, (mx / F32(hi)).astype(F32), SYM_FACTORS[name], lo, hi)
        cand = best != 0
        b1 = np.where(cand, best, F32(1))
        q = _sym_codes(x, b1, lo, hi)
        xr = (c - nmax).astype(F32) * dh.view(np.float16).astype(F32)[:, None]
        xb = q * b1[:, None]
        take = _better(x, xr, xb, eb, cand)
        c = np.where(take[:, None], q.astype(np.int32) + nmax, c)
        dh = np.where(take, _f16_bits(b1), dh)
    if name == "Q4_0":
        return np.concatenate([_u16(dh), _nibbles(c)], axis=1)
    return np.concatenate([_u16(dh), _qh(c), _nibbles(c)], axis=1)


def _quant_asym(x, name, mse):
    qmax = _ASYM[name]
    d, mn, mx, c = _rtn_asym(x, qmax)
    dh, mh = _f16_bits(d), _f16_bits(mn)
    if mse:
        bd, bm, eb = _asym_search(x, mn, mx, qmax, ASYM_GRID[name])
        cand = bd != 0
        bd1 = np.where(cand, bd, F32(1))
        bm1 = np.where(cand, bm, F32(0))
        q = _asym_codes(x, bd1, bm1, qmax)
        d16 = dh.view(np.float16).astype(F32)[:, None]
        m16 = mh.view(np.float16).astype(F32)[:, None]
        with np.errstate(invalid="ignore", over="ignore"):
            xr = d16 * c.astype(F32) + m16
        xb = bd1[:, None] * q + bm1[:, None]
        take = _better(x, xr, xb, eb, cand)
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
        best, eb = _sym_search(x, d, None, SYM_FACTORS["Q8_0"], -128, 127)
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
    ``name``: uint8 ``(n_blocks, type_size)``.

    Examples
    --------
    >>> import numpy as np
    >>> quantize_blocks(np.ones((1, 32), np.float32), "Q8_0")[0, :4].tolist()
    [8, 32, 127, 127]
    """
    if qw is not None:
        raise NotImplementedError(f"importance for {name} is not in the reference yet")
    t = formats.get(name)
    if name not in TYPES:
        raise ValueError(f"{name} is not one of this module's types {TYPES}")
    if method not in ("rtn", "mse"):
        raise ValueError(f"method must be 'rtn' or 'mse', got {method!r}")
    x = np.asarray(x, F32)
    if x.ndim != 2 or x.shape[1] != t.block_size:
        raise ValueError(f"x must have shape (n_blocks, {t.block_size}), got {x.shape}")
    if x.shape[0] == 0:
        return np.zeros((0, t.type_size), np.uint8)
    mse = method == "mse"
    # a scale past the float16 range stores inf (as ggml does) and decodes to inf/NaN
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name in _SYM:
            out = _quant_sym(x, name, mse)
        elif name in _ASYM:
            out = _quant_asym(x, name, mse)
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
