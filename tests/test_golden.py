"""Golden files: a change that breaks files written by format v1 must fail here."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

import flightquant as fq

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CASES = sorted(p.name[: -len(".v1.arrow")] for p in FIXTURES.glob("*.v1.arrow"))
OPTIONS = {
    "asym4_g32_list": dict(bits=4, scheme="asymmetric", group_size=32),
    "sym8_g7_fixed": dict(bits=8, scheme="symmetric", group_size=7),
    "ternary_g16_large": dict(scheme="ternary", group_size=16),
    "asym2_g3_mse_f16_stats": dict(
        bits=2, scheme="asymmetric", group_size=3, method="mse", stats=True
    ),
}


def read(path) -> pa.Table:
    with ipc.open_file(path) as f:
        return f.read_all()


def test_all_cases_present():
    assert CASES == sorted(OPTIONS)


@pytest.mark.parametrize("case", CASES)
def test_old_files_decode(case):
    golden = read(FIXTURES / f"{case}.v1.arrow")
    source = read(FIXTURES / f"{case}.input.arrow")
    md = golden.schema.field(golden.schema.names[1]).metadata
    assert md[b"flightquant.format_version"] == b"1"
    back = fq.dequantize(golden)
    assert back.schema.equals(source.schema)
    assert back.equals(read(FIXTURES / f"{case}.decoded.arrow"))  # bit for bit
    col = source.schema.names[1]
    for got, want in zip(back.column(col).to_pylist(), source.column(col).to_pylist()):
        assert (got is None) == (want is None)
        if want is not None:
            assert len(got) == len(want)
            assert np.all(np.isfinite(got))


@pytest.mark.parametrize("case", CASES)
def test_this_version_writes_the_same_bytes(case):
    golden = read(FIXTURES / f"{case}.v1.arrow")
    source = read(FIXTURES / f"{case}.input.arrow")
    assert fq.quantize(source, **OPTIONS[case]).equals(golden, check_metadata=True)


def test_wire_format_is_documented_with_the_same_keys():
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "wire-format.md").read_text()
    golden = read(FIXTURES / "asym4_g32_list.v1.arrow")
    for key in golden.schema.field("weights").metadata:
        assert key.decode() in doc, key
