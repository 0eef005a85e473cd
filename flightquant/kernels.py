"""PLACEHOLDER until the Cython kernels land: same API, NumPy reference underneath."""

from __future__ import annotations

import os

import numpy as np

from . import reference
from .errors import NonFiniteError
from .layout import QuantizedRows, RowLayout


def resolve_threads(threads: int | None) -> int:
    if threads is None:
        return len(os.sched_getaffinity(0))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None (all allowed cores) or an integer >= 1, got {threads!r}")
    return threads


def build_info() -> dict:
    return {"openmp": False, "max_threads": 1, "backend": "reference"}


def quantize_rows(values, row_starts, row_lens, *, bits, scheme, group_size, method="rtn",
                  clip=None, stats=False, fixed_row_len=None, threads=None) -> QuantizedRows:
    resolve_threads(threads)
    values = np.asarray(values)
    starts = np.asarray(row_starts, np.int64)
    lens = np.asarray(row_lens, np.int64)
    for r, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
        seg = values[s : s + n].astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(seg))
        if bad.size:
            e = int(bad[0])
            raise NonFiniteError(r, e, float(values[s + e]))
    return reference.quantize_rows(values, starts, lens, bits=bits, scheme=scheme,
                                   group_size=group_size, method=method, clip=clip,
                                   stats=stats, fixed_row_len=fixed_row_len)


def dequantize_rows(codes, layout: RowLayout, scales, zero_points, *, scheme, out_starts=None,
                    out_size=None, out_dtype=np.float32, threads=None) -> np.ndarray:
    out = reference.dequantize_rows(codes, layout, scales, zero_points, scheme=scheme,
                                    out_starts=out_starts, out_size=out_size)
    return out.astype(out_dtype, copy=False)
