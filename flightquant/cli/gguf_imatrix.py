"""``--imatrix FILE`` in the GGUF job: which importance vector each tensor gets, the checks
llama-quantize makes, and the ``quantize.imatrix.*`` keys it writes.

As llama-quantize: a tensor the file has no entry for is quantized without one (a tensor whose
recipe needs one, ``Q2_K`` in ``Q2_K_S``, is then an error); an entry of the wrong length is an
error except for ``token_embd`` (whose entry llama.cpp ignores); the keys record the file as
given on the command line and its first dataset (both cut to 127 bytes, as its
``llama_model_kv_override`` strings), the entry count and the chunk count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
from gguf import GGUFValueType

from ..modelfiles.gguf_policy import Choice
from .common import JobError

#: llama_model_kv_override's val_str holds 127 bytes and a NUL
MAX_STR = 127


def load(path: str):
    """The importance matrix in ``path`` (llama-imatrix's GGUF or legacy ``.dat``)."""
    from ..modelfiles.imatrix import read_imatrix

    return read_imatrix(path)


def vectors(imatrix, choices: Sequence[Choice]) -> dict[str, np.ndarray]:
    """Tensor name -> its importance vector (``ne0`` float32), for the tensors quantized."""
    out: dict[str, np.ndarray] = {}
    for c in choices:
        if not c.quantize:
            continue
        w = imatrix.importance(c.name)
        if w is None:
            if c.requires_imatrix:
                raise JobError(
                    f"the importance matrix has no entry for {c.name!r}, which {c.dst} in this "
                    'recipe needs (llama-quantize: "Missing importance matrix for tensor in a '
                    'very low-bit quantization")'
                )
            continue
        w = np.asarray(w, np.float32)
        n_mat = c.ne[2] if len(c.ne) > 2 else 1
        if w.size != c.ne[0] * n_mat:
            if c.name in ("token_embd.weight", "per_layer_token_embd.weight"):
                continue  # llama-quantize ignores it there
            raise JobError(
                f"the importance matrix's entry for {c.name!r} has {w.size} values, the "
                f"tensor needs {c.ne[0] * n_mat} ({c.ne[0]} per row"
                + (f" for each of {n_mat} experts)" if n_mat > 1 else ")")
            )
        w = w.reshape(n_mat, c.ne[0])
        if n_mat > 1 and not np.all(w == w[0]):
            raise JobError(
                f"{c.name!r}: per-expert importance vectors are not supported yet (each "
                "tensor goes through the codec as one row with one vector); quantize it "
                "without --imatrix (--keep it, or drop --imatrix)"
            )
        out[c.name] = np.ascontiguousarray(w[0])
    return out


def with_importance(batch: pa.RecordBatch, vecs: Mapping[str, np.ndarray]) -> pa.RecordBatch:
    """``batch`` with the codec's importance column for ``weights``: each row's vector by
    its layer name (none for the others)."""
    from ..arrays import with_importance

    names = set(batch.column("layer_name").to_pylist())
    return with_importance(batch, {n: w for n, w in vecs.items() if n in names}, ["weights"])


def metadata(path: str, imatrix) -> dict[str, tuple[int, object]]:
    """The ``quantize.imatrix.*`` keys llama-quantize writes, in its order."""
    out: dict[str, tuple[int, object]] = {
        "quantize.imatrix.file": (GGUFValueType.STRING, _cut(path)),
    }
    if imatrix.datasets:
        out["quantize.imatrix.dataset"] = (GGUFValueType.STRING, _cut(imatrix.datasets[0]))
    out["quantize.imatrix.entries_count"] = (GGUFValueType.UINT32, len(imatrix.entries))
    if imatrix.chunk_count > 0:
        out["quantize.imatrix.chunks_count"] = (GGUFValueType.UINT32, imatrix.chunk_count)
    return out


def _cut(text: str) -> str:
    return text.encode("utf-8")[:MAX_STR].decode("utf-8", "ignore")
