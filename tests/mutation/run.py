"""Mutation testing of the core modules with cosmic-ray: does the suite notice a planted bug?

Each core module (tests/mutation/modules.toml) gets every mutant cosmic-ray's operators make
of it; a seeded sample of them (the same sample on every machine) is applied one at a time to a
private copy of the repository and the module's own test files run against it (`pytest -x`,
one thread, `not slow`). A mutant is killed when they fail or run past the timeout, survives
when they pass. Survivors listed in tests/mutation/equivalent.toml (with the reason the change
cannot be observed) are equivalent and leave the score. Results go to
tests/mutation/results.jsonl as each mutant finishes, keyed by the module's source hash, so a
run resumes where it stopped and a changed module is tested again; docs/mutation.md is the
report.

    python -m tests.mutation.run                      # every module, 2 workers
    python -m tests.mutation.run --modules compress/pack.py --rerun-survivors
    python -m tests.mutation.run --report             # only rewrite docs/mutation.md
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / ".mutation"  # the workers' copies of the repository (git-ignored)
KILLED, SURVIVED, TIMEOUT, INCOMPETENT = "killed", "survived", "timeout", "incompetent"


@dataclass(frozen=True)
class Module:
    path: str
    tests: tuple[str, ...]
    sample: int


@dataclass(frozen=True)
class Mutant:
    module: str
    operator: str
    occurrence: int
    line: int
    col: int = 0

    @property
    def key(self) -> str:
        return f"{self.module}:{self.operator}:{self.occurrence}"


@dataclass
class Plan:
    modules: list[Module]
    seed: int
    timeout_factor: float
    min_timeout: float
    equivalent: list[dict] = field(default_factory=list)


def load_plan(
    modules_file: Path = HERE / "modules.toml", equivalent_file: Path = HERE / "equivalent.toml"
) -> Plan:
    cfg = tomllib.loads(modules_file.read_text())
    default = cfg.get("sample", 40)
    modules = [
        Module(m["path"], tuple(m["tests"]), int(m.get("sample", default))) for m in cfg["module"]
    ]
    equivalent = (
        tomllib.loads(equivalent_file.read_text()).get("mutant", [])
        if equivalent_file.exists()
        else []
    )
    return Plan(
        modules,
        int(cfg.get("seed", 0)),
        float(cfg.get("timeout_factor", 4)),
        float(cfg.get("min_timeout", 30)),
        equivalent,
    )


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def all_mutants(root: Path, module: str) -> list[Mutant]:
    """Every mutant cosmic-ray's operators make of `module` (its own enumeration, in a
    throwaway session)."""
    import cosmic_ray.commands
    from cosmic_ray.work_db import use_db

    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(root)
        try:
            with use_db(Path(tmp) / "session.sqlite") as db:
                cosmic_ray.commands.init([Path(module)], db, {})
                items = [m for w in db.work_items for m in w.mutations]
        finally:
            os.chdir(cwd)
    spans = annotation_spans(root / module)
    return [
        Mutant(module, m.operator_name, m.occurrence, *m.start_pos)
        for m in items
        if not any(a <= tuple(m.start_pos) < b for a, b in spans)
    ]


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Where the type annotations are, in a module that never evaluates them (`from __future__
    import annotations`): a mutant there (`int | None` -> `int + None`) changes nothing."""
    tree = ast.parse(path.read_text())
    lazy = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    if not lazy:
        return []
    nodes = []
    for n in ast.walk(tree):
        if isinstance(n, ast.arg | ast.AnnAssign) and n.annotation is not None:
            nodes.append(n.annotation)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.returns is not None:
            nodes.append(n.returns)
    return [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in nodes]


def sample(mutants: list[Mutant], n: int, seed: int) -> list[Mutant]:
    """A seeded sample of `n` (all when there are fewer), in source order: the same on every
    machine for the same source."""
    ordered = sorted(mutants, key=lambda m: (m.operator, m.occurrence))
    if len(ordered) > n:
        ordered = random.Random(f"{seed}:{mutants[0].module}").sample(ordered, n)
    return sorted(ordered, key=lambda m: (m.line, m.operator, m.occurrence))


def test_command(tests: tuple[str, ...]) -> str:
    """The module's test files: first failure stops them, fixed order, fast tests only."""
    return shlex.join(
        [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "--no-header",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "-W",
            "ignore",
            *tests,
        ]
    )


def test_env() -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.setdefault("COMPRESS_DATA_DIR", str(ROOT / "data"))
    env.pop("COMPRESS_EXPECTED_SKIPS", None)
    return env


def make_copy(dest: Path) -> Path:
    """The tracked files (and untracked, not ignored ones) of the checkout, without caches."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    if dest.exists():
        shutil.rmtree(dest)
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


# ---------------------------------------------------------------- the workers
def _init_worker(copies: multiprocessing.Queue) -> None:
    """Each worker process works in a copy of its own, taken from the queue."""
    os.chdir(copies.get())
    os.environ.update(test_env())


def run_one(mutant: Mutant, tests: tuple[str, ...], timeout: float) -> dict:
    """Apply `mutant` to this worker's copy, run the module's tests, restore the file."""
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_item import MutationSpec

    spec = MutationSpec(
        module_path=mutant.module,
        operator_name=mutant.operator,
        occurrence=mutant.occurrence,
        start_pos=(mutant.line, mutant.col),
        end_pos=(mutant.line, mutant.col + 1),
    )
    start = time.monotonic()
    result = mutate_and_test([spec], test_command(tests), timeout)
    seconds = round(time.monotonic() - start, 1)
    outcome = result.test_outcome.value if result.test_outcome else result.worker_outcome.value
    if outcome == KILLED and result.output == "timeout":
        outcome = TIMEOUT
    return {
        "key": mutant.key,
        "line": mutant.line,
        "outcome": outcome,
        "diff": result.diff or "",
        "seconds": seconds,
    }


def baseline(tests: tuple[str, ...], cwd: Path) -> float:
    """Seconds the unmutated module's tests take; they must pass."""
    start = time.monotonic()
    proc = subprocess.run(
        shlex.split(test_command(tests)), cwd=cwd, env=test_env(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"the tests {' '.join(tests)} fail without a mutant:\n{proc.stdout[-3000:]}"
        )
    return time.monotonic() - start


# ---------------------------------------------------------------- results and the report
def load_results(path: Path) -> dict[tuple[str, str], dict]:
    """(module hash, mutant key) -> its latest result."""
    out: dict[tuple[str, str], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r["hash"], r["key"])] = r
    return out


def changed_lines(diff: str) -> tuple[str, str]:
    """The removed and the added lines of a mutant's diff, stripped, blank ones left out."""

    def lines(sign: str) -> str:
        body = (
            ln[1:].strip()
            for ln in diff.splitlines()
            if ln.startswith(sign) and not ln.startswith(sign * 3)
        )
        return " / ".join(ln for ln in body if ln)

    return lines("-"), lines("+")


def equivalence(plan: Plan, module: str, diff: str, line: int | None = None) -> str | None:
    """The reason a surviving mutant is equivalent, when equivalent.toml lists it (by its
    changed lines, and by its line number where the same change occurs more than once)."""
    before, after = changed_lines(diff)
    for e in plan.equivalent:
        if e["module"] != module or e["before"].strip() != before or e["after"].strip() != after:
            continue
        if "line" not in e or e["line"] == line:
            return e["reason"]
    return None


def score(plan: Plan, module: Module, results: list[dict]) -> dict:
    counts = {KILLED: 0, TIMEOUT: 0, SURVIVED: 0, INCOMPETENT: 0, "equivalent": 0, "no-test": 0}
    survivors, equivalents = [], []  # equivalents: (result, reason)
    for r in results:
        outcome = r["outcome"]
        if outcome == SURVIVED:
            reason = equivalence(plan, module.path, r["diff"], r.get("line"))
            if reason:
                outcome = "equivalent"
                equivalents.append((r, reason))
            else:
                survivors.append(r)
        counts[outcome if outcome in counts else "no-test"] += 1
    caught = counts[KILLED] + counts[TIMEOUT]
    judged = caught + counts[SURVIVED]
    return {
        **counts,
        "tested": len(results),
        "score": 100.0 * caught / judged if judged else float("nan"),
        "survivors": survivors,
        "equivalents": equivalents,
    }


def write_report(
    plan: Plan, totals: dict[str, int], path: Path = ROOT / "docs" / "mutation.md"
) -> None:
    from compress.deploy.onnx_export import cpu_isa  # the CPU's name and int8 ISA, as the benches

    results = load_results(HERE / "results.jsonl")
    cpu = cpu_isa()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows, survivor_blocks, equivalents = [], [], []
    for m in plan.modules:
        h = source_hash(ROOT / m.path)
        mine = sorted(
            (r for (hh, _), r in results.items() if hh == h and r["key"].startswith(m.path + ":")),
            key=lambda r: r["line"],
        )
        s = score(plan, m, mine)
        total = totals.get(m.path, "?")
        pct = "-" if s["tested"] == 0 else f"{s['score']:.1f}%"
        rows.append(
            f"| `{m.path}` | {total} | {s['tested']} | {s[KILLED] + s[TIMEOUT]} | {s[SURVIVED]} "
            f"| {s['equivalent']} | {s[INCOMPETENT] + s['no-test']} | {pct} |"
        )
        for r in s["survivors"]:
            survivor_blocks.append(
                f"`{m.path}` line {r['line']} ({r['key'].split(':')[1]}):\n\n"
                f"```diff\n{_short_diff(r['diff'])}\n```\n"
            )
        for r, reason in s["equivalents"]:
            before, after = changed_lines(r["diff"])
            equivalents.append(f"| `{m.path}`:{r['line']} | `{before}` -> `{after}` | {reason} |")
    text = [
        "# Mutation testing",
        "",
        "[README](../README.md) > mutation testing.",
        "",
        "Does the suite notice a planted bug? `make mutation` ([run.py](../tests/mutation/run.py),",
        "with cosmic-ray's operators) applies a seeded sample of the mutants of each core module,",
        "one at a time, to a copy of the repository and runs that module's test files",
        "([modules.toml](../tests/mutation/modules.toml)) against it. Killed: a test failed or the",
        "tests ran past the timeout; survived: they all passed; equivalent: a survivor no test can",
        "tell from the original, listed with the reason in",
        "[equivalent.toml](../tests/mutation/equivalent.toml). Mutants inside type",
        "annotations that are never evaluated (`from __future__ import annotations`) are left out.",
        "Score = killed / (killed + survived);",
        "the goal is 85% in every module.",
        "",
        f"Written at commit {commit}, {time.strftime('%Y-%m-%d')}, from the results of the modules'"
        f" current sources (results.jsonl, keyed by source hash), run on {os.cpu_count()} cores of"
        f" {cpu['cpu']} ({cpu['isa']}); sample seed {plan.seed}.",
        "",
        "| module | mutants | sampled & run | killed | survived | equivalent | not run | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "## Equivalent mutants",
        "",
        *(
            ["| where | change | why no test can see it |", "|---|---|---|", *equivalents]
            if equivalents
            else ["None."]
        ),
        "",
        "## Survivors",
        "",
        *(survivor_blocks or ["None."]),
    ]
    path.write_text("\n".join(text).rstrip() + "\n")


def _short_diff(diff: str) -> str:
    return "\n".join(
        ln
        for ln in diff.splitlines()
        if ln.startswith(("-", "+")) and not ln.startswith(("---", "+++"))
    )


def try_mutants(plan: Plan, keys: list[str]) -> int:
    """Run mutants given by key in a copy of their own (.mutation/try, beside a running
    `make mutation`'s workers, removed after): does a new test kill them? Exit 1 when one
    survives."""
    copy = make_copy(WORK / "try")
    tests = {m.path: m.tests for m in plan.modules}
    cwd, env = os.getcwd(), dict(os.environ)
    os.chdir(copy)
    os.environ.update(test_env())
    survived = 0
    try:
        for key in keys:
            module, operator, occurrence = key.rsplit(":", 2)
            r = run_one(Mutant(module, operator, int(occurrence), 0), tests[module], 600)
            survived += r["outcome"] == SURVIVED
            print(f"{key}: {r['outcome']} ({r['seconds']} s)\n{_short_diff(r['diff'])}", flush=True)
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        shutil.rmtree(copy, ignore_errors=True)
    return 1 if survived else 0


# ---------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="*", help="only these module paths")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sample", type=int, help="mutants per module (default: modules.toml)")
    ap.add_argument(
        "--rerun-survivors",
        action="store_true",
        help="test the survivors again (after new tests; not the listed equivalent ones)",
    )
    ap.add_argument("--report", action="store_true", help="only rewrite docs/mutation.md")
    ap.add_argument(
        "--try",
        dest="keys",
        nargs="+",
        metavar="KEY",
        help="run these mutants now "
        "(keys from results.jsonl) against the module's tests; records nothing",
    )
    args = ap.parse_args(argv)

    plan = load_plan()
    modules = [m for m in plan.modules if not args.modules or m.path in args.modules]
    if args.modules and len(modules) != len(args.modules):
        known = ", ".join(m.path for m in plan.modules)
        raise SystemExit(f"unknown module in {args.modules}; modules.toml has: {known}")
    results_file = HERE / "results.jsonl"
    totals_file = HERE / "totals.json"
    totals = json.loads(totals_file.read_text()) if totals_file.exists() else {}
    if args.report:
        write_report(plan, totals)
        return 0
    if args.keys:
        return try_mutants(plan, args.keys)

    WORK.mkdir(exist_ok=True)
    # copies of this process's own: a second run (other modules) may go on beside it
    copies = [make_copy(WORK / f"{os.getpid()}-w{i}") for i in range(args.workers)]
    try:
        return _run(plan, modules, args, copies, results_file, totals, totals_file)
    finally:
        for c in copies:
            shutil.rmtree(c, ignore_errors=True)


def _open_survivor(plan: Plan, r: dict) -> bool:
    """A survivor that equivalent.toml does not explain: worth testing again."""
    return r["outcome"] == SURVIVED and not equivalence(plan, r["module"], r["diff"], r["line"])


def _run(
    plan: Plan,
    modules: list[Module],
    args: argparse.Namespace,
    copies: list[Path],
    results_file: Path,
    totals: dict[str, int],
    totals_file: Path,
) -> int:
    done = load_results(results_file)
    queue = multiprocessing.get_context("spawn").Queue()
    for c in copies:
        queue.put(str(c))
    with concurrent.futures.ProcessPoolExecutor(
        args.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(queue,),
    ) as pool:
        for m in modules:
            # the source the copies hold (the checkout may change while a run goes on)
            h = source_hash(copies[0] / m.path)
            mutants = all_mutants(copies[0], m.path)
            if totals_file.exists():  # another run beside this one may have added modules
                totals.update(json.loads(totals_file.read_text()))
            totals[m.path] = len(mutants)
            totals_file.write_text(json.dumps(totals, indent=1, sort_keys=True) + "\n")
            chosen = sample(mutants, args.sample or m.sample, plan.seed)
            todo = [
                mu
                for mu in chosen
                if (h, mu.key) not in done
                or (args.rerun_survivors and _open_survivor(plan, done[(h, mu.key)]))
            ]
            if not todo:
                print(
                    f"{m.path}: {len(chosen)} of {len(mutants)} mutants already tested", flush=True
                )
                continue
            secs = baseline(m.tests, copies[0])
            timeout = max(plan.min_timeout, plan.timeout_factor * secs)
            print(
                f"{m.path}: {len(todo)} of {len(mutants)} mutants to test; the tests take "
                f"{secs:.0f} s, timeout {timeout:.0f} s",
                flush=True,
            )
            futures = [pool.submit(run_one, mu, m.tests, timeout) for mu in todo]
            for i, f in enumerate(concurrent.futures.as_completed(futures), 1):
                r = {**f.result(), "hash": h, "module": m.path}
                with results_file.open("a") as out:
                    out.write(json.dumps(r) + "\n")
                print(
                    f"  [{i}/{len(todo)}] line {r['line']} {r['key'].split(':')[1]}: "
                    f"{r['outcome']} ({r['seconds']} s)",
                    flush=True,
                )
            write_report(plan, totals)
    write_report(plan, totals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
