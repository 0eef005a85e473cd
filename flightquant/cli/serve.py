"""``flightquant serve``: run the Flight server until SIGTERM/SIGINT, then drain.

On start it prints one line to stdout, ``flightquant serving on <location>`` (plus the
health port when enabled), so scripts started with ``--port 0`` can read the real port.
SIGTERM or SIGINT drains: new streams are refused with UNAVAILABLE, health reports
NOT_SERVING, running streams get ``--drain-timeout`` seconds to finish; after that the
streams still open are cut off (UNAVAILABLE at their next batch; a client that went silent
is dropped with the process). Exit status 0 after SIGTERM/SIGINT (a warning is logged when
streams were cut off), 2 for bad arguments or a port that cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading

#: the first line ``serve`` prints: ``flightquant serving on LOCATION [(health on port N, ...)]``
SERVING = "flightquant serving on"

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(text: str) -> int:
    """``268435456``, ``256MiB``, ``256M``, ``1GiB`` -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive size in bytes such as 268435456, 256MiB or 1GiB, got {text!r}"
        )
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _UNITS[unit]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="run the Flight quantization server",
        description=(
            "Run the Arrow Flight server that quantizes the float tensors streamed to it "
            "(DoExchange; the command is the options JSON). SIGTERM drains and exits."
        ),
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)"
    )
    p.add_argument("--port", type=_port, default=8815, help="port (default 8815; 0 = any free)")
    _add_limits(p, "threads", "max_streams", "max_batch_bytes", "memory_limit")
    _add_limits(p, "memory_wait", "idle_timeout")
    p.add_argument("--tls-cert", help="PEM certificate chain; serves grpc+tls://")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)",
    )
    p.add_argument(
        "--token-file",
        help="file holding the bearer token clients must send "
        "(default: $FLIGHTQUANT_TOKEN when set, else no authentication)",
    )
    p.add_argument(
        "--health-port",
        type=_port,
        default=None,
        help="serve grpc.health.v1 on this port (0 = any free)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = any free); plain "
        "HTTP, not covered by TLS or the token",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="interface of --metrics-port (default 127.0.0.1, whatever --host is)",
    )
    _add_limits(p, "drain_timeout", "max_sessions", "max_session_layers", "max_session_width")
    _add_limits(p, "session_idle_timeout")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="stderr lines as text (default) or one JSON object per line: one per finished "
        "stream, plus start, drain and stop",
    )
    p.set_defaults(func=run)
    return p


#: the flag's parser of each kind of limit (flightquant.server_config)
_TYPES = {
    "threads": _positive_int,
    "count": _positive_int,
    "bytes": _size,
    "seconds": _seconds,
    "timeout": _seconds,  # 0 = never
}


def _add_limits(p: argparse.ArgumentParser, *names: str) -> None:
    """The flags of the server's limits, from :data:`flightquant.server_config.SETTINGS`
    (its default, its help)."""
    from ..server_config import SETTINGS

    for s in SETTINGS:
        if s.name in names:
            p.add_argument(s.flag, type=_TYPES[s.kind], default=s.default, help=s.help_text)


def _limits(args: argparse.Namespace) -> dict:
    """The limits as Server keywords (a timeout of 0 means never: None)."""
    from ..server_config import SETTINGS

    out = {}
    for s in SETTINGS:
        value = getattr(args, s.name)
        out[s.name] = (value or None) if s.kind == "timeout" else value
    return out


#: what ``flightquant serve`` sets (unless already set) when it runs under RLIMIT_AS
_AS_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}
_AS_MARK = "FLIGHTQUANT_AS_TUNED"


def _tune_for_address_space_limit() -> None:
    """Under RLIMIT_AS, restart once with allocators that do not reserve address space.

    RLIMIT_AS counts address space, not memory: mimalloc (pyarrow's default pool)
    reserves 1 GiB arenas and glibc up to 8 per core 64 MiB arenas, so a server under a
    3 GiB limit ran out of address space with a third of it in use, and gRPC crashes
    when its own allocations fail. These must be set before pyarrow loads, hence the
    restart (once: the marker variable stops a loop).
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or os.environ.get(_AS_MARK):
        return
    env = dict(os.environ, **{_AS_MARK: "1"})
    for key, value in _AS_ENV.items():
        env.setdefault(key, value)
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    print(
        f"flightquant serve: RLIMIT_AS is {soft} bytes: restarting with "
        + " ".join(f"{k}={env[k]}" for k in _AS_ENV),
        file=sys.stderr,
        flush=True,
    )
    try:
        os.execve(sys.executable, argv, env)
    except OSError as exc:  # pragma: no cover - keep serving as we are
        print(f"flightquant serve: could not restart ({exc}); continuing", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"flightquant serve: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    _tune_for_address_space_limit()
    from .. import logs, security

    logs.configure(args.log_format, getattr(logging, args.log_level))
    from ..server import Server

    if (args.tls_cert is None) != (args.tls_key is None):
        return _fail("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        return _fail("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
    try:
        token = security.load_token(args.token_file)
        certs = roots = None
        if args.tls_cert is not None:
            certs, roots = security.read_tls_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    except ValueError as exc:
        return _fail(str(exc))

    host = f"[{args.host}]" if ":" in args.host else args.host
    scheme = "grpc+tls" if certs else "grpc"
    try:
        server = Server(
            f"{scheme}://{host}:{args.port}",
            auth_token=token,
            tls_certificates=certs,
            verify_client=roots is not None,
            root_certificates=roots,
            health_port=args.health_port,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            **_limits(args),
        )
    except (ValueError, OSError) as exc:
        return _fail(f"cannot start the server on {scheme}://{host}:{args.port}: {exc}")
    except Exception as exc:  # pyarrow reports a busy port as ArrowException/FlightError
        return _fail(
            f"cannot start the server on {scheme}://{host}:{args.port}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
            "(is the port already in use?)"
        )

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log = logging.getLogger("flightquant.server")
    line = f"{SERVING} {server.location}"
    extra = []
    if server.health_port is not None:
        extra.append(f"health on port {server.health_port}")
    if server.metrics_port is not None:
        extra.append(f"metrics on port {server.metrics_port}")
    if extra:
        line += f" ({', '.join(extra)})"
    print(line, flush=True)
    threads = args.threads or "auto (cores - 1, shared by streams)"
    logs.event(
        log,
        "start",
        f"{line}; max_streams={args.max_streams} max_batch_bytes={args.max_batch_bytes} "
        f"memory_limit={server.memory_limit} ({server.config()['memory_limit_source']}) "
        f"idle_timeout={server.idle_timeout} threads={threads} tls={bool(certs)} "
        f"auth={token is not None}",
        location=server.location,
        health_port=server.health_port,
        metrics_port=server.metrics_port,
        max_streams=args.max_streams,
        max_batch_bytes=args.max_batch_bytes,
        memory_limit=server.memory_limit,
        idle_timeout=server.idle_timeout,
        threads=args.threads,
        tls=bool(certs),
        auth=token is not None,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    logs.event(
        log,
        "drain",
        f"signal received: draining (deadline {args.drain_timeout:.1f}s)",
        deadline=args.drain_timeout,
        streams_active=server.stats()["streams_active"],
    )
    clean = server.drain()
    if not clean:
        # the deadline is the policy the operator chose, so this is still a normal stop
        logs.event(
            log,
            "stop",
            "stopped: streams still open at the drain deadline were cut off",
            logging.WARNING,
            clean=False,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # a stalled stream keeps pyarrow's shutdown waiting; do not wait for it at exit
        os._exit(0)
    logs.event(log, "stop", "stopped", clean=True)
    return 0
