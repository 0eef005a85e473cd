"""Which tensors of a model file are quantized, by default as llama.cpp and compressed-tensors
choose: float tensors with two or more dimensions (weight matrices). 1-D tensors (norms,
biases), scalars, empty tensors and integer tensors are kept as they are.

``--only GLOB`` and ``--keep GLOB`` (repeatable, matched against the whole tensor name with
:func:`fnmatch.fnmatchcase`) override: a name matching a ``--keep`` pattern is kept; with
``--only`` given, exactly the float tensors matching one of its patterns are quantized,
whatever their shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from .common import ModelIOError, TensorInfo


def matrix_dims(shape: Sequence[int]) -> int:
    """Dimensions larger than 1: a ``(1, 4096)`` tensor is a vector, as ggml counts it."""
    return sum(1 for d in shape if d > 1)


class Selection:
    """The tensors one job quantizes: the default rule, then ``only``/``keep`` patterns."""

    def __init__(self, only: Sequence[str] | None = None, keep: Sequence[str] | None = None):
        self.only = list(only or [])
        self.keep = list(keep or [])

    @property
    def overridden(self) -> bool:
        return bool(self.only or self.keep)

    def kept_by_name(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.keep)

    def forced_by_name(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.only)

    def __call__(self, info: TensorInfo) -> bool:
        """Whether ``info`` is quantized."""
        if not info.is_float or info.numel == 0 or self.kept_by_name(info.name):
            return False
        if self.only:
            return self.forced_by_name(info.name)
        return matrix_dims(info.shape) >= 2

    def check(self, names: Iterable[str], where: str) -> None:
        """Refuse a pattern that matches no tensor name (most likely a typo)."""
        names = list(names)
        for flag, patterns in (("--only", self.only), ("--keep", self.keep)):
            for p in patterns:
                if not any(fnmatchcase(n, p) for n in names):
                    raise ModelIOError(
                        f"{flag} {p!r} matches no tensor of {where} (patterns match whole "
                        "names, e.g. '*.weight' or 'model.layers.*.mlp.*'; "
                        "`flightquant inspect` lists the names)"
                    )
