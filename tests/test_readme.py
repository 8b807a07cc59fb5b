"""The README's examples run as printed."""

from __future__ import annotations

import contextlib
import io
import re

from tests.conftest import ROOT


def python_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_your_own_model_example_runs_as_printed():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_block("Your own model"), "README.md", "exec"), {})
    assert out.getvalue() == "(4, 4) 14837 params\n3 BNs folded, logits (1, 10)\n"
