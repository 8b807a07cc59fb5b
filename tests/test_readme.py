"""README.md and every page of docs/ run as printed.

- every ```python block runs (exec, in a fresh namespace); where a page shows what a block
  prints, the output is compared (PRINTS);
- every command of a ```bash block is checked as far as it can be without real files or data:
  `python ENTRY.py ...` (and `torchrun ... train.py ...`) composes into a config that Hydra and
  the library's checks accept, every point of a sweep (`-m`, comma lists) included, and a
  pipeline's stages are planned; `python -m MODULE` names a module that exists;
  `python bench/X.py --flag` a script that has that flag; `bash X.sh` a script that exists;
  `make T` a Makefile target. Paths in overrides (ckpt=RUN/best.pt, init_from=PATH) are not
  opened: composing and checking a config never reads them;
- every `$ python ...` line of a ```console block followed by `error: ...` prints that line,
  where the config checks are what refuse it (the others need real files);
- every relative link points to a file that exists, and a `#fragment` to a heading of it;
- the README stays a front page: at most README_MAX_LINES lines, linking every docs page, each
  of which links back to it.

Parametrized by page and line, so a failure names the block.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

import pack  # noqa: F401  (stores pack.py's schema, base_pack, in Hydra's ConfigStore)
from compress.config import validate_run
from compress.errors import ConfigError
from configstore import plain_config
from tests.conftest import ROOT

README = "README.md"
PAGES = [README, *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 320
ENTRY_POINTS = ("train", "prune", "fuse", "export", "calibrate", "pack")
# what a block prints, as its page says: (page, heading above the block) -> stdout
PRINTS = {
    (README, "Your own model"): "(4, 4) 14837 params\n3 BNs folded, logits (1, 10)\n",
}
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence
    lang: str
    heading: str  # the nearest heading above the block
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: str) -> list[Block]:
    out: list[Block] = []
    lang, start, body, heading = None, 0, [], ""
    for n, line in enumerate((ROOT / page).read_text().splitlines(), 1):
        if lang is None:
            m = FENCE.match(line)
            if m:
                lang, start, body = m.group(1), n, []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            out.append(Block(page, start, lang, heading, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"{page}:{start}: the code block is never closed"
    return out


BLOCKS = [b for page in PAGES for b in read_blocks(page)]


def block_commands(block: Block) -> list[tuple[str, list[str]]]:
    """(page:line, words) of every command of a bash block: continuation lines joined,
    comments dropped, quotes as the shell reads them."""
    out, pending, first = [], "", 0
    for n, line in enumerate(block.text.splitlines(), block.line + 1):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            out.append((f"{block.page}:{first}", words))
    return out


COMMANDS = [c for b in BLOCKS if b.lang == "bash" for c in block_commands(b)]


# ---------------------------------------------------------------- python blocks
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=lambda b: b.id)
def test_python_block_runs_as_printed(block):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.text, block.id, "exec"), {"__name__": "__docs__"})
    expected = PRINTS.get((block.page, block.heading))
    if expected is not None:
        assert out.getvalue() == expected


def test_every_printed_output_has_its_block():
    shown = {(b.page, b.heading) for b in BLOCKS if b.lang == "python"}
    assert set(PRINTS) <= shown


# ---------------------------------------------------------------- commands
def split_sweep(value: str) -> list[str]:
    """A sweep value's points: its commas outside brackets and quotes (`a,b` -> a, b;
    `[a,b]` stays one list)."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return [*parts, cur]


def sweep_points(args: list[str]) -> list[list[str]]:
    """The override lists a command runs: one, or with -m every point of its comma lists."""
    multirun = any(a in ("-m", "--multirun") for a in args)
    points: list[list[str]] = [[]]
    for arg in args:
        if arg in ("-m", "--multirun"):
            continue
        key, eq, value = arg.partition("=")
        values = split_sweep(value) if multirun and eq else [value]
        points = [p + [f"{key}{eq}{v}"] for p in points for v in values]
    return points


def check_config(script: str, overrides: list[str]) -> None:
    """Compose `script`'s config as Hydra would and run the checks the entry point runs on it
    before it opens any file."""
    from compress.deploy.onnx_export import BUILT
    from compress.deploy.ptq import validate_calib
    from compress.pipeline import plan
    from compress.tasks import calibrate as calibrate_task
    from compress.tasks import export as export_task
    from tests.test_config import compose_cfg

    cfg = plain_config(compose_cfg(script, overrides))
    validate_run(cfg)
    if script == "train" and cfg["schedule"].get("stages"):
        plan(cfg)  # every stage merged and checked, as the pipeline does before training
    if script == "export":
        export_task.check_common(cfg, BUILT)
        export_task.int8_choice(cfg)
        export_task.requant_batches(cfg)
    if script == "calibrate":
        export_task.check_common(cfg)
        validate_calib({**calibrate_task.CALIB_DEFAULTS, **(cfg.get("calib") or {})})


def check_bench_script(words: list[str]) -> None:
    path = ROOT / words[1]
    assert path.is_file(), f"{words[1]} does not exist"
    source = path.read_text()
    for w in words[2:]:
        if w.startswith("--"):
            flag = w.split("=")[0]
            assert f'"{flag}"' in source, f"{words[1]} has no option {flag}"


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_command_is_accepted_as_printed(where, words):
    if words[0] == "torchrun":  # torchrun's own options, then the script and its overrides
        words = ["python", *[w for w in words[1:] if not w.startswith("--")]]
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert words[1] in targets, f"make {words[1]}: no such Makefile target"
        return
    if words[0] == "bash":
        assert (ROOT / words[1]).is_file(), f"{words[1]} does not exist"
        return
    assert words[0] == "python", f"{where}: not a command this test knows: {words}"
    if words[1] == "-m":
        assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
        return
    script = words[1].removesuffix(".py")
    if script not in ENTRY_POINTS:
        check_bench_script(words)
        return
    for overrides in sweep_points(words[2:]):
        check_config(script, overrides)


def console_examples(block: Block) -> list[tuple[str, str]]:
    """(command, the error line printed after it) of a console block."""
    lines = block.text.splitlines()
    return [
        (line[2:], nxt)
        for line, nxt in zip(lines, [*lines[1:], ""], strict=True)
        if line.startswith("$ python ") and nxt.startswith("error: ")
    ]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "console"], ids=lambda b: b.id)
def test_console_errors_are_the_ones_printed(block):
    checked = 0
    for command, printed in console_examples(block):
        words = shlex.split(command)
        script = words[1].removesuffix(".py")
        try:
            check_config(script, words[2:])
        except ConfigError as e:
            assert f"error: {e}" == printed
            checked += 1
        # no error from the checks: the refusal needs a real file (a checkpoint)
    assert checked, "no example of this block is refused by the config checks"


# ---------------------------------------------------------------- links and the front page
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path, inline_code: bool = False) -> str:
    """The page without its code blocks, and without its inline code (which holds no links)
    unless `inline_code` (headings keep its text in their fragments)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return text if inline_code else re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's fragment of every heading: lower case, punctuation dropped, spaces to hyphens,
    -1, -2, ... after repeats."""
    seen: Counter[str] = Counter()
    out = set()
    for line in prose(page, inline_code=True).splitlines():
        if line.startswith("#"):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return out


def links(page: str) -> list[str]:
    return LINK.findall(prose(ROOT / page))


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_what_exists(page):
    found = links(page)
    assert found, f"{page} links nothing"
    for target in found:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = ((ROOT / page).parent / path).resolve() if path else ROOT / page
        assert dest.exists(), f"{page}: {target} -> {dest} does not exist"
        if fragment and dest.suffix == ".md":
            assert fragment in anchors(dest), f"{page}: {target}: no such heading in {dest.name}"


def test_readme_is_a_front_page():
    lines = (ROOT / README).read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    linked = {t.partition("#")[0] for t in links(README)}
    for page in PAGES[1:]:
        assert page in linked, f"README.md does not link {page}"
        back = {t.partition("#")[0] for t in links(page)}
        assert "../README.md" in back, f"{page} does not link back to the README"


def test_readme_sections_the_tests_rely_on():
    """The README's own examples: the python block of 'Your own model' (its output is
    compared above) and the commands of 'Compress a model you already trained'."""
    headings = {(b.heading, b.lang) for b in BLOCKS if b.page == README}
    assert ("Your own model", "python") in headings
    section = "Compress a model you already trained"
    trained = [
        c for b in BLOCKS if b.page == README and b.heading == section for c in block_commands(b)
    ]
    assert len(trained) >= 5
