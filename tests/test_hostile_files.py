"""Hostile and corrupt model files: one clear error line, never a crash, a hang, a traceback,
an allocation the size of the file's claim, or a partial output.

GGUF and safetensors files are built byte by byte here, then broken in the ways a hostile
or truncated file breaks them (counts, lengths, shapes and offsets that claim more than the
file holds); a seeded fuzz mutates valid files at random. Every case runs the real CLI
(``inspect``, then ``quantize``) in-process under ``tracemalloc``. Bounded: well under 20 s.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
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
