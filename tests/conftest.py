"""Shared fixtures: real flightquant servers on loopback ports, always shut down."""

from __future__ import annotations

import pytest
from common import make_layer_batch, mse_isas


@pytest.fixture
def layer_batch():
    """Factory: ``layer_batch(start=0, rows=3, elements=300)``."""
    return make_layer_batch


@pytest.fixture
def server():
    """Factory that starts ``Server("grpc://127.0.0.1:0", **kwargs)``; all are shut down.

    Teardown drains with a deadline, so a test that leaves a stream open fails instead of
    hanging the run.
    """
    from flightquant.server import Server

    started: list = []

    def start(**kwargs):
        kwargs.setdefault("drain_timeout", 10.0)
        s = Server("grpc://127.0.0.1:0", **kwargs)
        started.append(s)
        return s

    yield start
    leaked = []
    for s in started:
        if not s.drain(10.0):
            leaked.append(s.location)
    assert not leaked, f"streams still open at teardown on {leaked}"


@pytest.fixture(params=mse_isas())
def mse_isa(request):
    """Each native mse search loop this CPU runs, switched on for one test."""
    from flightquant import _kernels

    previous = _kernels.mse_isa(request.param)
    yield request.param
    _kernels.mse_isa(previous)
