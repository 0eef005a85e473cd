"""Table files in and out: Arrow IPC (file or stream format, feather) and Parquet.

Table files are streamed batch by batch as they are; the CLI quantizes their float list
columns in place and every other column passes through.

pyarrow's IPC reader does not check offsets or bitmaps against the buffers, so every batch
read from a file passes the same full validation as a batch from the network
(:func:`flightquant.validate.validate_batch`) before any column of it is read: a crafted
file is one error naming the file and the column, never a crash or another column's bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from ..errors import CodecError
from ..validate import validate_batch
from .common import ModelIOError, first_line, write_mode


class TableFile:
    """An Arrow IPC (file or stream) or Parquet file, read batch by batch."""

    kind = "table"

    def __init__(self, path: Path, fmt: str):
        self.path = path
        self.format = fmt
        self._ipc_file = None
        self._ipc_stream_path = False
        self._size = path.stat().st_size
        try:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                self._pq = pq.ParquetFile(str(path), memory_map=True)
                self.schema = self._pq.schema_arrow
                self.num_rows = self._pq.metadata.num_rows
            else:
                self._open_ipc()
        except ModelIOError:
            raise
        except Exception as exc:
            kind = "Parquet" if fmt == "parquet" else "Arrow IPC"
            raise ModelIOError(f"{path}: not a valid {kind} file ({first_line(exc)})") from None

    def _open_ipc(self) -> None:
        source = pa.memory_map(str(self.path), "r")
        try:
            self._ipc_file = ipc.open_file(source)
            self.schema = self._ipc_file.schema
            self.num_rows = sum(
                self._ipc_file.get_record_batch(i).num_rows
                for i in range(self._ipc_file.num_record_batches)
            )
            return
        except pa.ArrowInvalid:
            pass
        try:  # an IPC stream saved as .arrow
            with ipc.open_stream(source) as reader:
                self.schema = reader.schema
            self._ipc_stream_path = True
            self.num_rows = None
        except pa.ArrowInvalid:
            import pyarrow.feather as feather  # feather v1

            table = feather.read_table(str(self.path))
            self._table = table
            self.schema = table.schema
            self.num_rows = table.num_rows

    @property
    def metadata(self) -> dict[bytes, bytes]:
        return dict(self.schema.metadata or {})

    def iter_batches(
        self, max_batch_bytes: int | None = None, columns: Sequence[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """The file's batches in order (sliced by rows so none exceeds ``max_batch_bytes``)."""
        try:
            for index, batch in enumerate(self._raw_batches(columns)):
                self._validate(batch, index)
                if columns and batch.schema.names != list(columns):
                    batch = batch.select(columns)
                yield from _rechunk(batch, max_batch_bytes)
        except ModelIOError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise ModelIOError(f"{self.path}: cannot read ({first_line(exc)})") from None

    def _check_size(self) -> None:
        """Batches read through a memory map are touched only while the file still holds
        them: a file that shrank since it was opened would make reading them SIGBUS."""
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise ModelIOError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        if size < self._size:
            raise ModelIOError(
                f"{self.path}: the file shrank from {self._size} to {size} bytes since it was "
                "opened (truncated by another process?)"
            )

    def _validate(self, batch: pa.RecordBatch, index: int) -> None:
        try:
            validate_batch(batch, where=f"{self.path}: batch {index}")
        except CodecError as exc:
            raise ModelIOError(str(exc)) from None

    def _raw_batches(self, columns) -> Iterator[pa.RecordBatch]:
        """The file's batches as read (all columns, except Parquet's, which decodes only
        ``columns``); :meth:`iter_batches` validates each before selecting ``columns``."""
        if self.format == "parquet":
            for rg in range(self._pq.num_row_groups):
                self._check_size()
                table = self._pq.read_row_group(rg, columns=columns)
                yield from table.combine_chunks().to_batches() or []
        elif self._ipc_file is not None and columns:  # a few columns: from the memory map
            for i in range(self._ipc_file.num_record_batches):
                self._check_size()
                yield self._ipc_file.get_batch(i)
        elif self._ipc_file is not None:
            # a whole pass reads each batch into memory that is freed (and reused) after it:
            # through the memory map, every page read would stay in the process's RSS
            with pa.OSFile(str(self.path), "rb") as fh:
                reader = ipc.open_file(fh)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
        elif self._ipc_stream_path:
            with ipc.open_stream(pa.memory_map(str(self.path), "r")) as reader:
                while True:
                    self._check_size()
                    try:
                        batch = reader.read_next_batch()
                    except StopIteration:
                        return
                    yield batch
        else:
            yield from self._table.to_batches()

    def read_columns(self, columns: Sequence[str]) -> pa.Table:
        """Selected columns of the whole file (cheap: no codes are decoded)."""
        batches = list(self.iter_batches(columns=list(columns)))
        return pa.Table.from_batches(batches, schema=_select_schema(self.schema, columns))

    def close(self) -> None:
        self._ipc_file = None
        self._pq = None


def _select_schema(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)


def _rechunk(batch: pa.RecordBatch, max_bytes: int | None) -> Iterator[pa.RecordBatch]:
    if not max_bytes or batch.num_rows <= 1:
        yield batch
        return
    nbytes = batch.nbytes
    if nbytes <= max_bytes:
        yield batch
        return
    rows = max(1, int(batch.num_rows * max_bytes / nbytes))
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


class TableWriter:
    """Write RecordBatches of one schema to an Arrow IPC file or a Parquet file."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema):
        self.schema = schema
        self.format = fmt
        self._sink = pa.OSFile(str(path), write_mode(path))
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(self._sink, schema)
        else:
            self._writer = ipc.new_file(self._sink, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        if not _same_fields(batch.schema, self.schema):
            raise ModelIOError(
                "a batch's schema differs from the first batch's (e.g. another quantization "
                "setting); one file holds one schema"
            )
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()


def _same_fields(a: pa.Schema, b: pa.Schema) -> bool:
    return len(a) == len(b) and all(
        fa.equals(fb, check_metadata=True) for fa, fb in zip(a, b, strict=True)
    )
