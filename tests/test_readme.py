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


def test_trained_model_commands_compose_as_printed():
    """Every command of 'Compress a model you already trained' is a config Hydra composes and
    the library's checks accept (a sweep: each of its points)."""
    from compress.config import validate_run
    from configstore import plain_config
    from tests.test_config import compose_cfg

    section = (ROOT / "README.md").read_text().split("## Compress a model you already trained\n")[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    assert len(commands) >= 5
    for words in commands:
        assert words[0] == "python", words
        script, args = words[1].removesuffix(".py"), [w for w in words[2:] if w != "-m"]
        points = [[]]
        for arg in args:  # a sweep's comma lists: every point
            key, _, values = arg.partition("=")
            points = [p + [f"{key}={v}"] for p in points for v in values.split(",")]
        for overrides in points:
            cfg = plain_config(compose_cfg(script, overrides))
            validate_run(cfg)
