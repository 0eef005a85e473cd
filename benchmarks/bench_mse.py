"""How much method="mse" lowers the squared error against rtn, on Gaussian data.

    python benchmarks/bench_mse.py [--elements 1048576] [--seed 0]

Prints SNR (dB) of rtn and mse per scheme, bit width and group size, and the gain.
"""

from __future__ import annotations

import argparse

import numpy as np

from flightquant import kernels


def snr_db(x: np.ndarray, **options) -> float:
    q = kernels.quantize_rows(x, [0], [x.size], **options)
    x_hat = kernels.dequantize_rows(q.codes, q.layout, q.scales, q.zero_points, scheme=options["scheme"])
    err = np.sum((x.astype(np.float64) - x_hat) ** 2)
    return float(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / err))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=1 << 20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    x = np.random.default_rng(args.seed).standard_normal(args.elements).astype(np.float32)
    print(f"Gaussian N(0,1), {args.elements} float32 elements, seed {args.seed}")
    print(f"{'scheme':<11} {'bits':>4} {'group':>5} {'rtn dB':>8} {'mse dB':>8} {'gain dB':>8}")
    for scheme, bits_list in (("asymmetric", (2, 4, 8)), ("symmetric", (2, 4, 8)), ("ternary", (2,))):
        for bits in bits_list:
            for g in (32, 128):
                kw = dict(bits=bits, scheme=scheme, group_size=g)
                a, b = snr_db(x, method="rtn", **kw), snr_db(x, method="mse", **kw)
                print(f"{scheme:<11} {bits:>4} {g:>5} {a:>8.2f} {b:>8.2f} {b - a:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
