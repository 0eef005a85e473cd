"""Helpers for tests and benchmarks: a flightquant server in a child process, and the
memory, file descriptors and threads of a process read from /proc."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading

from flightquant.cli.serve import SERVING

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER_SCRIPT = """
import json, sys
from flightquant.server import Server
kwargs = json.loads(sys.argv[1])
server = Server("grpc://127.0.0.1:0", **kwargs)
print(json.dumps({"port": server.port, "pid": __import__("os").getpid()}), flush=True)
server.serve()
"""


def start_server_process(**kwargs) -> tuple[subprocess.Popen, int]:
    """Start ``flightquant.server.Server`` in a child process; return (process, port)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, json.dumps(kwargs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError("the server process exited before reporting its port")
    return proc, int(json.loads(line)["port"])


class ServeProcess:
    """``flightquant serve ARGS`` in a child process: the one way tests and benchmarks start
    the command. Its stdout lines go to a queue (:meth:`first_line` reads one with a
    deadline); with ``pump_stderr`` its stderr lines collect in :attr:`err`, otherwise
    ``proc.stderr`` is left to the caller. ``prefix`` runs it under another command (e.g.
    ``prlimit --as=N``); this tree comes first on the child's PYTHONPATH."""

    def __init__(self, *args: str, env=None, prefix=(), pump_stderr: bool = False):
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "flightquant", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.err: list[str] = []
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if pump_stderr:
            threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def first_line(self, timeout: float = 60) -> str:
        """The next stdout line, stripped; AssertionError when none comes in time."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise AssertionError("flightquant serve printed nothing") from None
        if line is None:
            detail = "".join(self.err) if self.err else self.proc.stderr.read()
            raise AssertionError(f"flightquant serve exited: {detail[-3000:]}")
        return line.strip()

    def wait_serving(self, timeout: float = 60) -> str:
        """Wait for ``flightquant serving on LOCATION ...`` and return the location."""
        line = self.first_line(timeout)
        assert line.startswith(SERVING), (line, "".join(self.err))
        self.serving_line = line
        return line.split()[3]

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (drain), then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def proc_usage(pid: int) -> dict[str, int]:
    """RSS (KiB), open fds and threads of a process, read from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_kib"] = int(value.split()[0])
            elif key == "Threads":
                out["threads"] = int(value.strip())
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class LlamaQuantizer:
    """llama.cpp's own quantizers (``ggml_quantize_chunk``: its ``quantize_row_*_ref``
    without an importance matrix, its ``quantize_row_*_impl`` with one) from
    llama-cpp-python's ``libggml-base``, through ctypes: the oracle of the ggml kernels' rtn
    bytes. ``FLIGHTQUANT_LLAMA_LIB`` names another
    ``libggml-base.so``. Use :func:`llama_quantizer`, which gives None when there is none.
    """

    def __init__(self, path: str):
        import ctypes

        self.path = path
        self.lib = ctypes.CDLL(path)
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip

    def quantize(self, x, name: str, n_per_row: int | None = None, importance=None):
        """ggml's bytes of the rows of ``x`` (float32; ``n_per_row`` weights a row, by
        default the largest multiple of the block size up to 4096 that divides ``x``; with
        ``importance``, float32 weights of a row, the rows are that long)."""
        import numpy as np

        from . import formats

        t = formats.get(name)
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
        imatrix = None
        if importance is not None:
            imatrix = np.ascontiguousarray(importance, np.float32).reshape(-1)
            n_per_row = imatrix.size
        if n_per_row is None:
            n_per_row = t.block_size
            while n_per_row * 2 <= min(x.size, 4096) and x.size % (n_per_row * 2) == 0:
                n_per_row *= 2
        out = np.zeros(t.row_bytes(x.size), np.uint8)
        if hasattr(self.lib, "ggml_quantize_init"):
            self.lib.ggml_quantize_init(t.ggml_type)
        if x.size:
            self.lib.ggml_quantize_chunk(
                t.ggml_type,
                x.ctypes.data,
                out.ctypes.data,
                0,
                x.size // n_per_row,
                n_per_row,
                None if imatrix is None else imatrix.ctypes.data,
            )
        return out


def llama_quantizer() -> LlamaQuantizer | None:
    """llama.cpp's quantizers when llama-cpp-python (or ``FLIGHTQUANT_LLAMA_LIB``) is there."""
    import importlib.util

    path = os.environ.get("FLIGHTQUANT_LLAMA_LIB")
    if not path:
        spec = importlib.util.find_spec("llama_cpp")
        for d in (spec.submodule_search_locations or []) if spec else []:
            candidate = os.path.join(d, "lib", "libggml-base.so")
            if os.path.exists(candidate):
                path = candidate
                break
    if not path or not os.path.exists(path):
        return None
    return LlamaQuantizer(path)


def llama_tool(name: str = "llama-quantize") -> str | None:
    """The path of one of llama.cpp's command-line tools (``llama-quantize``,
    ``llama-imatrix``), the oracles of the GGUF job and the imatrix files, or None:
    ``FLIGHTQUANT_LLAMA_QUANTIZE`` names llama-quantize (its siblings are looked for beside
    it, as a cmake build puts them), else the tool on ``PATH``. ``.ci/run`` builds both."""
    import shutil

    quantize = os.environ.get("FLIGHTQUANT_LLAMA_QUANTIZE")
    path = None
    if quantize:
        path = (
            quantize if name == "llama-quantize" else os.path.join(os.path.dirname(quantize), name)
        )
    else:
        path = shutil.which(name)
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None
