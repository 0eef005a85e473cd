"""The client-server protocol: action names, the pipeline header, error kinds and how
each kind travels. The server, the client, the metrics and the tests import it; nothing
here is spelled anywhere else.

Error kinds (gRPC's names, lower case) are what the server counts, logs and sends, and
what the client decides on. pyarrow's Flight transport carries a status code and a
message, but not every code: RESOURCE_EXHAUSTED travels as UNAVAILABLE with a message
that starts ``"RESOURCE_EXHAUSTED: "``, and an internal error of the server's own starts
``"internal error: "`` (a lost connection also arrives as INTERNAL or UNAVAILABLE, with
gRPC's words for it). A server that reads ahead (the client sent :data:`PIPELINE_HEADER`)
reports an error in band first: ``app_metadata`` ``{"error": {"code": KIND, "message":
...}}`` with no batch (:func:`encode_error`, :func:`decode_error`).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.flight as flight

__all__ = [
    "ACTIONS",
    "ERROR_KINDS",
    "PIPELINE_HEADER",
    "RETRIED",
    "decode_error",
    "encode_error",
    "error_kind",
    "exception_for",
    "server_message",
]

# -- actions ------------------------------------------------------------------------------

HEALTH = "health"
STATS = "stats"
CONFIG = "config"
CALIBRATION_LIST = "calibration-sessions"
CALIBRATION_DROP = "calibration-drop"

#: DoAction types and their descriptions (also the ListActions answer)
ACTIONS = {
    HEALTH: "liveness: {status, version, draining}",
    STATS: "counters: streams, batches, elements, bytes in/out, errors by kind, memory",
    CONFIG: "limits and defaults: max_streams, max_batch_bytes, memory_limit, idle_timeout, "
    "threads, options, build",
    CALIBRATION_LIST: "calibration sessions: [{session, layers, tokens, bytes, ...}]",
    CALIBRATION_DROP: 'drop a calibration session; body {"session": NAME}',
}

# -- pipelining ---------------------------------------------------------------------------

#: request header of a client that keeps sending without waiting for each answer and
#: ends the call on an in-band error message; the server then reads ahead
PIPELINE_HEADER = "x-flightquant-pipeline"
PIPELINE_VALUE = "1"

# -- error kinds --------------------------------------------------------------------------

INVALID_ARGUMENT = "invalid_argument"
UNAVAILABLE = "unavailable"
RESOURCE_EXHAUSTED = "resource_exhausted"
DEADLINE_EXCEEDED = "deadline_exceeded"
UNAUTHENTICATED = "unauthenticated"
CANCELLED = "cancelled"
INTERNAL = "internal"

#: every kind, in the order the counters list them
ERROR_KINDS = (
    INVALID_ARGUMENT,
    UNAVAILABLE,
    RESOURCE_EXHAUSTED,
    DEADLINE_EXCEEDED,
    UNAUTHENTICATED,
    CANCELLED,
    INTERNAL,
)

#: kinds a client resends elsewhere or later (a lost connection is UNAVAILABLE)
RETRIED = frozenset({UNAVAILABLE, RESOURCE_EXHAUSTED})

#: message prefixes of the kinds pyarrow's server cannot send as their own status code
RESOURCE_EXHAUSTED_PREFIX = "RESOURCE_EXHAUSTED: "
INTERNAL_PREFIX = "internal error: "

#: gRPC's words for a connection that went away (the transport gives only a message)
_CONNECTION_LOST = (
    "socket closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "stream removed",
    "failed to connect",
    "goaway",
    "rst_stream",
    "connection aborted",
    "end of tcp stream",
    "server disconnect",
)


def resource_exhausted_message(detail: str) -> str:
    return RESOURCE_EXHAUSTED_PREFIX + detail


def internal_message(detail: str) -> str:
    return f"{INTERNAL_PREFIX}{detail}; see server log"


def encode_error(kind: str, message: str) -> bytes:
    """The in-band error message (``app_metadata`` with no batch)."""
    return json.dumps({"error": {"code": kind, "message": message}}).encode()


def decode_error(app_metadata) -> tuple[str, str] | None:
    """``(kind, message)`` of an in-band error message, None for any other metadata."""
    if app_metadata is None:
        return None
    try:
        error = json.loads(app_metadata.to_pybytes()).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    return str(error.get("code")), str(error.get("message", "server error"))


def exception_for(kind: str, message: str) -> Exception:
    """What a client raises for an error of ``kind`` (INVALID_ARGUMENT: ``ArrowInvalid``,
    a ``ValueError``). DEADLINE_EXCEEDED in band is a stream the server ended for idling:
    raised as UNAVAILABLE, so the rows go on in a new stream."""
    if kind == INVALID_ARGUMENT:
        return pa.ArrowInvalid(message)
    if kind in RETRIED or kind == DEADLINE_EXCEEDED:
        return flight.FlightUnavailableError(message)
    if kind == INTERNAL:
        return flight.FlightInternalError(message)
    return flight.FlightServerError(message)


def server_message(exc: BaseException) -> str:
    """The server's message without pyarrow's transport decorations."""
    text = str(exc)
    for marker in (". Detail: ", ". gRPC client debug context"):
        i = text.find(marker)
        if i >= 0:
            text = text[:i]
    return text


def error_kind(exc: BaseException) -> str | None:
    """The kind of a failed call as the client sees it; None when the error is neither
    the server's nor the transport's (e.g. the caller's own)."""
    if isinstance(exc, flight.FlightUnavailableError):
        if server_message(exc).startswith(RESOURCE_EXHAUSTED_PREFIX):
            return RESOURCE_EXHAUSTED
        return UNAVAILABLE
    if isinstance(exc, flight.FlightTimedOutError):
        return DEADLINE_EXCEEDED
    if isinstance(exc, (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError)):
        return UNAUTHENTICATED
    if not isinstance(exc, (flight.FlightError, OSError, pa.ArrowException, ConnectionError)):
        return None
    text = str(exc).lower()
    if isinstance(exc, pa.ArrowInvalid) and "destination already closed" not in text:
        return INVALID_ARGUMENT
    if isinstance(exc, flight.FlightInternalError) and INTERNAL_PREFIX.rstrip() in text:
        return INTERNAL  # the server's own internal error, not the connection
    if any(m in text for m in _CONNECTION_LOST):
        return UNAVAILABLE
    if isinstance(exc, flight.FlightCancelledError):
        return CANCELLED
    return INTERNAL
