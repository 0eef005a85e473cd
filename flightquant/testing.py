"""Helpers for tests and benchmarks: a flightquant server in a child process, and the
memory, file descriptors and threads of a process read from /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
