"""The NumPy reference: the definition of every quantization scheme.

The Cython kernels (``flightquant._kernels``) must give the same codes and scales, bit for
bit, for float32 input at any thread count. Clarity beats speed here. The formulas, with
``x`` the group's float32 values after the optional clamp to ``[-clip, clip]``:

*asymmetric* (``qmax = 2**bits - 1``)::

    mn, mx = min(x) + 0.0, max(x)      # + 0.0: a -0.0 minimum counts as +0.0
    constant group (mn == mx):   scale = |mn|  (0 when mn == 0),  q = 0
    otherwise:                   scale = max(f32((f64(mx) - f64(mn)) / qmax), TRUE_MIN)
                                 q = rint(clamp((x - mn) / scale, 0, qmax))       # float32
    zero_point = -mn / scale  (0 when scale == 0);   x_hat = (q - zero_point) * scale

*symmetric* (``qpos = 2**(bits-1) - 1``, stored offset ``o = 2**(bits-1)``)::

    constant group:  scale = |mn|  (0 when mn == 0)
    otherwise:       scale = max(f32(max|x|) / f32(qpos), TRUE_MIN)              # float32 div
    q = o + rint(clamp(x / scale, -qpos, qpos))   (q = o when scale == 0)
    x_hat = (q - o) * scale

*ternary* (BitNet b1.58 absmean; ``qpos = 1``, ``o = 1``, 2-bit codes)::

    scale = f32(seqsum_f64(|x|) / n)            # gamma, the mean absolute value
    q = o + rint(clamp(x / scale, -1, 1))       (q = o when scale == 0)
    x_hat = (q - o) * scale

``rint`` is round half to even; ``seqsum_f64`` adds float64 values one after the other in
index order (so C and NumPy agree exactly); ``TRUE_MIN`` is the smallest positive float32,
which keeps a non-degenerate group off a zero scale when its range underflows. Constant
groups (all-zero ones included) reconstruct exactly.

``method="mse"`` starts from the rtn result and tries 21 candidates per group, each a grid
of codes ``L`` followed by a least-squares refit (llama.cpp's ``make_qkx2_quants`` idea),
keeping a candidate only when its squared error (float64, sequential, against the clamped
input, on the float32 reconstruction) is strictly lower:

* asymmetric: ``iscale = (qmax - 1 + 0.1*k) / (f64(mx) - f64(mn))``, ``L = rint(clamp(iscale *
  (x - mn), 0, qmax))``, then ``(s, m)`` minimise ``sum((s*L + m - x)**2)``; the candidate
  is ``scale = f32(s)``, ``min = f32(m)``, re-quantized as rtn with that scale and min.
* symmetric and ternary: ``iscale = (0.5 + 0.05*k) / f64(scale_rtn)``, ``L = rint(clamp(iscale
  * x, -qpos, qpos))``, ``s = sum(x*L) / sum(L*L)``; re-quantized with ``scale = f32(s)``.

``k`` runs over 0..20. All candidate arithmetic is float64 with sequential sums.

*Stored scales* (``scale_dtype``: float32, float16 or bfloat16; symmetric and asymmetric):
the scale is stored in that dtype and codes are chosen against it, for a layout such as
compressed-tensors' whose zero points are integers. Asymmetric groups then span zero
(``mn = min(mn, 0)``, ``mx = max(mx, 0)``) in rtn and mse alike. After rtn (and the mse
search, see below), with ``s`` and ``zp`` the result::

    s' = round(s, scale_dtype)                  # to nearest, ties to even
    symmetric:   q = o + rint(clamp(x / s', -qpos, qpos))
    asymmetric:  Z = rint(clamp(zp, 0, qmax));  base = -(Z * s')  (exact)
                 q = rint(clamp((x - base) / s', 0, qmax));  zero_point = Z
    s' == 0 (not > 0): every code is the offset, zero_point = 0

so ``x_hat = (q - zero_point) * s'`` with an integer zero point. The mse search then
compares its candidates as stored: the rtn result and each candidate ``(scale, min)`` go
through the same rounding before their error is measured (a candidate whose stored scale
is 0 is skipped; a group whose stored rtn scale is 0 is not searched), so the kept group
is never worse, as stored, than rtn's.

*Importance* (``mse`` only): a row with importance ``w`` (``k`` weights, ``k`` dividing the
row's length) weighs its element ``e`` by ``w[e % k]`` (as float64, ``wd``). The search is
the same with every sum weighted: the error is ``seqsum(wd * (d * d))``; the asymmetric fit
uses ``seqsum(wd)`` for ``n``, ``seqsum(wd * x)`` for ``sum(x)``, and ``seqsum(wd * L)``,
``seqsum(wd * (L * L))``, ``seqsum(wd * (x * L))`` for the grid's sums (the symmetric fit the
last two). The rtn result is still candidate 0, so a group is never worse in the weighted
error than rtn.
"""

from __future__ import annotations

import numpy as np

from ..layout import FLOAT32_TRUE_MIN, QuantizedRows, RowLayout, make_layout
from ..options import SCHEMES

F32 = np.float32
F64 = np.float64
MSE_STEPS = 21


def qparams(bits: int, scheme: str) -> tuple[int, int, int]:
    """Return ``(qmin, qmax, offset)`` of the signed code range and the stored offset.

    Stored codes are ``q + offset`` in ``[0, 2**bits - 1]``.
    """
    if scheme == "asymmetric":
        return 0, 2**bits - 1, 0
    if scheme == "symmetric":
        qpos = 2 ** (bits - 1) - 1
        return -qpos, qpos, 2 ** (bits - 1)
    if scheme == "ternary":
        return -1, 1, 1
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


#: partial sums of a group's squared error (``stats``): element i goes to lane i % 8
SSE_LANES = 8


def _lanesum(a: np.ndarray) -> float:
    """The ``stats`` SSE of a group: SSE_LANES partial sums, element i into lane
    i % SSE_LANES, each in index order, then the lanes added in lane order. Up to eight
    elements this is the sequential sum; beyond, eight short chains instead of one long one
    (the kernel's sum vectorizes)."""
    a = np.asarray(a, F64)
    pad = -a.size % SSE_LANES
    lanes = _seqsum(np.concatenate([a, np.zeros(pad, F64)]).reshape(-1, SSE_LANES), axis=0)
    return float(_seqsum(lanes))


def _seqsum(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum float64 values strictly in index order (``accumulate`` is sequential)."""
    a = np.asarray(a, F64)
    if a.shape[axis] == 0:
        return np.zeros(a.shape[:axis] if axis == -1 else a.shape[:-1], F64)
    return np.take(np.add.accumulate(a, axis=axis), -1, axis=axis)


def _range(x: np.ndarray, scheme: str, scale_dtype, axis=None):
    """(min, max) of groups; asymmetric with a stored scale dtype spans zero."""
    mn = x.min(axis=axis) + F32(0)  # canonical +0.0 for a -0.0 minimum (see the kernels)
    mx = x.max(axis=axis)
    if scale_dtype is not None and scheme == "asymmetric":
        mn = np.minimum(mn, F32(0)).astype(F32) + F32(0)
        mx = np.maximum(mx, F32(0)).astype(F32)
    return mn, mx


def round_scale(s, scale_dtype: str | None) -> np.ndarray:
    """float32 scales rounded to ``scale_dtype`` (to nearest, ties to even), as float32."""
    s = np.asarray(s, F32)
    if scale_dtype is None or scale_dtype == "float32":
        return s
    if scale_dtype == "float16":
        with np.errstate(over="ignore"):
            return s.astype(np.float16).astype(F32)
    import ml_dtypes

    return s.astype(ml_dtypes.bfloat16).astype(F32)


def _stored(g: np.ndarray, bits: int, scheme: str, q, s, z, scale_dtype):
    """Codes, scales, zero points of groups ``g`` against the scale as stored."""
    qmin, qmax, offset = qparams(bits, scheme)
    sr = round_scale(s, scale_dtype)
    pos = sr > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if scheme == "asymmetric":
            zi = np.rint(np.clip(z, F32(0), F32(qmax))).astype(F32)
            zi = np.where(pos, zi, F32(0)).astype(F32)
            base = -(zi * sr)
            v = (g - base[:, None]) / sr[:, None]
            z = zi
        else:
            v = g / sr[:, None]
        q = np.rint(np.clip(v, F32(qmin), F32(qmax)))
        q = np.where(pos[:, None], q, F32(0))
    return (q + F32(offset)).astype(np.uint8), sr, z


def _rtn_groups(x: np.ndarray, bits: int, scheme: str, scale_dtype=None):
    """rtn on a 2-D array of equally long groups (one per row). Returns (q, scale, zp)."""
    qmin, qmax, offset = qparams(bits, scheme)
    mn, mx = _range(x, scheme, scale_dtype, axis=1)
    const = mn == mx
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if scheme == "asymmetric":
            scale = ((mx.astype(F64) - mn.astype(F64)) / qmax).astype(F32)
            scale = np.maximum(scale, FLOAT32_TRUE_MIN)
            scale = np.where(const, np.abs(mn), scale).astype(F32)
            v = (x - mn[:, None]) / scale[:, None]
            zp = np.where(scale > 0, -mn / scale, F32(0)).astype(F32)
        else:
            if scheme == "symmetric":
                amax = np.abs(x).max(axis=1)
                scale = np.maximum(amax / F32(qmax), FLOAT32_TRUE_MIN).astype(F32)
                scale = np.where(const, np.abs(mn), scale).astype(F32)
            else:  # ternary
                scale = (_seqsum(np.abs(x).astype(F64), axis=1) / x.shape[1]).astype(F32)
            v = x / scale[:, None]
            zp = None
        q = np.rint(np.clip(v, F32(qmin), F32(qmax)))
        q = np.where(scale[:, None] > 0, q, F32(0))
    q = (q + F32(offset)).astype(np.uint8)
    return q, scale.astype(F32), zp


def _reconstruct(q: np.ndarray, scale, zp, offset: int) -> np.ndarray:
    """float32 reconstruction exactly as dequantize computes it."""
    qf = q.astype(F32)
    if zp is None:
        return (qf - F32(offset)) * F32(scale)
    return (qf - F32(zp)) * F32(scale)


def _sse(x: np.ndarray, x_hat: np.ndarray, wd: np.ndarray | None = None) -> float:
    d = x_hat.astype(F64) - x.astype(F64)
    return float(_seqsum(d * d if wd is None else wd * (d * d)))


def _mse_group(x: np.ndarray, bits: int, scheme: str, q0, scale0, zp0, w=None, scale_dtype=None):
    """Search 21 candidates around the rtn result of one group; keep the best (see docs).
    ``w``: the group's importance weights (float32, one per element) or None."""
    qmin, qmax, offset = qparams(bits, scheme)
    wd = None if w is None else np.asarray(w, F32).astype(F64)
    best = (q0, scale0, zp0)
    lo, hi = _range(x, scheme, scale_dtype)
    if scheme != "ternary" and lo == hi:
        return best  # a constant group: rtn is exact, or (stored) there is no search

    def stored(q, sc, zp):  # a candidate as it is stored (the codes against it)
        if scale_dtype is None:
            return q, sc, zp
        z = None if zp is None else np.array([zp], F32)
        qs, ss, zs = _stored(x[None, :], bits, scheme, None, np.array([sc], F32), z, scale_dtype)
        return qs[0], ss[0], (None if zs is None else zs[0])

    if scale_dtype is not None:
        if not round_scale(scale0, scale_dtype) > 0:
            return best
        best = stored(*best)
    best_err = _sse(x, _reconstruct(*best, offset), wd)
    if best_err == 0.0 or not scale0 > 0:
        return best
    n = x.size if wd is None else float(_seqsum(wd))
    xd = x.astype(F64)

    def wsum(a):
        return float(_seqsum(a if wd is None else wd * a))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if scheme == "asymmetric":
            mn, mx = _range(x, scheme, scale_dtype)
            rng = float(F64(mx) - F64(mn))
            sum_x = wsum(xd)
            for k in range(MSE_STEPS):
                iscale = (qmax + -1.0 + 0.1 * k) / rng
                L = np.rint(np.clip(iscale * (xd - F64(mn)), 0.0, float(qmax)))
                sum_l = wsum(L)
                sum_l2 = wsum(L * L)
                sum_xl = wsum(xd * L)
                D = n * sum_l2 - sum_l * sum_l
                if not D > 0:
                    continue
                s = (n * sum_xl - sum_l * sum_x) / D
                m = (sum_l2 * sum_x - sum_l * sum_xl) / D
                sc = F32(s)
                if not sc > 0:
                    continue
                mc = F32(m)
                q = (np.rint(np.clip((x - mc) / sc, F32(0), F32(qmax)))).astype(np.uint8)
                cand = stored(q, sc, F32(-mc / sc))
                if not cand[1] > 0:
                    continue
                err = _sse(x, _reconstruct(*cand, offset), wd)
                if err < best_err:
                    best, best_err = cand, err
        else:
            for k in range(MSE_STEPS):
                iscale = (0.5 + 0.05 * k) / float(F64(scale0))
                L = np.rint(np.clip(iscale * xd, float(qmin), float(qmax)))
                sum_l2 = wsum(L * L)
                sum_xl = wsum(xd * L)
                if not sum_l2 > 0:
                    continue
                sc = F32(sum_xl / sum_l2)
                if not sc > 0:
                    continue
                q = np.rint(np.clip(x / sc, F32(qmin), F32(qmax)))
                q = (q + F32(offset)).astype(np.uint8)
                cand = stored(q, sc, None)
                if not cand[1] > 0:
                    continue
                err = _sse(x, _reconstruct(*cand, offset), wd)
                if err < best_err:
                    best, best_err = cand, err
    return best


def _quantize_row(x, bits, scheme, group_size, method, w=None, scale_dtype=None):
    """Quantize one row (float32, already clamped). Returns (q, scales, zps). ``w``: the
    row's importance (``k`` weights, element e weighted by ``w[e % k]``; mse only)."""
    n = x.size
    we = None if w is None else np.tile(np.asarray(w, F32), n // max(1, len(w)))
    nfull = n // group_size
    parts_q, parts_s, parts_z = [], [], []
    for start, count, length in (
        (0, nfull, group_size),
        (nfull * group_size, 1 if n % group_size else 0, n % group_size),
    ):
        if count == 0:
            continue
        g = x[start : start + count * length].reshape(count, length)
        q, s, z = _rtn_groups(g, bits, scheme, scale_dtype)
        if method == "mse":
            q = q.copy()
            s = s.copy()
            z = None if z is None else z.copy()
            for i in range(count):
                gw = None if we is None else we[start + i * length : start + (i + 1) * length]
                qi, si, zi = _mse_group(
                    g[i], bits, scheme, q[i], s[i], None if z is None else z[i], gw, scale_dtype
                )
                q[i], s[i] = qi, si
                if z is not None:
                    z[i] = zi
        if scale_dtype is not None:
            q, s, z = _stored(g, bits, scheme, q, s, z, scale_dtype)
        parts_q.append(q.reshape(-1))
        parts_s.append(s)
        parts_z.append(z)
    if not parts_q:
        empty = np.zeros(0, F32)
        return np.zeros(0, np.uint8), empty, (None if scheme != "asymmetric" else empty)
    q = np.concatenate(parts_q)
    s = np.concatenate(parts_s)
    z = None if scheme != "asymmetric" else np.concatenate(parts_z)
    return q, s, z


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes LSB-first: element i sits at bit (i*bits) % 8 of byte (i*bits)//8."""
    q = np.asarray(q, np.uint8)
    per = 8 // bits
    pad = (-q.size) % per
    if pad:
        q = np.concatenate([q, np.zeros(pad, np.uint8)])
    q = q.reshape(-1, per).astype(np.uint16)
    shifts = (np.arange(per, dtype=np.uint16) * bits)[None, :]
    return (q << shifts).sum(axis=1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``n`` codes."""
    packed = np.asarray(packed, np.uint8)
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    q = (packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return q.reshape(-1)[:n]


def quantize_rows(
    values: np.ndarray,
    row_starts: np.ndarray,
    row_lens: np.ndarray,
    *,
    bits: int = 4,
    scheme: str = "asymmetric",
    group_size: int = 128,
    method: str = "rtn",
    clip: float | None = None,
    stats: bool = False,
    fixed_row_len: int | None = None,
    importance=None,
    scale_dtype: str | None = None,
) -> QuantizedRows:
    """Quantize rows ``values[row_starts[r] : row_starts[r] + row_lens[r]]``.

    ``importance``: None, or one entry per row, None or that row's importance vector of
    ``k`` weights (``k`` dividing the row's length; ``method="mse"`` weighs by it).

    ``values`` is float16, float32 or float64; arithmetic is float32 (float16 widens
    exactly, float64 rounds to nearest float32). Non-finite input is the caller's to
    reject; the reference assumes finite values. ``fixed_row_len`` gives every row the
    output slot of a row of that length (see :func:`flightquant.layout.make_layout`).

    Examples
    --------
    >>> import numpy as np
    >>> r = quantize_rows(np.array([0.0, 1.0, 2.0, 3.0], np.float32), [0], [4],
    ...                   bits=2, group_size=4)
    >>> r.scales.tolist(), unpack_codes(r.codes, 2, 4).tolist()
    ([1.0], [0, 1, 2, 3])
    """
    values = np.asarray(values)
    starts = np.asarray(row_starts, np.int64)
    layout = make_layout(row_lens, bits, group_size, fixed_row_len)
    qmin, qmax, offset = qparams(bits, scheme)
    codes = np.zeros(layout.n_code_bytes, np.uint8)
    scales = np.zeros(layout.n_groups, F32)
    zps = np.zeros(layout.n_groups, F32) if scheme == "asymmetric" else None
    sse = np.zeros(layout.n_groups, F64) if stats else None
    maxerr = np.zeros(layout.n_groups, F64) if stats else None
    for r, (start, n) in enumerate(zip(starts.tolist(), layout.row_lens.tolist(), strict=True)):
        if n == 0:
            continue
        x_orig = values[start : start + n].astype(F32)
        x = x_orig if clip is None else np.clip(x_orig, F32(-clip), F32(clip))
        w = None if importance is None else importance[r]
        q, s, z = _quantize_row(x, bits, scheme, group_size, method, w, scale_dtype)
        g0 = layout.group_offsets[r]
        g1 = g0 + s.size
        c0 = layout.code_offsets[r]
        packed = pack_codes(q, bits)
        codes[c0 : c0 + packed.size] = packed
        scales[g0:g1] = s
        if zps is not None:
            zps[g0:g1] = z
        if stats:
            x_hat = _reconstruct_row(q, s, z, offset, group_size)
            d = x_hat.astype(F64) - x_orig.astype(F64)
            for i in range(g1 - g0):
                seg = d[i * group_size : (i + 1) * group_size]
                sse[g0 + i] = _lanesum(seg * seg)
                maxerr[g0 + i] = np.abs(seg).max()
    return QuantizedRows(layout, codes, scales, zps, sse, maxerr)


def _reconstruct_row(q, scales, zps, offset, group_size):
    rep = min(group_size, q.size)  # a group larger than the row is one group
    rep_s = np.repeat(scales, rep)[: q.size]
    if zps is None:
        return (q.astype(F32) - F32(offset)) * rep_s
    rep_z = np.repeat(zps, rep)[: q.size]
    return (q.astype(F32) - rep_z) * rep_s


def dequantize_rows(
    codes: np.ndarray,
    layout: RowLayout,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    scheme: str,
    out_starts: np.ndarray | None = None,
    out_size: int | None = None,
) -> np.ndarray:
    """Reconstruct float32 values; row r goes to ``out[out_starts[r]:][:row_lens[r]]``.

    By default rows are concatenated in order.
    """
    _, _, offset = qparams(layout.bits, scheme)
    if out_starts is None:
        out_starts = np.concatenate([[0], np.cumsum(layout.row_lens)[:-1]]).astype(np.int64)
        out_size = layout.n_elements
    out = np.zeros(out_size, F32)
    for r, n in enumerate(layout.row_lens.tolist()):
        if n == 0:
            continue
        pos = int(out_starts[r])
        c0 = layout.code_offsets[r]
        q = unpack_codes(codes[c0 : c0 + -(-n * layout.bits // 8)], layout.bits, n)
        g0 = layout.group_offsets[r]
        g1 = g0 + -(-n // layout.group_size)
        z = None if zero_points is None else zero_points[g0:g1]
        out[pos : pos + n] = _reconstruct_row(q, scales[g0:g1], z, offset, layout.group_size)
    return out
