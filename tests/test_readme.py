"""Every ```python block of the README and of the docs' guides runs as-is, in a fresh process.

The blocks run on the current backend, so CI runs each on TensorFlow, JAX and PyTorch.
"""

import pathlib
import re

import pytest
from helpers import run_in_fresh_process

pytestmark = pytest.mark.slow  # end to end; the minimum-Keras CI run skips it

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = {
    f"{page.relative_to(ROOT)}-{i}": block
    for page in PAGES
    if "examples" not in page.parts and "benchmarks" not in page.parts
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL))
}


def test_the_readme_and_every_guide_have_python_blocks():
    assert any(name.startswith("README.md") for name in BLOCKS)
    guides = sorted((ROOT / "docs" / "guides").glob("*.md"))
    assert len(guides) == 10
    for guide in guides:
        assert any(name.startswith(str(guide.relative_to(ROOT))) for name in BLOCKS), guide


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_runs(name, tmp_path):
    run_in_fresh_process(BLOCKS[name], cwd=tmp_path)
