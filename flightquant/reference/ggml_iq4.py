"""NumPy reference of ggml's non-linear 4-bit blocks IQ4_NL (32 weights) and IQ4_XS
(256 weights): the definition the kernels in ``ext/ggml_iq4.pxi`` match bit for bit.

Both store 4-bit indices into the 16 values ``KVALUES`` (``kvalues_iq4nl``); code ``c`` of
element ``i`` decodes to ``scale * KVALUES[c]``. Layouts (little-endian, ``d`` IEEE float16)::

    IQ4_NL (18 B):  d, qs[16]: c[i] | c[i+16] << 4                       d * K[c]
    IQ4_XS (136 B): d, scales_h u16, scales_l[4], qs[128]  (8 sub-blocks of 32: qs as NL)
                    l = 6-bit sub-block scale (low 4 bits in scales_l, nibble ib%2 of
                    byte ib/2; high 2 bits at bit 2*ib of scales_h)    d * (l - 32) * K[c]

``method="rtn"`` is ggml's ``quantize_row_iq4_nl_impl`` as ``quantize_iq4_nl`` /
``quantize_iq4_xs`` call it (``ntry`` 7; what ``ggml_quantize_chunk`` and llama-quantize
give), byte for byte, with and without importance:

* ``sigma2 = 2 * mean(x^2)`` over the block (IQ4_XS: the super-block), float32 in order;
  search weights ``w = qw * sqrt(sigma2 + x^2)`` with importance ``qw``, else ``w = x^2``.
* Per 32 weights: ``max`` = the first element of largest magnitude (a group below
  ``GROUP_MAX_EPS`` gets scale 0); inverse scales ``127/max`` then ``(t - 127)/max`` for
  ``t = -7..7``; each maps the values to the nearest table entry (``best_index_int8``, ties
  up) and fits ``d = sum(w q x) / sum(w q^2)``; the fit of largest ``sum(w q x)^2 / sum(w
  q^2)`` wins (the first of equals).
* IQ4_NL stores ``d`` as float16 and recomputes the codes for ``1/d`` (unrounded).
  IQ4_XS stores ``D = -s_max/32`` (``s_max`` the sub-block scale of largest magnitude),
  ``l = clamp(nearest_int(s/D), -32, 31) + 32`` and the codes for ``1/(D*(l-32))``, with
  ``D`` unrounded.

``best_index_int8`` is the number of midpoints between consecutive table values that the
value is not below (NaN: all 15), which equals ggml's binary search and tie rule for every
float32 (the subtraction it compares is exact near a midpoint).

``method="mse"`` minimises ``sum(e * (x - x_hat)^2)``, ``e = qw`` with importance, else 1:

1. Per 32 weights the same fit as rtn but with the weights ``e`` and over the inverse
   scales ``c/max``, ``c`` in ``MSE_GRID`` (``MSE_GRID_PLAIN`` without importance; both
   orientations of the table: ``max`` near -127 or near 113); the best fit's scale ``s``.
2. IQ4_NL: ``d = fp16(s)``, codes for ``1/d``; then up to ``NL_REFITS`` least-squares refits
   of ``d`` on the codes (rounded to float16, codes again), each kept only when its error is
   strictly lower. IQ4_XS: for each super-block scale ``D = fp16(s_max * f)``, ``f`` in
   ``XS_FACTORS``, each sub-block takes the best of ``l = L0 - 1, L0, L0 + 1`` (``L0 =
   nearest_int(s/D)``, all clamped to -32..31; first of equals), codes for ``1/(D*l)``;
   the ``D`` of least total error wins (first of equals).
3. The result replaces rtn's block only when its error is strictly lower (or rtn's is
   NaN), so mse is never worse than rtn on any block.

Errors are float64 sums in element order of ``e * (x - x_hat)^2`` (``x_hat`` the float32
decoded value); a super-block's is its sub-blocks' added in order. Fits are float32 sums
in element order.
"""

from __future__ import annotations

import numpy as np

from ..formats import get as _get_type
from .ggml_common import f16_bits, nearest_int, round_f16, seq_sum

F32 = np.float32
F64 = np.float64
NAMES = ("IQ4_NL", "IQ4_XS")
#: ggml's kvalues_iq4nl
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], F32)
#: midpoints of consecutive table values (half-integers: exact in float32)
MIDPOINTS = (KVALUES[:-1] + KVALUES[1:]) / F32(2)
#: ggml's GROUP_MAX_EPS: a group of largest magnitude below it gets scale 0
GROUP_MAX_EPS = F32(1e-15)
#: rtn's ntry (quantize_iq4_nl / quantize_iq4_xs)
NTRY = 7
#: mse: the inverse scales c/max tried per 32 weights (max -> c), with importance: from well
#: inside to well outside either end of the table (the largest element need not be the
#: one that matters)
MSE_GRID = tuple(float(c) for c in range(-175, -78, 8)) + tuple(float(c) for c in range(65, 162, 8))
#: ... and without: the plain error's best fits sit close to either end
MSE_GRID_PLAIN = tuple(float(c) for c in range(-145, -102, 6)) + tuple(
    float(c) for c in range(107, 126, 6)
)
#: mse: least-squares refits of IQ4_NL's scale
NL_REFITS = 2
#: mse: IQ4_XS's super-block scales s_max * f (s_max -> sub-block scale -32 or +31 and near)
#: (as float32 num / den: -1/32, 1/31, -1/31.5, 1/30.5)
XS_FACTORS = ((-1, 32), (1, 31), (-2, 63), (2, 61))


def best_index(v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, v) for float32 ``v``: int index array."""
    v = np.asarray(v, F32)
    idx = np.zeros(v.shape, np.int64)
    for t in MIDPOINTS:
        idx += ~(v < t)
    return idx


def _seq64(terms: np.ndarray) -> np.ndarray:
    acc = np.zeros(terms.shape[:-1], F64)
    for i in range(terms.shape[-1]):
        acc = acc + terms[..., i]
    return acc


def _first_absmax(x: np.ndarray):
    """(amax, max): the largest |x| of each row and the first element that has it."""
    a = np.abs(x)
    i = np.argmax(a, axis=-1)
    return np.take_along_axis(a, i[..., None], -1)[..., 0], np.take_along_axis(x, i[..., None], -1)[
        ..., 0
    ]


def _fit(x, w, id_):
    """The codes of the inverse scales ``id_`` (one per row) and their weighted fit."""
    q = KVALUES[best_index(id_[:, None] * x)]
    wq = w * q
    return seq_sum(wq * x), seq_sum(wq * q)


def _search(x: np.ndarray, w: np.ndarray, first, cands) -> np.ndarray:
    """The scale of each row of 32 (``x``, search weights ``w``): ``first`` (an inverse
    scale factor or None) then the factors ``cands``, each ``c/max``; rows below
    GROUP_MAX_EPS get 0."""
    amax, mx = _first_absmax(x)
    skip = amax < GROUP_MAX_EPS
    mx = np.where(skip, F32(1), mx)
    d = np.zeros(x.shape[0], F32)
    best = np.zeros(x.shape[0], F32)
    with np.errstate(all="ignore"):
        if first is not None:
            sqx, sq2 = _fit(x, w, F32(1) / (mx / F32(first)))
            d = np.where(sq2 > 0, sqx / sq2, F32(0)).astype(F32)
            best = d * sqx
        for c in cands:
            sqx, sq2 = _fit(x, w, F32(c) / mx)
            upd = (sq2 > 0) & (sqx * sqx > best * sq2)
            d = np.where(upd, sqx / sq2, d).astype(F32)
            best = np.where(upd, d * sqx, best).astype(F32)
    return np.where(skip, F32(0), d).astype(F32)


def _inv(d: np.ndarray) -> np.ndarray:
    """``d ? 1/d : 0`` in float32 (NaN is true)."""
    with np.errstate(all="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def _pack_qs(L: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes c[i] | c[i+16] << 4."""
    L = L.astype(np.uint8)
    return L[:, :16] | (L[:, 16:] << 4)


def _unpack_qs(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _pack_xs(dh: np.ndarray, ls: np.ndarray, L: np.ndarray) -> np.ndarray:
    """fp16 bits (nb,), stored 6-bit scales (nb, 8), codes (nb, 256) -> (nb, 136) bytes."""
    nb = dh.shape[0]
    out = np.zeros((nb, 136), np.uint8)
    out[:, 0:2] = dh.astype(np.uint16).reshape(nb, 1).view(np.uint8)
    ls = ls.astype(np.uint16)
    h = np.zeros(nb, np.uint16)
    for ib in range(8):
        h |= (ls[:, ib] >> 4) << (2 * ib)
    out[:, 2:4] = h.reshape(nb, 1).view(np.uint8)
    lo = (ls & 15).astype(np.uint8)
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    out[:, 8:] = _pack_qs(L.reshape(nb * 8, 32)).reshape(nb, 128)
    return out


def _unpack_xs(data: np.ndarray):
    """(nb, 136) bytes -> (d float32 (nb,), l - 32 (nb, 8) int, codes (nb, 256))."""
    nb = data.shape[0]
    d = data[:, 0:2].copy().view(np.float16).astype(F32).reshape(nb)
    h = data[:, 2:4].copy().view(np.uint16).reshape(nb).astype(np.int64)
    lo = data[:, 4:8].astype(np.int64)
    ls = np.zeros((nb, 8), np.int64)
    for ib in range(8):
        ls[:, ib] = ((lo[:, ib // 2] >> (4 * (ib % 2))) & 15) | (((h >> (2 * ib)) & 3) << 4)
    L = _unpack_qs(data[:, 8:].reshape(nb * 8, 16)).reshape(nb, 256)
    return d, ls - 32, L


# ---------------------------------------------------------------------------------------
# rtn: quantize_row_iq4_nl_impl


def _rtn_weights(x: np.ndarray, qw) -> np.ndarray:
    if qw is None:
        return x * x
    S = x.shape[1]
    sigma2 = seq_sum(x * x) * F32(2.0 / S)
    with np.errstate(over="ignore", invalid="ignore"):
        return (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F32)


def _rtn_scales(x: np.ndarray, qw) -> np.ndarray:
    """(nb, S) -> the float scale of every 32 weights, (nb, S/32)."""
    nb, S = x.shape
    w = _rtn_weights(x, qw).reshape(-1, 32)
    cands = [float(t - 127) for t in range(-NTRY, NTRY + 1)]
    return _search(x.reshape(-1, 32), w, 127.0, cands).reshape(nb, S // 32)


def _rtn_nl(x: np.ndarray, qw) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bits (nb,), codes (nb, 32))."""
    s = _rtn_scales(x, qw)[:, 0]
    with np.errstate(all="ignore"):
        L = best_index(_inv(s)[:, None] * x)
    return f16_bits(s), L


def _xs_max_scale(s: np.ndarray) -> np.ndarray:
    """The first sub-block scale of largest magnitude (only |s| > 0 counts; else +0)."""
    a = np.abs(s)
    a = np.where(np.isnan(a), F32(0), a)
    i = np.argmax(a, axis=1)
    top = np.take_along_axis(a, i[:, None], 1)[:, 0]
    return np.where(top > 0, np.take_along_axis(s, i[:, None], 1)[:, 0], F32(0)).astype(F32)


def _xs_codes(x3: np.ndarray, dl: np.ndarray) -> np.ndarray:
    """x3 (nb, 8, 32), sub-block scales dl (nb, 8) -> codes for 1/dl (nb, 8, 32)."""
    with np.errstate(all="ignore"):
        return best_index(_inv(dl)[..., None] * x3)


def _rtn_xs(x: np.ndarray, qw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fp16 bits (nb,), stored scales l (nb, 8) in 0..63, codes (nb, 256))."""
    nb = x.shape[0]
    s = _rtn_scales(x, qw)
    d = -_xs_max_scale(s) / F32(32)
    with np.errstate(all="ignore"):
        sub = np.clip(nearest_int(_inv(d)[:, None] * s), -32, 31)
        dl = (d[:, None] * sub.astype(F32)).astype(F32)
    L = _xs_codes(x.reshape(nb, 8, 32), dl).reshape(nb, 256)
    return f16_bits(d), sub + 32, L


# ---------------------------------------------------------------------------------------
# mse


def _err(x: np.ndarray, e: np.ndarray, xh: np.ndarray) -> np.ndarray:
    """float64 sum in order of e * (x - x_hat)^2 over the last axis."""
    diff = x.astype(F64) - xh.astype(F64)
    return _seq64(e.astype(F64) * (diff * diff))


def _nl_eval(x, e, d16):
    """Codes for 1/d16 and their error; non-finite or zero d16: error inf."""
    with np.errstate(all="ignore"):
        L = best_index(_inv(d16)[:, None] * x)
        err = _err(x, e, d16[:, None] * KVALUES[L])
    ok = np.isfinite(d16) & (d16 != 0)
    return L, np.where(ok, err, np.inf)


def _mse_nl(x: np.ndarray, e: np.ndarray, grid, rtn_bits, rtn_L):
    s = _search(x, e, None, grid)
    d = round_f16(s)
    L, err = _nl_eval(x, e, d)
    active = np.ones(x.shape[0], bool)
    for _ in range(NL_REFITS):
        q = KVALUES[L]
        wq = e * q
        sqx, sq2 = seq_sum(wq * x), seq_sum(wq * q)
        with np.errstate(all="ignore"):
            dn = round_f16(np.where(sq2 > 0, sqx / sq2, F32(0)))
        active &= np.isfinite(dn) & (dn != 0) & (dn != d)
        Ln, en = _nl_eval(x, e, dn)
        take = active & (en < err)
        active &= take
        d = np.where(take, dn, d).astype(F32)
        L = np.where(take[:, None], Ln, L)
        err = np.where(take, en, err)
    d_rtn = rtn_bits.view(np.float16).astype(F32)
    with np.errstate(all="ignore"):
        e_rtn = _err(x, e, d_rtn[:, None] * KVALUES[rtn_L])
    use = (err < e_rtn) | (np.isnan(e_rtn) & np.isfinite(err))
    return np.where(use, f16_bits(d), rtn_bits), np.where(use[:, None], L, rtn_L)


def _mse_xs(x: np.ndarray, e: np.ndarray, grid, rtn_bits, rtn_ls, rtn_L):
    nb = x.shape[0]
    x3 = x.reshape(nb, 8, 32)
    e3 = e.reshape(nb, 8, 32)
    s = _search(x.reshape(-1, 32), e.reshape(-1, 32), None, grid).reshape(nb, 8)
    smax = _xs_max_scale(s)
    best_err = np.full(nb, np.inf)
    best_d = np.zeros(nb, F32)
    best_l = np.zeros((nb, 8), np.int64)
    best_L = np.zeros((nb, 8, 32), np.int64)
    for num, den in XS_FACTORS:
        with np.errstate(all="ignore"):
            D = round_f16(smax * (F32(num) / F32(den)))
            l0 = nearest_int(_inv(D)[:, None] * s).astype(np.int64)
        sub_err = np.full((nb, 8), np.inf)
        sub_l = np.zeros((nb, 8), np.int64)
        sub_L = np.zeros((nb, 8, 32), np.int64)
        for dlt in (-1, 0, 1):
            sub = np.clip(l0 + dlt, -32, 31)
            with np.errstate(all="ignore"):
                dl = (D[:, None] * sub.astype(F32)).astype(F32)
                L = _xs_codes(x3, dl)
                err = _err(x3, e3, dl[..., None] * KVALUES[L])
            take = err < sub_err
            sub_err = np.where(take, err, sub_err)
            sub_l = np.where(take, sub, sub_l)
            sub_L = np.where(take[..., None], L, sub_L)
        tot = _seq64(sub_err)
        tot = np.where(np.isfinite(D) & (D != 0), tot, np.inf)
        take = tot < best_err
        best_err = np.where(take, tot, best_err)
        best_d = np.where(take, D, best_d).astype(F32)
        best_l = np.where(take[:, None], sub_l, best_l)
        best_L = np.where(take[:, None, None], sub_L, best_L)
    d_rtn = rtn_bits.view(np.float16).astype(F32)
    with np.errstate(all="ignore"):
        dl_rtn = (d_rtn[:, None] * (rtn_ls - 32).astype(F32)).astype(F32)
        e_rtn = _seq64(_err(x3, e3, dl_rtn[..., None] * KVALUES[rtn_L.reshape(nb, 8, 32)]))
    use = (best_err < e_rtn) | (np.isnan(e_rtn) & np.isfinite(best_err))
    return (
        np.where(use, f16_bits(best_d), rtn_bits),
        np.where(use[:, None], best_l + 32, rtn_ls),
        np.where(use[:, None], best_L.reshape(nb, 256), rtn_L),
    )


# ---------------------------------------------------------------------------------------
# public API


def _check(x: np.ndarray, name: str) -> np.ndarray:
    if name not in NAMES:
        raise ValueError(f"this module holds {', '.join(NAMES)}, not {name!r}")
    bs = _get_type(name).block_size
    x = np.ascontiguousarray(x, F32)
    if x.ndim != 2 or x.shape[1] != bs:
        raise ValueError(f"x must be float32 (n_blocks, {bs}), got {list(x.shape)}")
    return x


def quantize_blocks(
    x: np.ndarray, name: str, method: str = "rtn", qw=None, sigma2=None
) -> np.ndarray:
    """Quantize float32 blocks ``x`` (n_blocks, block_size) into ggml ``name`` bytes
    (n_blocks, type_size); ``method`` is ``"rtn"`` (ggml's) or ``"mse"``; ``qw``: each
    element's importance (same shape), or None. ``sigma2`` is unused: the IQ4 types take
    the mean square of their own block.

    Examples
    --------
    >>> quantize_blocks(np.zeros((1, 256), np.float32), "IQ4_XS").shape
    (1, 136)
    """
    x = _check(x, name)
    if method not in ("rtn", "mse"):
        raise ValueError(f"method must be 'rtn' or 'mse', got {method!r}")
    if qw is not None:
        qw = np.ascontiguousarray(qw, F32).reshape(x.shape)
    nb = x.shape[0]
    e = qw if qw is not None else np.ones_like(x)
    grid = MSE_GRID if qw is not None else MSE_GRID_PLAIN
    if name == "IQ4_NL":
        bits, L = _rtn_nl(x, qw)
        if method == "mse":
            bits, L = _mse_nl(x, e, grid, bits, L)
        out = np.zeros((nb, 18), np.uint8)
        out[:, 0:2] = bits.astype(np.uint16).reshape(nb, 1).view(np.uint8)
        out[:, 2:] = _pack_qs(L)
        return out
    bits, ls, L = _rtn_xs(x, qw)
    if method == "mse":
        bits, ls, L = _mse_xs(x, e, grid, bits, ls, L)
    return _pack_xs(bits, ls, L)


def dequantize_blocks(data: np.ndarray, name: str) -> np.ndarray:
    """Decode ggml ``name`` blocks (n_blocks, type_size) uint8 into float32 (n_blocks,
    block_size), the values gguf-py's ``quants.dequantize`` gives."""
    if name not in NAMES:
        raise ValueError(f"this module holds {', '.join(NAMES)}, not {name!r}")
    data = np.ascontiguousarray(data, np.uint8).reshape(-1, _get_type(name).type_size)
    nb = data.shape[0]
    with np.errstate(all="ignore"):
        if name == "IQ4_NL":
            d = data[:, 0:2].copy().view(np.float16).astype(F32).reshape(nb, 1)
            return d * KVALUES[_unpack_qs(data[:, 2:])]
        d, sub, L = _unpack_xs(data)
        dl = (d[:, None] * sub.astype(F32)).astype(F32)
        return (dl[..., None] * KVALUES[L.reshape(nb, 8, 32)]).reshape(nb, 256)
