"""A size target for a GGUF file: each tensor's type for the least total error within it.

llama-quantize's recipes give each tensor a type by its role and layer; ``--target-size``
and ``--target-bpw`` instead measure, per tensor, the (importance-weighted) squared error of
every type llama.cpp can load for its row length, and choose the types that minimise the
total error under the size: a multiple-choice knapsack, solved greedily on each tensor's
lower convex hull of (bytes, error) -- the upgrade with the most error removed per byte
first, as long as it fits. The measuring is the job's (:mod:`flightquant.cli.quantize_gguf`);
this module only decides.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import formats
from .common import ModelIOError
from .gguf_policy import FLOAT_TYPES, block_size

#: block types a size target does not consider: the ternary types are for models trained
#: ternary (their error on any other tensor is an order of magnitude above Q2_K's)
EXCLUDED = ("TQ1_0", "TQ2_0")
#: the recipe whose ``general.file_type`` a target's file gets, by the type holding most bytes
FILE_TYPE_OF = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"123456"``, ``"400M"``/``"400MiB"`` (1024-based), ``"0.4GB"`` (1000-based) -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ModelIOError(
            f"--target-size {text!r}: expected bytes or a size such as 400M, 1.5G, 700MB"
        )
    value, unit, tail = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = " kmgt".index(unit) if unit else 0
    base = 1000 if tail == "b" and unit else 1024
    size = int(value * base**power)
    if size <= 0:
        raise ModelIOError(f"--target-size {text!r}: must be positive")
    return size


def candidates(ne: Sequence[int], src: str) -> list[str]:
    """The types a tensor of GGUF shape ``ne`` may get: every block type flightquant writes
    whose block divides the row, F16, and the tensor's own float type."""
    out = [t for t in formats.GGML_TYPES if t not in EXCLUDED and ne[0] % block_size(t) == 0]
    return [*out, *dict.fromkeys(t for t in ("F16", src) if t in FLOAT_TYPES)]


@dataclass(frozen=True)
class Option:
    """One type for one tensor: its bytes and its predicted (weighted) squared error."""

    type: str
    bytes: int
    error: float


def hull(options: Sequence[Option]) -> list[Option]:
    """The lower convex hull of (bytes, error), by rising bytes: the options worth upgrading
    through (a dominated or non-convex one is never the best use of its bytes)."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.error)):
        if pts and o.error >= pts[-1].error:
            continue  # more bytes, no less error
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # drop b if it lies on or above the segment a -> o
            if (b.error - a.error) * (o.bytes - a.bytes) >= (o.error - a.error) * (
                b.bytes - a.bytes
            ):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def solve(options: Mapping[str, Sequence[Option]], budget: int) -> dict[str, Option]:
    """The option per tensor with the least total error whose bytes sum to at most
    ``budget`` (greedy on the convex hulls; then any single upgrade that still fits)."""
    hulls = {name: hull(opts) for name, opts in options.items()}
    pick = {name: 0 for name in hulls}
    total = sum(h[0].bytes for h in hulls.values())
    if total > budget:
        raise ModelIOError(
            f"the size target leaves {budget:,} bytes for the tensors it chooses, below "
            f"{total:,}, what their smallest types take"
        )
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], pick[name]
        if i + 1 < len(h):
            gain = (h[i].error - h[i + 1].error) / max(1, h[i + 1].bytes - h[i].bytes)
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], pick[name]
        extra = h[i + 1].bytes - h[i].bytes
        if total + extra <= budget:
            pick[name] = i + 1
            total += extra
            push(name)
    chosen = {name: hulls[name][pick[name]] for name in hulls}
    # the hull skips points; spend what is left on the best single move that fits
    while True:
        best = None
        for name, opts in options.items():
            cur = chosen[name]
            for o in opts:
                extra = o.bytes - cur.bytes
                if o.error < cur.error and total + extra <= budget:
                    gain = cur.error - o.error
                    if best is None or gain > best[0]:
                        best = (gain, name, o, extra)
        if best is None:
            return chosen
        _, name, o, extra = best
        chosen[name] = o
        total += extra
