"""Typed stub for the one-step RecordBatch assembly (``ext/_arrow.pyx``).

Called by :mod:`flightquant.codec` only: the specs must match ``schema`` exactly (the C
data interface carries no buffer sizes, so nothing can check them here).
"""

from typing import Any

import pyarrow as pa

# (length, null_count, buffers: tuple of buffer-protocol objects or None, children: specs)
Spec = tuple[int, int, tuple[Any, ...], tuple[Any, ...]]

def make_batch(
    schema: pa.Schema,
    num_rows: int,
    columns: list[int | pa.Array | Spec],
    source: pa.RecordBatch | None = None,
) -> pa.RecordBatch: ...
