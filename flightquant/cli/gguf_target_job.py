"""``--target-size``/``--target-bpw``: measure each candidate type's error per tensor, then
let :mod:`flightquant.modelfiles.gguf_target` choose.

The error of a type on a tensor is measured on a sample of its rows (evenly spaced, at most
:data:`SAMPLE_VALUES` values): the sample goes through the codec with the job's method
(in-process or through ``--server``), is decoded, and its squared error -- weighted per column
by the importance matrix when there is one -- is scaled to the whole tensor.

The error the knapsack minimises is, by default (``--target-error relative``), each tensor's
squared error relative to its own (weighted) mean square, times its element count: the sum
of squared errors of tensors of different scales (``absolute``) spends the bytes on the
largest-valued tensors (a token embedding 16x the matrices' scale), and on a llama model that
made the logits worse than the recipe's at the same size (KL 0.77 against Q4_K_M's 0.57,
where the relative error gave 0.53; ``tests/gguf_models.py``'s llama, docs/cli.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from ..modelfiles import gguf_target
from ..modelfiles.gguf_files import GGUFFile, GGUFTensor
from ..modelfiles.gguf_policy import FLOAT_TYPES, Choice, is_quantized_type, recipe, tensor_bytes
from ..modelfiles.gguf_target import Option
from . import gguf_imatrix
from .common import JobError, Runner

#: the recipe whose tensors a size target chooses types for when --format is not given
BASE_RECIPE = "Q8_0"
#: values of one tensor's row sample (at least 8 rows)
SAMPLE_VALUES = 1 << 18
#: bytes a GGUF output adds to the input's header at most (quantization_version, file_type)
HEADER_SLACK = 128


@dataclass(frozen=True)
class Target:
    """The outcome: the new choices, each chosen tensor's options and predicted error."""

    choices: list[Choice]
    budget: int  # bytes of tensor data the target allows
    options: dict[str, list[Option]]
    predicted: dict[str, float]
    file_type: str  # the recipe whose general.file_type the file gets
    args: argparse.Namespace

    @property
    def error(self) -> str:
        """What the errors measure: ``relative`` or ``absolute`` (``weighted`` with an imatrix)."""
        kind = "relative" if relative_error(self.args) else "absolute"
        return f"{kind} weighted" if getattr(self.args, "imatrix", None) else kind

    def achieved(self, stat) -> float | None:
        return achieved(self.args, stat)


def wants_target(args: argparse.Namespace) -> bool:
    return getattr(args, "target_size", None) is not None or (
        getattr(args, "target_bpw", None) is not None
    )


def budget_of(args: argparse.Namespace, source: GGUFFile) -> int | None:
    """Bytes of tensor data ``--target-size``/``--target-bpw`` allow (``None``: no target)."""
    size, bpw = getattr(args, "target_size", None), getattr(args, "target_bpw", None)
    if size is None and bpw is None:
        return None
    if size is not None and bpw is not None:
        raise JobError("--target-size and --target-bpw: give one or the other")
    if bpw is not None:
        if not 0 < bpw <= 32:
            raise JobError(f"--target-bpw {bpw}: expected bits per weight in (0, 32]")
        return int(bpw * sum(t.numel for t in source.tensors) / 8)
    total = gguf_target.parse_size(size)
    overhead = source.data_offset + HEADER_SLACK + source.alignment * len(source.tensors)
    return total - overhead


def choose(
    args: argparse.Namespace,
    source: GGUFFile,
    choices: list[Choice],
    runner: Runner,
    budget: int,
    importance: Callable[[str], np.ndarray | None] = lambda name: None,
) -> Target:
    """Each tensor the recipe quantizes gets the type the knapsack picks."""
    by_name = {t.name: t for t in source.tensors}
    free = [c for c in choices if c.dst != c.src and c.src in FLOAT_TYPES
            and not c.note.startswith("--")]  # fmt: skip
    if not free:
        raise JobError("the size target has no tensor to choose a type for")
    fixed = sum(c.dst_bytes for c in choices) - sum(c.dst_bytes for c in free)
    options = _measure(args, source, [by_name[c.name] for c in free], runner, importance)
    picked = gguf_target.solve(options, budget - fixed)
    out = []
    for c in choices:
        o = picked.get(c.name) if c in free else None
        if o is None:
            out.append(c)
        else:
            note = f"target: {len(options[c.name])} types measured"
            out.append(replace(c, dst=o.type, note=note, requires_imatrix=False))
    shares: dict[str, int] = {}
    for c in out:
        if is_quantized_type(c.dst):
            shares[c.dst] = shares.get(c.dst, 0) + c.dst_bytes
    top = max(shares, key=shares.get) if shares else "F16"
    name = gguf_target.FILE_TYPE_OF.get(top, top)
    file_type = recipe(name).name if _is_recipe(name) else "F16"
    predicted = {k: o.error for k, o in picked.items()}
    return Target(out, budget, options, predicted, file_type, args)


def _is_recipe(name: str) -> bool:
    try:
        recipe(name)
    except Exception:  # noqa: BLE001 - a type no recipe is named after
        return False
    return True


def relative_error(args: argparse.Namespace) -> bool:
    return getattr(args, "target_error", "relative") != "absolute"


def achieved(args: argparse.Namespace, stat) -> float | None:
    """A tensor's squared error after the job, in the unit its options were measured in
    (the kernels' own statistics: known without an importance matrix only)."""
    if stat.sse is None or getattr(args, "imatrix", None) is not None:
        return None
    if not relative_error(args):
        return stat.sse
    return stat.sse * stat.numel / stat.signal if stat.signal else None


def _sample(source: GGUFFile, t: GGUFTensor) -> tuple[np.ndarray, float]:
    """Evenly spaced rows of ``t`` as float32 ``[n, ne0]``, and rows/n (the scale to the whole)."""
    ne0 = t.ne[0]
    rows = t.numel // ne0
    n = min(rows, max(8, SAMPLE_VALUES // ne0))
    idx = np.unique(np.linspace(0, rows - 1, n).round().astype(np.int64))
    raw = source.data(t).reshape(rows, -1)[idx]
    if t.type == "F32":
        x = raw.view("<f4")
    elif t.type == "F16":
        x = raw.view("<f2").astype(np.float32)
    else:  # BF16
        x = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(x, np.float32), rows / len(idx)


def _measure(args, source, tensors: list[GGUFTensor], runner: Runner, importance):
    samples = {t.name: _sample(source, t) for t in tensors}
    weights = {t.name: importance(t.name) for t in tensors}
    if relative_error(args):  # the sample's error per unit of the tensor's (weighted) signal
        for t in tensors:
            x, _ = samples[t.name]
            signal = _error(x, np.zeros_like(x), weights[t.name])
            samples[t.name] = (x, t.numel / signal if signal > 0 else 0.0)
    options: dict[str, list[Option]] = {}
    per_type: dict[str, list[GGUFTensor]] = {}
    for t in tensors:
        options[t.name] = []
        for typ in gguf_target.candidates(t.ne, t.type):
            if typ in FLOAT_TYPES:
                options[t.name].append(_float_option(t, typ, *samples[t.name], weights[t.name]))
            else:
                per_type.setdefault(typ, []).append(t)
    for typ, group in per_type.items():
        names = [t.name for t in group]
        batch = pa.record_batch(
            {
                "layer_name": pa.array(names, pa.string()),
                "weights": pa.array(
                    [samples[n][0].reshape(-1) for n in names], pa.list_(pa.float32())
                ),
            }
        )
        vecs = {n: weights[n] for n in names if weights[n] is not None}
        if vecs:
            batch = gguf_imatrix.with_importance(batch, vecs)
        opts = {"format": typ, "method": args.method, "columns": ["weights"]}
        if args.clip is not None:
            opts["clip"] = args.clip
        decoded = []
        for out in runner.dequantize(runner.quantize(iter([batch]), **opts)):
            decoded.extend(out.column("weights").to_numpy(zero_copy_only=False))
        if len(decoded) != len(group):
            raise JobError(f"measuring {typ}: the codec returned {len(decoded)} of {len(group)}")
        for t, xh in zip(group, decoded, strict=True):
            x, scale = samples[t.name]
            err = _error(x, np.asarray(xh, np.float32).reshape(x.shape), weights[t.name])
            options[t.name].append(Option(typ, tensor_bytes(typ, t.ne), err * scale))
    return options


def _float_option(t: GGUFTensor, typ: str, x, scale, w) -> Option:
    if typ == t.type:
        return Option(typ, t.nbytes, 0.0)
    if typ == "F16":
        with np.errstate(over="ignore"):
            xh = x.astype(np.float16).astype(np.float32)
    else:
        xh = x
    return Option(typ, tensor_bytes(typ, t.ne), _error(x, xh, w) * scale)


def _error(x: np.ndarray, xh: np.ndarray, w: np.ndarray | None) -> float:
    """Sum over the sample of ``w[j] * (x - xh)^2`` (``w`` = 1 without an importance matrix)."""
    d = (x.astype(np.float64) - xh) ** 2
    if w is None:
        return float(d.sum())
    return float(d.sum(axis=0) @ np.asarray(w, np.float64).reshape(-1)[: x.shape[1]])
