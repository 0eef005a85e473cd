"""Flight throughput of the flightquant server against bare pyarrow peers, and its memory.

    python benchmarks/bench_flight.py [--quick] [--sizes 1,4,16] [--streams 1,2]
                                      [--repeat 5] [--threads N] [--rss-batches 2000]
                                      [--metrics] [--plot out.png]

Three servers, each in its own process (so the driver and the servers never share a GIL;
on a 2-core machine they do share the cores, as a real client and server on one host would):

* ``sink``: a bare pyarrow ``DoExchange`` that reads each batch and answers a one-row batch
  with its row count: the transport ceiling for quantize, whose answer is small;
* ``echo``: a bare pyarrow ``DoExchange`` that answers each batch with itself: what a
  server that sends back as much as it receives costs;
* ``flightquant``: ``flightquant serve`` (``--threads`` passed through).

The driver (this process) uses plain ``pyarrow.flight``: per stream a writer thread sends
the batches while the calling thread reads the answers; it sends the
``x-flightquant-pipeline`` header, as ``flightquant.Client`` does, so the flightquant server
reads the next batch while it quantizes one. Inputs are seed-layer batches
(``layer_name``, ``weights: list<float32>`` in rows of 256 Ki floats = 1 MiB, ``shape``) of
1, 4 and 16 MiB of float32; 1 and 2 concurrent streams; quantize at 4 and 8 bits. Printed:
GB/s of float32 input (median of ``--repeat`` runs) and the ratios flightquant/sink and
flightquant/echo measured in the same run. A last row runs the same job through
``flightquant.Client`` (the product's Python client). Then the server's resident memory
over a long run (``--rss-batches`` 4 MiB batches in one stream): RSS after warm-up, in the
middle and at the end, the peak, and the growth in %.

``--metrics`` adds a fourth server, ``flightquant serve --metrics-port 0 --log-format json``
(INFO: one JSON line per stream), scraped every ``--scrape-interval`` seconds (default
0.5, far more often than Prometheus would) while it works, and the column ``fq 4b+m``: the
same 4-bit job with metrics and JSON logs on, and its ratio to ``fq 4b`` (metrics off),
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

MiB = 1 << 20
ROW_FLOATS = 256 * 1024  # 1 MiB of float32 per row (one "layer")


# --------------------------------------------------------------------------- peer servers


class _Sink(flight.FlightServerBase):
    def do_exchange(self, context, descriptor, reader, writer):
        schema = pa.schema([("rows", pa.int64())])
        writer.begin(schema)
        for chunk in reader:
            n = chunk.data.num_rows
            writer.write_batch(pa.record_batch([pa.array([n], pa.int64())], schema=schema))


class _Echo(flight.FlightServerBase):
    def do_exchange(self, context, descriptor, reader, writer):
        writer.begin(reader.schema)
        for chunk in reader:
            writer.write_batch(chunk.data)


def _serve_peer(kind: str) -> None:
    server = {"sink": _Sink, "echo": _Echo}[kind]("grpc://127.0.0.1:0")
    print(f"serving grpc://127.0.0.1:{server.port}", flush=True)
    sys.stdin.read()  # until the driver closes our stdin
    server.shutdown()


class _Proc:
    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            self.proc.kill()
            raise SystemExit(f"{name} server did not start") from None
        self.location = next(w for w in line.split() if w.startswith("grpc://"))
        self.metrics_port = (
            int(line.rsplit("metrics on port ", 1)[1].split(")")[0])
            if "metrics on port" in line
            else None
        )

    def rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        values = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    def stop(self) -> None:
        if self.name == "flightquant":
            self.proc.terminate()
        else:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


# --------------------------------------------------------------------------- driver


def make_batch(mib: int) -> pa.RecordBatch:
    rows = mib * MiB // (4 * ROW_FLOATS)
    values = np.random.default_rng(mib).standard_normal(rows * ROW_FLOATS).astype(np.float32)
    offsets = np.arange(rows + 1, dtype=np.int32) * ROW_FLOATS
    return pa.record_batch(
        {
            "layer_name": [f"model.layers.{i}.mlp.weight" for i in range(rows)],
            "weights": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            "shape": pa.array([[ROW_FLOATS]] * rows, pa.list_(pa.int64())),
        }
    )


def _stream(
    location: str, command: bytes, batch: pa.RecordBatch, n: int, errors: list, on_result=None
) -> None:
    try:
        with flight.connect(location) as client:
            # this driver keeps sending without waiting for answers: it says so, and the
            # flightquant server reads ahead (the bare peers ignore the header)
            writer, reader = client.do_exchange(
                flight.FlightDescriptor.for_command(command),
                options=flight.FlightCallOptions(headers=[(b"x-flightquant-pipeline", b"1")]),
            )

            def write():
                try:
                    writer.begin(batch.schema)
                    for _ in range(n):
                        writer.write_batch(batch)
                except Exception as exc:  # the reader reports the call's status
                    errors.append(exc)

            t = threading.Thread(target=write, daemon=True)
            t.start()
            for i in range(n):
                reader.read_chunk()
                if on_result is not None:
                    on_result(i)
            t.join()
            # ended from the reading thread: pyarrow's reader, when a call fails, sends
            # WritesDone itself, and a second one at that moment aborts (gRPC check)
            writer.done_writing()
            writer.close()
    except Exception as exc:
        errors.append(exc)


def run_streams(
    location: str, command: bytes, batch: pa.RecordBatch, n: int, streams: int
) -> float:
    """Seconds to push ``n`` batches through each of ``streams`` concurrent streams."""
    errors: list = []
    threads = [
        threading.Thread(target=_stream, args=(location, command, batch, n, errors))
        for _ in range(streams)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"stream to {location} failed: {errors[0]}")
    return dt


def run_client(location: str, bits: int, batch: pa.RecordBatch, n: int, streams: int) -> float:
    from flightquant.client import Client

    def one():
        with Client(location) as client:
            for _ in client.quantize((batch for _ in range(n)), bits=bits):
                pass

    threads = [threading.Thread(target=one) for _ in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


class _Scraper:
    """GETs ``/metrics`` every ``interval`` seconds on its own thread until stopped."""

    def __init__(self, port: int, interval: float):
        import urllib.request

        self.scrapes = 0
        self._stop = threading.Event()

        def run():
            while not self._stop.wait(interval):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                    r.read()
                self.scrapes += 1

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.scrapes


def gbps(batch: pa.RecordBatch, n: int, streams: int, seconds: float) -> float:
    floats = batch.column("weights").values.nbytes
    return floats * n * streams / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=["sink", "echo"], help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="short run (fewer, smaller repeats)")
    p.add_argument("--sizes", default="1,4,16", help="batch sizes in MiB of float32")
    p.add_argument("--streams", default="1,2", help="concurrent stream counts")
    p.add_argument("--repeat", type=int, default=None, help="runs per cell (median)")
    p.add_argument("--mib-per-run", type=int, default=None, help="MiB sent per stream per run")
    p.add_argument("--threads", type=int, default=None, help="flightquant serve --threads")
    p.add_argument("--rss-batches", type=int, default=None, help="batches of the memory run")
    p.add_argument(
        "--metrics",
        action="store_true",
        help="also time a server with --metrics-port and --log-format json (scraped)",
    )
    p.add_argument("--scrape-interval", type=float, default=0.5, help="seconds between scrapes")
    p.add_argument("--plot", help="write a PNG bar chart here")
    args = p.parse_args(argv)
    if args.serve:
        _serve_peer(args.serve)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    stream_counts = [int(s) for s in args.streams.split(",")]
    repeat = args.repeat or (3 if args.quick else 7)
    per_run = (args.mib_per_run or (64 if args.quick else 256)) * MiB
    rss_batches = args.rss_batches or (300 if args.quick else 2000)

    fq_argv = [
        sys.executable,
        "-m",
        "flightquant",
        "serve",
        "--port",
        "0",
        "--log-level",
        "WARNING",
        "--max-batch-bytes",
        "1GiB",
    ]
    if args.threads:
        fq_argv += ["--threads", str(args.threads)]
    me = os.path.abspath(__file__)
    procs = {
        "sink": _Proc("sink", [sys.executable, me, "--serve", "sink"]),
        "echo": _Proc("echo", [sys.executable, me, "--serve", "echo"]),
        "flightquant": _Proc("flightquant", fq_argv),
    }
    scraper = None
    if args.metrics:
        on = [*fq_argv, "--metrics-port", "0", "--log-format", "json"]
        on[on.index("--log-level") + 1] = "INFO"
        procs["metrics"] = _Proc("flightquant", on)
        scraper = _Scraper(procs["metrics"].metrics_port, args.scrape_interval)
    try:
        import flightquant as fq

        print(
            f"flightquant {fq.__version__} build={json.dumps(fq.build_info())} "
            f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.2f} "
            f"server threads={args.threads or 'auto'}"
        )
        print(
            f"repeat={repeat} (median), {per_run // MiB} MiB of float32 per stream per run; "
            "servers in subprocesses, plain pyarrow driver"
        )
        rows = []
        header = (
            f"{'MiB':>4} {'streams':>7} {'sink':>7} {'echo':>7} {'fq 4b':>7} {'fq 8b':>7}"
            f" {'4b/sink':>8} {'4b/echo':>8} {'8b/sink':>8} {'8b/echo':>8}"
            + (f" {'fq 4b+m':>7} {'on/off':>7}" if args.metrics else "")
            + "  (GB/s of float32 input)"
        )
        print(header)
        for mib in sizes:
            batch = make_batch(mib)
            n = max(1, per_run // (mib * MiB))
            cells = {
                "sink": ("sink", b""),
                "echo": ("echo", b""),
                "fq4": ("flightquant", b'{"bits": 4}'),
                "fq8": ("flightquant", b'{"bits": 8}'),
            }
            if args.metrics:
                cells["fq4m"] = ("metrics", b'{"bits": 4}')
            for streams in stream_counts:
                for _name, (server, cmd) in cells.items():  # warm-up
                    run_streams(procs[server].location, cmd, batch, max(1, n // 4), streams)
                samples = {name: [] for name in cells}
                for _ in range(repeat):  # interleaved so load changes hit every server alike
                    for name, (server, cmd) in cells.items():
                        dt = run_streams(procs[server].location, cmd, batch, n, streams)
                        samples[name].append(gbps(batch, n, streams, dt))
                med = {k: statistics.median(v) for k, v in samples.items()}
                rows.append((mib, streams, med))
                print(
                    f"{mib:>4} {streams:>7} {med['sink']:>7.2f} {med['echo']:>7.2f} "
                    f"{med['fq4']:>7.2f} {med['fq8']:>7.2f} "
                    f"{med['fq4'] / med['sink']:>8.2f} {med['fq4'] / med['echo']:>8.2f} "
                    f"{med['fq8'] / med['sink']:>8.2f} {med['fq8'] / med['echo']:>8.2f}"
                    + (
                        f" {med['fq4m']:>7.2f} {med['fq4m'] / med['fq4']:>7.3f}"
                        if args.metrics
                        else ""
                    ),
                    flush=True,
                )
                if args.metrics:
                    on, off = sorted(samples["fq4m"]), sorted(samples["fq4"])
                    print(
                        f"     4-bit metrics on  (GB/s, sorted): {' '.join(f'{v:.2f}' for v in on)}"
                        f"\n     4-bit metrics off (GB/s, sorted): "
                        f"{' '.join(f'{v:.2f}' for v in off)}"
                    )

        # the product's Python client against the same server
        mib = 4 if 4 in sizes else sizes[0]
        batch = make_batch(mib)
        n = max(1, per_run // (mib * MiB))
        loc = procs["flightquant"].location
        for streams in stream_counts:
            run_client(loc, 4, batch, max(1, n // 4), streams)
            c = [
                gbps(batch, n, streams, run_client(loc, 4, batch, n, streams))
                for _ in range(repeat)
            ]
            raw = next(r[2]["fq4"] for r in rows if r[0] == mib and r[1] == streams)
            print(
                f"flightquant.Client, 4-bit, {mib} MiB, {streams} stream(s): "
                f"{statistics.median(c):.2f} GB/s ({statistics.median(c) / raw:.2f}x the plain "
                "pyarrow driver)"
            )

        # memory over a long run
        batch = make_batch(4)
        fqp = procs["flightquant"]
        run_streams(fqp.location, b'{"bits": 4}', batch, 50, 1)  # warm-up
        samples = {}

        def sample(i):
            if i in (0, rss_batches // 2, rss_batches - 1):
                samples[i] = fqp.rss()

        errors: list = []
        t0 = time.perf_counter()
        _stream(fqp.location, b'{"bits": 4}', batch, rss_batches, errors, on_result=sample)
        dt = time.perf_counter() - t0
        if errors:
            raise RuntimeError(errors[0])
        final = fqp.rss()
        start, mid, end = (samples[0][0], samples[rss_batches // 2][0], samples[rss_batches - 1][0])
        print(
            f"server RSS over {rss_batches} x 4 MiB batches ({gbps(batch, rss_batches, 1, dt):.2f}"
            f" GB/s): start {start / MiB:.1f} MiB, middle {mid / MiB:.1f} MiB, end "
            f"{end / MiB:.1f} MiB, peak {final[1] / MiB:.1f} MiB, growth "
            f"{100 * (end - start) / start:+.1f}%"
        )

        if args.plot:
            _plot(rows, args.plot)
        if scraper is not None:
            print(f"metrics server scraped {scraper.stop()} times during the run")
            scraper = None
    finally:
        if scraper is not None:
            scraper.stop()
        for proc in procs.values():
            proc.stop()
    return 0


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{mib} MiB x{s}" for mib, s, _ in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, (name, key) in enumerate(
        [
            ("sink", "sink"),
            ("echo", "echo"),
            ("flightquant 4-bit", "fq4"),
            ("flightquant 8-bit", "fq8"),
        ]
    ):
        ax.bar(x + (k - 1.5) * 0.2, [r[2][key] for r in rows], 0.2, label=name)
    ax.set_xticks(x, labels)
    ax.set_ylabel("GB/s of float32 input")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
