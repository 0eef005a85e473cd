"""The kernels' Python face: validate and normalise, allocate, call Cython, raise.

Thin kernels, thick wrapper (numcodecs ``shuffle.py`` / ``_shuffle.pyx``): everything
that can go wrong is decided here, with the GIL; ``flightquant._kernels`` only computes,
without the GIL, over blocks of groups in an OpenMP ``prange``. The results equal
:mod:`flightquant.reference` bit for bit for float32 input at any thread count.

Input normalisation:

* float16 widens to float32 here (exact); float32 and float64 go to the kernel as they are
  (a fused type); float64 is rounded to float32 as the kernel reads it, like
  ``values.astype(np.float32)`` in the reference.
* The values may be a zero-copy view of an Arrow buffer: read-only is fine (the kernel
  takes ``const`` memoryviews). A buffer that is not aligned to its itemsize (Flight
  hands those over: the body of a received message sits wherever the protobuf put it) is
  never read through a misaligned float pointer: the kernel copies each group into an
  aligned per-thread scratch first (L1-sized, in parallel), so there is no extra pass
  over the whole input. Only groups longer than ``STAGE_MAX`` elements make the wrapper
  copy the whole array instead. (Unaligned float loads are legal on x86 but undefined
  behaviour in C, and gcc's vectorizer may peel a loop to an aligned address assuming
  the pointer is element-aligned, then emit aligned vector loads that fault.)
* Non-contiguous arrays are copied (``np.ascontiguousarray``).
"""

from __future__ import annotations

import os

import numpy as np

from . import formats
from .arrays import check_importance as check_vector
from .errors import NonFiniteError
from .layout import QuantizedRows, RowLayout, groups_per_block
from .options import METHOD_CODES, SCALE_DTYPE_CODES, SCHEME_CODES, VALID_BITS
from .reference import qparams

try:
    from . import _ggml, _kernels, _rows
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "flightquant's compiled kernels are missing: build them with `pip install -e .` "
        f"(or `python setup.py build_ext --inplace`) ({exc})"
    ) from exc

_F32 = np.float32
_F64 = np.float64
_INT64 = np.int64
_DT_INT64 = np.dtype(np.int64)
_NO_F64 = np.zeros(0, _F64)  # the kernel's stats outputs when stats are off (never written)
_NO_F32 = np.zeros(0, _F32)


def resolve_threads(threads: int | None) -> int:
    """Return the kernel thread count: ``None`` means all cores this process may use.

    Parameters
    ----------
    threads : int or None
        ``None`` (every core in ``os.sched_getaffinity``) or an integer >= 1. A build
        without OpenMP accepts any count and runs serially.

    Examples
    --------
    >>> resolve_threads(2)
    2
    >>> resolve_threads(None) >= 1
    True
    """
    if threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):  # pragma: no cover - macOS/Windows
            return max(1, os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise ValueError(
            f"threads must be None (all allowed cores) or an integer >= 1, got {threads!r}"
        )
    if threads < 1:
        raise ValueError(
            f"threads must be None (all allowed cores) or an integer >= 1, got {threads!r}"
        )
    return int(threads)


def build_info() -> dict:
    """How the kernels were built.

    Examples
    --------
    >>> build_info()["backend"]
    'cython'
    """
    try:
        from ._version import __version__ as version
    except ImportError:  # pragma: no cover
        version = "0.1.0"
    return {
        "version": version,
        "backend": "cython",
        "openmp": bool(_kernels.openmp_enabled()),
        "max_threads": int(_kernels.max_threads()),
    }


#: longest group the kernel stages through its per-thread scratch (elements; ``_kernels.pxd``)
STAGE_MAX = int(_kernels.stage_max())


def _as_values(values, stage_ok: bool = False) -> np.ndarray:
    """1-D, C-contiguous float32/float64 array (float16 widened), aligned unless
    ``stage_ok`` (the kernel then stages each group through aligned scratch)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"values must be a 1-D array, got {arr.ndim} dimensions")
    if arr.dtype == np.float16:
        return arr.astype(_F32)  # a fresh, aligned copy
    if arr.dtype not in (np.dtype(_F32), np.dtype(_F64)):
        raise TypeError(f"values must be float16, float32 or float64, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if not arr.flags.aligned and not stage_ok:
        # see the module docstring: vectorized loops may use aligned loads
        arr = arr.copy()
    return arr


def _aligned(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself when aligned to its itemsize, else an aligned copy (Arrow buffers
    received over Flight may sit at any address)."""
    return arr if arr.flags.aligned else arr.copy()


def _as_int64(a, name: str) -> np.ndarray:
    if type(a) is np.ndarray and a.dtype == _DT_INT64 and a.ndim == 1 and a.flags.behaved:
        return a  # the common case, already what the kernels take
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integers")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got {arr.dtype}")
    return _aligned(np.ascontiguousarray(arr, dtype=_INT64))


def row_layout(row_lens, bits: int, group_size: int, fixed_row_len: int | None = None) -> RowLayout:
    """:func:`flightquant.layout.make_layout` (the definition, in NumPy), computed in one
    pass over the rows by ``flightquant._rows``."""
    lens = np.asarray(row_lens)
    if lens.ndim != 1 or (lens.size and lens.dtype.kind not in "iu"):
        raise ValueError("row lengths must be a 1-D array of non-negative integers")
    lens = _as_int64(lens, "row lengths")
    n = lens.size
    k = groups_per_block(group_size, bits)
    go = np.empty(n + 1, _INT64)
    co = np.empty(n + 1, _INT64)
    bo = np.empty(n + 1, _INT64)
    fixed = -1 if fixed_row_len is None else fixed_row_len
    bad = _rows.pack_layout(lens, bits, group_size, fixed, k, go, co, bo)
    if bad >= 0:
        if lens[bad] < 0:
            raise ValueError("row lengths must be a 1-D array of non-negative integers")
        raise ValueError(f"a row is longer than fixed_row_len={fixed_row_len}")
    return RowLayout(lens, go, co, bo, k, bits, group_size)


def _check_common(bits, scheme, group_size):
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, VALID_BITS))}, got {bits!r}")
    if scheme not in SCHEME_CODES:
        raise ValueError(f"scheme must be one of {tuple(SCHEME_CODES)}, got {scheme!r}")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, (int, np.integer))
        or not (1 <= group_size <= 2**31 - 1)
    ):
        raise ValueError(f"group_size must be an integer from 1 to 2**31-1, got {group_size!r}")


def _first_non_finite(values: np.ndarray, starts: np.ndarray, lens: np.ndarray):
    """(row, element, original value) of the first non-finite element inside the rows."""
    for r, (s, n) in enumerate(zip(starts.tolist(), lens.tolist(), strict=True)):
        if n == 0:
            continue
        seg = values[s : s + n]
        with np.errstate(over="ignore", invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(seg.astype(_F32)))
        if bad.size:
            e = int(bad[0])
            return r, e, float(seg[e])
    return None  # pragma: no cover - the kernel said there was one


def quantize_rows(
    values,
    row_starts,
    row_lens,
    *,
    bits: int,
    scheme: str,
    group_size: int,
    method: str = "rtn",
    clip: float | None = None,
    stats: bool = False,
    fixed_row_len: int | None = None,
    threads: int | None = None,
    importance=None,
    scale_dtype: str | None = None,
) -> QuantizedRows:
    """Quantize rows ``values[row_starts[r] : row_starts[r] + row_lens[r]]``.

    Same contract as :func:`flightquant.reference.quantize_rows` (bit for bit), plus
    ``threads`` (see :func:`resolve_threads`). Elements outside the rows are never read.
    ``importance``: None or one entry per row, None or the row's importance vector (see
    :func:`check_importance`); only ``method="mse"`` takes it. ``scale_dtype``
    (symmetric/asymmetric): scales stored in that dtype, codes against them.

    Raises
    ------
    NonFiniteError
        For the first NaN/Inf (lowest row, then lowest element) inside the rows; a float64
        value that overflows float32 counts as non-finite.

    Examples
    --------
    >>> import numpy as np
    >>> r = quantize_rows(np.array([0.0, 1.0, 2.0, 3.0], np.float32), [0], [4],
    ...                   bits=2, scheme="asymmetric", group_size=4)
    >>> r.scales.tolist(), r.codes.tolist()
    ([1.0], [228])
    """
    n_threads = resolve_threads(threads)
    _check_common(bits, scheme, group_size)
    if method not in METHOD_CODES:
        raise ValueError(f"method must be one of {tuple(METHOD_CODES)}, got {method!r}")
    if scale_dtype not in SCALE_DTYPE_CODES or (scale_dtype and scheme == "ternary"):
        raise ValueError(
            f"scale_dtype must be None or one of {tuple(SCALE_DTYPE_CODES)[1:]} with a "
            f"symmetric or asymmetric scheme, got {scale_dtype!r}"
        )
    if clip is not None:
        clip_f = _F32(clip)
        if not (np.isfinite(clip_f) and clip_f > 0):
            raise ValueError(f"clip must be None or a positive finite float32 number, got {clip!r}")
    starts = _as_int64(row_starts, "row_starts")
    layout = row_layout(row_lens, bits, group_size, fixed_row_len)
    lens = layout.row_lens
    # a group fits the kernel's per-thread stage unless group_size (and a row) is larger
    longest_group = (
        group_size
        if group_size <= STAGE_MAX
        else min(group_size, int(lens.max()) if lens.size else 0)
    )
    vals = _as_values(values, stage_ok=longest_group <= STAGE_MAX)
    stage_elems = 0 if vals.flags.aligned else longest_group
    if starts.size != lens.size:
        raise ValueError(f"row_starts has {starts.size} entries but row_lens has {lens.size}")
    if _rows.place_rows(starts, lens, vals.size) >= 0:
        raise ValueError(f"a row lies outside the values buffer of {vals.size} elements")
    imp = imp_starts = imp_k = None
    if importance is not None:
        imp, imp_starts, imp_k = _row_importance(importance, lens, method)
    qmin, qmax, offset = qparams(bits, scheme)
    # the kernel writes every code byte and scale of every row; only a fixed-size layout
    # with shorter (null) rows leaves slots to zero. Zero-filling costs a pass of its own.
    gaps = fixed_row_len is not None and bool((lens != fixed_row_len).any())
    alloc = np.zeros if gaps else np.empty
    n_groups = layout.n_groups
    codes = alloc(layout.n_code_bytes, np.uint8)
    scales = alloc(n_groups, _F32)
    zps = alloc(n_groups, _F32) if scheme == "asymmetric" else _NO_F32
    sse = np.zeros(n_groups, _F64) if stats else _NO_F64
    maxerr = np.zeros(n_groups, _F64) if stats else _NO_F64
    n_bad = _kernels.quantize_kernel(
        vals, starts, lens, layout.group_offsets, layout.code_offsets, layout.block_offsets,
        layout.groups_per_block, bits, SCHEME_CODES[scheme], METHOD_CODES[method],
        group_size, qmin, qmax, offset, clip is not None,
        float(clip_f) if clip is not None else 0.0,
        codes, scales, zps, sse, maxerr, bool(stats), n_threads, stage_elems,
        imp, imp_starts, imp_k, SCALE_DTYPE_CODES[scale_dtype],
    )  # fmt: skip
    if n_bad:
        found = _first_non_finite(vals, starts, lens)
        if found is None:  # pragma: no cover
            raise RuntimeError("the kernel reported a non-finite value that NumPy cannot find")
        raise NonFiniteError(*found)
    return QuantizedRows(
        layout,
        codes,
        scales,
        zps if scheme == "asymmetric" else None,
        sse if stats else None,
        maxerr if stats else None,
    )


def dequantize_rows(
    codes,
    layout: RowLayout,
    scales,
    zero_points,
    *,
    scheme: str,
    out_starts=None,
    out_size: int | None = None,
    out_dtype=np.float32,
    threads: int | None = None,
) -> np.ndarray:
    """Reconstruct ``x_hat = (q - zero_point) * scale`` (float32 arithmetic).

    Row r goes to ``out[out_starts[r] : out_starts[r] + row_lens[r]]`` (by default rows
    are concatenated); other elements stay zero. ``out_dtype`` is float32, float64 (the
    float32 result widened) or float16 (rounded from float32).

    Examples
    --------
    >>> import numpy as np
    >>> r = quantize_rows(np.array([0.0, 1.0, 2.0, 3.0], np.float32), [0], [4],
    ...                   bits=2, scheme="asymmetric", group_size=4)
    >>> dequantize_rows(r.codes, r.layout, r.scales, r.zero_points, scheme="asymmetric")
    array([0., 1., 2., 3.], dtype=float32)
    """
    n_threads = resolve_threads(threads)
    _check_common(layout.bits, scheme, layout.group_size)
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (np.dtype(np.float16), np.dtype(_F32), np.dtype(_F64)):
        raise TypeError(f"out_dtype must be float16, float32 or float64, got {out_dtype}")
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    scales = _aligned(np.ascontiguousarray(scales, dtype=_F32))
    lens = _as_int64(layout.row_lens, "row_lens")
    if codes.ndim != 1 or codes.size < layout.n_code_bytes:
        raise ValueError(f"codes must hold {layout.n_code_bytes} bytes, got {codes.size}")
    if scales.ndim != 1 or scales.size < layout.n_groups:
        raise ValueError(f"scales must hold {layout.n_groups} values, got {scales.size}")
    if scheme == "asymmetric":
        if zero_points is None:
            raise ValueError("the asymmetric scheme needs zero_points")
        zps = _aligned(np.ascontiguousarray(zero_points, dtype=_F32))
        if zps.ndim != 1 or zps.size < layout.n_groups:
            raise ValueError(f"zero_points must hold {layout.n_groups} values, got {zps.size}")
    else:
        zps = _NO_F32
    if out_starts is None:
        starts = np.zeros(lens.size, _INT64)
        if lens.size > 1:
            np.cumsum(lens[:-1], out=starts[1:])
        size = int(lens.sum()) if out_size is None else int(out_size)
    else:
        starts = _as_int64(out_starts, "out_starts")
        if starts.size != lens.size:
            raise ValueError(f"out_starts has {starts.size} entries but there are {lens.size} rows")
        if out_size is None:
            size = int((starts + lens).max()) if lens.size else 0
        else:
            size = int(out_size)
    placed = _rows.place_rows(starts, lens, size)
    if placed >= 0:
        raise ValueError(f"a row lies outside the output of {size} elements")
    _, _, offset = qparams(layout.bits, scheme)
    kernel_dtype = _F64 if out_dtype == np.dtype(_F64) else _F32
    # rows that tile the output leave nothing to zero-fill
    out = (np.empty if placed == -2 else np.zeros)(size, kernel_dtype)
    offsets = [
        _as_int64(a, "layout offsets")
        for a in (layout.group_offsets, layout.code_offsets, layout.block_offsets)
    ]
    if any(a.size != lens.size + 1 for a in offsets):
        raise ValueError("the layout's offset arrays must have one entry more than row_lens")
    _kernels.dequantize_kernel(
        codes, lens, *offsets, starts,
        layout.groups_per_block, layout.bits, layout.group_size, scales, zps, offset, out,
        n_threads,
    )  # fmt: skip
    if out_dtype == np.dtype(np.float16):
        return out.astype(np.float16)
    return out


# ---------------------------------------------------------------------------------------
# ggml block formats (flightquant._ggml; the registry is flightquant.formats)


def quantize_ggml(
    values,
    fmt: str,
    method: str = "rtn",
    *,
    importance=None,
    threads: int | None = None,
    stats: bool = False,
):
    """Quantize one row of whole blocks into ggml's bytes for type ``fmt``.

    ``values`` is a 1-D float16/float32/float64 array whose length is a multiple of the
    type's block size. With ``importance`` (a 1-D float32 vector of ``k`` non-negative
    finite weights, ``k`` a multiple of the block size that divides the length) the values
    are ggml rows of ``k`` elements, element ``j`` of each weighted by ``importance[j]``:
    ``rtn`` is then ggml's importance path (``llama-quantize --imatrix``). Returns the bytes
    (``uint8``), or with ``stats`` the tuple ``(bytes, block_sse, block_max_abs_error)``.

    Examples
    --------
    >>> import numpy as np
    >>> quantize_ggml(np.ones(32, np.float32), "Q8_0").size
    34
    """
    t = formats.get(fmt)
    x = np.ascontiguousarray(values)
    if x.ndim != 1 or x.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"values must be a 1-D float16/32/64 array, got {x.dtype}{list(x.shape)}")
    if x.size % t.block_size:
        raise ValueError(
            f"{x.size} values is not a multiple of {t.name}'s block size {t.block_size}"
        )
    if method not in METHOD_CODES:
        raise ValueError(
            f"method must be one of {', '.join(map(repr, METHOD_CODES))}, got {method!r}"
        )
    w = None
    if importance is not None:
        w = check_importance(importance, x.size, t.block_size)
    out, bad, sse, mx = _ggml.quantize_blocks(
        x.view(np.uint8),
        x.itemsize,
        t.code,
        t.block_size,
        t.type_size,
        METHOD_CODES[method],
        resolve_threads(threads),
        stats,
        w,
    )
    if bad:
        row, element, value = _first_non_finite(x, np.zeros(1, np.int64), np.array([x.size]))
        raise NonFiniteError(row, element, value)
    return (out, sse, mx) if stats else out


def _row_importance(importance, lens: np.ndarray, method: str):
    """Per-row importance vectors -> (concatenated float32 weights, starts, k) for the
    kernel (start -1: no importance for that row)."""
    if method != "mse":
        raise ValueError("importance with format='native' needs method='mse'")
    if len(importance) != lens.size:
        raise ValueError(f"importance has {len(importance)} entries for {lens.size} rows")
    parts, starts, ks, at = [], np.full(lens.size, -1, np.int64), np.zeros(lens.size, np.int64), 0
    for r, w in enumerate(importance):
        if w is None:
            continue
        w = check_importance(w, int(lens[r]))
        parts.append(w)
        starts[r], ks[r] = at, w.size
        at += w.size
    if not parts:
        return None, None, None
    return np.concatenate(parts), starts, ks


def check_importance(importance, n: int, block_size: int = 1) -> np.ndarray:
    """``importance`` as a contiguous float32 vector of ``k`` weights for a tensor of ``n``
    elements quantized as rows of ``k`` (``k`` a multiple of ``block_size`` that divides
    ``n``); a ``ValueError`` that says what is wrong otherwise."""
    w = check_vector("the tensor", importance)
    k = w.size
    if k == 0 or k % block_size or n % k:
        raise ValueError(
            f"importance has {k} weights: it must be the row length, a multiple of the block "
            f"size {block_size} that divides the tensor's {n} elements"
        )
    return w


def dequantize_ggml(data, fmt: str, dtype=np.float32, *, threads: int | None = None) -> np.ndarray:
    """Decode one row of ggml blocks of type ``fmt`` into a 1-D array of ``dtype``."""
    t = formats.get(fmt)
    buf = np.frombuffer(memoryview(data), np.uint8) if not isinstance(data, np.ndarray) else data
    buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    if buf.size % t.type_size:
        raise ValueError(
            f"{buf.size} bytes is not a whole number of {t.name} blocks ({t.type_size} bytes)"
        )
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"dtype must be float16, float32 or float64, got {dtype}")
    out = _ggml.dequantize_blocks(
        buf, t.code, t.block_size, t.type_size, dtype.itemsize, resolve_threads(threads)
    )
    return out.view(dtype)
