"""Hostile and corrupt model files: one clear error line, never a crash, a hang, a traceback,
an allocation the size of the file's claim, or a partial output.

GGUF and safetensors files are built byte by byte here, then broken in the ways a hostile
or truncated file breaks them (counts, lengths, shapes and offsets that claim more than the
file holds); a seeded fuzz mutates valid files at random. Every case runs the real CLI
(``inspect``, then ``quantize``) in-process under ``tracemalloc``. Bounded: well under 20 s.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flightquant.cli import main

#: no case may allocate more than this (the files are a few KiB; the claims are terabytes)
PEAK_LIMIT = 32 << 20
#: nor take longer than this (a count of 2**60 must not become a loop of 2**60)
TIME_LIMIT = 5.0

# --------------------------------------------------------------------------- GGUF bytes

U8, U32, F32, STRING, ARRAY, U64 = 0, 4, 6, 8, 9, 10


def s(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, ne, ggml_type: int = 0, offset: int = 0, n_dims=None) -> bytes:
    nd = len(ne) if n_dims is None else n_dims
    return (
        s(name)
        + struct.pack("<I", nd)
        + b"".join(struct.pack("<Q", d) for d in ne)
        + (struct.pack("<IQ", ggml_type, offset))
    )


def gguf(
    kvs=None,
    infos=None,
    data: bytes | None = None,
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    align: int = 32,
) -> bytes:
    """A GGUF file: header, metadata, tensor infos, padding, data."""
    rng = np.random.default_rng(0)
    if kvs is None:
        kvs = [
            kv("general.architecture", STRING, s("llama")),
            kv("llama.block_count", U32, struct.pack("<I", 1)),
            kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 3) + s("a") + s("bc") + s("d")),
            kv("tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", F32, 3) + struct.pack("<3f", 0, 1, 2)),
        ]  # fmt: skip
    if infos is None:
        infos = [
            tensor_info("blk.0.attn_q.weight", (64, 4), 0, 0),
            tensor_info("blk.0.attn_norm.weight", (64,), 0, 1024),
        ]
    if data is None:
        data = (rng.standard_normal(64 * 5) * 0.1).astype("<f4").tobytes()
    head = struct.pack("<4sIQQ", b"GGUF", version, len(infos) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)  # fmt: skip
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % align)
    return body + data


# --------------------------------------------------------------------------- safetensors bytes


def safetensors(header: dict | bytes | None = None, data: bytes | None = None, n=None) -> bytes:
    if header is None:
        header = {
            "__metadata__": {"format": "pt"},
            "w": {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]},
            "b": {"dtype": "BF16", "shape": [64], "data_offsets": [2048, 2176]},
            "ids": {"dtype": "I64", "shape": [4], "data_offsets": [2176, 2208]},
        }
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if data is None:
        data = np.random.default_rng(1).standard_normal(552).astype("<f4").tobytes()[:2208]
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


# --------------------------------------------------------------------------- running a case


def attempt(path: Path, tmp: Path, capsys, fmt_args) -> tuple[int, str]:
    """``inspect`` then (if it could open the file) ``quantize``; checks the invariants and
    returns the first failing status and its error line (0, "" when the file was fine)."""
    out = tmp / ("out" + (".gguf" if path.suffix == ".gguf" else ".arrow"))
    results = []
    for argv in (["inspect", path], ["quantize", path, "-o", out, "-q", *fmt_args]):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            rc = main([str(a) for a in argv])
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        seconds = time.perf_counter() - t0
        captured = capsys.readouterr()
        err = captured.err
        assert peak < PEAK_LIMIT, (argv[0], peak)
        assert seconds < TIME_LIMIT, (argv[0], seconds)
        assert rc in (0, 1), (argv[0], rc, err)
        assert "Traceback" not in err and "MemoryError" not in err, err
        if rc:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("flightquant: error: "), err
            assert str(path.name) in lines[0] or argv[0] == "quantize", lines[0]
        results.append((rc, err.strip()))
        if argv[0] == "quantize":
            leftovers = [p.name for p in tmp.iterdir() if p.name.startswith((".out", "out"))]
            assert leftovers == ([out.name] if rc == 0 else []), (leftovers, err)
            if rc == 0:
                out.unlink()
        if rc:
            break
    return next(((rc, e) for rc, e in results if rc), (0, ""))


def check(tmp: Path, name: str, content: bytes, capsys, needle: str | None) -> None:
    path = tmp / name
    path.write_bytes(content)
    fmt = ["--format", "Q8_0"] if name.endswith(".gguf") else []
    rc, err = attempt(path, tmp, capsys, fmt)
    if needle is not None:
        assert rc == 1, f"{name}: accepted"
        assert needle in err, err
    path.unlink()


# --------------------------------------------------------------------------- GGUF cases

BIG = 2**62
GGUF_CASES = {
    "valid": (gguf(), None),
    "tensor count 2**62": (gguf(n_tensors=BIG), "claims"),
    "kv count 2**64-1": (gguf(n_kv=2**64 - 1), "claims"),
    "kv count one too many": (gguf(n_kv=5), "claims"),
    "key length 2**62": (gguf(kvs=[s("k", BIG) + b"x"]), "claims"),
    "string value 2**40": (gguf(kvs=[kv("k", STRING, s("abc", 2**40))]), "claims"),
    "u8 array of 2**61": (gguf(kvs=[kv("k", ARRAY, struct.pack("<IQ", U8, 2**61))]), "claims"),
    "u64 array of 2**60": (gguf(kvs=[kv("k", ARRAY, struct.pack("<IQ", U64, 2**60))]), "claims"),
    "string array of 2**58": (
        gguf(kvs=[kv("k", ARRAY, struct.pack("<IQ", STRING, 2**58) + s("a"))]),
        "claims",
    ),
    "array of arrays": (
        gguf(kvs=[kv("k", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U8, 0))]),
        "arrays of arrays",
    ),
    "unknown value type": (gguf(kvs=[kv("k", 99, b"")]), "unknown value type"),
    "1000 dimensions": (gguf(infos=[tensor_info("t", (64,) * 3, n_dims=1000)]), "dimensions"),
    "0 dimensions": (gguf(infos=[tensor_info("t", (), n_dims=0)]), "dimensions"),
    "dims of 2**62": (gguf(infos=[tensor_info("t.weight", (64, BIG))]), "claims"),
    "product overflowing 64 bits": (
        gguf(infos=[tensor_info("t.weight", (2**40, 2**40, 2**40))]),
        "claims",
    ),
    "unknown ggml type": (gguf(infos=[tensor_info("t", (64,), 99)]), "unknown ggml type"),
    "offset beyond the file": (gguf(infos=[tensor_info("t", (64,), 0, 2**50)]), "claims"),
    "misaligned offset": (gguf(infos=[tensor_info("t", (64,), 0, 4)]), "misaligned"),
    "row not a block multiple": (gguf(infos=[tensor_info("t", (33,), 8)]), "block size"),
    "alignment 3": (
        gguf(kvs=[kv("general.alignment", U32, struct.pack("<I", 3))]),
        "power of two",
    ),
    "duplicate key": (
        gguf(kvs=[kv("a", U32, b"\0\0\0\0"), kv("a", U32, b"\0\0\0\0")]),
        "appears twice",
    ),
    "duplicate tensor": (
        gguf(infos=[tensor_info("t", (64,)), tensor_info("t", (64,), 0, 256)]),
        "appears twice",
    ),
    "version 1": (gguf(version=1), "version 1"),
    "big-endian": (gguf(version=3 << 24), "big-endian"),
    "not GGUF": (b"GGML" + gguf()[4:], "no GGUF magic"),
    "empty": (b"", "not a valid GGUF"),
    "data truncated": (gguf()[:-1], "claims"),
    "bad UTF-8 key": (gguf(kvs=[s(b"\xff\xfe") + struct.pack("<I", U8) + b"\0"]), "UTF-8"),
}


# issue 18
GGUF_CASES.update(
    {
        "alignment 2**30": (
            gguf(kvs=[kv("general.alignment", U32, struct.pack("<I", 2**30))]),
            "general.alignment 1073741824 is larger than",
        ),
        "shape (0, 2**64-1)": (
            gguf(infos=[tensor_info("blk.0.attn_q.weight", (0, 2**64 - 1))]),
            "beyond int64",
        ),
        "two tensors on the same bytes": (
            gguf(
                infos=[
                    tensor_info("blk.0.attn_q.weight", (64, 4), 0, 0),
                    tensor_info("blk.0.attn_k.weight", (64, 4), 0, 0),
                ]
            ),
            "overlaps the data of 'blk.0.attn_q.weight'",
        ),
        "data out of order": (
            gguf(
                infos=[
                    tensor_info("blk.0.attn_norm.weight", (64,), 0, 1024),
                    tensor_info("blk.0.attn_q.weight", (64, 4), 0, 0),
                ]
            ),
            "is before the data of 'blk.0.attn_norm.weight'",
        ),
    }
)


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_crafted_gguf(case, tmp_path, capsys):
    content, needle = GGUF_CASES[case]
    check(tmp_path, "m.gguf", content, capsys, needle)


@pytest.mark.parametrize("cut", [1, 4, 8, 16, 23, 30, 60, 100, 200, 300])
def test_truncated_gguf(cut, tmp_path, capsys):
    content = gguf()
    check(tmp_path, "m.gguf", content[:cut], capsys, "")


# --------------------------------------------------------------------------- safetensors cases


def _entry(**kw):
    e = {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}
    e.update(kw)
    return {"w": e}


ST_CASES = {
    "valid": (safetensors(), None),
    "header length 2**63": (safetensors(n=2**63), "claims"),
    "header length beyond the file": (safetensors(n=10**6), "claims"),
    "not JSON": (safetensors(b"{not json"), "not a valid safetensors"),
    "not a map": (safetensors(b"[1, 2]"), "not a map"),
    "deeply nested": (safetensors(b"[" * 100000 + b"]" * 100000), "not a valid safetensors"),
    "huge shape": (safetensors(_entry(shape=[2**40, 2**40])), "do not hold shape"),
    "negative dimension": (safetensors(_entry(shape=[-8, -64])), "non-negative"),
    "float dimension": (safetensors(_entry(shape=[8.0, 64])), "non-negative"),
    "1000 dimensions": (safetensors(_entry(shape=[1] * 1000)), "non-negative"),
    "offsets beyond the file": (safetensors(_entry(data_offsets=[0, 2**50])), "claims"),
    "offsets reversed": (safetensors(_entry(data_offsets=[2048, 0])), "data_offsets"),
    "offsets not ints": (safetensors(_entry(data_offsets=["0", "2048"])), "data_offsets"),
    "unknown dtype": (safetensors(_entry(dtype="Q4_K" * 100)), "not supported"),
    "overlap": (
        safetensors(
            {
                "a": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]},
                "b": {"dtype": "F32", "shape": [64], "data_offsets": [128, 384]},
            }
        ),
        "overlap",
    ),
    "bad metadata": (safetensors({"__metadata__": [1]}), "__metadata__"),
    "data truncated": (safetensors()[:-1], "claims"),
    "short": (b"\x01\x02", "not a valid safetensors"),
}


@pytest.mark.parametrize("case", list(ST_CASES))
def test_crafted_safetensors(case, tmp_path, capsys):
    content, needle = ST_CASES[case]
    check(tmp_path, "m.safetensors", content, capsys, needle)


# --------------------------------------------------------------------------- fuzz


def _mutate(rng: np.random.Generator, content: bytes, header_end: int) -> bytes:
    b = bytearray(content)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 4))
        pos = int(rng.integers(0, max(1, header_end)))
        if kind == 0:  # flip a byte
            b[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:  # an extreme 8-byte count or length
            values = [2**64 - 1, 2**63, 2**40, 2**32, 2**31, 0]
            value = values[int(rng.integers(len(values)))]
            b[pos : pos + 8] = struct.pack("<Q", value)
        elif kind == 2:  # an extreme 4-byte field (a type, a dimension count)
            values = [2**32 - 1, 99, 1000, 0]
            b[pos : pos + 4] = struct.pack("<I", values[int(rng.integers(len(values)))])
        else:  # truncate
            del b[int(rng.integers(0, len(b))) :]
    return bytes(b)


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_fuzz(fmt, tmp_path, capsys):
    """Seeded random mutations of valid files: every outcome is success or one error line."""
    rng = np.random.default_rng(20260)
    if fmt == "gguf":
        content = gguf()
        header_end = len(content) - 64 * 5 * 4
    else:
        content = safetensors()
        header_end = 8 + struct.unpack("<Q", content[:8])[0]
    t0 = time.perf_counter()
    outcomes = {0: 0, 1: 0}
    for _ in range(200):
        path = tmp_path / f"m.{fmt}"
        path.write_bytes(_mutate(rng, content, header_end))
        rc, _ = attempt(path, tmp_path, capsys, ["--format", "Q8_0"] if fmt == "gguf" else [])
        outcomes[rc] += 1
    assert outcomes[1] > 60  # most mutations of a header are caught
    assert time.perf_counter() - t0 < 20


# --------------------------------------------------------------------------- issue 18

REFUSED_GGUF = [case for case, (_, needle) in GGUF_CASES.items() if needle]


@pytest.mark.parametrize("case", list(REFUSED_GGUF))
def test_estimate_refuses_what_quantize_refuses(case, tmp_path, capsys):
    """Issue 18 defect 9: `--estimate` exited 0 on a shape that quantize refused."""
    path = tmp_path / "m.gguf"
    path.write_bytes(GGUF_CASES[case][0])
    for argv in (["quantize", "--estimate"], ["inspect", "--estimate"]):
        rc = main([*argv[:1], str(path), *argv[1:], "--format", "Q8_0"])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "m.gguf" in err, (argv, err)


@pytest.mark.parametrize("flags", [["--method", "bogus"], ["--clip", "-1"]])
def test_estimate_refuses_the_options_quantize_refuses(flags, tmp_path, capsys):
    """Found with issue 18: a GGUF `--estimate` took a --method or --clip the job refused."""
    (tmp_path / "m.gguf").write_bytes(gguf())
    for argv in (
        ["quantize", "--estimate"],
        ["inspect", "--estimate"],
        ["quantize", "-o", "o.gguf"],
    ):
        rc = main([argv[0], str(tmp_path / "m.gguf"), *argv[1:], "--format", "Q8_0", *flags])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and flags[0][2:] in err, (argv, err)


def test_padding_is_never_built_in_memory(tmp_path, capsys):
    """Issue 18 defect 3: the largest alignment read (1 MiB here; 2**30 is refused above)
    is padding written from a small zero block, not a list of 8-byte ints per byte."""
    from flightquant.modelfiles import GGUFFile, GGUFOutput, OutTensor
    from flightquant.modelfiles.gguf_files import MAX_ALIGNMENT

    align = MAX_ALIGNMENT
    data = np.ones(64, "<f4").tobytes()
    content = gguf(
        kvs=[kv("general.alignment", U32, struct.pack("<I", align))],
        infos=[tensor_info("a.weight", (64,), 0, 0), tensor_info("b.weight", (64,), 0, align)],
        data=data + bytes(align - len(data)) + data,
        align=align,
    )
    (tmp_path / "m.gguf").write_bytes(content)
    src = GGUFFile(tmp_path / "m.gguf")
    out = GGUFOutput(
        tmp_path / "o.gguf", src, [OutTensor(t.name, t.ne, t.type) for t in src.tensors]
    )
    tracemalloc.start()
    try:
        for t in src.tensors:
            out.write(t.name, src.data(t))
        out.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        src.close()
    assert peak < align // 2, peak  # gguf-py's own padding: 8 bytes per byte
    written = (tmp_path / "o.gguf").read_bytes()  # the same, padded after the last tensor
    assert written[: len(content)] == content and len(written) % align == 0
    assert not any(written[len(content) :])


SHRINK = """
import sys
from pathlib import Path
from flightquant.cli import main, quantize_gguf

path = Path({path!r})
plan = quantize_gguf.plan

def plan_then_shrink(args, source):  # another process truncates the input mid-job
    choices = plan(args, source)
    with open(path, "r+b") as fh:
        fh.truncate({cut})
    return choices

quantize_gguf.plan = plan_then_shrink
sys.exit(main(["quantize", str(path), "-o", str(path.with_name("out.gguf")), "-q",
               "--format", "Q8_0", "--type", "*norm*=F16"]))
"""


@pytest.mark.parametrize("cut", [0, 100, -4])
def test_gguf_shrinking_during_the_job_is_a_clean_error(cut, tmp_path):
    """Issue 18 defect 5: the kept and converted tensors' reads touched the memory map past
    the end of a file truncated mid-job (SIGBUS) and left the .part file."""
    from common import run_isolated

    path = tmp_path / "m.gguf"
    content = gguf()
    path.write_bytes(content)
    proc = run_isolated(SHRINK.format(path=str(path), cut=cut % len(content)))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "m.gguf" in lines[0] and "truncated" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_zero_size_tensor_requantized(tmp_path, capsys):
    """Issue 18 defect 9: a zero-size Q8_0 tensor with --allow-requantize raised NumPy's
    "cannot reshape array of size 0"."""
    import gguf as gguf_py

    content = gguf(
        infos=[tensor_info("blk.0.attn_q.weight", (32, 0), 8, 0), tensor_info("t.weight", (64, 4))],
    )
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    out = tmp_path / "o.gguf"
    argv = ["quantize", str(path), "-o", str(out), "-q", "--format", "Q4_0", "--allow-requantize"]
    assert main(argv) == 0, capsys.readouterr().err
    tensors = {t.name: t for t in gguf_py.GGUFReader(str(out)).tensors}
    assert tensors["blk.0.attn_q.weight"].n_elements == 0


# ----------------------------------------------------------------- inputs that are not files

FIFO_CHILD = """
import json, os, sys
from pathlib import Path
from flightquant.cli import main

results = {{}}
for name in {names!r}:
    path = Path({tmp!r}) / name
    os.mkfifo(path)
    argv = ["inspect", str(path)]
    if name == "model-folder":
        argv = ["quantize", str(path), "-o", str(path) + "-out", "--format", "compressed-tensors"]
    results[name] = main(argv)
print(json.dumps(results))
"""


def test_fifo_inputs_are_refused(tmp_path):
    """Issue 18 defect 7: `inspect` on a FIFO named .npy/.npz/.arrow/.parquet/.gguf hung
    forever (the child process's timeout is the hang)."""
    from common import run_isolated

    names = ["x.npy", "x.npz", "x.arrow", "x.parquet", "x.gguf", "x.safetensors", "model-folder"]
    proc = run_isolated(FIFO_CHILD.format(names=names, tmp=str(tmp_path)), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == dict.fromkeys(names, 1)
    lines = proc.stderr.splitlines()
    assert len(lines) == len(names) and all("is a FIFO, not a regular file" in x for x in lines)


def test_device_input_is_refused(capsys):
    assert main(["inspect", "/dev/zero.npy"]) == 1  # no such file
    capsys.readouterr()
    from flightquant.modelfiles import check_input_file

    with pytest.raises(ValueError, match="is a device"):
        check_input_file("/dev/zero")


# --------------------------------------------------------------------------- model folders


def ct_model(folder: Path) -> Path:
    """A tiny Llama-shaped float model folder (one Linear weight, a norm, config.json)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((64, 128)) * 0.05).astype("<f2"),
        "model.norm.weight": np.ones(128, "<f2"),
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    return folder


def ct_quantize(src: Path, out: Path, capsys) -> tuple[int, str]:
    argv = ["quantize", str(src), "-o", str(out), "--format", "compressed-tensors"]
    rc = main([*argv, "--group-size", "64"])
    return rc, capsys.readouterr().err


def test_side_files_never_come_from_outside_the_folder(tmp_path, capsys):
    """Issue 18 defect 2: side files were copied by following symlinks
    (generation_config.json -> /proc/self/environ put the environment into the output)."""
    src = ct_model(tmp_path / "models" / "m")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.txt").write_text("secret")
    (src / "generation_config.json").symlink_to("/proc/self/environ")
    (src / "tokenizer.json").symlink_to("../../elsewhere/secret.txt")
    (src / "special_tokens_map.json").symlink_to("/dev/zero")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "vocab.txt").symlink_to("tokenizer_config.json")  # inside: fine
    os.mkfifo(src / "merges.txt")  # not a regular file: skipped, no hang
    rc, err = ct_quantize(src, tmp_path / "out", capsys)
    assert rc == 0, err
    copied = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert copied == ["config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt"]
    for name in ("generation_config.json", "tokenizer.json"):
        assert f"warning: not copied: {src / name}: leads to" in err, err
    assert "secret" not in (tmp_path / "out" / "vocab.txt").read_text()


def test_side_files_of_a_hugging_face_cache_snapshot_are_copied(tmp_path, capsys):
    """A snapshot's files are symlinks into its repository's blobs/: that is inside."""
    repo = tmp_path / "models--org--m"
    snap = ct_model(repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text('{"version": "1.0"}')
    (snap / "tokenizer.json").symlink_to("../../blobs/f00d")
    config = snap / "config.json"
    (repo / "blobs" / "c0de").write_text(config.read_text())
    config.unlink()
    config.symlink_to("../../blobs/c0de")
    rc, err = ct_quantize(snap, tmp_path / "out", capsys)
    assert rc == 0, err
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def test_config_outside_the_folder_is_refused(tmp_path, capsys):
    src = ct_model(tmp_path / "m")
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "llama", "token": "x"}))
    (src / "config.json").unlink()
    (src / "config.json").symlink_to("../other.json")
    rc, err = ct_quantize(src, tmp_path / "out", capsys)
    assert rc == 1 and "outside the model folder" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_files_are_capped(name, tmp_path, capsys):
    """Issue 18 defect 8: a 367 MB index took 2 GiB of memory, a 1 GiB config.json 3.1 GiB."""
    from flightquant.modelfiles import MAX_JSON_BYTES

    src = ct_model(tmp_path / "m")
    with open(src / name, "wb") as fh:  # sparse: no disk, and never read
        fh.truncate(MAX_JSON_BYTES + 1)
    tracemalloc.start()
    try:
        rc, err = ct_quantize(src, tmp_path / "out", capsys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rc == 1 and f"{src / name}: {MAX_JSON_BYTES + 1} bytes, more than the" in err, err
    assert peak < PEAK_LIMIT


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_one_line(name, tmp_path, capsys):
    """Issue 18 defect 9: JSON nested 100k deep was a bare RecursionError."""
    src = ct_model(tmp_path / "m")
    (src / name).write_text("[" * 100_000 + "]" * 100_000)
    rc, err = ct_quantize(src, tmp_path / "out", capsys)
    assert rc == 1 and err.count("\n") == 1, err
    assert f"{src / name} is JSON nested too deeply" in err, err


def test_unreadable_file_is_named(tmp_path):
    """Issue 18 defect 9: a side file that cannot be read was a bare [Errno 5]."""
    from flightquant.modelfiles import ModelIOError, copy_file

    with pytest.raises(ModelIOError, match=r"^/proc/self/mem: cannot copy \(Input/output error\)"):
        copy_file("/proc/self/mem", tmp_path / "copy")  # reading address 0: EIO
    assert list(tmp_path.iterdir()) == []  # no partial copy left


# --------------------------------------------------------------------------- outputs


def test_output_problems_are_found_before_the_work(tmp_path, capsys, monkeypatch):
    """Issue 18 defect 10: `[Errno 20] Not a directory` after quantizing everything."""
    from flightquant import api
    from flightquant.modelfiles import compressed_tensors

    def no_work(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(compressed_tensors, "_run_one", no_work)
    monkeypatch.setattr(api, "quantize", no_work)
    src = ct_model(tmp_path / "m")
    for target in (tmp_path / "missing", tmp_path / "empty"):
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        rc, err = ct_quantize(src, link, capsys)
        assert rc == 1 and "is a symbolic link" in err, err
    np.savez(tmp_path / "x.npz", w=np.ones((4, 64), np.float32))
    (tmp_path / "o.arrow").mkdir()
    assert main(["quantize", str(tmp_path / "x.npz"), "-o", str(tmp_path / "o.arrow")]) == 1
    assert "o.arrow: is a directory; give a file name" in capsys.readouterr().err


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("ext", [".arrow", ".parquet", ".gguf", ".safetensors"])
def test_outputs_get_the_umask_mode_or_keep_theirs(ext, tmp_path, capsys, umask_022):
    """Issue 18 defect 11: outputs were written 0600 (a mkstemp file renamed into place),
    even when they replaced a 0644 file."""
    if ext == ".gguf":
        (tmp_path / "in.gguf").write_bytes(gguf())
        argv = ["quantize", str(tmp_path / "in.gguf"), "--format", "Q8_0"]
    elif ext == ".safetensors":
        np.savez(tmp_path / "x.npz", w=np.ones((4, 64), np.float32))
        assert (
            main(["quantize", str(tmp_path / "x.npz"), "-q", "-o", str(tmp_path / "q.arrow")]) == 0
        )
        argv = ["dequantize", str(tmp_path / "q.arrow")]
    else:
        np.savez(tmp_path / "x.npz", w=np.ones((4, 64), np.float32))
        argv = ["quantize", str(tmp_path / "x.npz")]
    out = tmp_path / f"out{ext}"
    assert main([*argv, "-q", "-o", str(out)]) == 0, capsys.readouterr().err
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    out.chmod(0o640)
    assert main([*argv, "-q", "-o", str(out)]) == 0, capsys.readouterr().err
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


# --------------------------------------------------------------------------- the server's budget


def _with_key(batch: pa.RecordBatch, key: bytes, value: bytes) -> pa.RecordBatch:
    field = batch.schema.field("w")
    schema = batch.schema.set(0, field.with_metadata({**field.metadata, key: value}))
    return pa.RecordBatch.from_arrays(batch.columns, schema=schema)


def test_one_reading_of_the_metadata_sizes_and_decodes():
    """Issue 18 defect 4: a native batch that also said ``flightquant.format: Q8_0`` was
    sized by the memory budget as Q8_0 (4x less output) but decoded as native."""
    import flightquant as fq
    from flightquant import budget
    from flightquant.options import QuantOptions

    x = np.random.default_rng(0).standard_normal((1, 1 << 16)).astype(np.float64)
    batch = pa.record_batch({"w": pa.array(list(x), pa.list_(pa.float64()))})
    native = fq.quantize(batch, bits=2, group_size=1 << 16)
    ggml = fq.quantize(batch.cast(pa.schema([("w", pa.list_(pa.float32()))])), format="Q8_0")
    op = QuantOptions.from_mapping({"op": "dequantize"})
    for good, key, value in (
        (native, b"flightquant.format", b"Q8_0"),
        (ggml, b"flightquant.bits", b"8"),
        (ggml, b"flightquant.group_size", b"32"),
    ):
        bad = _with_key(good, key, value)
        assert budget.output_bound(bad, op) >= budget.output_bound(good, op)
        with pytest.raises(ValueError, match=f"has no {key.decode()} key"):
            fq.dequantize(bad)
    # what the native batch decodes to (64 Ki float64) is what the budget counts
    assert budget.output_bound(native, op) >= 8 << 16
    with (
        fq.Server("grpc://127.0.0.1:0") as server,
        fq.Client(f"grpc://127.0.0.1:{server.port}") as c,
    ):
        with pytest.raises(pa.ArrowInvalid, match="has no flightquant.format key"):
            c.dequantize(_with_key(native, b"flightquant.format", b"Q8_0"))
