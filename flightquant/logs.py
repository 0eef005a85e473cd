"""The server's log lines: one call, rendered as text or as one JSON object per line.

An event (a finished stream, start, drain, stop) is logged once, with its fields attached
to the record; the text formatter prints the human line, :class:`JsonFormatter` prints the
fields as JSON. Any other record becomes ``{"event": "log", "level", "logger", "message"}``
(plus ``exception``, the traceback as one string), so every line of a ``--log-format json``
server parses. Fields carry sizes, counts and messages only: never a token or a payload
byte (error messages are bounded like the client's, see :mod:`flightquant.errors`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from .errors import MESSAGE_LIMIT, shorten

__all__ = ["JsonFormatter", "STREAM_KEYS", "configure", "event", "stream"]

#: the record attribute that holds an event's fields
_ATTR = "flightquant_event"
#: the keys of a ``stream`` event, in order
STREAM_KEYS = (
    "event",
    "peer",
    "op",
    "format",
    "batches",
    "rows",
    "input_bytes",
    "output_bytes",
    "seconds",
    "status",
    "error",
)
FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def event(log: logging.Logger, name: str, text: str, level: int = logging.INFO, **fields) -> None:
    """Log ``text`` (the text line) carrying ``{"event": name, **fields}`` for JSON."""
    if log.isEnabledFor(level):
        log.log(level, "%s", text, extra={_ATTR: {"event": name, **fields}})


def stream(
    log: logging.Logger,
    *,
    peer: str,
    op: str,
    format: str,
    batches: int,
    rows: int,
    input_bytes: int,
    output_bytes: int,
    seconds: float,
    status: str,
    error: str | None,
) -> None:
    """The one line of a finished (or refused) stream."""
    if not log.isEnabledFor(logging.INFO):
        return
    error = None if error is None else shorten(error, MESSAGE_LIMIT)
    text = (
        f"stream peer={peer} op={op} format={format} batches={batches} rows={rows} "
        f"bytes_in={input_bytes} bytes_out={output_bytes} seconds={seconds:.3f} outcome={status}"
    )
    if error is not None:
        text += f" error={error!r}"
    fields: dict[str, Any] = {
        "peer": peer,
        "op": op,
        "format": format,
        "batches": batches,
        "rows": rows,
        "input_bytes": input_bytes,
        "output_bytes": output_bytes,
        "seconds": round(seconds, 6),
        "status": status,
        "error": error,
    }
    log.info("%s", text, extra={_ATTR: {"event": "stream", **fields}})


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    Examples
    --------
    >>> record = logging.LogRecord("x", logging.WARNING, "", 0, "low on %s", ("memory",), None)
    >>> JsonFormatter().format(record)
    '{"event": "log", "level": "WARNING", "logger": "x", "message": "low on memory"}'
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _ATTR, None)
        if fields is None:
            fields = {
                "event": "log",
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            if record.exc_info:
                fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str)


def configure(log_format: str = "text", level: int | str = logging.INFO, stream=None) -> None:
    """Log to ``stream`` (default stderr) in ``log_format`` (``text`` or ``json``)."""
    if log_format not in FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
