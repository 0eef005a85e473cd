"""The server's calibration sessions: named statistics that many streams feed at once.

A session is a :class:`flightquant.calibration.Accumulator` plus a reservation from the
server's :class:`flightquant.budget.MemoryBudget`: each layer holds ``8 * width`` bytes of
float64 sums (plus a fixed overhead), reserved before the layer is created, so sessions and
quantization streams together stay under ``--memory-limit``. Limits: how many sessions
(``max_sessions``), layers per session and columns per layer; a session nobody has fed or
read for ``idle_timeout`` seconds is dropped (by a background thread, and before a new
session is refused for the session limit).

A batch is reduced (validated and squared, the costly part) before any lock is taken; it
is then merged under the session's lock, or not at all when it does not fit (a width that
differs from the session's, too many layers, no memory): a bad batch changes nothing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from . import budget
from .calibration import (
    Accumulator,
    CalibrationError,
    batch_sums,
    layer_bytes,
)
from .options import check_session_name

__all__ = ["SessionStore", "SessionsExhausted", "DEFAULTS"]

#: bytes a session holds before its first layer
SESSION_OVERHEAD = 4096
#: the limits' defaults (``flightquant serve`` flags of the same names)
DEFAULTS = {
    "max_sessions": 16,
    "max_session_layers": 65536,
    "max_session_width": 1 << 20,
    "session_idle_timeout": 3600.0,
}


class SessionsExhausted(budget.BudgetExhausted):
    """No room for another session (RESOURCE_EXHAUSTED, as for memory)."""


@dataclass
class Session:
    name: str
    acc: Accumulator
    reservation: budget.Reservation
    created: float
    last_used: float
    busy: int = 0  # batches being merged right now
    dropped: bool = False
    streams: set = field(default_factory=set)

    def info(self, now: float) -> dict[str, Any]:
        with self.acc.lock:
            return {
                "session": self.name,
                "layers": len(self.acc.layers),
                "batches": self.acc.batches,
                "rows": self.acc.rows,
                "tokens": self.acc.tokens,
                "bytes": self.reservation.nbytes,
                "age_seconds": round(now - self.created, 3),
                "idle_seconds": round(now - self.last_used, 3),
            }


class SessionStore:
    """Named calibration sessions under a memory budget and limits.

    Examples
    --------
    >>> from flightquant.calibration import activation_batch
    >>> import numpy as np
    >>> store = SessionStore(budget.MemoryBudget(1 << 20), idle_timeout=None)
    >>> store.add("s", activation_batch({"w": np.ones((2, 4))}))["tokens"]
    2
    >>> [s["session"] for s in store.list()]
    ['s']
    """

    def __init__(
        self,
        memory: budget.MemoryBudget,
        *,
        max_sessions: int = DEFAULTS["max_sessions"],
        max_layers: int = DEFAULTS["max_session_layers"],
        max_width: int = DEFAULTS["max_session_width"],
        idle_timeout: float | None = DEFAULTS["session_idle_timeout"],
        memory_wait: float = 10.0,
        clock=time.monotonic,
    ):
        for key, value in (
            ("max_sessions", max_sessions),
            ("max_session_layers", max_layers),
            ("max_session_width", max_width),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if idle_timeout is not None and (
            isinstance(idle_timeout, bool)
            or not isinstance(idle_timeout, (int, float))
            or not idle_timeout > 0
        ):
            raise ValueError(
                f"session_idle_timeout must be None or a number > 0, got {idle_timeout!r}"
            )
        self.memory = memory
        self.max_sessions = max_sessions
        self.max_layers = max_layers
        self.max_width = max_width
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        self.memory_wait = float(memory_wait)
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self.created = 0
        self.dropped = 0
        self.expired = 0
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- the reaper ------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread that drops idle sessions (no-op without an idle timeout)."""
        if self.idle_timeout is None or self._reaper is not None:
            return
        self._reaper = threading.Thread(target=self._reap, name="fq-sessions", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        """Stop the reaper and drop every session (the server is shutting down)."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5.0)
        for name in list(self._sessions):
            self.drop(name)

    def _reap(self) -> None:
        period = min(5.0, max(0.05, self.idle_timeout / 4))
        while not self._stop.wait(period):
            self.expire()

    def expire(self) -> int:
        """Drop the sessions idle for longer than the idle timeout; returns how many."""
        if self.idle_timeout is None:
            return 0
        now = self._clock()
        with self._lock:
            idle = [
                s
                for s in self._sessions.values()
                if not s.busy and now - s.last_used > self.idle_timeout
            ]
        n = 0
        for s in idle:
            if self._drop(s, idle_only=True):
                n += 1
        with self._lock:
            self.expired += n
        return n

    # -- sessions --------------------------------------------------------------------
    def _session(self, name: str) -> Session:
        """The session ``name``, created if new (marked busy: the caller must unmark)."""
        check_session_name(name)
        for attempt in range(2):
            with self._lock:
                s = self._sessions.get(name)
                if s is not None:
                    s.busy += 1
                    return s
                full = len(self._sessions) >= self.max_sessions
            if not full:
                break
            if attempt == 0:
                self.expire()
        if full:
            raise SessionsExhausted(
                f"cannot open calibration session {name!r}: {self.max_sessions} sessions are "
                "open (--max-sessions); drop one (action 'calibration-drop'), or wait for "
                "idle ones to expire"
            )
        reservation = self.memory.reserve(
            SESSION_OVERHEAD, self.memory_wait, f"calibration session {name!r}"
        )
        now = self._clock()
        with self._lock:
            s = self._sessions.get(name)
            if s is not None:  # another stream created it meanwhile
                reservation.release()
            elif len(self._sessions) >= self.max_sessions:
                reservation.release()
                raise SessionsExhausted(
                    f"cannot open calibration session {name!r}: {self.max_sessions} sessions "
                    "are open (--max-sessions)"
                )
            else:
                acc = Accumulator(max_layers=self.max_layers, max_width=self.max_width)
                s = self._sessions[name] = Session(name, acc, reservation, now, now)
                self.created += 1
            s.busy += 1
            return s

    def _done(self, s: Session) -> None:
        with self._lock:
            s.busy -= 1
            s.last_used = self._clock()

    def add(self, name: str, batch: pa.RecordBatch, reserve=None) -> dict[str, Any]:
        """Add a batch of activations to session ``name`` (created if new).

        ``reserve(nbytes)`` is called before the batch's reduction allocates (the server
        grows the batch's reservation). Returns the batch's totals and the session's
        (layers, tokens). Raises :class:`CalibrationError` for a bad batch,
        :class:`SessionsExhausted` or :class:`budget.BudgetExhausted` when there is no
        room; either way the session keeps what it had. A new layer takes over the
        reduction's array, so the session's reservation and the batch's overlap until the
        batch's is released: counted twice for a moment, never not at all.
        """
        # outside every lock: the costly part
        sums = batch_sums(batch, max_width=self.max_width, reserve=reserve)
        while True:
            s = self._session(name)
            try:
                with s.acc.lock:
                    if s.dropped:  # dropped between lookup and lock: start a new one
                        continue
                    new = s.acc.new_layers(sums)
                    if new:
                        s.reservation.resize(
                            s.reservation.nbytes + sum(layer_bytes(w) for w in new.values()),
                            self.memory_wait,
                            f"calibration session {name!r} ({len(new)} new layers)",
                        )
                    s.acc._merge(sums)
                    out = sums.totals()
                    out["session"] = name
                    out["session_layers"] = len(s.acc.layers)
                    out["session_tokens"] = s.acc.tokens
                    return out
            finally:
                self._done(s)

    def get(self, name: str) -> Accumulator:
        """The statistic of session ``name``; :class:`CalibrationError` if there is none."""
        check_session_name(name)
        with self._lock:
            s = self._sessions.get(name)
            if s is None:
                raise CalibrationError(
                    f"no calibration session {name!r} on this server (open sessions: "
                    f"{', '.join(sorted(self._sessions)) or 'none'}); it may have expired "
                    "after --session-idle-timeout"
                )
            s.last_used = self._clock()
            return s.acc

    def drop(self, name: str) -> bool:
        """Drop session ``name`` and give its memory back; False if there was none."""
        check_session_name(name)
        with self._lock:
            s = self._sessions.get(name)
        return s is not None and self._drop(s, idle_only=False)

    def _drop(self, s: Session, idle_only: bool) -> bool:
        with s.acc.lock:
            with self._lock:
                if s.dropped or self._sessions.get(s.name) is not s:
                    return False
                if idle_only and (
                    s.busy or self._clock() - s.last_used <= (self.idle_timeout or 0)
                ):
                    return False
                del self._sessions[s.name]
                s.dropped = True
                self.dropped += 1
            s.acc.layers.clear()
            s.reservation.release()
        return True

    def list(self) -> list[dict[str, Any]]:
        """One dict per session: name, layers, batches, rows, tokens, bytes, age, idle."""
        now = self._clock()
        with self._lock:
            sessions = sorted(self._sessions.values(), key=lambda s: s.name)
        return [s.info(now) for s in sessions]

    def snapshot(self) -> dict[str, Any]:
        """The ``calibration`` part of the server's ``stats``."""
        sessions = self.list()
        with self._lock:
            return {
                "sessions": len(sessions),
                "layers": sum(s["layers"] for s in sessions),
                "tokens": sum(s["tokens"] for s in sessions),
                "bytes": sum(s["bytes"] for s in sessions),
                "created": self.created,
                "dropped": self.dropped,
                "expired": self.expired,
            }

    def config(self) -> dict[str, Any]:
        """The limits, as the server's ``config`` action reports them."""
        return {
            "max_sessions": self.max_sessions,
            "max_session_layers": self.max_layers,
            "max_session_width": self.max_width,
            "session_idle_timeout": self.idle_timeout,
        }
