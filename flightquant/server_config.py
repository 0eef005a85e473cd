"""The server's limits as one table: each setting's name, default, rule and help.

:class:`flightquant.Server` takes them as keywords and checks them here; ``flightquant
serve`` builds its flags from the same table (``--max-streams`` for ``max_streams``), so
a default and its help live in one place. The calibration sessions' limits are owned by
:mod:`flightquant.sessions` (its ``DEFAULTS``; :class:`~flightquant.sessions.SessionStore`
checks them); the table lists them for the flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .kernels import resolve_threads
from .sessions import DEFAULTS as SESSION_DEFAULTS

__all__ = ["SETTINGS", "DEFAULTS", "Setting", "check", "check_location"]


@dataclass(frozen=True)
class Setting:
    """One limit. ``kind``: ``count`` (integer >= 1), ``bytes`` (integer >= 1; the CLI
    takes 256MiB), ``seconds`` (number >= 0), ``timeout`` (number > 0; None: never; the
    CLI's 0 means never), ``threads`` (the kernels' rule). ``none``: what None means, or
    "" where None is not allowed."""

    name: str
    default: Any
    kind: str
    help: str
    none: str = ""
    owner: str = "server"  # "sessions": checked by the session store

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def help_text(self) -> str:
        """The flag's help, its default filled in (``{default}``)."""
        value = self.default
        if self.kind == "bytes" and value and value % (1 << 20) == 0:
            shown = f"{value >> 20}MiB"
        elif isinstance(value, float):
            shown = f"{value:g}"
        else:
            shown = str(value)
        return self.help.replace("{default}", shown)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "threads",
        None,
        "threads",
        "kernel threads per batch (default: auto, the cores less one shared by the streams)",
        none="auto",
    ),
    Setting(
        "max_streams",
        64,
        "count",
        "concurrent streams; more are refused with UNAVAILABLE (default {default})",
    ),
    Setting(
        "max_batch_bytes",
        256 << 20,
        "bytes",
        "largest input batch, e.g. 268435456 or 256MiB (default {default})",
    ),
    Setting(
        "memory_limit",
        None,
        "bytes",
        "bytes all streams together may hold, e.g. 4GiB (default: half of the smallest of "
        "the cgroup limit, RLIMIT_AS and physical memory)",
        none="half of what the process may use",
    ),
    Setting(
        "memory_wait",
        10.0,
        "seconds",
        "seconds a stream waits for memory before RESOURCE_EXHAUSTED (default {default})",
    ),
    Setting(
        "idle_timeout",
        60.0,
        "timeout",
        "seconds a stream may wait on its client before the server ends it; 0 = never "
        "(default {default})",
        none="never",
    ),
    Setting(
        "drain_timeout",
        30.0,
        "seconds",
        "seconds running streams get to finish on SIGTERM (default {default})",
    ),
    Setting(
        "max_sessions",
        SESSION_DEFAULTS["max_sessions"],
        "count",
        "calibration sessions open at once (default {default})",
        owner="sessions",
    ),
    Setting(
        "max_session_layers",
        SESSION_DEFAULTS["max_session_layers"],
        "count",
        "layers per calibration session (default {default})",
        owner="sessions",
    ),
    Setting(
        "max_session_width",
        SESSION_DEFAULTS["max_session_width"],
        "count",
        "columns per layer of a session (default {default})",
        owner="sessions",
    ),
    Setting(
        "session_idle_timeout",
        SESSION_DEFAULTS["session_idle_timeout"],
        "timeout",
        "seconds a calibration session may go unused before it is dropped; 0 = never "
        "(default {default})",
        none="never",
        owner="sessions",
    ),
)

#: every setting's default, by its keyword
DEFAULTS = {s.name: s.default for s in SETTINGS}
_BY_NAME = {s.name: s for s in SETTINGS}


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check(name: str, value: Any) -> Any:
    """``value`` for the setting ``name``, as the server keeps it (floats for seconds);
    ValueError naming the setting when it breaks the rule."""
    s = _BY_NAME[name]
    if value is None and s.none:
        return None
    if s.kind == "threads":
        resolve_threads(value)
        return value
    if s.kind in ("count", "bytes"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            either = "None or " if s.none else ""
            raise ValueError(f"{name} must be {either}an integer >= 1, got {value!r}")
        return value
    if s.kind == "seconds":
        if not (_is_number(value) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        return float(value)
    if not (_is_number(value) and value > 0):  # timeout
        raise ValueError(f"{name} must be None or a number > 0, got {value!r}")
    return float(value)


def check_location(location: str, tls_certificates) -> Any:
    """The parts of a ``grpc://`` or ``grpc+tls://`` location (TLS needs certificates)."""
    parts = urlsplit(location)
    if parts.scheme not in ("grpc", "grpc+tcp", "grpc+tls") or not parts.hostname:
        raise ValueError(
            f"location must look like grpc://host:port or grpc+tls://host:port, got {location!r}"
        )
    if parts.scheme == "grpc+tls" and not tls_certificates:
        raise ValueError("a grpc+tls:// location needs tls_certificates (certificate and key)")
    if tls_certificates and parts.scheme != "grpc+tls":
        raise ValueError(f"tls_certificates given but the location {location!r} is not grpc+tls://")
    return parts
