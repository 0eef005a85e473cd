"""The server's limits under pressure: the memory budget and the idle timeout.

Memory pressure runs a real ``flightquant serve`` under ``prlimit --as`` (an address-space
limit, the harshest: every mapping counts) and sends several large batches at once: the
server must survive, every stream must get its answer or RESOURCE_EXHAUSTED (sent as
UNAVAILABLE with a "RESOURCE_EXHAUSTED:" message, see docs/server.md), and the next valid
request must be answered. Each pressure test stays under ~30 s and 4 GiB for both
processes. The figures (streams, batch sizes, peak RSS, outcomes) are printed (``-s``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from common import make_layer_batch, wait_for

import flightquant as fq
from flightquant import budget, codec
from flightquant.calibration import activation_batch, layer_bytes
from flightquant.options import QuantOptions
from flightquant.sessions import SESSION_OVERHEAD
from flightquant.testing import ServeProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def _cmd(options: dict) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(options).encode())


def _send(location: str, batch: pa.RecordBatch, options: dict, timeout: float = 60):
    """One stream, one batch: ("ok", answer, metadata) or (error kind, message, None)."""
    try:
        with flight.connect(location) as client:
            writer, reader = client.do_exchange(
                _cmd(options), options=flight.FlightCallOptions(timeout=timeout)
            )
            writer.begin(batch.schema)
            writer.write_batch(batch)
            chunk = reader.read_chunk()
            writer.done_writing()
            writer.close()
        return "ok", chunk.data, json.loads(chunk.app_metadata.to_pybytes())
    except flight.FlightUnavailableError as exc:
        text = str(exc)
        kind = "resource_exhausted" if "RESOURCE_EXHAUSTED" in text else "unavailable"
        return kind, text, None
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return type(exc).__name__, str(exc)[:300], None


def _action(location: str, name: str) -> dict:
    with flight.connect(location) as client:
        return json.loads(next(iter(client.do_action(flight.Action(name, b"")))).body.to_pybytes())


def _float_batch(mib: int, rows: int = 8, dtype=np.float32, seed: int = 0) -> pa.RecordBatch:
    n = mib * MiB // np.dtype(dtype).itemsize // rows
    values = np.random.default_rng(seed).standard_normal(n * rows).astype(dtype)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * n)
    weights = pa.ListArray.from_arrays(offsets, pa.array(values))
    return pa.record_batch(
        {"layer_name": pa.array([f"layer.{i}" for i in range(rows)]), "weights": weights}
    )


# --------------------------------------------------------------------------- a limited server
class LimitedServer(ServeProcess):
    """``flightquant serve`` under ``prlimit --as=...``, with its peak RSS at the end."""

    def __init__(self, address_space: int, *args: str):
        super().__init__(
            "--port",
            "0",
            "--log-level",
            "WARNING",
            *args,
            prefix=("prlimit", f"--as={address_space}"),
        )
        self.location = self.wait_serving()
        self.base_rss = self.rss()

    def rss(self) -> int:
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def alive(self) -> bool:
        return self.proc.poll() is None

    def peak_rss(self) -> int:
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    def stderr(self) -> str:
        if self.alive():
            return ""
        return self.proc.stderr.read()[-3000:]

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


needs_prlimit = pytest.mark.skipif(
    shutil.which("prlimit") is None or not sys.platform.startswith("linux"),
    reason="needs util-linux prlimit (Linux)",
)


def _pressure(
    server: LimitedServer, jobs: list[tuple[pa.RecordBatch, dict]], want: dict[int, pa.RecordBatch]
) -> list[tuple]:
    """All jobs at once, each on its own stream; no client reads an answer before every
    client has sent its batch (so the server holds all of them at the same time, as with
    slow readers). Returns (kind, message or None, metadata, seconds) per job; an answer
    is checked against ``want[id(batch)]`` as it arrives, then dropped."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs), timeout=60)

    def run(i):
        batch, options = jobs[i]
        t0 = time.monotonic()
        try:
            with flight.connect(server.location) as client:
                writer, reader = client.do_exchange(
                    _cmd(options), options=flight.FlightCallOptions(timeout=60)
                )
                try:
                    writer.begin(batch.schema)
                    writer.write_batch(batch)
                finally:
                    barrier.wait()
                chunk = reader.read_chunk()
                writer.done_writing()
                writer.close()
            assert chunk.data.equals(want[id(batch)]), f"stream {i}: wrong answer"
            results[i] = (
                "ok",
                None,
                json.loads(chunk.app_metadata.to_pybytes()),
                time.monotonic() - t0,
            )
        except Exception as exc:  # noqa: BLE001 - classified here, judged by the caller
            # the refusal is UNAVAILABLE with a RESOURCE_EXHAUSTED message; a client that was
            # still writing may see it raised from the write side under another class
            if "RESOURCE_EXHAUSTED" in str(exc):
                kind = "resource_exhausted"
            elif isinstance(exc, flight.FlightUnavailableError):
                kind = "unavailable"
            else:
                kind = type(exc).__name__
            results[i] = (kind, str(exc)[:600], None, time.monotonic() - t0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _report(title: str, server: LimitedServer, jobs, results, stats) -> None:
    print(
        f"\n{title}: {len(jobs)} concurrent streams, server RSS {server.base_rss / MiB:.0f} MiB "
        f"idle, peak {server.peak_rss() / MiB:.0f} MiB; budget "
        f"{stats['memory']['limit'] / MiB:.0f} MiB, peak reserved "
        f"{stats['memory']['peak_reserved'] / MiB:.0f} MiB"
    )
    for (batch, options), (kind, _, meta, seconds) in zip(jobs, results):
        size = batch.get_total_buffer_size() / MiB
        out = f"{meta['output_bytes'] / MiB:.0f} MiB out" if meta else ""
        print(f"  {options} {size:.0f} MiB in: {kind} {out} {seconds:.1f} s")


def _check_pressure(server: LimitedServer, results, stats) -> None:
    assert server.alive(), server.stderr()
    kinds = [r[0] for r in results]
    assert set(kinds) <= {"ok", "resource_exhausted"}, [r[:2] for r in results if r[0] != "ok"]
    assert "ok" in kinds
    for kind, message, _, _ in results:
        if kind == "resource_exhausted":
            assert "--memory-limit" in message or "retry later" in message, message
    assert stats["memory"]["reserved"] == 0
    assert stats["memory"]["peak_reserved"] <= stats["memory"]["limit"]
    assert stats["errors"]["resource_exhausted"] == kinds.count("resource_exhausted")
    # what the server really held stays within its budget (plus its own idle footprint
    # and gRPC's buffers); without the budget this run peaks near the address-space limit
    assert server.peak_rss() <= server.base_rss + stats["memory"]["limit"] + 256 * MiB
    # the next valid request is answered
    small = make_layer_batch()
    kind, answer, _ = _send(server.location, small, {})
    assert kind == "ok" and answer.equals(fq.quantize(small))


@needs_prlimit
def test_memory_pressure_quantize_group_size_1():
    """Issue 11 defect 3: eight concurrent group_size=1 batches (output 2.1x the input)
    under a 2 GiB address space. Before the budget the server died (SIGSEGV in gRPC's
    allocator; SIGABRT with 3 x 200 MiB under 3 GiB)."""
    server = LimitedServer(
        2 << 30, "--max-batch-bytes", "64MiB", "--memory-wait", "3", "--idle-timeout", "30"
    )
    try:
        batch = _float_batch(60)
        options = {"bits": 4, "group_size": 1}
        want = {id(batch): fq.quantize(batch, **options)}
        jobs = [(batch, options)] * 8
        results = _pressure(server, jobs, want)
        stats = _action(server.location, "stats")
        _report("quantize group_size=1", server, jobs, results, stats)
        for kind, _, meta, _ in results:
            if kind == "ok":
                assert meta["output_bytes"] > 2 * batch.get_total_buffer_size()
        _check_pressure(server, results, stats)
        config = _action(server.location, "config")
        assert config["memory_limit"] == stats["memory"]["limit"]
        assert "RLIMIT_AS" in config["memory_limit_source"]
        assert config["idle_timeout"] == 30 and config["memory_wait"] == 3
    finally:
        server.stop()


@needs_prlimit
def test_memory_pressure_dequantize_to_float64():
    """2-bit codes to float64 (32x the input), concurrent, under a 2 GiB address space;
    then a batch whose output alone exceeds the budget is refused at once."""
    server = LimitedServer(
        2 << 30, "--max-batch-bytes", "32MiB", "--memory-wait", "3", "--idle-timeout", "30"
    )
    try:
        small = fq.quantize(_float_batch(120, dtype=np.float64), bits=2, group_size=128)
        # 640 MiB of float64 zeros: untouched pages cost no memory here; 20 MiB of codes
        zeros = pa.array(np.zeros(80 * MiB, np.float64))
        offsets = pa.array(np.arange(9, dtype=np.int32) * (10 * MiB))
        huge = fq.quantize(
            pa.record_batch({"w": pa.ListArray.from_arrays(offsets, zeros)}), bits=2, group_size=256
        )
        del zeros
        limit = _action(server.location, "config")["memory_limit"]
        assert budget.output_bound(huge, QuantOptions(op="dequantize")) > limit
        want = {id(small): fq.dequantize(small)}
        jobs = [(small, {"op": "dequantize"})] * 6
        results = _pressure(server, jobs, want)
        t0 = time.monotonic()
        kind, message, _ = _send(server.location, huge, {"op": "dequantize"})
        assert kind == "resource_exhausted", message
        assert "more than this server's whole budget" in message
        assert time.monotonic() - t0 < 3  # at once, not after --memory-wait
        stats = _action(server.location, "stats")
        _report("dequantize 2-bit -> float64", server, jobs, results, stats)
        results.append(("resource_exhausted", message, None, 0.0))  # counted in stats too
        _check_pressure(server, results, stats)
    finally:
        server.stop()


# --------------------------------------------------------------------------- the budget, in-process
def test_a_stream_waits_for_memory_then_is_served(server):
    mbb = 1 * MiB
    s = server(max_batch_bytes=mbb, memory_limit=3 * mbb, memory_wait=30)
    batch = make_layer_batch()
    with flight.connect(s.location) as holder:
        # a stream waiting for its next batch holds the bound of one message (2 x mbb)
        w1, r1 = holder.do_exchange(_cmd({}))
        w1.begin(batch.schema)
        wait_for(lambda: s.stats()["memory"]["reserved"] == 2 * mbb, what="the reservation")
        result = {}
        t = threading.Thread(target=lambda: result.update(out=_send(s.location, batch, {})))
        t.start()
        wait_for(lambda: s.stats()["memory"]["waiting"] == 1, what="the second stream to wait")
        assert "out" not in result
        w1.done_writing()  # the first stream ends: its reservation comes free
        w1.close()
        t.join(30)
    kind, answer, _ = result["out"]
    assert kind == "ok" and answer.equals(fq.quantize(batch))
    wait_for(lambda: s.stats()["memory"]["reserved"] == 0, what="every reservation back")


def test_a_stream_that_cannot_get_memory_gets_resource_exhausted(server):
    mbb = 1 * MiB
    s = server(max_batch_bytes=mbb, memory_limit=3 * mbb, memory_wait=0.5)
    batch = make_layer_batch()
    with flight.connect(s.location) as holder:
        w1, r1 = holder.do_exchange(_cmd({}))
        w1.begin(batch.schema)
        wait_for(lambda: s.stats()["memory"]["reserved"] == 2 * mbb, what="the reservation")
        t0 = time.monotonic()
        kind, message, _ = _send(s.location, batch, {})
        assert kind == "resource_exhausted", message
        assert time.monotonic() - t0 < 10
        assert "RESOURCE_EXHAUSTED: server memory busy" in message and "retry later" in message
        w1.done_writing()
        w1.close()
    kind, answer, _ = _send(s.location, batch, {})
    assert kind == "ok"
    assert s.stats()["errors"]["resource_exhausted"] == 1


def test_a_batch_beyond_the_whole_budget_is_refused_at_once(server):
    s = server(max_batch_bytes=8 * MiB, memory_limit=64 * MiB, memory_wait=30)
    codes = fq.quantize(_float_batch(8, dtype=np.float64), bits=2, group_size=64)  # ~0.6 MiB
    assert codes.get_total_buffer_size() < 1 * MiB
    t0 = time.monotonic()
    kind, message, _ = _send(s.location, codes, {"op": "dequantize"})  # 8 MiB of float64 out
    assert (kind, time.monotonic() - t0 < 5) == ("ok", True), message
    big = fq.quantize(_float_batch(80, dtype=np.float64), bits=2, group_size=64)  # 80 MiB out
    t0 = time.monotonic()
    kind, message, _ = _send(s.location, big, {"op": "dequantize"})
    assert kind == "resource_exhausted", message
    assert time.monotonic() - t0 < 5  # not memory_wait=30
    assert "more than this server's whole budget" in message and "smaller batches" in message
    assert _send(s.location, make_layer_batch(), {})[0] == "ok"


def test_memory_error_fails_that_stream_only(server, monkeypatch):
    s = server()
    real = codec.process_batch
    calls = []

    def flaky(batch, options, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("cannot allocate 12 GiB")
        return real(batch, options, **kw)

    monkeypatch.setattr(codec, "process_batch", flaky)
    batch = make_layer_batch()
    kind, message, _ = _send(s.location, batch, {})
    assert kind == "resource_exhausted", message
    assert "ran out of memory" in message and "Traceback" not in message
    kind, answer, _ = _send(s.location, batch, {})
    assert kind == "ok" and answer.equals(fq.quantize(batch))
    stats = s.stats()
    assert stats["errors"]["resource_exhausted"] == 1 and stats["memory"]["reserved"] == 0
    # a pipelining client gets it in-band: UNAVAILABLE, so it would try the next server
    calls.clear()
    with fq.Client(s.location) as client:
        with pytest.raises(flight.FlightUnavailableError, match="RESOURCE_EXHAUSTED"):
            client.quantize(batch)


def test_memory_available_reads_cgroup_v1_and_v2(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "svc" / "app").mkdir(parents=True)
    (v2 / "svc" / "memory.max").write_text("3221225472\n")
    (v2 / "svc" / "app" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/svc/app\n")
    assert budget._cgroup_limit(str(proc), str(v2)) == 3 << 30  # a parent's limit applies
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("1073741824\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # none
    proc.write_text("12:cpu,cpuacct:/job\n4:memory:/job\n")
    assert budget._cgroup_limit(str(proc), str(v1)) == 1 << 30
    proc.write_text("0::/\n")
    assert budget._cgroup_limit(str(proc), str(tmp_path / "missing")) is None
    value, what = budget.memory_available()
    assert value > 0 and what


def test_output_bound_covers_what_the_codec_allocates():
    """The bound is an upper bound of the answer's own buffers, for shapes that cost most."""
    rng = np.random.default_rng(3)
    shapes = {"tiny rows": [1] * 2000, "empty rows": [0] * 2000, "ragged": [1, 300, 0, 7, 129]}
    for name, lens in shapes.items():
        w = pa.array(
            [rng.standard_normal(k).astype(np.float16) for k in lens], pa.list_(pa.float16())
        )
        batch = pa.record_batch({"w": w})
        for options in (
            {"bits": 8, "group_size": 1, "stats": True},
            {"bits": 2},
            {"scheme": "symmetric", "group_size": 3},
        ):
            opts = QuantOptions.from_mapping(options)
            out, _ = codec.quantize_batch(batch, opts)
            assert budget.output_bound(batch, opts) >= out.get_total_buffer_size(), (name, options)
            back, _ = codec.dequantize_batch(out)
            deq = QuantOptions(op="dequantize")
            assert budget.output_bound(out, deq) >= back.get_total_buffer_size(), (name, options)


# --------------------------------------------------------------------------- idle streams
_STOPPED_CLIENT = """
import os, signal, sys
import pyarrow as pa, pyarrow.flight as flight
b = pa.record_batch({"w": pa.array([[1.0] * 64], pa.list_(pa.float32()))})
c = flight.connect(sys.argv[1])
w, r = c.do_exchange(flight.FlightDescriptor.for_command(b"{}"))
w.begin(b.schema)
w.write_batch(b)
r.read_chunk()
print("stopping", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_idle_streams_are_ended_and_their_slots_freed(server):
    """Issue 11 defect 4: schema-then-nothing, nothing at all, and a SIGSTOPped client
    hold every slot; the idle timeout frees them and a legitimate client is served."""
    s = server(max_streams=3, idle_timeout=1.0)
    batch = make_layer_batch()
    quiet = flight.connect(s.location)
    w_schema, r_schema = quiet.do_exchange(_cmd({}))
    w_schema.begin(batch.schema)  # a schema, then nothing, and waits for an answer
    seen: list = []

    def wait_for_answer():
        try:
            while True:
                seen.append(r_schema.read_chunk())
        except Exception as exc:  # noqa: BLE001 - checked below
            seen.append(exc)

    reader = threading.Thread(target=wait_for_answer, daemon=True)
    reader.start()
    silent = flight.connect(s.location)
    w_none, r_none = silent.do_exchange(_cmd({}))  # nothing at all
    stopped = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_CLIENT, s.location], stdout=subprocess.PIPE
    )
    try:
        assert stopped.stdout.readline().strip() == b"stopping"
        wait_for(lambda: s.stats()["streams_active"] == 3, what="three streams to hold slots")
        assert _send(s.location, batch, {})[0] == "unavailable"  # locked out for now
        t0 = time.monotonic()
        wait_for(lambda: s.stats()["streams_active"] == 0, timeout=20, what="the idle streams")
        assert time.monotonic() - t0 < 10
        kind, answer, _ = _send(s.location, batch, {})
        assert kind == "ok" and answer.equals(fq.quantize(batch))
        stats = s.stats()
        assert stats["errors"]["deadline_exceeded"] == 3 and stats["idle_streams_ended"] == 3
        assert stats["memory"]["reserved"] == 0
        # the waiting client learns why (in-band), then its call ends
        reader.join(30)
        assert len(seen) == 2, seen
        error = json.loads(seen[0].app_metadata.to_pybytes())["error"]
        assert error["code"] == "deadline_exceeded" and "idle timeout" in error["message"]
        assert isinstance(seen[1], flight.FlightUnavailableError), seen[1]
    finally:
        stopped.send_signal(signal.SIGCONT)
        stopped.kill()
        stopped.wait(30)
        for c in (quiet, silent):
            try:
                c.close()
            except Exception:  # noqa: BLE001 - the server closed these connections
                pass


def test_a_stream_the_server_is_busy_with_is_not_idle(server, monkeypatch):
    s = server(idle_timeout=0.5)
    real = codec.process_batch

    def slow(batch, options, **kw):
        time.sleep(1.5)  # three idle timeouts of kernel time
        return real(batch, options, **kw)

    monkeypatch.setattr(codec, "process_batch", slow)
    batch = make_layer_batch()
    kind, answer, _ = _send(s.location, batch, {})
    assert kind == "ok" and answer.equals(fq.quantize(batch))
    assert s.stats()["idle_streams_ended"] == 0


def test_client_whose_source_stalls_opens_a_new_stream(server):
    """A flightquant.Client whose data comes slower than the idle timeout: the server ends
    the quiet stream, and the client sends the next batch on a new one."""
    s = server(idle_timeout=0.5)
    batches = [make_layer_batch(0), make_layer_batch(3)]

    def source():
        yield batches[0]
        wait_for(lambda: s.stats()["idle_streams_ended"] == 1, what="the idle stream's end")
        yield batches[1]

    with fq.Client(s.location) as client:
        out = list(client.quantize(source()))
    assert [o.equals(fq.quantize(b)) for o, b in zip(out, batches)] == [True, True]
    wait_for(lambda: s.stats()["streams_active"] == 0, what="the stream to end")
    stats = s.stats()
    assert stats["errors"]["deadline_exceeded"] == 1 and stats["streams_served"] == 1


def test_plain_client_waiting_for_an_answer_is_told_why(server):
    """A lock-step pyarrow client that is reading when its stream is ended sees the
    in-band DEADLINE_EXCEEDED message, then UNAVAILABLE."""
    s = server(idle_timeout=0.5)
    batch = make_layer_batch()
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(_cmd({}))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        reader.read_chunk()  # the answer; the client then waits without sending more
        chunk = reader.read_chunk()
        error = json.loads(chunk.app_metadata.to_pybytes())["error"]
        assert error["code"] == "deadline_exceeded"
        assert "DEADLINE_EXCEEDED" in error["message"] and "--idle-timeout" in error["message"]
        with pytest.raises(flight.FlightUnavailableError):
            reader.read_chunk()
    wait_for(lambda: s.stats()["streams_active"] == 0, what="the stream to end")


def test_a_client_that_takes_no_answers_is_ended(server):
    """The server blocked writing to a client that never reads is idle too."""
    s = server(idle_timeout=1.0)
    codes = fq.quantize(_float_batch(8, dtype=np.float64), bits=2, group_size=64)  # 8 MiB out
    with flight.connect(s.location) as client:
        writer, reader = client.do_exchange(_cmd({"op": "dequantize"}))
        writer.begin(codes.schema)
        for _ in range(12):  # ~100 MiB of answers: far more than gRPC's windows hold
            try:
                writer.write_batch(codes)
            except Exception:  # noqa: BLE001 - the server ended the call
                break
        wait_for(
            lambda: s.stats()["idle_streams_ended"] == 1,
            timeout=20,
            what="the stream that takes no answers to be ended",
        )
        wait_for(lambda: s.stats()["streams_active"] == 0, what="its slot")
    stats = s.stats()
    assert stats["errors"]["deadline_exceeded"] == 1 and stats["memory"]["reserved"] == 0


@needs_prlimit
def test_memory_pressure_calibration_sessions():
    """Eight clients at once, each opening its own calibration session of 96 layers x
    128 Ki columns (96 MiB of float64 sums each, 768 MiB together) under a 2 GiB address
    space: sessions are held under the budget, a session that cannot grow fails its batch
    with RESOURCE_EXHAUSTED and keeps nothing of it, the server survives, and dropping the
    sessions gives every byte back."""
    server = LimitedServer(
        2 << 30, "--max-batch-bytes", "64MiB", "--memory-wait", "2", "--idle-timeout", "30"
    )
    width, layers = 128 * 1024, 96
    rng = np.random.default_rng(0)
    row = rng.standard_normal(width).astype(np.float32)
    batch = activation_batch([(f"blk.{i}.ffn_up.weight", row) for i in range(layers)])
    results: list = [None] * 8
    barrier = threading.Barrier(8, timeout=60)

    def run(i):
        try:
            with flight.connect(server.location) as client:
                writer, reader = client.do_exchange(
                    _cmd({"op": "calibrate", "session": f"s{i}"}),
                    options=flight.FlightCallOptions(timeout=60),
                )
                try:
                    writer.begin(batch.schema)
                    barrier.wait()
                    writer.write_batch(batch)
                    meta = json.loads(reader.read_chunk().app_metadata.to_pybytes())
                    writer.done_writing()
                finally:
                    try:
                        writer.close()
                    except pa.ArrowException:
                        pass
            results[i] = ("ok", meta)
        except Exception as exc:  # noqa: BLE001 - judged below
            kind = "resource_exhausted" if "RESOURCE_EXHAUSTED" in str(exc) else repr(exc)
            results[i] = (kind, None)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert server.alive(), server.stderr()
        kinds = [r[0] for r in results]
        assert set(kinds) <= {"ok", "resource_exhausted"}, kinds
        assert "ok" in kinds
        stats = _action(server.location, "stats")
        session_bytes = SESSION_OVERHEAD + layers * layer_bytes(width)
        held = stats["calibration"]
        print(
            f"\ncalibrate: 8 sessions of {session_bytes / MiB:.0f} MiB at once: "
            f"{kinds.count('ok')} held, {kinds.count('resource_exhausted')} refused; budget "
            f"{stats['memory']['limit'] / MiB:.0f} MiB, peak reserved "
            f"{stats['memory']['peak_reserved'] / MiB:.0f} MiB, server peak RSS "
            f"{server.peak_rss() / MiB:.0f} MiB"
        )
        for kind, meta in results:
            if kind == "ok":
                assert meta["session_layers"] == layers and meta["tokens"] == layers
        # a refused batch left its session empty (created, then nothing added)
        assert held["layers"] == kinds.count("ok") * layers
        assert stats["memory"]["reserved"] == held["bytes"] <= stats["memory"]["limit"]
        assert held["bytes"] >= kinds.count("ok") * session_bytes
        # gRPC's receive buffers of eight 48 MiB batches sit outside the budget: 384 MiB of
        # slack (the sums held outside the budget reached 1,468 MiB before the fix)
        assert server.peak_rss() <= server.base_rss + stats["memory"]["limit"] + 384 * MiB
        with flight.connect(server.location) as client:
            for i in range(8):
                body = json.dumps({"session": f"s{i}"}).encode()
                list(client.do_action(flight.Action("calibration-drop", body)))
        assert _action(server.location, "stats")["memory"]["reserved"] == 0
    finally:
        server.stop()


def test_budget_waiters_of_the_same_size_are_distinct():
    """A waiter that gives up removes itself, not another waiter asking for as much."""
    memory = budget.MemoryBudget(100)
    held = memory.reserve(100, 0)
    got: dict = {}

    def wait(name, timeout):
        try:
            got[name] = memory.reserve(60, timeout)
        except budget.BudgetExhausted:
            got[name] = None

    patient = threading.Thread(target=wait, args=("patient", 20))
    patient.start()
    wait_for(lambda: memory.snapshot()["waiting"] == 1, what="the first waiter")
    wait("hasty", 0.05)
    assert got["hasty"] is None
    held.release()
    patient.join(20)
    assert got["patient"] is not None and got["patient"].nbytes == 60
