"""The docs match the code: README commands, README examples and docstring examples run."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    bash = code_blocks("bash")
    assert bash[0].strip() == "python3 -m pip install . && flightquant serve"
    test_cmd = bash[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, "the README's test command must be a line of .ci/run"


def test_readme_python_api_example_runs():
    block = next(b for b in code_blocks("python") if "fq.quantize(table" in b)
    namespace: dict = {}
    exec(compile(block.replace("progress=print", "progress=None"), "README.md", "exec"), namespace)
    assert namespace["q2"].equals(namespace["q"])


@pytest.mark.parametrize(
    "module",
    [
        "flightquant.options",
        "flightquant.reference",
        "flightquant.codec",
        "flightquant.api",
        "flightquant.kernels",
        "flightquant.validate",
        "flightquant.budget",
        "flightquant.errors",
        "flightquant.calibration",
        "flightquant.sessions",
        "flightquant.modelfiles.imatrix",
        "flightquant.metrics",
        "flightquant.logs",
    ],
)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_plain_flight_example_runs(capsys):
    import numpy as np
    import pyarrow as pa

    import flightquant as fq

    block = next(b for b in code_blocks("python") if "flight.connect" in b)
    table = pa.table(
        {
            "layer_name": ["a", "b"],
            "weights": pa.array(
                [np.ones(300, np.float32), np.arange(5, dtype=np.float32)], pa.list_(pa.float32())
            ),
        }
    )
    with fq.Server("grpc://127.0.0.1:0") as server:
        code = block.replace("grpc://127.0.0.1:8815", server.location)
        exec(compile(code, "README.md", "exec"), {"table": table})
    printed = capsys.readouterr().out
    assert '"batch_index": 0' in printed.replace("'", '"') or "'batch_index': 0" in printed
