"""The in-process Python API: quantize Arrow data or NumPy arrays without a server.

All the logic lives in the codec; the server and the client call the same functions, so a
result is the same bit for bit wherever it was computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar, Union

import numpy as np
import pyarrow as pa

from . import codec, kernels
from .arrays import (
    DTYPE,
    NAME,
    SHAPE,
    WEIGHTS,
    QuantizedTensor,
    arrays_to_batches,
    batches_to_results,
    with_importance,
)
from .errors import NonFiniteError
from .options import QuantOptions, check_importance_method
from .progress import Progress, Tracker

Data = Union[pa.Table, pa.RecordBatch, Iterable[pa.RecordBatch]]  # noqa: UP007 (runtime alias, py3.10)
T = TypeVar("T", pa.Table, pa.RecordBatch)

__all__ = [
    "DTYPE",
    "NAME",
    "SHAPE",
    "WEIGHTS",
    "QuantizedTensor",
    "apply",
    "arrays_to_batches",
    "batches_to_results",
    "dequantize",
    "dequantize_arrays",
    "quantize",
    "quantize_arrays",
]


def apply(
    data: Data, options: QuantOptions, threads: int | None = None, progress: Progress | None = None
) -> Any:
    """Run the codec over a Table, a RecordBatch or an iterable of RecordBatches.

    Returns the same kind of container; an iterable gives a lazy iterator.
    ``progress(label, fraction)`` is called after each row (:mod:`flightquant.progress`).
    """
    if isinstance(data, pa.RecordBatch):
        tracker = Tracker(progress, data.num_rows, 1)
        out = codec.process_batch(data, options, threads=threads)[0]
        tracker.done(data)
        tracker.finish()
        return out
    if isinstance(data, pa.Table):
        schema = codec.output_schema(data.schema, options)
        batches = data.to_batches()
        tracker = Tracker(progress, data.num_rows, len(batches))
        out = []
        for b in batches:
            out.append(codec.process_batch(b, options, threads=threads)[0])
            tracker.done(b)
        tracker.finish()
        return pa.Table.from_batches(out, schema=schema)
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be a pyarrow.Table, a pyarrow.RecordBatch or an iterable of "
            f"RecordBatches, got {type(data).__name__}"
            + (
                "; for a dict of NumPy arrays use quantize_arrays"
                if isinstance(data, Mapping)
                else ""
            )
        )
    total_rows = total_batches = None
    if isinstance(data, (list, tuple)) and all(isinstance(b, pa.RecordBatch) for b in data):
        total_rows, total_batches = sum(b.num_rows for b in data), len(data)
    return _apply_iter(iter(data), options, threads, Tracker(progress, total_rows, total_batches))


def _apply_iter(
    batches: Iterator, options: QuantOptions, threads, tracker: Tracker
) -> Iterator[pa.RecordBatch]:
    for i, batch in enumerate(batches):
        if not isinstance(batch, pa.RecordBatch):
            raise TypeError(
                f"item {i} of the iterable is a {type(batch).__name__}, not a RecordBatch"
            )
        out = codec.process_batch(batch, options, threads=threads)[0]
        tracker.done(batch)
        yield out
        # the caller has this batch now: hold neither it nor its input while computing the
        # next one (a streamed job's peak memory is then one batch, not two)
        del out, batch
    tracker.finish()


def quantize(
    data: Data,
    *,
    format: str = "native",
    bits: int | None = None,
    group_size: int | None = None,
    scheme: str | None = None,
    method: str = "rtn",
    clip: float | None = None,
    columns: list[str] | None = None,
    stats: bool = False,
    importance: Mapping[str, Any] | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> Any:
    """Quantize the float tensor columns of Arrow data in-process.

    Parameters
    ----------
    data : pyarrow.Table, pyarrow.RecordBatch or iterable of RecordBatch
        Columns of ``list``/``large_list``/``fixed_size_list`` of float16/32/64 are
        quantized (all of them, or those named in ``columns``); others pass through.
    format : {"native", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0", "IQ4_NL", "IQ4_XS"}
        ``native`` (wire format v1: ``bits``, ``scheme``, ``group_size`` apply) or one of
        llama.cpp's ggml block types (the codes of a row are ggml's bytes for it; rows must
        be whole blocks; ``bits``, ``scheme``, ``group_size`` are implied).
    bits : {2, 4, 8}, default 4 (2 for ``scheme="ternary"``)
    group_size : int, default 128
    scheme : {"asymmetric", "symmetric", "ternary"}, default "asymmetric"
    method : {"rtn", "mse"}
        ``rtn``: round to nearest (for ggml types, ggml's reference quantizer, byte for
        byte); ``mse``: flightquant's search for a lower squared error, same format.
    clip : float, optional
        Clamp inputs to ``[-clip, clip]`` first.
    columns : list of str, optional
    stats : bool
        Add per-row ``<c>_mse`` and ``<c>_max_abs_error`` columns.
    importance : dict, optional
        Row key (the value of the first string column, e.g. the layer name) -> that
        tensor's importance vector ``w`` of ``k`` weights (its row length): the tensor is
        quantized as rows of ``k``, element ``j`` of each weighted by ``w[j]`` (ggml types:
        ``rtn`` is llama.cpp's imatrix path; native: needs ``method="mse"``). Rows whose
        key is not in it get none; a key no row has is an error for a Table or RecordBatch
        (an iterable is not read ahead to check). A column ``<c>_importance`` (list of
        float32, one vector per row) in the data does the same.
    threads : int, optional
        Kernel threads; None uses every allowed core.
    progress : callable, optional
        ``progress(label, fraction)`` after each row: its key (e.g. the layer name) and
        the fraction of rows done, rising to exactly 1.0; its exceptions are logged, ignored.

    Returns
    -------
    The same kind of container with wire-format columns (``docs/wire-format.md``).

    Examples
    --------
    >>> import pyarrow as pa, flightquant as fq
    >>> t = pa.table({"w": pa.array([[0.5, -1.0, 2.0]], pa.list_(pa.float32()))})
    >>> fq.quantize(t, bits=8).column_names
    ['w', 'w_scales', 'w_zero_points', 'w_numel']
    >>> t32 = pa.table({"w": pa.array([[0.5] * 32], pa.list_(pa.float32()))})
    >>> block = fq.quantize(t32, format="Q8_0").column("w")[0].as_py()  # ggml's block_q8_0
    >>> len(block), block[2:] == bytes([127] * 32)                      # fp16 d, 32 int8 codes
    (34, True)
    """
    opts = QuantOptions.from_mapping(
        {
            "format": format,
            "bits": bits,
            "group_size": group_size,
            "scheme": scheme,
            "method": method,
            "clip": clip,
            "columns": columns,
            "stats": stats,
        }
    )
    kernels.resolve_threads(threads)
    if importance is not None:
        data = with_importance(data, importance, opts.columns)
    return apply(data, opts, threads, progress)


def dequantize(data: Data, *, threads: int | None = None, progress: Progress | None = None) -> Any:
    """Restore quantized Arrow data to floats (original dtypes, list types, lengths, nulls).

    Examples
    --------
    >>> import pyarrow as pa, flightquant as fq
    >>> t = pa.table({"w": pa.array([[0.0, 1.0, 2.0, 3.0]], pa.list_(pa.float32()))})
    >>> fq.dequantize(fq.quantize(t, bits=2, group_size=4)).column("w").to_pylist()
    [[0.0, 1.0, 2.0, 3.0]]
    """
    kernels.resolve_threads(threads)
    return apply(data, QuantOptions.from_mapping({"op": "dequantize"}), threads, progress)


def quantize_arrays(
    arrays: Mapping[str, np.ndarray],
    *,
    importance: Mapping[str, Any] | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, QuantizedTensor]:
    """Quantize a dict of NumPy arrays (any shape; kept) in-process.

    Takes the options of :func:`quantize` (``columns`` excepted). Every error names the
    array it is about. ``progress(name, completed / total)`` is called once after each
    array. ``importance``: array name -> its importance
    vector, as long as the array's last dimension (its rows); arrays not named get none.

    Examples
    --------
    >>> import numpy as np, flightquant as fq
    >>> r = fq.quantize_arrays({"w": np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16)})
    >>> r["w"].shape, r["w"].bits, r["w"].scales.shape
    ((16, 16), 4, (2,))
    """
    if "columns" in options:
        raise TypeError("quantize_arrays takes no 'columns' option: every array is quantized")
    opts = QuantOptions.from_mapping(options)
    if importance:
        check_importance_method(opts, "the arrays")
    kernels.resolve_threads(threads)
    tracker = Tracker(progress, len(arrays) if isinstance(arrays, Mapping) else None, None)

    def batches():
        for b in arrays_to_batches(arrays, importance=importance):
            out = _quantize_named(b, opts, threads)
            tracker.done(b)
            yield out
        tracker.finish()

    return batches_to_results(batches())


def _quantize_named(batch: pa.RecordBatch, opts: QuantOptions, threads) -> pa.RecordBatch:
    """Quantize one batch of arrays; a non-finite error names the array and its index."""
    try:
        return codec.quantize_batch(batch, opts, threads=threads)[0]
    except NonFiniteError as exc:
        name = batch.column(NAME)[exc.row].as_py()
        shape = tuple(batch.column(SHAPE)[exc.row].as_py())
        where = f"array {name!r}"
        if len(shape) > 1:
            where += f" at index {tuple(int(i) for i in np.unravel_index(exc.element, shape))}"
        raise NonFiniteError(exc.row, exc.element, exc.value, where) from None


def dequantize_arrays(
    results: Mapping[str, QuantizedTensor], *, threads: int | None = None
) -> dict[str, np.ndarray]:
    """Reconstruct a dict of arrays from :func:`quantize_arrays` results."""
    return {name: t.dequantize(threads=threads) for name, t in results.items()}
