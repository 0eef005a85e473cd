"""method="mse" is never worse than rtn and meets its gains on Gaussian data."""

from __future__ import annotations

import numpy as np
import pytest

from flightquant import kernels


def sse(x, **options) -> float:
    q = kernels.quantize_rows(x, [0], [x.size], **options)
    x_hat = kernels.dequantize_rows(
        q.codes, q.layout, q.scales, q.zero_points, scheme=options["scheme"]
    )
    return float(np.sum((x.astype(np.float64) - x_hat) ** 2))


@pytest.mark.parametrize(
    "scheme,bits,group_size,min_gain_db",
    [
        ("asymmetric", 4, 128, 0.5),
        ("asymmetric", 2, 32, 1.5),
        ("symmetric", 4, 128, 0.5),
        ("symmetric", 2, 32, 1.5),
        ("ternary", 2, 32, 0.5),
    ],
)
def test_mse_gain_on_gaussian_data(scheme, bits, group_size, min_gain_db):
    x = np.random.default_rng(0).standard_normal(1 << 17).astype(np.float32)
    kw = dict(bits=bits, scheme=scheme, group_size=group_size)
    gain = 10 * np.log10(sse(x, method="rtn", **kw) / sse(x, method="mse", **kw))
    assert gain >= min_gain_db, f"{scheme} {bits}-bit g{group_size}: mse gains only {gain:.2f} dB"


@pytest.mark.parametrize(
    "scheme,bits", [("asymmetric", 2), ("asymmetric", 8), ("symmetric", 4), ("ternary", 2)]
)
def test_mse_never_worse_per_group(scheme, bits):
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [rng.standard_normal(4096), rng.standard_t(2, 4096), rng.uniform(-1, 1, 4096)]
    ).astype(np.float32)
    g = 64
    out = {}
    for method in ("rtn", "mse"):
        q = kernels.quantize_rows(
            x, [0], [x.size], bits=bits, scheme=scheme, group_size=g, method=method, stats=True
        )
        out[method] = q.group_sse
    # the search keeps a candidate only if it lowers the error against the input
    assert np.all(out["mse"] <= out["rtn"] * (1 + 1e-12))
