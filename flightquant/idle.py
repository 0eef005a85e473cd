"""Idle streams: find the streams whose client has gone quiet, and end them.

A DoExchange handler that waits for a client's next message sits in a blocking gRPC read,
and neither gRPC's sync API as pyarrow exposes it nor pyarrow itself can cancel a call
from the server side (``ServerCallContext`` has ``is_cancelled`` but no ``cancel``; the
handler must not return while another thread still reads from its stream). What does end
such a read is the end of the call's connection. So the :class:`IdleWatchdog` thread
checks every stream's last sign of life; a stream that has waited on its client (to send
the next message, or to take an answer) for longer than the idle timeout is ended thus:

1. unless the handler is writing, an in-band message tells the client why
   (``app_metadata`` ``{"error": {"code": "deadline_exceeded", "message": ...}}``, the
   form a read-ahead stream reports errors in; :class:`flightquant.Client` raises it as
   ``FlightTimedOutError``);
2. the server shuts down the TCP connection the call came on (found by the peer address
   gRPC reports): the handler's read ends, the handler returns, the slot and the memory
   reservation are freed; the client sees UNAVAILABLE "Socket closed" for anything else
   in flight on that connection (a gRPC channel reconnects on its next call).

A stream the server itself is busy with (waiting for memory, running the kernels) is never
idle. Other calls that share the idle stream's connection end with it: a client that
multiplexes streams on one channel and leaves one of them silent loses the others too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from urllib.parse import unquote

from . import protocol

__all__ = ["Activity", "IdleWatchdog", "drop_connection"]


class Activity:
    """One stream's signs of life, updated by its handler (and read-ahead) threads."""

    __slots__ = ("peer", "started", "last", "busy", "timed_out", "write_lock", "writer", "idle_for")

    def __init__(self, peer: str, writer=None):
        self.peer = peer
        self.started = self.last = time.monotonic()
        self.busy = 0  # > 0 while the server works on the stream (not waiting on the client)
        self.timed_out = False
        self.idle_for = 0.0
        self.writer = writer
        self.write_lock = threading.Lock()  # one writer at a time: handler or watchdog

    def touch(self) -> None:
        self.last = time.monotonic()

    def begin_work(self) -> None:
        self.busy += 1

    def end_work(self) -> None:
        self.busy -= 1
        self.last = time.monotonic()


class IdleWatchdog:
    """Ends streams that wait on their client for more than ``timeout`` seconds.

    ``local_port`` is the server's port (a connection is found by its two ends). With
    ``timeout=None`` no stream is ended for idling, but :meth:`end_waiting` still works.
    """

    def __init__(self, timeout: float | None, local_port: int, log: logging.Logger):
        self.timeout = None if timeout is None else float(timeout)
        self.local_port = local_port
        self.log = log
        self.expired = 0
        self._streams: set[Activity] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, activity: Activity) -> None:
        with self._lock:
            self._streams.add(activity)
            if self._thread is None and self.timeout is not None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="fq-idle", daemon=True)
                self._thread.start()

    def unregister(self, activity: Activity) -> None:
        with self._lock:
            self._streams.discard(activity)

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def end_waiting(self, code: str, message: str) -> int:
        """End now every stream that waits on its client (e.g. past a drain deadline)."""
        with self._lock:
            waiting = [a for a in self._streams if not a.timed_out and a.busy <= 0]
            for a in waiting:
                a.timed_out = True
        for a in waiting:
            self._end(a, code, message, "the drain deadline passed")
        return len(waiting)

    def _run(self) -> None:
        tick = min(1.0, max(0.05, self.timeout / 4))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                idle = [
                    a
                    for a in self._streams
                    if not a.timed_out and a.busy <= 0 and now - a.last > self.timeout
                ]
                for a in idle:
                    a.timed_out = True
                    a.idle_for = now - a.last
            for a in idle:
                try:
                    self._expire(a)
                except Exception:  # pragma: no cover - never let the watchdog die
                    self.log.exception("could not end the idle stream of %s", a.peer)

    def _expire(self, a: Activity) -> None:
        self.expired += 1
        self._end(
            a,
            protocol.DEADLINE_EXCEEDED,
            idle_message(a.idle_for, self.timeout),
            f"idle for {a.idle_for:.1f}s (idle timeout {self.timeout:g}s)",
        )

    def _end(self, a: Activity, code: str, message: str, why: str) -> None:
        told = False
        if a.writer is not None and a.write_lock.acquire(blocking=False):
            try:  # the handler is reading (not writing): gRPC allows one write beside it
                a.writer.write_metadata(protocol.encode_error(code, message))
                told = True
            except Exception:  # the client may be gone already
                pass
            finally:
                a.write_lock.release()
        if told:
            time.sleep(0.1)  # let gRPC hand the message to the socket before it closes
        dropped = drop_connection(a.peer, self.local_port)
        self.log.warning(
            "stream peer=%s ended, %s: %s",
            a.peer,
            why,
            "connection closed" if dropped else "its connection was already gone",
        )


def idle_message(idle_for: float, timeout: float) -> str:
    return (
        f"DEADLINE_EXCEEDED: the stream sent nothing (and took no answer) for {idle_for:.0f} s, "
        f"over this server's idle timeout of {timeout:g} s (--idle-timeout); the server ended "
        "it to free its slot: keep sending, end the stream when done (done_writing), or open "
        "a new stream when the data is ready"
    )


def _parse_peer(peer: str) -> tuple[str, int] | None:
    """``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5`` (possibly %-encoded) -> (host, port)."""
    kind, _, address = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def _same_host(a: str, b: str) -> bool:
    return a.removeprefix("::ffff:") == b.removeprefix("::ffff:")


def drop_connection(peer: str, local_port: int) -> int:
    """Shut down this process's TCP connection(s) from ``peer`` to ``local_port``.

    Only ``shutdown(2)``: the descriptors stay gRPC's, which sees the connection end and
    tears it down as if the client had gone. Returns how many connections matched.
    """
    where = _parse_peer(peer)
    if where is None:
        return 0
    host, port = where
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:  # pragma: no cover
        return 0
    dropped = 0
    for name in names:
        try:
            dup = os.dup(int(name))  # ours to close; the socket stays open for gRPC
        except (OSError, ValueError):
            continue
        try:
            sock = socket.socket(fileno=dup)
        except OSError:  # not a socket
            os.close(dup)
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            if sock.getsockname()[1] != local_port:
                continue
            remote = sock.getpeername()
            if remote[1] == port and _same_host(remote[0], host):
                sock.shutdown(socket.SHUT_RDWR)
                dropped += 1
        except OSError:  # a listening socket, or one closing right now
            pass
        finally:
            sock.close()
    return dropped
