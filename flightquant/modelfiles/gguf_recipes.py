"""llama-quantize's recipes (``Q4_K_M``, ...) and their mixes: the type each tensor gets.

Ported from llama.cpp's ``src/llama-quant.cpp`` (the version llama-cpp-python 0.3.36
vendors): ``llama_ftype_get_default_type`` (:data:`RECIPES`), ``llama_tensor_get_type_impl``
(:func:`mix`), ``tensor_get_category`` (:func:`category`), the ``weights_map`` order its
layer counters see (:func:`llama_order`) and ``tensor_requires_imatrix``; the names and
aliases are ``tools/quantize/quantize.cpp``'s. :mod:`.gguf_policy` applies them with the
flags, the overrides and the row fallbacks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from .common import ModelIOError

#: the float types llama.cpp quantizes from (and can convert between)
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Recipe:
    """One of llama-quantize's file types: its name, ``general.file_type`` and default type."""

    name: str
    file_type: LlamaFileType
    default: str  # llama_ftype_get_default_type

    @property
    def quantized(self) -> bool:
        """A block-type recipe (the mixes and fallbacks apply); F32/F16/BF16 only convert."""
        return self.default not in FLOAT_TYPES


_F = LlamaFileType
#: llama-quantize's recipes that flightquant writes, by its names
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("Q4_0", _F.MOSTLY_Q4_0, "Q4_0"),
        Recipe("Q4_1", _F.MOSTLY_Q4_1, "Q4_1"),
        Recipe("Q5_0", _F.MOSTLY_Q5_0, "Q5_0"),
        Recipe("Q5_1", _F.MOSTLY_Q5_1, "Q5_1"),
        Recipe("Q8_0", _F.MOSTLY_Q8_0, "Q8_0"),
        Recipe("Q2_K", _F.MOSTLY_Q2_K, "Q2_K"),
        Recipe("Q2_K_S", _F.MOSTLY_Q2_K_S, "Q2_K"),
        Recipe("Q3_K_S", _F.MOSTLY_Q3_K_S, "Q3_K"),
        Recipe("Q3_K_M", _F.MOSTLY_Q3_K_M, "Q3_K"),
        Recipe("Q3_K_L", _F.MOSTLY_Q3_K_L, "Q3_K"),
        Recipe("Q4_K_S", _F.MOSTLY_Q4_K_S, "Q4_K"),
        Recipe("Q4_K_M", _F.MOSTLY_Q4_K_M, "Q4_K"),
        Recipe("Q5_K_S", _F.MOSTLY_Q5_K_S, "Q5_K"),
        Recipe("Q5_K_M", _F.MOSTLY_Q5_K_M, "Q5_K"),
        Recipe("Q6_K", _F.MOSTLY_Q6_K, "Q6_K"),
        Recipe("IQ4_NL", _F.MOSTLY_IQ4_NL, "IQ4_NL"),
        Recipe("IQ4_XS", _F.MOSTLY_IQ4_XS, "IQ4_XS"),
        Recipe("TQ1_0", _F.MOSTLY_TQ1_0, "TQ1_0"),
        Recipe("TQ2_0", _F.MOSTLY_TQ2_0, "TQ2_0"),
        Recipe("F16", _F.MOSTLY_F16, "F16"),
        Recipe("BF16", _F.MOSTLY_BF16, "BF16"),
        Recipe("F32", _F.ALL_F32, "F32"),
    )
}
#: llama-quantize's aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
#: every name ``--format`` takes for a GGUF input
RECIPE_NAMES = (*RECIPES, *ALIASES)


def recipe(name: str) -> Recipe:
    """The recipe called ``name`` (any case; an alias or a llama_ftype number as
    llama-quantize takes them); a :class:`ModelIOError` that lists them if none."""
    key = str(name).strip().upper()
    key = ALIASES.get(key, key)
    if key in RECIPES:
        return RECIPES[key]
    if key.isdigit():
        for r in RECIPES.values():
            if int(r.file_type) == int(key):
                return r
    raise ModelIOError(
        f"--format {name!r} is not a GGUF recipe; llama-quantize's names are: "
        + ", ".join(RECIPE_NAMES)
    )


@dataclass(frozen=True)
class ModelParams:
    """What of a model's hyperparameters llama.cpp's mixes look at."""

    arch: str = ""
    n_layer: int = 0  # block_count (hparams.n_layer_all)
    n_head: int = 0  # of layer 0
    n_head_kv: int = 0
    n_expert: int = 0
    n_layer_nextn: int = 0

    @classmethod
    def from_gguf(cls, value) -> ModelParams:
        """From a GGUF file's keys; ``value(key, default)`` reads one."""
        arch = value("general.architecture", "") or ""

        def first(key: str, default: int = 0) -> int:
            v = value(f"{arch}.{key}", default)
            v = v[0] if isinstance(v, list) and v else v
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default

        n_head = first("attention.head_count")
        return cls(
            arch=arch,
            n_layer=first("block_count"),
            n_head=n_head,
            n_head_kv=first("attention.head_count_kv", n_head),
            n_expert=first("expert_count"),
            n_layer_nextn=first("nextn_predict_layers"),
        )

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """``LLM_TYPE_70B``, the one model size the mixes look at (each architecture's
        ``load_arch_hparams``: by layer count)."""
        n = self.n_layer - self.n_layer_nextn
        if self.arch == "llama":
            return n == 80 and self.n_expert != 8 and self.n_head != self.n_head_kv
        return (self.arch, n) in {("deci", 80), ("olmo", 80), ("qwen2", 80), ("jais2", 68)}


# tensor_get_category: broad roles, by name
OUTPUT, TOKEN_EMBD, ATTN_QKV, ATTN_KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT = range(8)
FFN_UP, FFN_GATE, FFN_DOWN, OTHER = range(8, 12)
ATTN_V_LIKE = (ATTN_V, ATTN_QKV, ATTN_KV_B)
_BY_SUBSTRING = (
    ("attn_qkv.weight", ATTN_QKV),
    ("attn_kv_b.weight", ATTN_KV_B),
    ("attn_v.weight", ATTN_V),
    ("attn_k.weight", ATTN_K),
    ("attn_q.weight", ATTN_Q),
    ("attn_output.weight", ATTN_OUTPUT),
    ("ffn_up", FFN_UP),
    ("ffn_gate", FFN_GATE),
    ("ffn_down", FFN_DOWN),
)


def category(name: str) -> int:
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    return next((c for s, c in _BY_SUBSTRING if s in name), OTHER)


_BLK = re.compile(r"blk\.\s*([+-]?\d+)")


def _layer(name: str) -> int | None:
    """``sscanf(name, "blk.%d.")``: the block number a name starts with, if any."""
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def llama_order(names: Sequence[str]) -> list[int]:
    """Indices of ``names`` in the order llama.cpp walks them (its ``weights_map``: by block
    number, tensors outside blocks first, then by name): the order its layer counters see."""
    return sorted(
        range(len(names)),
        key=lambda i: (-1 if (b := _layer(names[i])) is None else b, names[i].encode()),
    )


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers a mix gives more bits: the first and last eighth, and every third between."""
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


@dataclass
class Counters:
    """quantize_state_impl: what the mixes know of the model and the counters they advance,
    in llama.cpp's tensor order."""

    model: ModelParams
    recipe: Recipe
    n_attention_wv: int  # attn_v-like tensors in the file
    tied: bool  # has_tied_embeddings: no tensor called output.weight
    has_imatrix: bool = False
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    @classmethod
    def start(cls, names: Sequence[str], model: ModelParams, recipe: Recipe,
              has_imatrix: bool = False) -> Counters:  # fmt: skip
        return cls(model, recipe, sum(category(n) in ATTN_V_LIKE for n in names),
                   "output.weight" not in names, has_imatrix)  # fmt: skip


def requires_imatrix(name: str, dst: str, ftype: str) -> bool:
    """tensor_requires_imatrix, for the types flightquant writes."""
    if category(name) in (OUTPUT, TOKEN_EMBD):
        return False
    return dst == "Q2_K" and ftype == "Q2_K_S"


def mix(name: str, ne, cat: int, new: str, st: Counters, output_type: str | None) -> str:
    """llama_tensor_get_type_impl for the recipes of :data:`RECIPES`: the mix's type for one
    tensor (``new`` is the recipe's default), advancing the layer counters as it does."""
    m, f = st.model, st.recipe.name
    falcon = m.arch == "falcon"
    if m.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        return "Q8_0"
    if cat == OUTPUT or (st.tied and cat == TOKEN_EMBD):
        if output_type:
            return output_type
        if falcon or ne[0] % GGML_QUANT_SIZES[GGMLQuantizationType[new]][0]:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == TOKEN_EMBD:
        return "Q4_K" if f in ("TQ1_0", "TQ2_0") else new
    if cat in ATTN_V_LIKE:
        i, n = st.i_attention_wv, st.n_attention_wv
        if f == "Q2_K":
            new = "Q4_K" if m.n_gqa >= 4 else "Q3_K"
        elif f == "Q2_K_S" and m.n_gqa >= 4:
            new = "Q4_K"
        elif f == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif f == "Q3_K_L":
            new = "Q5_K"
        elif f in ("IQ4_NL", "IQ4_XS") and m.n_gqa >= 4:
            new = "Q5_K"
        elif f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = "Q6_K"
        elif f == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if m.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if m.n_expert == 8:
            new = "Q8_0"
        st.i_attention_wv += 1
    elif cat == ATTN_K:
        if m.n_expert == 8:
            new = "Q8_0"
    elif cat == FFN_DOWN:
        i, n = _layer_info(st.i_ffn_down, m, name)
        if f == "Q2_K":
            new = "Q3_K"
        elif f == "Q2_K_S":
            if i < n // 8:
                new = "Q4_K"
        elif f == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K" if not falcon or use_more_bits(i, n) else "Q3_K"
        elif f == "Q3_K_L":
            new = "Q4_K" if falcon else "Q5_K"
        elif f == "Q4_K_M":
            if falcon:
                new = "Q6_K" if i < n // 16 else "Q5_K" if use_more_bits(i, n) else "Q4_K"
            elif use_more_bits(i, n):
                new = "Q6_K"
        elif i < n // 8 and f in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
            new = "Q5_K"
        elif f == "Q5_K_M" and use_more_bits(i, n):
            new = "Q6_K"
        elif f == "Q4_K_S" and not falcon and i < n // 8:
            new = "Q5_K"
        elif f in ("Q4_0", "Q5_0") and st.has_imatrix and i < n // 8:
            new = "Q4_1" if f == "Q4_0" else "Q5_1"
        st.i_ffn_down += 1
    elif cat == ATTN_OUTPUT:
        if not falcon:
            if m.n_expert == 8:
                if f in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    new = "Q5_K"
            elif f == "Q2_K":
                new = "Q3_K"
            elif f == "Q3_K_M":
                new = "Q4_K"
            elif f == "Q3_K_L":
                new = "Q5_K"
        elif f == "Q3_K_L":
            new = "Q4_K"
    elif cat == FFN_GATE:
        _layer_info(st.i_ffn_gate, m, name)
        st.i_ffn_gate += 1
    elif cat == FFN_UP:
        _layer_info(st.i_ffn_up, m, name)
        st.i_ffn_up += 1
    return new


def _layer_info(i_layer: int, m: ModelParams, name: str) -> tuple[int, int]:
    """The layer a mix rule sees: the counter, or (MoE: experts are not consecutive) the
    block number in the name."""
    if m.n_expert > 1:
        b = _layer(name)
        if b is None:
            raise ModelIOError(f"tensor {name!r}: cannot tell its layer (expected 'blk.N.')")
        if not 0 <= b < m.n_layer:
            raise ModelIOError(f"tensor {name!r}: layer {b} is not in [0, {m.n_layer})")
        return b, m.n_layer
    return i_layer, m.n_layer
