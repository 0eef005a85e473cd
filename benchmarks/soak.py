"""Soak a flightquant server: many concurrent streams, some failing on purpose.

The server runs in its own process so its memory, open file descriptors and threads can
be read from ``/proc/<pid>/status`` and ``/proc/<pid>/fd`` (psutil is not needed). After
a warm-up the three are sampled; at the end they are sampled again and the growth is
reported. Every valid batch must be answered exactly once, in order, bit-identical to
``flightquant.quantize`` of the same batch; every poisoned stream must fail with a clear
status (INVALID_ARGUMENT / UNAVAILABLE / CANCELLED), never UNKNOWN or INTERNAL.

Full run (about a minute on 2 cores)::

    python benchmarks/soak.py --batches 20000

CI runs it with ``--batches 2400 --json`` as a slow test (tests/test_faults.py). Exit status 0 when every check passed and growth stayed under ``--max-growth``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import flightquant as fq  # noqa: E402
from flightquant.testing import proc_usage, start_server_process  # noqa: E402,F401


def make_batch(stream: int, index: int, rows: int, elements: int, rng) -> pa.RecordBatch:
    keys = [f"s{stream}-b{index}-r{r}" for r in range(rows)]
    values = rng.standard_normal((rows, elements)).astype(np.float32)
    weights = pa.ListArray.from_arrays(
        pa.array(np.arange(rows + 1, dtype=np.int32) * elements), pa.array(values.ravel())
    )
    return pa.record_batch({"layer_name": pa.array(keys), "weights": weights})


OPTIONS = {"bits": 4, "group_size": 64}
POISONS = ("nan", "bad_option", "too_big", "cancel")
CLEAN_ERRORS = (pa.ArrowInvalid, flight.FlightUnavailableError, flight.FlightCancelledError)


class SoakResult:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches_sent = 0
        self.batches_answered = 0
        self.streams_ok = 0
        self.streams_poisoned = 0
        self.poison_kinds: dict[str, int] = {}
        self.seen: set[str] = set()
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 50:
                self.problems.append(text)


def _one_stream(client, stream: int, nbatches: int, poison: str | None, res: SoakResult, args):
    rng = np.random.default_rng(stream)
    batches = [make_batch(stream, i, args.rows, args.elements, rng) for i in range(nbatches)]
    command = dict(OPTIONS)
    poison_at = nbatches // 2
    if poison == "bad_option":
        command["bits"] = 5
        poison_at = 0  # the whole stream is refused before its first batch
    elif poison == "nan":
        col = batches[poison_at].column("weights")
        vals = col.values.to_numpy(zero_copy_only=False).copy()
        vals[len(vals) // 2] = np.nan
        batches[poison_at] = pa.record_batch(
            {
                "layer_name": batches[poison_at].column("layer_name"),
                "weights": pa.ListArray.from_arrays(col.offsets, pa.array(vals)),
            }
        )
    elif poison == "too_big":
        big = np.zeros(args.max_batch_bytes // 4 + 16, np.float32)
        batches[poison_at] = pa.record_batch(
            {
                "layer_name": pa.array([f"s{stream}-b{poison_at}-big"]),
                "weights": pa.ListArray.from_arrays(
                    pa.array([0, big.size], pa.int32()), pa.array(big)
                ),
            }
        )
    desc = flight.FlightDescriptor.for_command(json.dumps(command).encode())
    opts = flight.FlightCallOptions(timeout=60)
    writer, reader = client.do_exchange(desc, options=opts)
    answered = []
    error = None
    try:
        writer.begin(batches[0].schema)
        # interleave writes and reads so a long stream never fills both directions
        for i, batch in enumerate(batches):
            if poison == "cancel" and i == poison_at:
                break
            writer.write_batch(batch)
            chunk = reader.read_chunk()
            answered.append(chunk)
        if poison == "cancel":
            reader.cancel()
        else:
            writer.done_writing()
            try:
                extra = reader.read_chunk()
                res.problem(f"stream {stream}: an extra batch after the last answer: {extra}")
            except StopIteration:
                pass
    except StopIteration:
        error = "stream ended early"
    except CLEAN_ERRORS as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001 - reported as a problem
        error = exc
        res.problem(f"stream {stream} ({poison}): unclear error {type(exc).__name__}: {exc}"[:400])
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the status was seen above
            pass
    # checks
    for i, chunk in enumerate(answered):
        meta = json.loads(chunk.app_metadata.to_pybytes())
        if meta.get("batch_index") != i:
            res.problem(f"stream {stream}: answer {i} has batch_index {meta.get('batch_index')}")
        keys = chunk.data.column("layer_name").to_pylist()
        want_keys = batches[i].column("layer_name").to_pylist()
        if keys != want_keys:
            res.problem(
                f"stream {stream}: answer {i} has keys {keys[:2]}..., want {want_keys[:2]}..."
            )
        if args.verify_every and (stream * 7 + i) % args.verify_every == 0:
            want = fq.quantize(batches[i], **OPTIONS)
            if not chunk.data.equals(want):
                res.problem(f"stream {stream}: answer {i} differs from fq.quantize")
        with res.lock:
            for k in keys:
                if k in res.seen:
                    res.problems.append(f"row {k} answered twice")
                res.seen.add(k)
    with res.lock:
        res.batches_answered += len(answered)
        if poison is None:
            res.batches_sent += nbatches
            if error is not None or len(answered) != nbatches:
                res.problems.append(
                    f"valid stream {stream}: {len(answered)}/{nbatches} answered, error {error!r}"[
                        :400
                    ]
                )
            else:
                res.streams_ok += 1
        else:
            res.batches_sent += poison_at
            res.streams_poisoned += 1
            res.poison_kinds[poison] = res.poison_kinds.get(poison, 0) + 1
            if len(answered) != poison_at:
                res.problems.append(
                    f"poisoned stream {stream} ({poison}): {len(answered)} answers before the "
                    f"poison at {poison_at}"
                )
            if poison != "cancel":
                text = str(error)
                if not isinstance(error, CLEAN_ERRORS):
                    res.problems.append(f"poisoned stream {stream} ({poison}): {error!r}"[:400])
                elif "Traceback (most recent call last)" in text or 'File "' in text:
                    res.problems.append(f"poisoned stream {stream}: traceback in {text[:300]!r}")


def _run_streams(clients, first_stream: int, total_batches: int, res: SoakResult, args) -> int:
    """Run streams until ``total_batches`` batches were planned; return the next stream id."""
    plan = []
    planned = 0
    stream = first_stream
    while planned < total_batches:
        n = min(args.stream_len, total_batches - planned)
        poison = None
        if args.fail_every and stream % args.fail_every == args.fail_every - 1 and n >= 2:
            poison = POISONS[(stream // args.fail_every) % len(POISONS)]
        plan.append((stream, n, poison))
        planned += n
        stream += 1
    lock = threading.Lock()

    def worker(client):
        while True:
            with lock:
                if not plan:
                    return
                item = plan.pop(0)
            try:
                _one_stream(client, *item, res, args)
            except Exception as exc:  # noqa: BLE001
                res.problem(f"stream {item[0]}: harness error {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stream


def run_soak(
    batches: int = 20000,
    *,
    concurrency: int = 4,
    stream_len: int = 25,
    rows: int = 4,
    elements: int = 512,
    fail_every: int = 5,
    warmup: int | None = None,
    verify_every: int = 3,
    max_batch_bytes: int = 1 << 20,
    print_fn=print,
) -> dict:
    """Run the soak against a fresh server process; return the figures as a dict."""
    args = argparse.Namespace(
        concurrency=concurrency,
        stream_len=stream_len,
        rows=rows,
        elements=elements,
        fail_every=fail_every,
        verify_every=verify_every,
        max_batch_bytes=max_batch_bytes,
    )
    warmup = max(200, batches // 10) if warmup is None else warmup
    proc, port = start_server_process(max_batch_bytes=max_batch_bytes, max_streams=64)
    res = SoakResult()
    # one connection per worker for the whole run, so the fd count compares like for like
    clients = [flight.connect(f"grpc://127.0.0.1:{port}") for _ in range(concurrency)]
    control = flight.connect(f"grpc://127.0.0.1:{port}")

    def quiet_stats():
        # a cancelled stream ends on the server a moment after the client gives up
        for _ in range(200):
            body = next(iter(control.do_action(flight.Action("stats", b"")))).body
            stats = json.loads(body.to_pybytes())
            if stats["streams_active"] == 0:
                break
            time.sleep(0.025)
        return stats

    try:
        t0 = time.perf_counter()
        nxt = _run_streams(clients, 0, warmup, res, args)
        quiet_stats()
        before = proc_usage(proc.pid)
        t1 = time.perf_counter()
        _run_streams(clients, nxt, batches, res, args)
        t2 = time.perf_counter()
        stats = quiet_stats()
        after = proc_usage(proc.pid)
        alive = proc.poll() is None
    finally:
        for c in clients + [control]:
            c.close()
        proc.kill()
        proc.wait()
    growth = {k: (after[k] - before[k]) / before[k] for k in before}
    out = {
        "batches_planned": warmup + batches,
        "batches_sent_valid": res.batches_sent,
        "batches_answered": res.batches_answered,
        "rows_seen": len(res.seen),
        "streams_ok": res.streams_ok,
        "streams_poisoned": res.streams_poisoned,
        "poison_kinds": res.poison_kinds,
        "before": before,
        "after": after,
        "growth": {k: round(v, 4) for k, v in growth.items()},
        "server_alive": alive,
        "server_stats": stats,
        "seconds": round(t2 - t0, 2),
        "batches_per_second": round(batches / max(t2 - t1, 1e-9), 1),
        "problems": res.problems,
    }
    if print_fn is not None:
        print_fn(
            f"soak: {out['batches_answered']} batches answered ({out['batches_sent_valid']} valid "
            f"sent), {res.streams_ok} streams ok, {res.streams_poisoned} poisoned "
            f"{res.poison_kinds}, {out['seconds']} s, {out['batches_per_second']} batches/s"
        )
        for k in ("rss_kib", "fds", "threads"):
            print_fn(
                f"  {k:8s} after warm-up {before[k]:>8d}  end {after[k]:>8d}  growth {growth[k]:+.2%}"
            )
        print_fn(f"  problems: {len(res.problems)}")
        for p in res.problems[:10]:
            print_fn(f"    {p}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, default=20000, help="batches after the warm-up")
    p.add_argument("--concurrency", type=int, default=4, help="client threads (streams at once)")
    p.add_argument("--stream-len", type=int, default=25, help="batches per stream")
    p.add_argument("--rows", type=int, default=4, help="tensors per batch")
    p.add_argument("--elements", type=int, default=512, help="floats per tensor")
    p.add_argument(
        "--fail-every", type=int, default=5, help="every Nth stream is poisoned (0: none)"
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up batches (default: 10%%)")
    p.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS/fd/thread growth")
    p.add_argument("--json", help="write the figures to this file")
    a = p.parse_args(argv)
    out = run_soak(
        a.batches,
        concurrency=a.concurrency,
        stream_len=a.stream_len,
        rows=a.rows,
        elements=a.elements,
        fail_every=a.fail_every,
        warmup=a.warmup,
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
    ok = (
        not out["problems"]
        and out["server_alive"]
        and all(g < a.max_growth for g in out["growth"].values())
        and out["rows_seen"] == out["batches_answered"] * a.rows
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
