"""The registry of formats: native and llama.cpp's ggml block types.

One entry per format, and the only place that knows a type's block size, bytes per
block, ggml type id and kernel code. Everything else (options, the wire module, the
codec, the model-file writers, ``inspect``) asks here.

Examples
--------
>>> get("Q4_K").bits_per_weight
4.5
>>> get("Q8_0").row_bytes(64)
68
"""

from __future__ import annotations

from dataclasses import dataclass

NATIVE = "native"


@dataclass(frozen=True)
class GgmlType:
    """One of ggml's block formats: ``block_size`` weights in ``type_size`` bytes."""

    name: str
    ggml_type: int  # ggml's enum ggml_type value (gguf.GGMLQuantizationType)
    block_size: int
    type_size: int
    code: int  # the kernels' type code (index of the type's block functions)
    family: str  # "legacy", "k", "ternary" or "iq" (non-linear 16-value table)

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    def row_bytes(self, n: int) -> int:
        """Bytes of a row of ``n`` weights (``n`` a multiple of ``block_size``)."""
        return n // self.block_size * self.type_size


_TYPES = (
    GgmlType("Q4_0", 2, 32, 18, 0, "legacy"),
    GgmlType("Q4_1", 3, 32, 20, 1, "legacy"),
    GgmlType("Q5_0", 6, 32, 22, 2, "legacy"),
    GgmlType("Q5_1", 7, 32, 24, 3, "legacy"),
    GgmlType("Q8_0", 8, 32, 34, 4, "legacy"),
    GgmlType("Q2_K", 10, 256, 84, 5, "k"),
    GgmlType("Q3_K", 11, 256, 110, 6, "k"),
    GgmlType("Q4_K", 12, 256, 144, 7, "k"),
    GgmlType("Q5_K", 13, 256, 176, 8, "k"),
    GgmlType("Q6_K", 14, 256, 210, 9, "k"),
    GgmlType("TQ1_0", 34, 256, 54, 10, "ternary"),
    GgmlType("TQ2_0", 35, 256, 66, 11, "ternary"),
    GgmlType("IQ4_NL", 20, 32, 18, 12, "iq"),
    GgmlType("IQ4_XS", 23, 256, 136, 13, "iq"),
)

GGML_TYPES: dict[str, GgmlType] = {t.name: t for t in _TYPES}
#: every value the ``format`` option takes
FORMAT_NAMES: tuple[str, ...] = (NATIVE, *GGML_TYPES)
BY_GGML_ID: dict[int, GgmlType] = {t.ggml_type: t for t in _TYPES}
BY_CODE: dict[int, GgmlType] = {t.code: t for t in _TYPES}


def get(name: str) -> GgmlType:
    """The ggml type called ``name``; a ``ValueError`` that lists the valid names if none."""
    try:
        return GGML_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown format {name!r}; valid formats are: {', '.join(FORMAT_NAMES)}"
        ) from None


def is_ggml(name: str) -> bool:
    return name in GGML_TYPES
