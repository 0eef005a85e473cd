"""flightquant's GGUF job against llama.cpp's own ``llama_model_quantize`` on the same input.

Builds a llama-shaped F16 GGUF with gguf-py (random weights, a vocabulary), quantizes it with
both (llama.cpp with ``pure``, so both choose the same types), and prints per type: seconds,
file size, and the SNR of the quantized tensors against the F16 input (decoded with
``gguf.quants.dequantize``), with flightquant/llama.cpp ratios from the same run.

    python benchmarks/bench_gguf.py [--dim 1024] [--layers 4] [--types Q8_0,Q4_K,Q6_K]

Needs llama-cpp-python (``llama_cpp``).
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, quants

FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7, "Q2_K": 10, "Q3_K": 12,
          "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}  # fmt: skip


def llama_matrices(d: int, n_ff: int, layers: int, vocab: int) -> list[tuple[str, int, int]]:
    """(name, rows, cols) of the matrices of the llama-shaped model :func:`build` writes."""
    out = [("token_embd.weight", vocab, d)]
    for i in range(layers):
        for n, r in (("attn_q", d), ("attn_k", d // 2), ("attn_v", d // 2), ("attn_output", d)):
            out.append((f"blk.{i}.{n}.weight", r, d))
        out += [(f"blk.{i}.ffn_gate.weight", n_ff, d), (f"blk.{i}.ffn_up.weight", n_ff, d),
                (f"blk.{i}.ffn_down.weight", d, n_ff)]  # fmt: skip
    return out + [("output.weight", vocab, d)]


def build(path: Path, d: int, n_ff: int, layers: int, vocab: int, matrix=None,
          file_type: int = 1) -> None:  # fmt: skip
    """A llama-shaped GGUF with a vocabulary. ``matrix(name, rows, cols)`` gives each
    matrix as (array, raw ggml type or None); default: heavy-tailed random F16."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(d // 64)
    w.add_head_count_kv(d // 128)
    w.add_rope_dimension_count(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(file_type)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(vocab - 3)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))

    def m(name, rows, cols):
        if matrix is not None:
            arr, raw_dtype = matrix(name, rows, cols)
            w.add_tensor(name, arr, raw_dtype=raw_dtype)
            return
        x = rng.standard_t(5, (rows, cols)) * 0.02  # heavy-tailed like trained weights
        w.add_tensor(name, x.astype(np.float16))

    for name, rows, cols in llama_matrices(d, n_ff, layers, vocab):  # norms in their places
        if name.endswith("attn_q.weight"):
            w.add_tensor(name.replace("attn_q", "attn_norm"), np.ones(d, np.float32))
        elif name == "output.weight":
            w.add_tensor("output_norm.weight", np.ones(d, np.float32))
        m(name, rows, cols)
        if name.endswith("attn_output.weight"):
            w.add_tensor(name.replace("attn_output", "ffn_norm"), np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def snr_db(src: Path, out: Path) -> float:
    ref = {t.name: t for t in GGUFReader(str(src)).tensors}
    sig = err = 0.0
    for t in GGUFReader(str(out)).tensors:
        if t.tensor_type == ref[t.name].tensor_type:
            continue
        x = ref[t.name].data.astype(np.float64).reshape(-1)
        y = quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        sig += float(x @ x)
        err += float((x - y) @ (x - y))
    return 10 * np.log10(sig / err) if err else float("inf")


def main() -> None:
    import llama_cpp

    from flightquant.cli import main as fq_main

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ff", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--types", default="Q8_0,Q4_K,Q6_K")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # keep a reference
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f16.gguf"
        build(src, args.dim, args.ff, args.layers, args.vocab)
        print(f"input: {src.stat().st_size / 2**20:.1f} MiB F16, dim {args.dim}, "
              f"{args.layers} layers, vocab {args.vocab}, {args.threads} threads")  # fmt: skip
        warm = Path(tmp) / "warm.gguf"  # load the codec and kernels before timing anything
        assert fq_main(["quantize", str(src), "-o", str(warm), "--format", "Q8_0", "-q"]) == 0
        print(f"{'type':6} {'who':14} {'seconds':>8} {'MiB':>8} {'SNR dB':>7}   fq/llama.cpp")
        for typ in args.types.split(","):
            lc = Path(tmp) / f"lc-{typ}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.pure, params.nthread = FTYPES[typ], True, args.threads
            t0 = time.perf_counter()
            assert llama_cpp.llama_model_quantize(str(src).encode(), str(lc).encode(),
                                                  ctypes.byref(params)) == 0  # fmt: skip
            t_lc = time.perf_counter() - t0
            rows = [("llama.cpp", t_lc, lc)]
            for method in ("rtn", "mse"):
                out = Path(tmp) / f"fq-{typ}-{method}.gguf"
                t0 = time.perf_counter()
                argv = ["quantize", str(src), "-o", str(out), "--format", typ, "--pure", "--method", method,
                        "-q", "--threads", str(args.threads)]  # fmt: skip
                assert fq_main(argv) == 0
                rows.append((f"flightquant {method}", time.perf_counter() - t0, out))
            base = snr_db(src, lc)
            for who, seconds, path in rows:
                s = snr_db(src, path)
                ratio = "" if who == "llama.cpp" else (
                    f"time {seconds / t_lc:.2f}x, size {path.stat().st_size / lc.stat().st_size:.3f}x, "
                    f"SNR {s - base:+.2f} dB"
                )  # fmt: skip
                print(f"{typ:6} {who:14} {seconds:8.2f} {path.stat().st_size / 2**20:8.2f} "
                      f"{s:7.2f}   {ratio}")  # fmt: skip


if __name__ == "__main__":
    main()
