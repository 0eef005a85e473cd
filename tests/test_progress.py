"""Progress, one owner (flightquant.progress): one call per tensor / row key, monotonic, the
last exactly 1.0, in-process and through fq.Client; a failing callback is logged, ignored."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

import flightquant as fq
from flightquant import progress
from tests.common import make_layer_batch


def _five() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {f"blk.{i}.w": rng.standard_normal((4, 32)).astype(np.float32) for i in range(5)}


def _check_per_key(calls, keys):
    assert [label for label, _ in calls] == list(keys)
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert fractions == [i / len(keys) for i in range(1, len(keys) + 1)]


def test_quantize_arrays_calls_once_per_tensor():
    arrays = _five()  # five small tensors travel in one batch: still five calls
    calls = []
    fq.quantize_arrays(arrays, bits=4, progress=lambda n, f: calls.append((n, f)))
    _check_per_key(calls, arrays)


def test_table_calls_once_per_row_key():
    table = pa.Table.from_batches([make_layer_batch(3 * i, 3) for i in range(3)])
    calls = []
    fq.quantize(table, bits=4, progress=lambda n, f: calls.append((n, f)))
    _check_per_key(calls, table.column(0).to_pylist())


def test_through_the_client_the_same_calls(server):
    s = server()
    arrays = _five()
    table = pa.Table.from_batches([make_layer_batch(3 * i, 3) for i in range(3)])
    local_a, local_t, remote_a, remote_t = [], [], [], []
    fq.quantize_arrays(arrays, bits=4, progress=lambda n, f: local_a.append((n, f)))
    fq.quantize(table, bits=4, progress=lambda n, f: local_t.append((n, f)))
    with fq.Client(s.location) as client:
        client.quantize_arrays(arrays, bits=4, progress=lambda n, f: remote_a.append((n, f)))
        client.quantize(table, bits=4, progress=lambda n, f: remote_t.append((n, f)))
    assert remote_a == local_a and remote_t == local_t
    _check_per_key(remote_a, arrays)


@pytest.mark.parametrize("where", ["in-process", "client"])
def test_a_failing_callback_is_logged_and_ignored(server, caplog, where):
    arrays = _five()
    calls = []

    def broken(name, fraction):
        calls.append(name)
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.WARNING, logger="flightquant.progress"):
        if where == "client":
            with fq.Client(server().location) as client:
                got = client.quantize_arrays(arrays, bits=4, progress=broken)
        else:
            got = fq.quantize_arrays(arrays, bits=4, progress=broken)
    assert calls == list(arrays)  # called every time, never stopped the work
    want = fq.quantize_arrays(arrays, bits=4)
    assert all(np.array_equal(got[k].codes, want[k].codes) for k in arrays)
    warnings = [r for r in caplog.records if "progress callback raised" in r.getMessage()]
    assert len(warnings) == len(arrays) and warnings[0].exc_info and not warnings[1].exc_info


def test_a_batch_without_a_string_key_is_one_call_labelled_by_its_index():
    batch = pa.record_batch({"w": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))})
    calls = []
    tracker = progress.Tracker(lambda n, f: calls.append((n, f)), 4, 2)
    tracker.done(batch)
    tracker.done(batch)
    tracker.finish()
    assert calls == [("batch 0", 0.5), ("batch 1", 1.0)]


def test_the_cli_bar_is_off_when_quiet():
    assert isinstance(progress.bar(100, "quantize", quiet=True), progress.NoBar)
