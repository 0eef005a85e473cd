"""Typed stub for the codec's one-call path (``ext/_fastpath.pyx``).

Built and called by :mod:`flightquant.codec` only: a plan per input schema, then
``run`` per batch. ``run`` returns None whenever the batch needs the codec's general
path (which then raises the error, if there is one).
"""

import pyarrow as pa

class QuantizePlan:
    def __init__(
        self,
        schema: pa.Schema,
        columns: list[tuple[int, int, int] | None],
        bits: int,
        scheme: int,
        method: int,
        group_size: int,
        groups_per_block: int,
        qmin: int,
        qmax: int,
        offset: int,
        has_clip: bool,
        clip: float,
        asymmetric: bool,
    ) -> None: ...
    def run(
        self, batch: pa.RecordBatch, n_threads: int, trace: list[int] | None = None
    ) -> tuple[pa.RecordBatch, int, float] | None: ...

class DequantizePlan:
    def __init__(self, schema: pa.Schema, columns: list[int | tuple]) -> None: ...
    def run(
        self, batch: pa.RecordBatch, n_threads: int, trace: list[int] | None = None
    ) -> tuple[pa.RecordBatch, int, float] | None: ...
