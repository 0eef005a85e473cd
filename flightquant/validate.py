"""Every batch is checked here before the codec reads a byte of it.

A batch that arrives over the network (or from a file, or from a caller who built it with
``pyarrow.Array.from_buffers``) is only as trustworthy as its sender: its offsets may point
past its buffers, its validity bitmap may be shorter than its rows, its null count may be
wrong, two columns may share a name. The codec reads buffers directly and passes columns
through untouched, so any of these would make it read (and send back) memory outside the
batch, or index the wrong column. :func:`validate_batch` refuses them first, with a
:class:`~flightquant.errors.CodecError` (INVALID_ARGUMENT over Flight) that names the
column. The codec calls it at both entry points (``quantize_batch``, ``dequantize_batch``),
so the library, the CLI and the server are all covered.

What is checked:

* the schema: column names are unique (every column is found by name);
* each column: ``Array.validate(full=True)``, i.e. buffer sizes, offsets within and
  monotonic, validity bitmaps long enough, null counts that match the bitmap, child
  arrays, dictionary indices, UTF-8 of strings;
* the batch: every column as long as the batch (``RecordBatch.validate``).

Full validation reads every offset and bitmap once (and every byte of string columns, for
UTF-8): linear in the batch, and small beside the kernels. A valid batch costs one C++
call; only a failing batch is walked column by column to name the culprit.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from .errors import CodecError, echo, shorten

__all__ = ["validate_batch", "validate_schema"]

_CAUSES = (pa.ArrowInvalid, pa.ArrowIndexError, pa.ArrowTypeError)


def validate_schema(schema: pa.Schema, *, where: str = "the batch") -> None:
    """Refuse a schema with two columns of the same name (linear in the columns)."""
    names = schema.names
    if len(set(names)) == len(names):
        return
    dupes = [name for name, count in Counter(names).items() if count > 1]
    shown = ", ".join(echo(n, 60) for n in dupes[:5]) + (", ..." if len(dupes) > 5 else "")
    raise CodecError(
        f"{where} has {len(dupes)} duplicated column name(s): {shown}; every column needs "
        "a name of its own (the codec finds columns by name): rename or drop the duplicates"
    )


def validate_batch(batch: pa.RecordBatch, *, where: str = "the batch") -> None:
    """Raise :class:`~flightquant.errors.CodecError` unless ``batch`` is fully valid.

    ``where`` starts the message (e.g. ``"input batch 3"``).

    Examples
    --------
    >>> import numpy as np, pyarrow as pa
    >>> validate_batch(pa.record_batch({"w": pa.array([[1.0]], pa.list_(pa.float32()))}))
    >>> offsets = pa.py_buffer(np.array([0, 3, 1], np.int32))  # not monotonic
    >>> bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"abc")])
    >>> try:
    ...     validate_batch(pa.record_batch([bad], names=["name"]))
    ... except ValueError as exc:
    ...     print(str(exc)[:52])
    the batch: column 'name' is not a valid Arrow array:
    """
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"expected a pyarrow.RecordBatch, got {type(batch).__name__}")
    validate_schema(batch.schema, where=where)
    try:
        batch.validate(full=True)
        return
    except _CAUSES as exc:
        whole = exc
    for i in range(batch.num_columns):  # which column: the first that fails on its own
        name = batch.schema.field(i).name
        try:
            batch.column(i).validate(full=True)
        except _CAUSES as exc:
            raise CodecError(
                f"{where}: column {echo(name, 100)} is not a valid Arrow array: "
                f"{shorten(str(exc))}; rebuild it with pyarrow (e.g. pa.array(...) or "
                "Array.validate(full=True) before sending)"
            ) from None
    raise CodecError(f"{where} is not a valid record batch: {shorten(str(whole))}") from None
