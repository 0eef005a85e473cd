"""The quantize job as a user runs it, against its own kernel and against llama.cpp.

Makes (or takes, ``--model``) a bfloat16 safetensors model of >= 0.5 GB (llama-shaped,
cached under benchmarks/out/) and prints, in one run, per case (native 4-bit rtn, native
4-bit mse, Q4_K rtn, Q4_K mse):

* the kernel: ``flightquant.quantize`` on the file's batches already in memory, with
  ``stats`` off and on (the CLI asks for stats: the SNR column);
* the CLI end to end: ``flightquant quantize MODEL -o OUT ...`` as a child process, with its
  wall time, CPU time and peak RSS (``wait4``, as ``/usr/bin/time -v`` reports them);
* the same CLI through a loopback server in a child process (``--server``), its output
  compared byte for byte with the in-process one;

with the ratios CLI/kernel and server/in-process. Then the dequantize job (CLI, and
``fq.dequantize`` in memory) against a memory copy of its output, and, when llama-cpp-python
is installed, llama.cpp's ``llama_model_quantize`` on the same weights as a BF16 GGUF
against flightquant's GGUF job, Q4_K, same threads.

    python benchmarks/bench_job.py [--model M.safetensors] [--threads N] [--cases ...]

The peak-RSS bound printed is 2.5x the largest tensor (as float32) plus the peak RSS of
the same command on a one-tensor file (the interpreter and libraries: the constant).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import flightquant as fq  # noqa: E402
from flightquant import modelfiles  # noqa: E402
from flightquant.testing import start_server_process  # noqa: E402

CASES = {
    "native-rtn": ["--bits", "4", "--group-size", "128", "--method", "rtn"],
    "native-mse": ["--bits", "4", "--group-size", "128", "--method", "mse"],
    "q4k-rtn": ["--format", "Q4_K", "--method", "rtn"],
    "q4k-mse": ["--format", "Q4_K", "--method", "mse"],
}
OPTIONS = {
    "native-rtn": {"bits": 4, "group_size": 128, "method": "rtn"},
    "native-mse": {"bits": 4, "group_size": 128, "method": "mse"},
    "q4k-rtn": {"format": "Q4_K", "method": "rtn"},
    "q4k-mse": {"format": "Q4_K", "method": "mse"},
}


# --------------------------------------------------------------------------- the model


def make_model(path: Path, dim: int, ff: int, layers: int, vocab: int) -> None:
    """A llama-shaped bfloat16 model under GGUF tensor names (bench_gguf's shapes), so the
    same weights go into the GGUF for llama.cpp."""
    import ml_dtypes
    from bench_gguf import llama_matrices

    rng = np.random.default_rng(0)
    names: list[tuple[str, tuple[int, ...]]] = []
    for name, rows, cols in llama_matrices(dim, ff, layers, vocab):
        if name.endswith("attn_q.weight"):
            names.append((name.replace("attn_q", "attn_norm"), (dim,)))
        names.append((name, (rows, cols)))
    infos = [modelfiles.TensorInfo(n, s, "bfloat16") for n, s in names]
    tmp = path.with_suffix(".part")
    w = modelfiles.SafetensorsWriter(tmp, infos, {"format": "pt"})
    for name, shape in names:
        if len(shape) == 1:
            x = np.ones(shape, np.float32)
        else:  # heavy-tailed like trained weights, in float32 then rounded to bfloat16
            x = rng.standard_normal(shape, np.float32) * np.float32(0.02)
            x *= 1 + (rng.random(shape, np.float32) < 0.01) * np.float32(4)  # some outliers
        w.write(name, x.astype(ml_dtypes.bfloat16))
    w.close()
    os.replace(tmp, path)


def model_gguf(src: modelfiles.SafetensorsFile, path: Path, dims) -> None:
    """The model's weights as a llama BF16 GGUF (bench_gguf's writer, these weights)."""
    from bench_gguf import build
    from gguf import GGMLQuantizationType

    by_name = {i.name: i for i in src.infos}

    def matrix(name, rows, cols):
        arr = src.read(by_name[name]).view(np.uint16).reshape(rows, cols)
        return arr, GGMLQuantizationType.BF16

    build(path, *dims, matrix=matrix, file_type=32)  # 32: LLAMA_FTYPE_MOSTLY_BF16


# --------------------------------------------------------------------------- measuring


TIME = "/usr/bin/time"


def run_timed(cmd: list[str], env=None) -> dict:
    """Run a command as a child process: wall, user and system seconds, peak RSS (MiB).

    Through ``/usr/bin/time`` when there is one: the rusage of a child forked from this
    (large) process would count this process's pages in the child's peak RSS. Without
    it, the peak is read from /proc while the child runs (sampled: a lower bound)."""
    out_file = None
    if os.path.exists(TIME):
        out_file = tempfile.NamedTemporaryFile("r", suffix=".time", delete=False)  # noqa: SIM115
        cmd = [TIME, "-f", "%e %U %S %M", "-o", out_file.name, *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )  # cwd: `python -m` imports from the current directory first
    peak = 0.0
    if out_file is None:
        while proc.poll() is None:
            try:
                peak = max(peak, vm_hwm(proc.pid))
            except OSError:
                break
            time.sleep(0.01)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    user = system = float("nan")
    if out_file is not None:
        fields = out_file.read().split()
        out_file.close()
        os.unlink(out_file.name)
        wall, user, system, peak = float(fields[-4]), float(fields[-3]), float(fields[-2]), \
            int(fields[-1]) / 1024  # fmt: skip
    return {"wall": wall, "user": user, "sys": system, "rss": peak, "stdout": out.decode()}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flightquant", *map(str, args)]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def vm_hwm(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memcpy_rate(nbytes: int) -> float:
    """Bytes per second of a memory copy of ``nbytes`` (both buffers already touched)."""
    a = np.ones(nbytes, np.uint8)
    b = np.zeros(nbytes, np.uint8)
    return nbytes / best(lambda: np.copyto(b, a), 3)


# --------------------------------------------------------------------------- the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a bfloat16 .safetensors (default: make one)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--cases", default=",".join(CASES), help="of: " + ", ".join(CASES))
    ap.add_argument("--repeat", type=int, default=2, help="best of N for in-memory timings")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-dequantize", action="store_true")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    threads = args.threads
    dims = (args.dim, args.ff, args.layers, args.vocab)
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    model = args.model
    if model is None:
        model = out_dir / "job_bf16_{}_{}_{}_{}.safetensors".format(*dims)
        if not model.exists():
            t0 = time.perf_counter()
            make_model(model, *dims)
            print(f"made {model} in {time.perf_counter() - t0:.1f} s")
    src = modelfiles.open_input(model)
    sel = modelfiles.Selection(None, None)
    quantized = [i for i in src.infos if sel(i)]
    n_weights = sum(i.numel for i in quantized)
    largest = max(i.numel for i in src.infos) * 4
    print(f"model: {model} ({src.nbytes / 1e9:.3f} GB, {len(src.infos)} tensors, "
          f"{n_weights / 1e6:.0f} M weights quantized, largest tensor {largest / 2**20:.0f} MiB "
          f"as float32), {threads} threads, {os.cpu_count()} cores")  # fmt: skip

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        # the constant: the same command on a one-tensor file
        tiny = tmp / "tiny.safetensors"
        w = modelfiles.SafetensorsWriter(tiny, [modelfiles.TensorInfo("w", (256, 256), "float32")])
        w.write("w", np.ones((256, 256), np.float32))
        w.close()
        base = run_timed(fq_cmd("quantize", tiny, "-o", tmp / "tiny.arrow", "-q"), env())
        bound = 2.5 * largest / 2**20 + base["rss"]
        print(f"constant: a one-tensor job takes {base['wall']:.2f} s, peak RSS "
              f"{base['rss']:.0f} MiB; RSS bound 2.5 x largest + constant = {bound:.0f} MiB")  # fmt: skip

        batches = list(modelfiles.tensor_batches(src, quantize=sel))
        for b in batches:  # fault the batches in before timing
            b.column("weights").values.to_numpy()[::1024].sum()

        server = port = None
        if not args.no_server:
            server, port = start_server_process(threads=threads)
        rows = []
        outputs = {}
        try:
            for case in cases:
                opts = {**OPTIONS[case], "columns": ["weights"]}
                k_off = best(lambda: list(fq.quantize(batches, stats=False, threads=threads,
                                                      **opts)), args.repeat)  # fmt: skip
                k_on = best(lambda: list(fq.quantize(batches, stats=True, threads=threads,
                                                     **opts)), args.repeat)  # fmt: skip
                out = tmp / f"{case}.arrow"
                cli = run_timed(fq_cmd("quantize", model, "-o", out, *CASES[case], "--json",
                                       "--threads", threads), env())  # fmt: skip
                cli["job"] = json.loads(cli["stdout"])["seconds"]
                outputs[case] = out
                row = {"case": case, "kernel_off": k_off, "kernel_on": k_on, "cli": cli}
                if server is not None:
                    remote = tmp / f"{case}.remote.arrow"
                    row["server"] = run_timed(fq_cmd(
                        "quantize", model, "-o", remote, *CASES[case], "--json",
                        "--server", f"grpc://127.0.0.1:{port}"), env())  # fmt: skip
                    row["server"]["job"] = json.loads(row["server"]["stdout"])["seconds"]
                    row["identical"] = remote.read_bytes() == out.read_bytes()
                    remote.unlink()
                rows.append(row)
                print_row(row, n_weights, bound)
            if "native-rtn" in cases:  # diagnostic: the job without the stats' cost
                nostats = tmp / "nostats.py"
                nostats.write_text(NOSTATS)
                r = run_timed([sys.executable, str(nostats), "quantize", str(model), "-o",
                               str(tmp / "ns.arrow"), *CASES["native-rtn"], "-q",
                               "--threads", str(threads)], env())  # fmt: skip
                k_off = rows[cases.index("native-rtn")]["kernel_off"]
                print(f"{'native-rtn':11} {'CLI, stats off (diagnostic)':32} {r['wall']:7.2f} "
                      f"{n_weights / r['wall'] / 1e6:7.0f} {r['rss']:8.0f}   "
                      f"CLI/kernel(stats off) {k_off / r['wall']:.2f}x")  # fmt: skip
            if server is not None:
                print(f"server process peak RSS (all cases): {vm_hwm(server.pid):.0f} MiB")
            if not args.no_dequantize and "native-rtn" in outputs:
                dequantize(outputs["native-rtn"], tmp, threads, port, 4 * n_weights)
        finally:
            if server is not None:
                server.kill()
                server.wait()
        if not args.no_llama:
            llama(src, dims, args, tmp, threads, model)


NOSTATS = """
import sys
from flightquant.cli import common
quantize = common.Runner.quantize
common.Runner.quantize = lambda self, b, **o: quantize(self, b, **{**o, "stats": False})
from flightquant.cli import main
sys.exit(main(sys.argv[1:]))
"""

HEADER_DONE = []


def print_row(row: dict, n: int, bound: float) -> None:
    if not HEADER_DONE:
        HEADER_DONE.append(1)
        print(f"{'case':11} {'what':32} {'seconds':>7} {'M w/s':>7} {'RSS MiB':>8}   ratios")
    case = row["case"]

    def line(what, seconds, rss=None, note=""):
        r = f"{rss:8.0f}" if rss is not None else " " * 8
        print(f"{case:11} {what:32} {seconds:7.2f} {n / seconds / 1e6:7.0f} {r}   {note}")

    line("kernel in memory, stats off", row["kernel_off"])
    line("kernel in memory, stats on", row["kernel_on"], None,
         f"stats cost {row['kernel_on'] / row['kernel_off'] - 1:+.0%}")  # fmt: skip
    c = row["cli"]
    line("CLI in-process (whole process)", c["wall"], c["rss"],
         f"CLI/kernel {row['kernel_off'] / c['wall']:.2f}x (stats off), "
         f"{row['kernel_on'] / c['wall']:.2f}x (stats on); CPU {c['user'] + c['sys']:.2f} s; "
         f"RSS {'within' if c['rss'] <= bound else 'OVER'} bound")  # fmt: skip
    line("  the job itself (its summary)", c["job"], None,
         f"job/kernel {row['kernel_off'] / c['job']:.2f}x (stats off), "
         f"{row['kernel_on'] / c['job']:.2f}x (stats on)")  # fmt: skip
    if "server" in row:
        s = row["server"]
        line("CLI via loopback server", s["wall"], s["rss"],
             f"server/in-process {c['wall'] / s['wall']:.2f}x (jobs: {c['job'] / s['job']:.2f}x)"
             f"; output {'byte-identical' if row['identical'] else 'DIFFERS'}")  # fmt: skip


def dequantize(qfile: Path, tmp: Path, threads: int, port, out_bytes: int) -> None:
    out = tmp / "deq.safetensors"
    r = run_timed(fq_cmd("dequantize", qfile, "-o", out, "-q", "--threads", threads), env())
    size = out.stat().st_size
    copy = memcpy_rate(256 << 20)
    print(f"dequantize job (CLI, whole process) -> {size / 2**20:.0f} MiB bf16 safetensors: "
          f"{r['wall']:.2f} s, {size / r['wall'] / 1e9:.2f} GB/s, peak RSS {r['rss']:.0f} MiB; "
          f"memory copy {copy / 1e9:.2f} GB/s: job/copy {size / r['wall'] / copy:.2f}x")  # fmt: skip
    if port is not None:
        out.unlink()
        s = run_timed(fq_cmd("dequantize", qfile, "-o", out, "-q", "--server",
                             f"grpc://127.0.0.1:{port}"), env())  # fmt: skip
        print(f"dequantize job via loopback server: {s['wall']:.2f} s "
              f"(server/in-process {r['wall'] / s['wall']:.2f}x)")  # fmt: skip
    qbatches = list(modelfiles.open_input(qfile).iter_batches())
    seconds = best(lambda: list(fq.dequantize(qbatches, threads=threads)), 2)
    print(f"fq.dequantize in memory: {seconds:.2f} s for {out_bytes / 2**20:.0f} MiB float32, "
          f"{out_bytes / seconds / 1e9:.2f} GB/s: {out_bytes / seconds / copy:.2f}x a memory "
          "copy")  # fmt: skip


def llama(src, dims, args, tmp: Path, threads: int, model: Path) -> None:
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed; skipped")
        return
    from bench_gguf import FTYPES

    if args.model is not None:
        print("llama.cpp: --model given; the GGUF peer needs the llama-shaped model; skipped")
        return
    gguf = HERE / "out" / (model.stem + ".gguf")
    if not gguf.exists():
        t0 = time.perf_counter()
        model_gguf(src, gguf.with_suffix(".part"), dims)
        os.replace(gguf.with_suffix(".part"), gguf)
        print(f"made {gguf} in {time.perf_counter() - t0:.1f} s")
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # keep a reference
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    lc = tmp / "lc.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = FTYPES["Q4_K"], True, threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(gguf).encode(), str(lc).encode(), ctypes.byref(params))
    t_lc = time.perf_counter() - t0
    assert rc == 0, rc
    print(f"Q4_K GGUF, {threads} threads (llama.cpp: in-process call, pure):")
    print(
        f"  llama.cpp llama_model_quantize       {t_lc:7.2f} s  {lc.stat().st_size / 2**20:8.1f} MiB"
    )
    for method in ("rtn", "mse"):
        out = tmp / f"fq-{method}.gguf"
        r = run_timed(fq_cmd("quantize", gguf, "-o", out, "--format", "Q4_K", "--pure", "--method", method,
                             "--threads", threads, "--json"), env())  # fmt: skip
        job = json.loads(r["stdout"]).get("seconds")
        job_txt = f", the job itself {job:.2f} s ({t_lc / job:.2f}x)" if job else ""
        print(f"  flightquant {method} (whole process)     {r['wall']:7.2f} s  "
              f"{out.stat().st_size / 2**20:8.1f} MiB  fq speed / llama.cpp {t_lc / r['wall']:.2f}x"
              f"{job_txt}; peak RSS {r['rss']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
