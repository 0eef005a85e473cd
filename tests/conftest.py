"""Shared fixtures: real flightquant servers on loopback ports, always shut down."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest

SEED_SCHEMA = pa.schema(
    [
        ("layer_name", pa.string()),
        ("weights", pa.list_(pa.float32())),
        ("shape", pa.list_(pa.int64())),
    ]
)


def make_layer_batch(
    start: int = 0, rows: int = 3, elements: int = 300, seed: int | None = None
) -> pa.RecordBatch:
    """A batch of the seed layer schema: rows named ``layer.<i>``, float32 weights."""
    rng = np.random.default_rng(start if seed is None else seed)
    names, lists, shapes = [], [], []
    for i in range(start, start + rows):
        n = elements + (i % 5) * 7  # ragged rows, tail groups
        names.append(f"layer.{i}")
        lists.append(rng.standard_normal(n).astype(np.float32))
        shapes.append([n])
    offsets = np.zeros(rows + 1, np.int32)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.concatenate(lists) if lists else np.zeros(0, np.float32)
    weights = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))
    return pa.RecordBatch.from_arrays(
        [pa.array(names, pa.string()), weights, pa.array(shapes, pa.list_(pa.int64()))],
        schema=SEED_SCHEMA,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition"):
    """Poll ``condition`` until true or fail after ``timeout`` seconds (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


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
