"""Typed stub for the codec engine (``ext/_engine.pyx``).

Built and called by :mod:`flightquant.codec` only: a plan per input schema, then ``run``
per validated batch. ``run`` returns ``(0, batch, elements, kernel_seconds, sse,
max_abs_error)``, or ``(status, input_column, row, a, b, c, d, value)`` when the batch
cannot be taken; ``codec._fail`` turns each status (``STATUS_NAMES``) into its message.
"""

import pyarrow as pa

STATUS_NAMES: dict[int, str]

class QuantizePlan:
    def __init__(
        self,
        schema: pa.Schema,
        # per input column: None (passed through), "consumed" (an importance column) or
        # (kind, itemsize, list_size, ggml code, block_size, type_size, importance column,
        #  its kind, its list size)
        columns: list[tuple[int, int, int, int, int, int, int, int, int] | str | None],
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
        stats: bool,
        scale_dtype: int = 0,
    ) -> None: ...
    def run(
        self, batch: pa.RecordBatch, n_threads: int, trace: list[int] | None = None
    ) -> tuple: ...

class DequantizePlan:
    def __init__(self, schema: pa.Schema, columns: list[int | tuple]) -> None: ...
    def run(
        self, batch: pa.RecordBatch, n_threads: int, trace: list[int] | None = None
    ) -> tuple: ...
