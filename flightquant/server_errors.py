"""The server's errors: which kind an exception is, and what a handler raises for it.

One ladder for every handler: :func:`classify` turns an exception into ``(kind,
message)`` (the kinds of :mod:`flightquant.protocol`), :func:`to_flight` into the
exception pyarrow sends with the right status and no traceback.
"""

from __future__ import annotations

import pyarrow.flight as flight

from . import budget, protocol

__all__ = ["InvalidArgument", "Unimplemented", "classify", "to_flight", "CUT"]

# ---------------------------------------------------------------------------------------
# errors without tracebacks
#
# pyarrow turns a handler's non-Flight exception into a Status whose detail is
# ``traceback.format_exception(...)`` of it, and that text reaches the client ("...
# Detail: Python exception: Traceback (most recent call last): File ..."). ``raise ... from
# None`` does not help (the frames are still there), and there is no FlightError class for
# INVALID_ARGUMENT. When formatting fails, pyarrow falls back to "Python exception:
# <type name>" (PythonErrorDetail::ToString). The exceptions below make the formatting fail
# on purpose: ``traceback.TracebackException`` reads ``exc.__suppress_context__`` as an
# attribute, and ours raises. ``raise`` itself sets the flag at the C level, so raising
# works normally. These exceptions are made only to be raised out of a handler, never
# logged or shown elsewhere. tests/test_flight_server.py checks that no traceback leaks.


class _Unformattable(Exception):
    pass


class _NoTraceback:
    @property
    def __suppress_context__(self) -> bool:
        raise _Unformattable("flightquant: this exception carries no traceback by design")

    @__suppress_context__.setter
    def __suppress_context__(self, value: bool) -> None:
        pass


class InvalidArgument(_NoTraceback, ValueError):
    """Raised out of a handler: INVALID_ARGUMENT with just the message (no traceback)."""


class Unimplemented(_NoTraceback, NotImplementedError):
    """Raised out of a handler: UNIMPLEMENTED with just the message (no traceback)."""


def short(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


#: what a stream still running at the drain deadline is told
CUT = (
    "server is shutting down (drain deadline passed); resend the unanswered batches to "
    "another server"
)


def classify(
    exc: BaseException | None,
    *,
    batch: int,
    timed_out: bool = False,
    aborting: bool = False,
    idle: str = "",
    cancelled: bool = False,
) -> tuple[str, str]:
    """(error kind, client-facing message) of a handler's exception.

    ``timed_out``: the idle watchdog ended the stream (``idle`` says why), or the drain
    deadline did (``aborting``); ``cancelled``: the client cancelled the call; ``batch``:
    the index of the batch being served.
    """
    if timed_out:
        if aborting:
            return protocol.UNAVAILABLE, CUT
        return protocol.DEADLINE_EXCEEDED, idle
    if isinstance(exc, flight.FlightCancelledError) or (
        not isinstance(exc, flight.FlightError) and cancelled
    ):
        return protocol.CANCELLED, "stream cancelled by the client"
    if isinstance(exc, budget.BudgetExhausted):
        return protocol.RESOURCE_EXHAUSTED, protocol.resource_exhausted_message(str(exc))
    if isinstance(exc, MemoryError):  # numpy, pyarrow (ArrowMemoryError), the kernels
        return protocol.RESOURCE_EXHAUSTED, protocol.resource_exhausted_message(
            f"the server ran out of memory in batch {batch} ({short(exc, 200)}); "
            "retry later or on another server, or send smaller batches"
        )
    if isinstance(exc, flight.FlightUnavailableError):
        return protocol.UNAVAILABLE, str(exc)
    if isinstance(exc, flight.FlightError):
        return protocol.INTERNAL, str(exc)
    if isinstance(exc, ValueError):
        return protocol.INVALID_ARGUMENT, message(exc)
    return protocol.INTERNAL, protocol.internal_message(short(exc))


def to_flight(kind: str, text: str) -> Exception:
    """The exception a handler raises for an error of ``kind``: its status code, ``text``
    and no traceback (RESOURCE_EXHAUSTED travels as UNAVAILABLE, see protocol)."""
    if kind == protocol.INVALID_ARGUMENT:
        return InvalidArgument(text)
    if kind in (protocol.UNAVAILABLE, protocol.RESOURCE_EXHAUSTED):
        return flight.FlightUnavailableError(text)
    if kind == protocol.DEADLINE_EXCEEDED:
        return flight.FlightTimedOutError(text)
    if kind == protocol.CANCELLED:
        return flight.FlightCancelledError(text)
    if kind == protocol.UNAUTHENTICATED:
        return flight.FlightUnauthenticatedError(text)
    return flight.FlightInternalError(text)
