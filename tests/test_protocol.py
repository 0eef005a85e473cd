"""flightquant.protocol: the one owner of action names, error kinds and their encodings."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flightquant import metrics, protocol


def test_every_kind_round_trips_in_band():
    for kind in protocol.ERROR_KINDS:
        meta = pa.py_buffer(protocol.encode_error(kind, f"{kind} happened"))
        assert protocol.decode_error(meta) == (kind, f"{kind} happened")


@pytest.mark.parametrize("meta", [None, b"", b"not json", b"[1]", b'{"error": 3}', b'{"rows": 2}'])
def test_other_metadata_is_no_error(meta):
    assert protocol.decode_error(None if meta is None else pa.py_buffer(meta)) is None


@pytest.mark.parametrize(
    "exc, kind",
    [
        (flight.FlightUnavailableError("server busy"), protocol.UNAVAILABLE),
        (
            flight.FlightUnavailableError(protocol.resource_exhausted_message("no memory")),
            protocol.RESOURCE_EXHAUSTED,
        ),
        (flight.FlightTimedOutError("deadline"), protocol.DEADLINE_EXCEEDED),
        (flight.FlightUnauthenticatedError("token"), protocol.UNAUTHENTICATED),
        (pa.ArrowInvalid("bad option"), protocol.INVALID_ARGUMENT),
        (flight.FlightInternalError(protocol.internal_message("boom")), protocol.INTERNAL),
        (flight.FlightInternalError("Socket closed"), protocol.UNAVAILABLE),
        (OSError("Connection reset by peer"), protocol.UNAVAILABLE),
        (flight.FlightCancelledError("cancelled"), protocol.CANCELLED),
        (KeyError("mine"), None),
    ],
)
def test_error_kind_of_what_the_client_sees(exc, kind):
    assert protocol.error_kind(exc) == kind


def test_in_band_kinds_raise_what_the_client_retries():
    # a kind the client must not retry stays unretried once raised, and the reverse
    for kind in protocol.ERROR_KINDS:
        raised = protocol.exception_for(kind, "x")
        retried = protocol.error_kind(raised) in protocol.RETRIED
        expect = kind in protocol.RETRIED or kind == protocol.DEADLINE_EXCEEDED
        assert retried == expect, kind


def test_the_counters_count_the_protocol_kinds():
    assert list(metrics.Counters().errors) == list(protocol.ERROR_KINDS)
