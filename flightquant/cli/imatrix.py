"""``flightquant imatrix``: an importance matrix from a server's session or from a model.

Two forms:

- ``flightquant imatrix --server URL --session NAME -o OUT`` writes a calibration session
  (fed by any number of workers, see ``docs/server.md``) as llama.cpp's imatrix file;
- ``flightquant imatrix MODEL_DIR --text FILE -o OUT`` runs a transformers model on CPU over
  the text, in chunks of ``--chunk-size`` tokens as ``llama-imatrix`` does, hooks the input
  of every ``torch.nn.Linear`` and accumulates the sums of squares in-process, or streams
  them to ``--server`` (session ``--session``, a fresh one by default).

``--names gguf`` names the entries as llama.cpp's converter names the weights (gguf-py's
tensor-name map), so the file fits ``llama-quantize --imatrix``; ``--names hf`` (the
default) keeps the model's own weight names, which ``flightquant quantize --imatrix`` uses
on safetensors and compressed-tensors.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

from ..modelfiles.imatrix import DEFAULT_CHUNK_SIZE, FORMATS, Imatrix, write_imatrix
from ..progress import bar
from .common import JobError, command, one_line_errors, positive_int, read_token


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``imatrix`` to the ``flightquant`` parser."""
    p = subparsers.add_parser(
        "imatrix",
        help="make llama.cpp's importance matrix (from a server session, or by running a model)",
        description=(
            "Write llama.cpp's importance matrix (imatrix) file: from a calibration session "
            "on a server (--server URL --session NAME), or by running a transformers "
            "model (MODEL_DIR) over a text file on CPU and hooking the input of every Linear."
        ),
    )
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="a transformers model folder")
    p.add_argument("--text", metavar="FILE", help="calibration text (UTF-8), with MODEL_DIR")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the imatrix file")
    p.add_argument(
        "--output-format",
        choices=FORMATS,
        default=None,
        help="gguf (llama.cpp's current format) or dat (legacy); default: dat for a .dat "
        "OUT, else gguf",
    )
    p.add_argument("--server", metavar="URL", help="a flightquant server holding the session")
    p.add_argument("--session", metavar="NAME", help="the calibration session on --server")
    p.add_argument("--token-file", metavar="PATH", help="file holding the server's bearer token")
    p.add_argument(
        "--names",
        choices=("hf", "gguf"),
        default="hf",
        help="entry names: the model's weight names (hf, default) or llama.cpp's GGUF names (gguf)",
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help=f"tokens per forward pass (default {DEFAULT_CHUNK_SIZE}, as llama-imatrix's context)",
    )
    p.add_argument("--max-chunks", type=positive_int, default=None, metavar="N")
    p.add_argument(
        "--threads", type=positive_int, default=None, metavar="N", help="torch CPU threads"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)
    one_line_errors(p)


@command
def run(args: argparse.Namespace) -> int:
    """``flightquant imatrix``."""
    fmt = args.output_format or ("dat" if args.output.endswith(".dat") else "gguf")
    token = read_token(args.token_file) if args.token_file else None
    if args.token_file and not args.server:
        raise JobError("--token-file needs --server")
    if args.model is None:
        if args.text is not None:
            raise JobError("--text needs MODEL_DIR (the model to run over the text)")
        if not (args.server and args.session):
            raise JobError(
                "give MODEL_DIR --text FILE (run a model), or --server URL --session NAME "
                "(write a server's calibration session)"
            )
        summary = _from_session(args, token, fmt)
    else:
        if args.text is None:
            raise JobError("MODEL_DIR needs --text FILE (the calibration text)")
        if args.session and not args.server:
            raise JobError("--session needs --server")
        summary = _from_model(args, token, fmt)
    if not args.quiet:
        if args.json:
            print(json.dumps(summary))
        else:
            print(_describe(summary))
    return 0


def _client(args: argparse.Namespace, token: str | None):
    from ..client import Client

    return Client(args.server, token=token)


def _from_session(args: argparse.Namespace, token: str | None, fmt: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    with _client(args, token) as client:
        imx = client.imatrix(args.session, chunk_size=args.chunk_size)
    if not imx.entries:
        raise JobError(f"session {args.session!r} on {args.server} has no data yet")
    write_imatrix(args.output, imx, format=fmt)
    return _summary(imx, args, fmt, seconds=time.perf_counter() - t0)


def _summary(imx: Imatrix, args, fmt: str, **more: Any) -> dict[str, Any]:
    counts = [int(e.counts.max()) for e in imx.entries.values()]
    return {
        "output": args.output,
        "format": fmt,
        "entries": len(imx.entries),
        "tokens": max(counts, default=0),
        "chunks": imx.chunk_count,
        "chunk_size": imx.chunk_size,
        **more,
    }


def _describe(s: dict[str, Any]) -> str:
    line = (
        f"imatrix: {s['entries']} entries, {s['tokens']} tokens ({s['chunks']} chunks of "
        f"{s['chunk_size']})"
    )
    if "tokens_per_second" in s:
        line += f", {s['tokens_per_second']:.1f} tokens/s in {s['seconds']:.2f} s ({s['where']})"
        if s.get("skipped"):
            line += f", {s['skipped']} Linear layers without a GGUF name skipped"
    return f"{line} -> {s['output']} ({s['format']})"


# --------------------------------------------------------------------------- running a model


def _from_model(args: argparse.Namespace, token: str | None, fmt: str) -> dict[str, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise JobError(
            "flightquant imatrix MODEL_DIR needs torch and transformers: "
            "pip install 'flightquant[hf]'"
        ) from None
    from ..torch_hooks import LinearInputs

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise JobError(f"{model_dir}: not a transformers model folder (no config.json)")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{args.text}: cannot read the text ({exc})") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # ours is the one bar
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        chunks = _chunks(tokenizer, text, args.chunk_size, args.max_chunks, args.text)
        model = _load_model(transformers, model_dir)
    except (OSError, ValueError) as exc:
        raise JobError(f"{model_dir}: cannot load the model ({_first(exc)})") from None
    names = _gguf_names(model.config) if args.names == "gguf" else None

    client = session = None
    made_session = False
    if args.server:
        client = _client(args, token)
        session = args.session or f"imatrix-{uuid.uuid4().hex[:12]}"
        made_session = not args.session
    t0 = time.perf_counter()
    try:
        hooks = LinearInputs(model, client=client, session=session, names=names)
        if not hooks.layers:
            raise JobError(f"{model_dir}: the model has no torch.nn.Linear layers to hook")
        bar = _bar(args, len(chunks))
        with hooks, torch.no_grad():
            for ids in chunks:
                model(input_ids=torch.tensor([ids], dtype=torch.long))
                bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0
        datasets = [args.text]
        if client is not None:
            imx = client.imatrix(session, datasets=datasets, chunk_size=args.chunk_size)
        else:
            from ..modelfiles.imatrix import imatrix_from_sums

            imx = imatrix_from_sums(
                hooks.accumulator.snapshot(), datasets=datasets, chunk_size=args.chunk_size
            )
        imx.chunk_count = len(chunks)
        write_imatrix(args.output, imx, format=fmt)
    finally:
        if client is not None:
            if made_session:
                try:
                    client.drop_session(session)
                except Exception:  # noqa: BLE001 - it expires on its own
                    pass
            client.close()
    n_tokens = len(chunks) * args.chunk_size
    return _summary(
        imx,
        args,
        fmt,
        seconds=round(seconds, 3),
        tokens_per_second=n_tokens / seconds if seconds > 0 else 0.0,
        where=f"session {session!r} on {args.server}" if client is not None else "in-process",
        skipped=len(hooks.skipped),
    )


def _first(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _load_model(transformers, model_dir: Path):
    """A causal LM where the config names one (so lm_head is hooked too), else the base
    model (encoders such as BERT)."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    cls = transformers.AutoModel
    if any(a.endswith("ForCausalLM") for a in archs):
        cls = transformers.AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, torch_dtype="float32")
    model.eval()
    return model


def _chunks(tokenizer, text: str, size: int, most: int | None, path: str) -> list[list[int]]:
    """The text's tokens in chunks of ``size``, a partial last chunk dropped, the first
    token of each a BOS where the tokenizer has one (as llama-imatrix does)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // size
    if most is not None:
        n = min(n, most)
    if n < 1:
        raise JobError(
            f"{path}: {len(ids)} tokens, fewer than one chunk of --chunk-size {size}; give "
            "more text or a smaller --chunk-size"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    chunks = []
    for i in range(n):
        chunk = list(ids[i * size : (i + 1) * size])
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def _gguf_names(config):
    """``module name -> GGUF weight name`` from gguf-py's tensor-name map (None: no GGUF
    name, the layer is skipped)."""
    import gguf

    arch_of = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    model_type = getattr(config, "model_type", None)
    arch = arch_of.get(model_type)
    if arch is None:
        raise JobError(
            f"--names gguf: gguf-py has no architecture for model_type {model_type!r}; "
            "use --names hf"
        )
    n_blocks = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    tmap = gguf.get_tensor_name_map(arch, int(n_blocks))

    def name(module_name: str) -> str | None:
        parts = module_name.split(".")
        for candidate in (module_name, ".".join(parts[1:]), f"model.{module_name}"):
            if candidate:
                mapped = tmap.get_name(candidate + ".weight", try_suffixes=(".weight",))
                if mapped is not None:
                    return mapped
        return None

    return name


def _bar(args: argparse.Namespace, total: int):
    return bar(total, "imatrix", quiet=args.quiet, unit="chunks")
