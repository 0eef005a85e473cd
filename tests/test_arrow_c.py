"""One-step RecordBatch assembly through the Arrow C data interface (``flightquant._arrow``)."""

from __future__ import annotations

import gc
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest

from flightquant import _arrow

SCHEMA = pa.schema([("id", pa.int64()), ("w", pa.list_(pa.float32())), ("s", pa.string())])


def _source():
    return pa.record_batch({"id": pa.array([7, 8, 9], pa.int64()), "s": ["a", None, "c"]})


def _w_spec(values, offsets):
    return (3, 0, (None, offsets), ((len(values), 0, (None, values), ()),))


def test_builds_without_copying_and_takes_source_columns():
    values = np.arange(6, dtype=np.float32)
    offsets = np.array([0, 1, 1, 6], np.int32)
    b = _arrow.make_batch(SCHEMA, 3, [0, _w_spec(values, offsets), 1], _source())
    b.validate(full=True)
    assert b.schema.equals(SCHEMA)
    assert b.to_pydict() == {
        "id": [7, 8, 9],
        "w": [[0.0], [], [1, 2, 3, 4, 5]],
        "s": ["a", None, "c"],
    }
    assert b.column("w").values.buffers()[1].address == values.ctypes.data  # no copy


def test_buffers_live_exactly_as_long_as_the_batch():
    values = np.arange(6, dtype=np.float32)
    offsets = np.array([0, 1, 1, 6], np.int32)
    before = sys.getrefcount(values)
    b = _arrow.make_batch(SCHEMA, 3, [0, _w_spec(values, offsets), 1], _source())
    assert sys.getrefcount(values) == before + 1
    col = b.column("w")
    del b
    gc.collect()
    assert sys.getrefcount(values) == before + 1  # the column still uses it
    assert col.to_pylist()[2] == [1, 2, 3, 4, 5]
    del col
    gc.collect()
    assert sys.getrefcount(values) == before


def test_released_from_another_thread():
    values = np.arange(6, dtype=np.float32)
    before = sys.getrefcount(values)
    box = [
        _arrow.make_batch(
            SCHEMA, 3, [0, _w_spec(values, np.array([0, 1, 1, 6], np.int32)), 1], _source()
        )
    ]
    t = threading.Thread(target=box.clear)
    t.start()
    t.join()
    gc.collect()
    assert sys.getrefcount(values) == before


def test_arrays_passed_as_objects_and_errors_release_everything():
    values = np.arange(6, dtype=np.float32)
    before = sys.getrefcount(values)
    src = _source()
    b = _arrow.make_batch(
        SCHEMA, 3, [src.column(0), _w_spec(values, np.array([0, 1, 1, 6], np.int32)), src.column(1)]
    )
    assert b.column("s").equals(src.column(1))
    del b
    with pytest.raises(IndexError, match="no column 5"):
        _arrow.make_batch(SCHEMA, 3, [0, _w_spec(values, np.array([0, 1, 1, 6], np.int32)), 5], src)
    with pytest.raises(ValueError, match="column 0 does not have 2 rows"):
        _arrow.make_batch(SCHEMA, 2, [0, _w_spec(values, np.array([0, 1, 1, 6], np.int32)), 1], src)
    part = src.slice(1)  # exported with sliced children: taking them keeps the slice
    two = (2, 0, (None, np.array([0, 2, 6], np.int32)), ((6, 0, (None, values), ()),))
    assert _arrow.make_batch(SCHEMA, 2, [0, two, 1], part).column("s").to_pylist() == [None, "c"]
    del two
    with pytest.raises(ValueError, match="contiguous"):  # no single address to point at
        _arrow.make_batch(
            SCHEMA,
            3,
            [0, _w_spec(np.arange(12, dtype=np.float32)[::2], np.array([0, 1, 1, 6], np.int32)), 1],
            src,
        )
    gc.collect()
    assert sys.getrefcount(values) == before
