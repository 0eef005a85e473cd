"""The server's memory budget: what a batch may cost, and who may hold how much.

Every stream reserves memory from one :class:`MemoryBudget` before it lets the transport
allocate (reading a batch) and before the codec allocates (processing it), and gives it
back once the answer is sent. A stream that cannot reserve waits a bounded time, then
fails with :class:`BudgetExhausted`; a batch that alone costs more than the whole budget
is refused at once. So all streams together never hold more than the budget, whatever
the clients send, and the process keeps the rest of its memory for the interpreter,
gRPC's threads and buffers and the allocator.

The costs (all upper bounds, from the batch's schema, lengths and buffer sizes: nothing
here reads data):

* before a read: ``RECEIVE_COPIES * max_batch_bytes`` (a Flight message is received in
  gRPC slices, then joined into one buffer; see :func:`receive_bound`);
* after it: the batch's buffers plus :func:`output_bound` (the output and the codec's
  working arrays), worked out per column from the options.

Flight gives no size before a message is read, so the first reservation is the limit,
not the batch; it shrinks to the real size as soon as the batch is in.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections import deque
from dataclasses import dataclass

import pyarrow as pa

from . import formats, wire

__all__ = [
    "DEFAULT_FRACTION",
    "BudgetExhausted",
    "MemoryBudget",
    "Reservation",
    "memory_available",
    "output_bound",
    "receive_bound",
]

#: default budget: this fraction of what the process may use (see :func:`memory_available`)
DEFAULT_FRACTION = 0.5
#: a received message exists twice for a moment: gRPC's slices and the joined buffer
RECEIVE_COPIES = 2

#: working bytes per row of an importance column (three int64 per row in the engine)
_IMPORTANCE_ROW = 3 * 8 + 16
_LIST_IDS = {pa.lib.Type_LIST, pa.lib.Type_LARGE_LIST, pa.lib.Type_FIXED_SIZE_LIST}
#: bytes per row of the codec's own bookkeeping (starts, lengths, blocks... as int64),
#: and per output column for its offsets and validity (a fixed allowance per row)
_ROW_WORK = 128
_ROW_OUT = 48


class BudgetExhausted(MemoryError):
    """The memory budget cannot take a reservation (now, or ever for this size)."""


# ---------------------------------------------------------------------------------------
# what the process may use


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < (1 << 62) else None  # v1 writes ~2**63 for "no limit"


def _cgroup_limit(
    proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> int | None:
    """The smallest memory limit of this process's cgroup and its ancestors (v2 or v1)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one unified hierarchy
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        path = path.strip("/")
        while True:  # the limit of any ancestor applies too; "/" inside a cgroup namespace
            value = _read_int(os.path.join(base, path, name))
            if value is not None:
                found.append(value)
            if not path:
                break
            path = os.path.dirname(path)
    return min(found) if found else None


#: address space kept back under RLIMIT_AS for what is mapped later beside the budget:
#: thread stacks (8 MiB each), malloc arenas, gRPC's buffers
AS_RESERVE = 512 << 20


def _address_space_left() -> int | None:
    """RLIMIT_AS less the address space already mapped and ``AS_RESERVE`` (the limit
    counts virtual memory, and stacks and allocator arenas are mapped as threads start)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    used = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - used - AS_RESERVE)


def _physical() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_available() -> tuple[int, str]:
    """``(bytes, what)``: the most memory this process may use, and which limit that is.

    The smallest of the cgroup's memory limit (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``, ancestors included), ``RLIMIT_AS`` less the address space
    already mapped, and the physical memory.
    """
    limits = [
        (value, what)
        for value, what in (
            (_cgroup_limit(), "the cgroup memory limit"),
            (_address_space_left(), "RLIMIT_AS less the mapped address space"),
            (_physical(), "physical memory"),
        )
        if value is not None
    ]
    if not limits:  # pragma: no cover - every Linux has sysconf
        return 1 << 30, "an assumed 1 GiB"
    return min(limits)


# ---------------------------------------------------------------------------------------
# what a batch may cost


def receive_bound(max_batch_bytes: int) -> int:
    """What reading one message of up to ``max_batch_bytes`` may allocate."""
    return RECEIVE_COPIES * max_batch_bytes


def _format_of(options) -> str:
    fmt = getattr(options, "format", None)
    return formats.NATIVE if fmt in (None, "", formats.NATIVE) else str(fmt)


def _quantized_bytes_per_element(options, value_size: int) -> float:
    """Output plus working bytes per input element of a quantized column (rows aside)."""
    fmt = _format_of(options)
    if fmt == formats.NATIVE:
        groups = 1.0 / max(1, options.group_size)
        per_group = 4 * (2 if options.scheme == "asymmetric" else 1)
        codes = options.bits / 8
        out = codes + per_group * groups
    elif formats.is_ggml(fmt):
        out = formats.get(fmt).bits_per_weight / 8
    else:  # a format this module does not know: as much as float64 values
        out = 8.0
    # float16 is widened (and unaligned or long-group input copied) before the kernel
    return out + max(4, value_size)


def _quantized_bytes_per_row(options) -> int:
    fmt = _format_of(options)
    if fmt == formats.NATIVE:
        k = 2 if options.scheme == "asymmetric" else 1
        per_row = 1 + 4 * k  # a partial byte of codes, a partial group's scale/zero point
    elif formats.is_ggml(fmt):
        per_row = formats.get(fmt).type_size  # a row padded to whole blocks
    else:
        per_row = 256
    stats = 16 if getattr(options, "stats", False) else 0
    return per_row + stats + _ROW_OUT + _ROW_WORK


def _codes_cost(field: pa.Field) -> tuple[float, int]:
    """(bits per element, bytes per decoded value) of a codes column, from the one reading
    of its metadata the codec decodes by (:func:`wire.parse_codes_field`); a field it
    refuses is never decoded, and costs the most any field may (1 bit, float64)."""
    try:
        meta = wire.parse_codes_field(field)
    except wire.WireError:
        return 1.0, 8
    bits = meta.ggml.bits_per_weight if meta.ggml is not None else float(meta.bits)
    return bits, wire.FLOAT_SIZES[meta.dtype]


def _buffer_bytes(arr: pa.Array) -> int:
    """Bytes of the array's own buffers (sizes only: safe on an array not yet validated)."""
    return sum(b.size for b in arr.buffers() if b is not None)


def _data_bytes(arr: pa.Array) -> int:
    bufs = arr.buffers()
    data = bufs[-1] if bufs else None
    return 0 if data is None else data.size


def output_bound(batch: pa.RecordBatch, options) -> int:
    """Bytes that processing ``batch`` under ``options`` may allocate, beyond the batch.

    Reads only the schema, lengths and buffer sizes, so it is safe on a batch that has not
    been validated yet (its answer is then meaningless, but finite).

    Passed-through columns cost nothing (the output shares their buffers). For
    ``quantize``, each float list column: codes, scales (and zero points) and offsets,
    per element and per row, as the options and the value type give them, plus the
    codec's working arrays; the elements are counted from the child array, which bounds
    them from above. An importance column (``c_importance``, consumed by quantizing ``c``)
    costs its per-row bookkeeping and a float32 per weight. For ``dequantize``, each codes column: at most
    ``8 * code_bytes / bits`` elements of the original value type, plus offsets and
    working arrays. A ``format`` this module does not know costs as much as float64
    values (quantize) or one bit per element (dequantize).

    >>> import pyarrow as pa
    >>> from flightquant.options import QuantOptions
    >>> b = pa.record_batch({"w": pa.array([[1.0] * 1000], pa.list_(pa.float32()))})
    >>> 1000 * 4 < output_bound(b, QuantOptions(group_size=1)) < 1000 * 20
    True
    """
    rows = batch.num_rows
    total = rows * 8  # a row key and the batch's own bookkeeping
    if getattr(options, "op", "quantize") == "dequantize":
        for field, arr in zip(batch.schema, batch.columns, strict=True):
            if not wire.is_quantized_field(field):
                continue
            bits, size = _codes_cost(field)
            elements = 8 * _data_bytes(arr) / bits
            # float16 output goes through float32
            total += math.ceil(elements * (size + (4 if size == 2 else 0)))
            total += rows * (_ROW_OUT + _ROW_WORK) + _buffer_bytes(arr)  # e.g. realigned copies
        return total
    importance = set(wire.importance_columns(batch.schema).values())
    for i, (field, arr) in enumerate(zip(batch.schema, batch.columns, strict=True)):
        t = field.type
        if t.id not in _LIST_IDS or wire.float_name(t.value_type) is None:
            continue
        if i in importance:
            # read in place, never output: its rows' starts, lengths and extents, and the
            # ggml kernels' mean square of each importance row (at most one per weight)
            total += rows * _IMPORTANCE_ROW + 4 * len(arr.values)
            continue
        value_size = wire.FLOAT_SIZES[wire.float_name(t.value_type)]
        elements = len(arr.values)
        total += math.ceil(elements * _quantized_bytes_per_element(options, value_size))
        total += rows * _quantized_bytes_per_row(options)
    return total


# ---------------------------------------------------------------------------------------
# the budget


@dataclass(eq=False)  # identity: two waiters of the same size are still two waiters
class _Waiter:
    need: int
    urgent: bool
    granted: bool = False


class Reservation:
    """Bytes held from a :class:`MemoryBudget`; :meth:`release` (idempotent) returns them."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: MemoryBudget, nbytes: int):
        self._budget = budget
        self.nbytes = nbytes

    def resize(self, nbytes: int, timeout: float, what: str = "this batch") -> None:
        """Hold ``nbytes`` now: shrinking is immediate, growing may wait (see reserve)."""
        self._budget._resize(self, nbytes, timeout, what)

    def release(self) -> None:
        self._budget._resize(self, 0, 0.0, "")

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class MemoryBudget:
    """``limit`` bytes shared by every stream of a server.

    Waiting is first come, first served, with one exception: a reservation that grows
    (a batch already read that now needs room for its output) goes before new ones,
    since it holds memory already and frees it only by finishing.

    >>> budget = MemoryBudget(1000)
    >>> r = budget.reserve(600, timeout=0)
    >>> budget.reserved
    600
    >>> try:
    ...     budget.reserve(600, timeout=0)
    ... except BudgetExhausted as exc:
    ...     print(str(exc)[:18])
    server memory busy
    >>> r.release()
    >>> budget.reserved
    0
    """

    def __init__(self, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"the memory limit must be an integer >= 1 byte, got {limit!r}")
        self.limit = limit
        self.reserved = 0
        self.peak = 0
        self.refused = 0
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Waiter] = deque()

    def reserve(self, nbytes: int, timeout: float, what: str = "this batch") -> Reservation:
        """A :class:`Reservation` of ``nbytes``, waiting at most ``timeout`` seconds.

        Raises :class:`BudgetExhausted` at once when ``nbytes`` exceeds the whole limit,
        or after ``timeout`` when the other streams do not free enough.
        """
        res = Reservation(self, 0)
        self._resize(res, nbytes, timeout, what)
        return res

    def snapshot(self) -> dict:
        with self._cond:
            return {
                "limit": self.limit,
                "reserved": self.reserved,
                "peak_reserved": self.peak,
                "waiting": len(self._queue),
                "refused": self.refused,
            }

    def _resize(self, res: Reservation, nbytes: int, timeout: float, what: str) -> None:
        nbytes = max(0, int(nbytes))
        with self._cond:
            grow = nbytes - res.nbytes
            if grow <= 0:
                self.reserved += grow
                res.nbytes = nbytes
                self._grant()
                return
            if nbytes > self.limit:
                self.refused += 1
                raise BudgetExhausted(
                    f"{what} needs {_mib(nbytes)} of memory, more than this server's whole "
                    f"budget of {_mib(self.limit)} (--memory-limit): send smaller batches "
                    "(e.g. Table.to_batches(max_chunksize=...)), or use a server with a "
                    "larger --memory-limit"
                )
            urgent = res.nbytes > 0
            waiter = _Waiter(grow, urgent)
            if urgent:  # after the other growing ones, before every new one
                at = sum(1 for w in self._queue if w.urgent)
                self._queue.insert(at, waiter)
            else:
                self._queue.append(waiter)
            self._grant()
            deadline = time.monotonic() + max(0.0, timeout)
            while not waiter.granted:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if not waiter.granted:
                self._queue.remove(waiter)
                self.refused += 1
                self._grant()  # the next one may fit now
                raise BudgetExhausted(
                    f"server memory busy: {what} needs {_mib(grow)} more, "
                    f"{_mib(self.reserved)} of the {_mib(self.limit)} budget are held by "
                    f"other streams, and none came free in {timeout:g} s; retry later or "
                    "on another server, send smaller batches, or raise --memory-limit"
                )
            res.nbytes = nbytes  # the grant added ``grow`` to ``reserved``

    def _grant(self) -> None:
        """Hand free bytes to waiters in queue order (the lock is held)."""
        granted = False
        while self._queue and self._queue[0].need <= self.limit - self.reserved:
            w = self._queue.popleft()
            self.reserved += w.need
            w.granted = granted = True
        self.peak = max(self.peak, self.reserved)
        if granted or not self._queue:
            self._cond.notify_all()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
