"""Activations per second into a calibration session: over Flight against in-process.

    python benchmarks/bench_calibrate.py [--tokens 512] [--width 4096] [--layers 8]
                                         [--batches 20] [--streams 1]

The workload is what a transformer's hooks send: per batch, ``--layers`` rows of
``--tokens x --width`` float32 activations (one forward chunk of that many Linear inputs).
Three ways to reduce it to the per-layer float64 sums of squares, in one run:

* ``numpy``: the plain NumPy statistic (``(x.astype(float64) ** 2).sum(0)`` per row), the
  peer;
* ``in-process``: ``flightquant.calibration.Accumulator.add_batch`` (validation + the same
  reduction);
* ``flight``: ``flightquant.Client.calibrate`` into a session of ``flightquant serve`` in a
  child process (``--streams`` clients at once, each sending its share).

Printed: activations (float32 values) per second and GB/s of float32 for each, and the
ratios flight/in-process and flight/numpy. One run each (the reduction is deterministic;
on a shared machine run it twice and keep the better).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flightquant.calibration import Accumulator, activation_batch  # noqa: E402
from flightquant.client import Client  # noqa: E402
from flightquant.testing import start_server_process  # noqa: E402


def make_batches(n: int, layers: int, tokens: int, width: int) -> list[pa.RecordBatch]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, width)).astype(np.float32)  # reused: the cost is the same
    return [
        activation_batch([(f"blk.{i}.ffn_up.weight", x + b) for i in range(layers)])
        for b in range(n)
    ]


def run_numpy(batches) -> float:
    sums: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for b in batches:
        names = b.column(0).to_pylist()
        values = b.column(1)
        shapes = b.column(2).to_pylist()
        flat = values.values.to_numpy()
        offsets = values.offsets.to_numpy()
        for i, name in enumerate(names):
            x = flat[offsets[i] : offsets[i + 1]].reshape(shapes[i]).astype(np.float64)
            s = (x * x).sum(axis=0)
            sums[name] = sums[name] + s if name in sums else s
    return time.perf_counter() - t0


def run_in_process(batches) -> float:
    acc = Accumulator()
    t0 = time.perf_counter()
    for b in batches:
        acc.add_batch(b)
    return time.perf_counter() - t0


def run_flight(batches, streams: int) -> float:
    proc, port = start_server_process()
    location = f"grpc://127.0.0.1:{port}"
    try:
        clients = [Client(location) for _ in range(streams)]
        shares = [batches[i::streams] for i in range(streams)]
        clients[0].calibrate("warm-up", batches[:1])
        clients[0].drop_session("warm-up")
        errors: list[BaseException] = []

        def feed(client, share):
            try:
                client.calibrate("bench", share)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=feed, args=a) for a in zip(clients, shares, strict=True)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        if errors:
            raise errors[0]
        table = clients[0].imatrix_table("bench")
        assert table.num_rows == len(batches[0]), table.num_rows
        for c in clients:
            c.close()
        return seconds
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--streams", type=int, default=1)
    args = p.parse_args()
    batches = make_batches(args.batches, args.layers, args.tokens, args.width)
    values = args.batches * args.layers * args.tokens * args.width
    results = {
        "numpy": run_numpy(batches),
        "in-process": run_in_process(batches),
        "flight": run_flight(batches, args.streams),
    }
    print(
        f"{args.batches} batches x {args.layers} layers x {args.tokens} tokens x "
        f"{args.width} wide = {values / 1e6:.1f} M activations ({values * 4 / 1e9:.2f} GB "
        f"float32), flight streams: {args.streams}"
    )
    print(f"{'path':<12} {'seconds':>8} {'Mact/s':>9} {'GB/s':>6}")
    for name, seconds in results.items():
        rate = values / seconds
        print(f"{name:<12} {seconds:8.3f} {rate / 1e6:9.1f} {rate * 4 / 1e9:6.2f}")
    print(f"flight / in-process: {results['in-process'] / results['flight']:.2f}")
    print(f"flight / numpy:      {results['numpy'] / results['flight']:.2f}")


if __name__ == "__main__":
    main()
