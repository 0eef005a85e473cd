"""Which GGUF tensors get which ggml type: the choice llama.cpp's ``llama-quantize`` makes.

Ported from llama.cpp's ``src/llama-quant.cpp`` (the version llama-cpp-python 0.3.36 vendors):
``tensor_allows_quantization`` (:func:`llama_quantizes`), ``llama_ftype_get_default_type``
(:data:`RECIPES`), ``llama_tensor_get_type`` with its mixes (:func:`_mix`) and
``tensor_type_fallback`` (:func:`_fallback`), and ``tensor_requires_imatrix``; the recipe
names and aliases are ``tools/quantize/quantize.cpp``'s. In short:

* llama.cpp quantizes a tensor only if it has two or more dimensions (``ggml_n_dims``: trailing
  dimensions of size 1 do not count), its name ends in ``weight`` and is none of those its
  quantizer excludes (norms, position and token-type embeddings, MoE gates, small
  conv/RWKV/multimodal tensors, :data:`EXCLUDED_SUBSTRINGS`).
* A recipe (``Q4_K_M``) has a default type (Q4_K); unless ``--pure``, the mix raises some
  tensors: the output head (and a tied token embedding) to Q6_K, ``attn_v``/``ffn_down`` by
  layer (``use_more_bits``: the first and last eighth and every third layer between), ...
  Layers are counted in llama.cpp's tensor order (by block number, then by name).
* A row (``ne[0]``) that is not a multiple of the chosen type's block size falls back:
  Q2_K/Q3_K/TQ1_0/TQ2_0 -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL,
  and to F16 when the row does not fit that (or a 32-block type) either.
* Only F32, F16 and BF16 tensors are quantized. Tensors already quantized pass through
  unless ``allow_requantize``; integer tensors always do.

Overrides, as llama-quantize's flags: ``token_embd_type``/``output_type``
(``--token-embedding-type``/``--output-tensor-type``), ``leave_output``
(``--leave-output-tensor``), ``types`` (``--tensor-type PATTERN=TYPE``: the first pattern
found in the name, as a regular expression the way llama-quantize reads it, or matching the
whole name as a glob, wins; it bypasses the mix, not the fallback). flightquant's own:
``keep`` (whole-name globs) keeps a tensor as it is, ``only`` quantizes exactly the tensors
it names, and a ``types`` glob that names a whole tensor llama.cpp would not quantize
applies to it too (an explicit request is honoured).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import formats
from .common import ModelIOError
from .gguf_recipes import (
    ALIASES,
    FLOAT_TYPES,
    OUTPUT,
    RECIPE_NAMES,
    RECIPES,
    TOKEN_EMBD,
    Counters,
    ModelParams,
    Recipe,
    category,
    llama_order,
    mix,
    recipe,
    requires_imatrix,
)

__all__ = ["ALIASES", "RECIPES", "RECIPE_NAMES", "ModelParams", "Recipe", "recipe"]

#: types an override accepts: the ggml formats flightquant writes, and the float types
TARGET_TYPES = (*formats.GGML_TYPES, *FLOAT_TYPES)


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


def block_size(name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]


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


def n_dims(ne: Sequence[int]) -> int:
    """``ggml_n_dims``: dimensions up to the last one larger than 1 (at least 1)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def is_quantized_type(name: str) -> bool:
    """A block type (not F32/F16/BF16/F64 and not an integer type)."""
    return GGML_QUANT_SIZES.get(GGMLQuantizationType[name], (1, 0))[0] > 1


def llama_quantizes(name: str, ne: Sequence[int], leave_output: bool = False) -> bool:
    """``tensor_allows_quantization`` for a tensor called ``name`` of GGUF shape ``ne``."""
    if n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    if name in EXCLUDED_NAMES or (leave_output and name == "output.weight"):
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
    requires_imatrix: bool = False  # tensor_requires_imatrix: llama.cpp refuses without one

    @property
    def quantize(self) -> bool:
        """Encoded with a ggml format by the codec."""
        return self.dst != self.src and is_quantized_type(self.dst)

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


def parse_type(text: str, flag: str) -> str:
    """A type name as llama-quantize reads it (any case), one flightquant writes."""
    typ = str(text).strip().upper()
    if typ not in TARGET_TYPES:
        raise ModelIOError(
            f"{flag} {text!r}: unknown type {typ!r}; valid types are: " + ", ".join(TARGET_TYPES)
        )
    return typ


def parse_type_overrides(items: Iterable[str]) -> list[tuple[str, str]]:
    """``["ffn_down=Q6_K", ...]`` -> ``[("ffn_down", "Q6_K"), ...]``, validated."""
    out = []
    for item in items:
        pattern, sep, typ = item.rpartition("=")
        if not sep or not pattern:
            raise ModelIOError(
                f"--tensor-type {item!r}: expected PATTERN=TYPE, e.g. 'output.weight=Q6_K'"
            )
        out.append((pattern, parse_type(typ, f"--tensor-type {item!r}:")))
    return out


def _regex(pattern: str) -> re.Pattern | None:
    # llama-quantize lower-cases the pattern and searches it as a std::regex (ECMAScript)
    try:
        return re.compile(pattern.lower())
    except re.error:
        return None


#: tensor_allows_quantization's extra exclusions for GLM-5-next
GLM5_NEXT_EXCLUDED = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj",
                      "indexer_compressor_gate", "indexer_compressor_ape", "ssm_f_a.weight",
                      "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight", "ssm_beta.weight",
                      "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight")  # fmt: skip


def _allowed(name: str, ne: Sequence[int], arch: str, leave_output: bool) -> bool:
    if not llama_quantizes(name, ne, leave_output):
        return False
    return arch != "glm5-next" or not any(s in name for s in GLM5_NEXT_EXCLUDED)


# --------------------------------------------------------------------------- choose


@dataclass
class _State:
    counters: Counters
    patterns: list = field(default_factory=list)  # (pattern, compiled regex or None, type)

    def manual(self, name: str) -> tuple[str, str] | None:
        """The first ``--tensor-type`` that names ``name``: (type, pattern)."""
        return next(((t, p) for p, rx, t in self.patterns if _matches(name, p, rx)), None)


def _matches(name: str, pattern: str, rx: re.Pattern | None) -> bool:
    return (rx is not None and rx.search(name) is not None) or fnmatchcase(name, pattern)


def choose(
    tensors: Sequence[tuple[str, Sequence[int], str]],
    target: str | Recipe,
    model: ModelParams | None = None,
    *,
    pure: bool = False,
    output_type: str | None = None,
    token_embd_type: str | None = None,
    leave_output: bool = False,
    types: Sequence[tuple[str, str]] = (),
    only: Sequence[str] = (),
    keep: Sequence[str] = (),
    allow_requantize: bool = False,
    has_imatrix: bool = False,
) -> list[Choice]:
    """One :class:`Choice` per ``(name, ne, type name)``, in order, for the recipe ``target``
    (a name llama-quantize takes, e.g. ``"Q4_K_M"``) on a model with ``model``'s
    hyperparameters; the keyword arguments are llama-quantize's flags (module docstring).

    Raises :class:`ModelIOError` for a request that cannot be honoured (an explicitly named
    tensor that is an integer tensor, or already quantized without ``allow_requantize``; a
    type whose block the row does not fit and that has no fallback; a pattern that matches
    nothing).
    """
    rec = target if isinstance(target, Recipe) else recipe(target)
    model = model or ModelParams()
    items = [(name, tuple(int(d) for d in ne), src) for name, ne, src in tensors]
    names = [t[0] for t in items]
    for flag, globs in (("--only", only), ("--keep", keep)):
        for p in globs:
            if not any(fnmatchcase(n, p) for n in names):
                raise ModelIOError(
                    f"{flag} {p!r} matches no tensor of the GGUF file (patterns match whole "
                    "names, e.g. 'blk.*.ffn_down.weight'; `flightquant inspect` lists them)"
                )
    patterns = [(p, _regex(p), t) for p, t in types]
    for p, rx, _ in patterns:
        if not any(_matches(n, p, rx) for n in names):
            raise ModelIOError(
                f"--tensor-type {p!r} matches no tensor of the GGUF file (a pattern is found "
                "in the name as a regular expression, as llama-quantize reads it, or matches "
                "the whole name as a glob; `flightquant inspect` lists the names)"
            )
    state = _State(Counters.start(names, model, rec, has_imatrix), patterns)
    flags = (pure, output_type, token_embd_type, leave_output, only, keep, allow_requantize)
    out: list[Choice | None] = [None] * len(items)
    for i in llama_order(names):
        out[i] = _choose_one(*items[i], state, *flags)
    return out  # type: ignore[return-value]


def _choose_one(
    name, ne, src, st, pure, output_type, token_embd_type, leave_output, only, keep, requant
) -> Choice:
    rec = st.counters.recipe
    allowed = _allowed(name, ne, st.counters.model.arch, leave_output)
    explicit = False
    if allowed:
        dst, why = _get_type(name, ne, st, pure, output_type, token_embd_type)
        explicit = why.startswith("--") or any(fnmatchcase(name, p) for p in only)
    elif (m := next((t for p, _, t in st.patterns if fnmatchcase(name, p)), None)) is not None:
        dst, why, explicit = m, "--tensor-type", True
    elif any(fnmatchcase(name, p) for p in only):
        dst, why, explicit = rec.default, "--only", True
        if is_quantized_type(dst):
            dst, why = _fallback(name, ne, dst, why)
    else:
        dst, why = src, ""
    if any(fnmatchcase(name, p) for p in keep):
        return Choice(name, ne, src, src, "--keep")
    if only and not any(fnmatchcase(name, p) for p in only):
        return Choice(name, ne, src, src)
    if dst == src:
        return Choice(name, ne, src, src)
    if src not in FLOAT_TYPES:
        if not is_quantized_type(src) or not requant:
            if not explicit:  # llama.cpp would quantize it; it passes through
                note = f"already {src}" if is_quantized_type(src) else ""
                return Choice(name, ne, src, src, note)
            if is_quantized_type(src):
                raise ModelIOError(
                    f"tensor {name!r} is already {src}; re-quantizing it to {dst} loses more "
                    "precision and is refused unless --allow-requantize"
                )
            raise ModelIOError(f"tensor {name!r} is {src}, not a float tensor: it cannot be {dst}")
    if is_quantized_type(dst) and ne[0] % block_size(dst):
        raise ModelIOError(
            f"tensor {name!r}: rows of {ne[0]} values do not fit {dst}'s {block_size(dst)}-blocks "
            f"({why}); choose a type whose block divides {ne[0]}"
        )
    needs = allowed and requires_imatrix(name, dst, rec.name)
    return Choice(name, ne, src, dst, why, needs)


def _get_type(name, ne, st: _State, pure, output_type, token_embd_type) -> tuple[str, str]:
    """llama_tensor_get_type: the type of a tensor llama.cpp quantizes, and why."""
    cat = category(name)
    if token_embd_type and cat == TOKEN_EMBD:
        # per_layer_token_embd follows it unless a --tensor-type names it
        if name != "per_layer_token_embd.weight" or st.manual(name) is None:
            return token_embd_type, "--token-embedding-type"
    if output_type and cat == OUTPUT:
        return output_type, "--output-tensor-type"
    rec = st.counters.recipe
    new, why = rec.default, ""
    manual = st.manual(name)
    if manual is not None:
        new, why = manual[0], f"--tensor-type {manual[1]}"
    elif rec.quantized and not pure:
        new = mix(name, ne, cat, new, st.counters, output_type)
        why = f"{rec.name} mix" if new != rec.default else ""
    if is_quantized_type(new):
        new, why = _fallback(name, ne, new, why)
    return new, why


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


def _fallback(name: str, ne: Sequence[int], dst: str, why: str) -> tuple[str, str]:
    ncols, block = ne[0], block_size(dst)
    if ncols % block == 0:
        return dst, why
    if dst in FALLBACK:
        new = FALLBACK[dst]
    elif block <= 32:  # a 32-block type has nothing smaller: F16 below
        new = dst
    else:
        raise ModelIOError(
            f"tensor {name!r}: rows of {ncols} values do not fit {dst}'s {block}-blocks, and "
            f"llama.cpp defines no fallback for {dst}"
        )
    if ncols % block_size(new):
        new = "F16"
    note = f"{ncols}-wide rows do not fit {dst}'s {block}-blocks: {dst} -> {new}"
    return new, f"{why}; {note}" if why else note
