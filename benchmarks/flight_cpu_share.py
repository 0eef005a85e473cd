"""Where the CPU goes while a flightquant server quantizes over loopback.

    python benchmarks/flight_cpu_share.py [--batches 800] [--threads N]

Starts `flightquant serve` in a subprocess, streams 4 MiB float32 batches through
`flightquant.Client` (4-bit), and prints the throughput with the machine's CPU split from
/proc/stat over the run (user, system, softirq, idle), to show whether the client, the
transport and the kernels are competing for the same cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa

import flightquant as fq

FIELDS = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]


def cpu_snapshot() -> list[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:9]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, default=800)
    ap.add_argument("--threads", type=int, default=None, help="flightquant serve --threads")
    args = ap.parse_args(argv)
    cmd = [sys.executable, "-m", "flightquant", "serve", "--port", "0"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        location = proc.stdout.readline().split(" on ")[1].split()[0]
        x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
        offsets = pa.array(np.arange(5, dtype=np.int32) * (1 << 18))
        batch = pa.record_batch(
            {
                "layer_name": [f"l{i}" for i in range(4)],
                "weights": pa.ListArray.from_arrays(offsets, pa.array(x)),
            }
        )
        with fq.Client(location) as client:
            for _ in client.quantize(iter([batch] * 20), bits=4):
                pass  # warm-up
            before = cpu_snapshot()
            t0 = time.perf_counter()
            for _ in client.quantize(iter([batch] * args.batches), bits=4):
                pass
            seconds = time.perf_counter() - t0
            after = cpu_snapshot()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta)
    split = " ".join(f"{n}={100 * d / total:.0f}%" for n, d in zip(FIELDS, delta, strict=True))
    print(
        f"server threads={args.threads or 'auto'}: {args.batches * 4 / 1024 / seconds:.2f} GB/s of "
        f"float32 input; CPU over the run: {split}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
