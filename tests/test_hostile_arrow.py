"""Hostile Arrow IPC files through every CLI command: one clear error line, never a crash.

pyarrow's IPC reader checks little (offsets, bitmaps and null counts are trusted), so a
crafted ``.arrow`` file could make a command read outside its buffers (SIGSEGV) or print
another column's bytes as tensor names. Every batch read from a file must pass the same
full validation as a batch from the network (``flightquant.validate``) before any of its
columns is read. The record batch messages of valid files (a plain tensor table and a
quantized one) are edited here in place, as ``test_hostile.py`` edits a batch on the wire:
the batch length, field nodes, buffer offsets and lengths in the flatbuffer header, the
offsets and bytes in the body; the footer stays valid, so pyarrow opens the file.

Each file goes through ``inspect`` (plain, ``--json``, ``--estimate``), ``quantize``
(``--estimate`` and a real run) or ``dequantize`` (to .arrow and .safetensors). A command
that reads the batches may succeed only on a file whose batches are all valid. Crashing
cases run in a child process, so a regression fails the test instead of killing pytest;
``test_fuzz_needs_the_validation`` shows the fuzz fails with the validation switched off.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from common import _field_pos, _u32, ipc_layout, run_isolated

from flightquant.cli import main

FUZZ_CASES = int(os.environ.get("FQ_HOSTILE_ARROW_CASES", "60"))


# --------------------------------------------------------------------------- files


def plain_table() -> pa.Table:
    """A tensor-layout table as `flightquant quantize` reads it (names, weights, shapes)."""
    rng = np.random.default_rng(5)
    names = ["model.layers.0.q.weight", "model.layers.0.k.weight", "model.norm.weight"]
    weights = [rng.standard_normal(64).astype(np.float32) for _ in names]
    return pa.table(
        {
            "layer_name": pa.array(names),
            "weights": pa.array(weights, pa.list_(pa.float32())),
            "shape": pa.array([[2, 32], [2, 32], [64]], pa.list_(pa.int64())),
            "dtype": pa.array(["float32"] * 3),
        }
    )


def write_ipc(path: Path, table: pa.Table) -> bytes:
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    return path.read_bytes()


def batch_messages(content: bytes) -> list[tuple[int, int]]:
    """(start of the flatbuffer, start of the body) of each record batch message of an
    Arrow IPC file (magic, then the stream: continuation, length, flatbuffer, body)."""
    out, pos = [], 8
    while pos + 8 <= len(content):
        cont, size = struct.unpack_from("<Ii", content, pos)
        if cont != 0xFFFFFFFF or size <= 0:
            break
        meta = content[pos + 8 : pos + 8 + size]
        root = _u32(meta, 0)
        kind, body_len = _field_pos(meta, root, 1), _field_pos(meta, root, 3)
        body = struct.unpack_from("<q", meta, body_len)[0] if body_len else 0
        if kind is not None and meta[kind] == 3:  # MessageHeader.RecordBatch
            out.append((pos + 8, pos + 8 + size))
        pos += 8 + size + body
    return out


def buffer_at(content: bytes, meta: int, index: int) -> tuple[int, int]:
    """(absolute offset, length) of buffer ``index`` of the batch whose flatbuffer starts
    at ``meta``."""
    _, _, bufs = ipc_layout(content[meta:])
    offset, length = struct.unpack_from("<qq", content, meta + bufs[index])
    body = next(b for m, b in batch_messages(content) if m == meta)
    return body + offset, length


def sound(path: Path) -> bool:
    """Whether pyarrow reads every batch of the file and each is fully valid."""
    try:
        with pa.ipc.open_file(str(path)) as reader:
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                batch.validate(full=True)
                if len(set(batch.schema.names)) != batch.num_columns:
                    return False
    except (pa.ArrowException, OSError):
        return False
    return True


# --------------------------------------------------------------------------- commands

#: (argv after the file, whether it reads the batches); {out} is an output path
PLAIN_COMMANDS = [
    (["inspect"], True),  # a tensor table: per-tensor sizes
    (["inspect", "--json"], False),  # the schema and row count only
    (["inspect", "--estimate", "--bits", "4"], True),
    (["quantize", "--estimate"], True),
    (["quantize", "-q", "-o", "{out}.arrow"], True),
]
QUANTIZED_COMMANDS = [
    (["inspect"], True),
    (["inspect", "--json"], True),
    (["dequantize", "-q", "-o", "{out}.arrow"], True),
    (["dequantize", "-q", "-o", "{out}.safetensors"], True),
]


def run_commands(path: Path, commands, out: Path, capsys) -> list[tuple[int, str, bool]]:
    """Each command on ``path``: (status, its error line, whether it reads the batches);
    checks that a failure is one line naming the file and leaves no output behind."""
    results = []
    for argv, reads in commands:
        args = [argv[0], str(path), *(a.format(out=out) for a in argv[1:])]
        rc = main(args)
        err = capsys.readouterr().err
        assert rc in (0, 1), (args, rc, err)
        assert "Traceback" not in err, err
        if rc:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("flightquant: error: "), err
            # the file, or (a codec error about the data) the column and row
            assert path.name in lines[0] or "column 'weights', row" in lines[0], lines[0]
        left = [
            p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))
        ]
        assert left == [] or rc == 0, (args, left)
        for p in out.parent.iterdir():
            if p.name.startswith(out.name):
                p.unlink()
        results.append((rc, err.strip(), reads))
    return results


def files(tmp: Path, capsys) -> dict[str, tuple[bytes, list]]:
    plain = write_ipc(tmp / "plain.arrow", plain_table())
    assert main(["quantize", str(tmp / "plain.arrow"), "-q", "-o", str(tmp / "q.arrow")]) == 0
    capsys.readouterr()
    return {
        "plain": (plain, PLAIN_COMMANDS),
        "quantized": ((tmp / "q.arrow").read_bytes(), QUANTIZED_COMMANDS),
    }


class Capture:
    """``capsys`` for a child process: sys.stdout/sys.stderr into buffers; ``real`` is the
    process's stdout, for its report."""

    def __init__(self):
        self.real = sys.stdout
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()

    def readouterr(self):
        out, err = sys.stdout.getvalue(), sys.stderr.getvalue()
        for stream in (sys.stdout, sys.stderr):
            stream.seek(0)
            stream.truncate()
        return types.SimpleNamespace(out=out, err=err)


# --------------------------------------------------------------------------- named cases


def crafted_offsets(tmp: Path, capsys, value: int) -> dict[str, Path]:
    """Both files with the layer_name offsets of their first batch pointing at ``value``."""
    out = {}
    for kind, (content, _) in files(tmp, capsys).items():
        b = bytearray(content)
        meta, _ = batch_messages(content)[0]
        start, length = buffer_at(content, meta, 1)  # column 0: validity, offsets, data
        assert length >= 8
        struct.pack_into("<i", b, start + 4, value)
        path = tmp / f"crafted-{kind}.arrow"
        path.write_bytes(bytes(b))
        assert not sound(path)
        out[kind] = path
    return out


CRAFTED = """
import json
from pathlib import Path
import test_hostile_arrow as t

capture = t.Capture()
tmp = Path({tmp!r})
report = {{}}
for kind, path in t.crafted_offsets(tmp, capture, {value}).items():
    commands = t.PLAIN_COMMANDS if kind == "plain" else t.QUANTIZED_COMMANDS
    report[kind] = t.run_commands(path, commands, tmp / "out", capture)
capture.real.write(json.dumps(report))
"""


@pytest.mark.parametrize("value", [2**30, 200, 400])
def test_string_offsets_past_the_data_are_refused_by_every_command(value, tmp_path):
    """Issue 18 defect 1: offsets of 2**30 crashed every command (SIGSEGV); 200/400 made
    ``inspect`` print another column's bytes as tensor names."""
    proc = run_isolated(CRAFTED.format(tmp=str(tmp_path), value=value))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    report = json.loads(proc.stdout)
    for kind, results in report.items():
        for (rc, err, reads), (argv, _) in zip(
            results, PLAIN_COMMANDS if kind == "plain" else QUANTIZED_COMMANDS, strict=True
        ):
            if not reads:
                continue
            assert rc == 1, (kind, argv, err)
            assert "column 'layer_name' is not a valid Arrow array" in err, err
            assert f"crafted-{kind}.arrow: batch 0" in err, err


# --------------------------------------------------------------------------- the fuzz


def mutate(rng: np.random.Generator, content: bytes) -> tuple[bytes, str]:
    """One to three structural edits of one record batch message, in place."""
    b = bytearray(content)
    msgs = batch_messages(content)
    meta, body = msgs[int(rng.integers(len(msgs)))]
    length_pos, nodes, bufs = ipc_layout(content[meta:])
    desc = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 5))
        if kind == 0 and length_pos is not None:
            value = [0, 1, 2, 4, 1000, 2**31][int(rng.integers(6))]
            struct.pack_into("<q", b, meta + length_pos, value)
            desc.append(f"length={value}")
        elif kind == 1:
            node = nodes[int(rng.integers(len(nodes)))]
            part = 8 * int(rng.integers(2))
            value = [0, 1, 2, 3, 5, 64, 2**31 - 1, -1][int(rng.integers(8))]
            struct.pack_into("<q", b, meta + node + part, value)
            desc.append(f"node{'.null_count' if part else '.length'}={value}")
        elif kind == 2:
            buf = bufs[int(rng.integers(len(bufs)))]
            part = 8 * int(rng.integers(2))
            value = [0, 8, 64, 256, 2**30, -8][int(rng.integers(6))]
            struct.pack_into("<q", b, meta + buf + part, value)
            desc.append(f"buffer{'.length' if part else '.offset'}={value}")
        else:  # an offset or a byte of the body
            buf = bufs[int(rng.integers(len(bufs)))]
            offset, length = struct.unpack_from("<qq", content, meta + buf)
            if length < 4:
                continue
            at = body + offset + 4 * int(rng.integers(length // 4))
            if kind == 3:
                value = [-1, 0, 1, 7, 200, 400, 2**30, 2**31 - 1][int(rng.integers(8))]
                struct.pack_into("<i", b, at, value)
                desc.append(f"body int32={value}")
            else:
                b[at] ^= int(rng.integers(1, 256))
                desc.append("body byte")
    return bytes(b), ", ".join(desc)


def fuzz(tmp: Path, capsys, seed: int, cases: int) -> dict[str, int]:
    """Seeded mutations of both files through every command; returns the outcome counts."""
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    bases = files(tmp, capsys)
    for index in range(cases):
        kind = ("plain", "quantized")[index % 2]
        content, commands = bases[kind]
        mutated, desc = mutate(rng, content)
        path = tmp / f"m-{kind}.arrow"
        path.write_bytes(mutated)
        valid = sound(path)
        for rc, _err, reads in run_commands(path, commands, tmp / "out", capsys):
            if reads and rc == 0:
                assert valid, f"case {index} ({kind}: {desc}): an invalid file was read"
            key = f"{kind}:{'valid' if valid else 'invalid'}:{'ok' if rc == 0 else 'error'}"
            counts[key] = counts.get(key, 0) + 1
    return counts


FUZZ = """
import json
from pathlib import Path
import flightquant.modelfiles.arrow_files as arrow_files
import test_hostile_arrow as t

if {unchecked}:
    arrow_files.validate_batch = lambda *args, **kwargs: None  # the validation switched off
capture = t.Capture()
counts = t.fuzz(Path({tmp!r}), capture, {seed}, {cases})
capture.real.write(json.dumps(counts))
"""


def run_fuzz(tmp: Path, seed: int, cases: int, unchecked: bool = False):
    """The fuzz in a child process: a crash fails the test instead of killing pytest."""
    code = FUZZ.format(unchecked=unchecked, tmp=str(tmp), seed=seed, cases=cases)
    return run_isolated(code)


def test_structural_fuzz_every_command(tmp_path):
    proc = run_fuzz(tmp_path, int(os.environ.get("FQ_HOSTILE_SEED", "18")), FUZZ_CASES)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    counts = json.loads(proc.stdout)
    # both outcomes, on both files: broken files refused, harmless edits accepted
    for kind in ("plain", "quantized"):
        assert counts.get(f"{kind}:invalid:error", 0) > 0, counts
        assert counts.get(f"{kind}:valid:ok", 0) > 0, counts


@pytest.mark.slow
def test_structural_fuzz_every_command_long(tmp_path):
    proc = run_fuzz(tmp_path, 19, 10 * FUZZ_CASES)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])


def test_fuzz_needs_the_validation(tmp_path):
    """With the file validation switched off, the same fuzz fails: a command reads an
    invalid file (an AssertionError) or the process dies of it (a signal)."""
    proc = run_fuzz(tmp_path, 18, FUZZ_CASES, unchecked=True)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert proc.returncode < 0 or "an invalid file was read" in proc.stderr, proc.stderr[-2000:]


SHRINK = """
import sys
from pathlib import Path
from flightquant.cli import accounting, main

path = Path({path!r})
record = accounting.Ledger._record

def record_then_shrink(self, batch, infos):  # another process truncates the input mid-job
    with open(path, "r+b") as fh:
        fh.truncate({cut})
    return record(self, batch, infos)

accounting.Ledger._record = record_then_shrink
sys.exit(main(["quantize", str(path), "-o", str(path.with_name("out.arrow")), "-q"]))
"""


@pytest.mark.parametrize("kind", ["ipc-file", "ipc-stream", "parquet"])
def test_table_shrinking_during_the_job_is_a_clean_error(kind, tmp_path):
    """Found with issue 18 defect 5: Parquet and IPC-stream inputs are read through a
    memory map, so a file truncated mid-job must be an error before the next read."""
    import pyarrow.parquet as pq

    table = pa.concat_tables([plain_table()] * 8)
    path = tmp_path / ("in.parquet" if kind == "parquet" else "in.arrow")
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=3)
    elif kind == "ipc-stream":
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table, max_chunksize=3)
    else:
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table, max_chunksize=3)
    proc = run_isolated(SHRINK.format(path=str(path), cut=path.stat().st_size // 3))
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and path.name in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
