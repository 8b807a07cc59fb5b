"""`make mutation`'s driver (tests/mutation/run.py): the plan, the sample, the exclusions, the
score, and one real cosmic-ray mutant killed and one surviving on a toy module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.mutation import run

pytest.importorskip("cosmic_ray")

CORE = [
    "compress/quant/primitives.py",
    "compress/quant/quantizers.py",
    "compress/quant/lsq.py",
    "compress/quant/int8.py",
    "compress/fuse.py",
    "compress/pack.py",
    "compress/prune/graph.py",
    "compress/prune/importance.py",
    "compress/prune/pruner.py",
    "compress/deploy/qdq.py",
    "compress/engine.py",
    "compress/config.py",
    "compress/checkpoint.py",
    "compress/spec.py",
]
TOY = """\
from __future__ import annotations


def add(a: int, b: int | None = None) -> int:
    return a + (b or 0)


def unused_limit() -> int:
    return 7
"""
TOY_TEST = """\
from toy import add


def test_add():
    assert add(2, 3) == 5
"""


def test_the_plan_covers_the_core_modules_with_tests_that_exist():
    plan = run.load_plan()
    paths = [m.path for m in plan.modules]
    assert set(CORE) <= set(paths) and len(paths) == len(set(paths))
    for m in plan.modules:
        assert (ROOT / m.path).is_file(), m.path
        assert m.tests and all((ROOT / t).is_file() for t in m.tests), m.tests
        assert m.sample >= 20
    for e in plan.equivalent:
        assert {"module", "before", "after", "reason"} <= set(e) and e["reason"].strip()


def test_the_sample_is_seeded_sized_and_in_source_order():
    mutants = [run.Mutant("m.py", f"op{i % 3}", i, line=100 - i) for i in range(50)]
    a = run.sample(mutants, 10, seed=0)
    assert a == run.sample(list(reversed(mutants)), 10, seed=0)  # the input order does not matter
    assert len(a) == 10 and len(set(a)) == 10 and set(a) <= set(mutants)
    assert [m.line for m in a] == sorted(m.line for m in a)
    assert a != run.sample(mutants, 10, seed=1)
    assert run.sample(mutants, 80, seed=0) == sorted(
        mutants, key=lambda m: (m.line, m.operator, m.occurrence)
    )


def test_mutants_in_lazy_annotations_are_left_out(tmp_path):
    (tmp_path / "toy.py").write_text(TOY)
    lazy = run.all_mutants(tmp_path, "toy.py")
    (tmp_path / "toy.py").write_text(TOY.replace("from __future__ import annotations\n", ""))
    eager = run.all_mutants(tmp_path, "toy.py")
    on_line_4 = {m.operator for m in lazy if m.line == 4}
    assert not any("BitOr" in op for op in on_line_4)  # `int | None` in the signature
    assert any("BitOr" in m.operator and m.line == 3 for m in eager)  # evaluated there: kept
    assert any("Add" in m.operator and m.line == 5 for m in lazy)  # the body is mutated


def test_score_counts_equivalents_apart():
    diff = "--- a\n+++ b\n@@\n-    x = a + 1\n+    x = a - 1\n"
    assert run.changed_lines(diff) == ("x = a + 1", "x = a - 1")
    plan = run.Plan(
        [],
        0,
        3,
        60,
        [{"module": "m.py", "before": "x = a + 1", "after": "x = a - 1", "reason": "r"}],
    )
    module = run.Module("m.py", ("t.py",), 20)
    results = [
        {"outcome": "killed", "diff": ""},
        {"outcome": "timeout", "diff": ""},
        {"outcome": "survived", "diff": diff},  # listed: equivalent
        {"outcome": "survived", "diff": diff.replace("1", "2")},
        {"outcome": "incompetent", "diff": ""},
    ]
    s = run.score(plan, module, results)
    assert (s["killed"], s["timeout"], s["survived"], s["equivalent"], s["incompetent"]) == (
        1,
        1,
        1,
        1,
        1,
    )
    assert s["score"] == pytest.approx(200 / 3)
    assert len(s["survivors"]) == 1


def test_a_real_mutant_is_killed_and_an_unseen_one_survives(tmp_path, monkeypatch):
    (tmp_path / "toy.py").write_text(TOY)
    (tmp_path / "test_toy.py").write_text(TOY_TEST)
    monkeypatch.chdir(tmp_path)
    mutants = run.all_mutants(tmp_path, "toy.py")
    plus = next(
        m for m in mutants if m.line == 5 and m.operator.endswith("ReplaceBinaryOperator_Add_Sub")
    )
    seven = next(m for m in mutants if m.line == 9 and m.operator.endswith("NumberReplacer"))
    killed = run.run_one(plus, ("test_toy.py",), timeout=60)
    survived = run.run_one(seven, ("test_toy.py",), timeout=60)
    assert killed["outcome"] == "killed" and "-    return a + (b or 0)" in killed["diff"]
    assert survived["outcome"] == "survived" and "return 7" in survived["diff"]
    assert (tmp_path / "toy.py").read_text() == TOY  # restored after each
    assert killed["key"].startswith("toy.py:")


def test_an_unknown_module_is_refused_in_one_line():
    with pytest.raises(
        SystemExit, match=r"unknown module in \['compress/nope.py'\]; modules.toml has: "
    ):
        run.main(["--modules", "compress/nope.py"])


def test_the_report_is_written_from_the_results(tmp_path, monkeypatch):
    page = tmp_path / "mutation.md"
    monkeypatch.setattr(run, "HERE", tmp_path)
    h = run.source_hash(ROOT / "compress/pack.py")
    rows = [
        {
            "key": "compress/pack.py:core/NumberReplacer:3",
            "line": 12,
            "outcome": "killed",
            "diff": "",
        },
        {
            "key": "compress/pack.py:core/AddNot:1",
            "line": 40,
            "outcome": "survived",
            "diff": "-    if x:\n+    if not x:",
        },
    ]
    (tmp_path / "results.jsonl").write_text(
        "".join(json.dumps({**r, "hash": h}) + "\n" for r in rows)
    )
    plan = run.Plan([run.Module("compress/pack.py", ("tests/test_pack.py",), 40)], 0, 3, 60)
    run.write_report(plan, {"compress/pack.py": 1508}, page)
    text = page.read_text()
    assert "| `compress/pack.py` | 1508 | 2 | 1 | 1 | 0 | 0 | 50.0% |" in text
    assert "`compress/pack.py` line 40 (core/AddNot)" in text and "+    if not x:" in text
    assert Path(page).read_text().startswith("# Mutation testing")
