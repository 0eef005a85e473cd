"""Which GGUF tensors get which ggml type: the choice llama.cpp's ``llama-quantize`` makes.

Learned from ``llama_model_quantize_impl``, ``tensor_allows_quantization``,
``llama_tensor_get_type`` and ``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp``
(``llama-quantize --pure``: every tensor it quantizes gets the chosen type; the mixes such as
Q4_K_M are what ``--type GLOB=TYPE`` writes by hand):

* llama.cpp quantizes a tensor only if it has two or more dimensions (``ggml_n_dims``: trailing
  dimensions of size 1 do not count), its name ends in ``weight`` and is none of those its
  quantizer excludes (norms, position and token-type embeddings, MoE gates, small
  conv/RWKV/multimodal tensors, :data:`EXCLUDED_SUBSTRINGS`). Its kernels add position and
  token-type embeddings as float: a GGUF with those quantized makes llama.cpp abort.
* A row (``ne[0]``, the first GGUF dimension) that is not a multiple of the type's block size
  falls back: Q2_K/Q3_K/TQ1_0/TQ2_0 -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, and to
  F16 when the row does not fit 32 either; a 32-block type has no fallback (an error, as in
  llama.cpp).
* Only F32, F16 and BF16 tensors are quantized. Tensors already quantized pass through
  unless ``allow_requantize``; integer tensors always do.

Overrides, per tensor name (whole-name globs): ``keep`` keeps a tensor as it is; ``types``
(``GLOB=TYPE``, first match wins, as llama.cpp's ``--tensor-type``) and ``only`` pick tensors
explicitly, even ones llama.cpp would not quantize.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from .. import formats
from .common import ModelIOError

#: the float types llama.cpp quantizes from (and can convert between)
FLOAT_TYPES = ("F32", "F16", "BF16")
#: types ``--type`` accepts: the ggml formats flightquant writes, and the float types
TARGET_TYPES = (*formats.GGML_TYPES, *FLOAT_TYPES)

#: the ``general.file_type`` llama-quantize writes for each type name it is given
#: (``Q3_K``/``Q4_K``/``Q5_K`` are its aliases of the ``_M`` mixes)
FILE_TYPES = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q2_K": LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": LlamaFileType.MOSTLY_Q3_K_M,
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
    "TQ1_0": LlamaFileType.MOSTLY_TQ1_0,
    "TQ2_0": LlamaFileType.MOSTLY_TQ2_0,
    "IQ4_NL": LlamaFileType.MOSTLY_IQ4_NL,
    "IQ4_XS": LlamaFileType.MOSTLY_IQ4_XS,
}

#: tensor_type_fallback: the type a row that does not fit the block size falls back to
FALLBACK = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}

#: whole names tensor_allows_quantization never quantizes (BERT-style position and
#: token-type embeddings: llama.cpp's kernels add them as float)
EXCLUDED_NAMES = ("position_embd.weight", "token_types.weight")
#: substrings of names it never quantizes
EXCLUDED_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)


def type_name(ggml_type: int) -> str:
    """The name of a ggml type id (``12`` -> ``"Q4_K"``); ``"type 99"`` if unknown."""
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def type_id(name: str) -> int:
    return int(GGMLQuantizationType[name])


def row_bytes(name: str, ne0: int) -> int:
    """Bytes of one row of ``ne0`` values of type ``name`` (``ne0`` a multiple of its block)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return ne0 // block * size


def tensor_bytes(name: str, ne: Sequence[int]) -> int:
    """Bytes of a tensor of GGUF shape ``ne`` stored as type ``name``."""
    rows = 1
    for d in ne[1:]:
        rows *= d
    return rows * row_bytes(name, ne[0] if ne else 1)


def block_size(name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]


def n_dims(ne: Sequence[int]) -> int:
    """``ggml_n_dims``: dimensions up to the last one larger than 1 (at least 1)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def is_quantized_type(name: str) -> bool:
    """A block type (not F32/F16/BF16/F64 and not an integer type)."""
    return GGML_QUANT_SIZES.get(GGMLQuantizationType[name], (1, 0))[0] > 1


def llama_quantizes(name: str, ne: Sequence[int]) -> bool:
    """``tensor_allows_quantization`` for a tensor called ``name`` of GGUF shape ``ne``."""
    if n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    if name in EXCLUDED_NAMES:
        return False
    return not any(s in name for s in EXCLUDED_SUBSTRINGS)


@dataclass(frozen=True)
class Choice:
    """What happens to one tensor: ``src`` type in, ``dst`` type out, and why."""

    name: str
    ne: tuple[int, ...]
    src: str
    dst: str
    note: str = ""

    @property
    def quantize(self) -> bool:
        """Encoded with a ggml format by the codec."""
        return self.dst != self.src and self.dst in formats.GGML_TYPES

    @property
    def convert(self) -> bool:
        """Converted between float types (F32/F16/BF16), no codec involved."""
        return self.dst != self.src and not self.quantize

    @property
    def numel(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def src_bytes(self) -> int:
        return tensor_bytes(self.src, self.ne)

    @property
    def dst_bytes(self) -> int:
        return tensor_bytes(self.dst, self.ne)


def parse_type_overrides(items: Iterable[str]) -> list[tuple[str, str]]:
    """``["*.ffn_down.*=Q6_K", ...]`` -> ``[("*.ffn_down.*", "Q6_K"), ...]``, validated."""
    out = []
    for item in items:
        glob, sep, typ = item.rpartition("=")
        typ = typ.strip().upper()
        if not sep or not glob:
            raise ModelIOError(f"--type {item!r}: expected GLOB=TYPE, e.g. 'output.weight=Q6_K'")
        if typ not in TARGET_TYPES:
            raise ModelIOError(
                f"--type {item!r}: unknown type {typ!r}; valid types are: "
                + ", ".join(TARGET_TYPES)
            )
        out.append((glob, typ))
    return out


def choose(
    tensors: Sequence[tuple[str, Sequence[int], str]],
    target: str,
    *,
    only: Sequence[str] = (),
    keep: Sequence[str] = (),
    types: Sequence[tuple[str, str]] = (),
    allow_requantize: bool = False,
) -> list[Choice]:
    """One :class:`Choice` per ``(name, ne, type name)``, in order, for ``target`` (a ggml
    format name).

    Raises :class:`ModelIOError` for a request that cannot be honoured (an explicitly named
    tensor that is an integer tensor, or already quantized without ``allow_requantize``; a
    32-block type on rows that do not fit it; a pattern that matches nothing).
    """
    if target not in formats.GGML_TYPES:
        raise ModelIOError(
            f"GGUF output needs a ggml format (--format {'|'.join(formats.GGML_TYPES)}), "
            f"got {target!r}"
        )
    names = [t[0] for t in tensors]
    for flag, patterns in (
        ("--only", only),
        ("--keep", keep),
        ("--type", [g for g, _ in types]),
    ):
        for p in patterns:
            if not any(fnmatchcase(n, p) for n in names):
                raise ModelIOError(
                    f"{flag} {p!r} matches no tensor of the GGUF file (patterns match whole "
                    "names, e.g. 'blk.*.ffn_down.weight'; `flightquant inspect` lists them)"
                )
    return [
        _choose_one(
            name, tuple(int(d) for d in ne), src, target, only, keep, types, allow_requantize
        )  # fmt: skip
        for name, ne, src in tensors
    ]


def _choose_one(name, ne, src, target, only, keep, types, allow_requantize) -> Choice:
    if any(fnmatchcase(name, p) for p in keep):
        return Choice(name, ne, src, src, "--keep")
    explicit, why = next((t for g, t in types if fnmatchcase(name, g)), None), "--type"
    if explicit is None and any(fnmatchcase(name, p) for p in only):
        explicit, why = target, "--only"
    if explicit is not None:
        dst = explicit
    elif not only and llama_quantizes(name, ne):
        dst, why = target, ""
    else:
        return Choice(name, ne, src, src)
    if dst == src:
        return Choice(name, ne, src, src)
    if src not in FLOAT_TYPES:
        if not is_quantized_type(src) or not allow_requantize:
            if explicit is None:  # llama.cpp would quantize it; it passes through
                note = f"already {src}" if is_quantized_type(src) else ""
                return Choice(name, ne, src, src, note)
            if is_quantized_type(src):
                raise ModelIOError(
                    f"tensor {name!r} is already {src}; re-quantizing it to {dst} loses more "
                    "precision and is refused unless --allow-requantize"
                )
            raise ModelIOError(f"tensor {name!r} is {src}, not a float tensor: it cannot be {dst}")
    if dst in FLOAT_TYPES:
        return Choice(name, ne, src, dst, why)
    return _fallback(Choice(name, ne, src, dst, why))


def _fallback(c: Choice) -> Choice:
    ncols = c.ne[0]
    block = formats.get(c.dst).block_size
    if ncols % block == 0:
        return c
    if c.dst not in FALLBACK:
        raise ModelIOError(
            f"tensor {c.name!r}: rows of {ncols} values are not a multiple of {c.dst}'s block "
            f"size {block}, and llama.cpp defines no fallback for {c.dst}; --keep it or "
            "give it another type with --type"
        )
    dst = FALLBACK[c.dst]
    if ncols % formats.get(dst).block_size != 0:
        dst = "F16"
    why = f"{ncols}-wide rows do not fit {c.dst}'s {block}-blocks: {c.dst} -> {dst}"
    note = f"{c.note}; {why}" if c.note else why
    return Choice(c.name, c.ne, c.src, c.src if dst == c.src else dst, note)
