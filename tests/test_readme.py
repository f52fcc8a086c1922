"""README.md stays true: its Python examples run, and it links every docs page."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md should show the Python API"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_shows_the_two_commands_and_links_every_doc():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"
