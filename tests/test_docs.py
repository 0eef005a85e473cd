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


@pytest.mark.parametrize("module", ["flightquant.options", "flightquant.reference", "flightquant.codec",
                                    "flightquant.api", "flightquant.kernels"])
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
