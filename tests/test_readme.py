"""Every ```python block of the README runs as-is, on the current backend, in a fresh process."""

import pathlib
import re

import pytest
from helpers import run_in_fresh_process

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    run_in_fresh_process(BLOCKS[index], cwd=tmp_path)
