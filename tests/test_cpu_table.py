"""bench/cpu_table.py: the results table's rows come from the runs' metrics.json (unit tests
on hand-made metrics), and `--tiny` runs every kind of row end to end (slow)."""

from __future__ import annotations

import csv
import json
import re
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import cpu_table  # noqa: E402


def _row(key: str) -> cpu_table.Row:
    return next(r for r in cpu_table.rows(5, 2) if r.key == key)


def test_every_mode_of_the_issue_is_a_row_within_five_finetune_epochs():
    keys = [r.key for r in cpu_table.rows(5, 2)]
    for q in ("w8a8", "w4a4", "w2a2", "w8a8p", "w4a4p", "w2a2p", "w8a8l", "w4a4l", "w3a3l"):
        assert q in keys
    for k in ("w2a2l", "wba32", "wta32", "wbab", "wtab", "int8_qat", "l1_30", "l1_50"):
        assert k in keys
    assert {"ptq_minmax", "ptq_percentile", "ptq_entropy", "slim_50", "l1_50_w4a4l"} <= set(keys)
    assert len(keys) == len(set(keys))
    for r in cpu_table.rows(5, 2):
        assert r.seeds == (2 if r.key[:4] in ("w4a4", "w2a2") else 1), r.key
        if r.kind == "finetune":
            assert "schedule.epochs=5" in r.args and "distill=kd" in r.args
        if r.kind == "pipeline":  # the stage epochs add up to the budget
            stages = next(a for a in r.args if a.startswith("schedule.stages="))
            epochs = [int(n) for n in re.findall(r"epochs: (\d+)", stages)]
            assert sum(epochs) == 5, (r.key, stages)


def test_a_row_reads_its_runs_and_its_goal():
    base = {"test_acc": 91.0, "params": 100, "macs": 1000}
    got = cpu_table.Measured(_row("w4a4l"), wall_s=120.0)
    got.runs = [{"test_acc": 90.5, "params": 110, "macs": 1000, "epochs": 5}, {"test_acc": 90.1}]
    got.pack = {"size_bytes_packed_file": 4321}
    got.exports = {"onnx": {"latency_ms_bs1_int8": 0.5, "latency_ms_bs64_int8": 8.0}}
    line = cpu_table.table_row(got, base, {"onnx": {1: 1.0, 64: 10.0}})
    assert line["top1"] == "90.30" and line["spread"] == "0.40" and line["seeds"] == 2
    assert line["delta"] == "-0.70" and line["met"] == "yes"  # the goal is base - 0.7
    assert (line["ort_int8_bs1"], line["ort_int8_bs64"]) == ("0.50", "0.80")
    assert line["ov_int8_bs1"] == "" and line["packed_bytes"] == 4321
    assert (line["params"], line["finetune_epochs"], line["wall_min"]) == (110, 5, "2.0")
    got.runs[1]["test_acc"] = 89.9
    assert cpu_table.table_row(got, base, {})["met"] == "no"
    missed = cpu_table.table_row(got, base, {})["finding"]
    assert line["finding"] == "" and missed == cpu_table.FINDINGS["w4a4l"]  # only when missed


def test_a_failed_pack_or_export_is_the_rows_status():
    got = cpu_table.Measured(_row("int8_qat"), runs=[{"test_acc": 88.5}])
    got.pack = {"failed": "exit 1: ValueError: cannot be packed"}
    line = cpu_table.table_row(got, {"test_acc": 88.3}, {})
    assert line["status"] == "pack exit 1: ValueError: cannot be packed" and line["top1"] == "88.50"
    got.pack, got.exports = {}, {"openvino": {"failed": "exit 2: boom"}}
    line = cpu_table.table_row(got, {"test_acc": 88.3}, {})
    assert line["status"] == "openvino export exit 2: boom"


def test_a_missed_goal_carries_what_was_found_about_it():
    got = cpu_table.Measured(_row("ptq_entropy"), runs=[{"test_acc_int8": 84.0}])
    line = cpu_table.table_row(got, {"test_acc": 88.3}, {})
    assert line["met"] == "no" and line["finding"].startswith("cause not found")
    got.runs = [{"test_acc_int8": 88.2}]
    assert cpu_table.table_row(got, {"test_acc": 88.3}, {})["finding"] == ""  # met: none


def test_a_failed_row_is_a_row_that_says_why():
    got = cpu_table.Measured(_row("wbab"), failed="exit 3: error: training diverged")
    line = cpu_table.table_row(got, {"test_acc": 91.0}, {})
    assert line["status"] == "exit 3: error: training diverged" and line["top1"] == ""
    assert line["goal"] == "as high as possible" and line["met"] == ""


def test_ptq_rows_take_the_base_architecture_and_their_own_ort_timing():
    got = cpu_table.Measured(_row("ptq_entropy"))
    got.runs = [{"test_acc_int8": 90.8, "latency_ms_bs1_int8": 0.3, "latency_ms_bs64_int8": 5}]
    base = {"test_acc": 91.0, "params": 100, "macs": 1000}
    line = cpu_table.table_row(got, base, {"onnx": {1: 0.6, 64: 10.0}})
    assert (line["top1"], line["delta"], line["met"]) == ("90.80", "-0.20", "yes")
    assert (line["params"], line["macs"], line["finetune_epochs"]) == (100, 1000, 0)
    assert (line["ort_int8_bs1"], line["ort_int8_bs64"]) == ("0.50", "0.50")


def test_a_pipeline_row_exports_its_last_stage(tmp_path):
    stage = tmp_path / "01_finetune"
    stage.mkdir()
    (stage / "stage.json").write_text(json.dumps({"kind": "finetune", "checkpoint": "best.pt"}))
    metrics = {"stages": [{"stage": "00_prune"}, {"stage": "01_finetune"}]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert cpu_table.final_checkpoint(tmp_path) == stage / "best.pt"
    assert cpu_table.final_checkpoint(tmp_path / "x") == tmp_path / "x" / "best.pt"


@pytest.mark.slow
def test_tiny_table_runs_every_kind_of_row_and_resumes(tmp_path, capsys):
    table = tmp_path / "table.md"
    args = ["--tiny", "--out", str(tmp_path / "out"), "--table", str(table)]
    assert cpu_table.main(args) == 0
    rows = list(csv.DictReader(table.with_suffix(".csv").read_text().splitlines()))
    assert [r["key"] for r in rows] == ["fp32", "ptq_minmax", "w4a4l", "l1_30"]
    assert all(r["status"] == "ok" and r["top1"] for r in rows), rows
    by = {r["key"]: r for r in rows}
    assert int(by["l1_30"]["macs"]) < int(by["fp32"]["macs"])  # the pruned row is pruned
    assert by["w4a4l"]["packed_bytes"] and by["w4a4l"]["ort_int8_bs1"]
    assert by["ptq_minmax"]["ort_int8_bs1"] and by["ptq_minmax"]["finetune_epochs"] == "0"
    text = table.read_text()
    assert "python calibrate.py" in text and "Machine: " in text
    capsys.readouterr()
    assert cpu_table.main(args) == 0  # every step done: nothing runs again
    assert "ok in" not in capsys.readouterr().out


def test_render_writes_the_table_and_the_readme_block_from_the_runs_there_are(tmp_path):
    """--render runs nothing: the rows with a metrics.json are rows, the others 'not run yet',
    and --readme puts the short table between the README's markers, the rest untouched."""
    out = tmp_path / "out"

    def put(rel: str, m: dict) -> None:
        (out / rel).mkdir(parents=True)
        (out / rel / "metrics.json").write_text(json.dumps(m))

    put("base", {"test_acc": 88.5, "test_acc_tta": 89.25, "epochs": 60, "params": 1, "macs": 2})
    put("base_export_onnx", {"latency_ms_bs1_fp32": 2.0, "latency_ms_bs64_fp32": 40.0})
    put("rows/fp32", {"test_acc": 88.75, "epochs": 2})
    put("rows/ptq_minmax", {"test_acc_int8": 88.0, "latency_ms_bs1_int8": 1.0})
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{cpu_table.README_START}\nold\n{cpu_table.README_END}\n\nafter\n")
    table = tmp_path / "t.md"
    argv = ["--render", "--out", str(out), "--table", str(table), "--readme", str(readme)]
    argv += ["--ft", "2"]
    assert cpu_table.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n" + cpu_table.README_START) and text.endswith("\n\nafter\n")
    assert "old" not in text and "base 88.50% (89.25% with flip TTA) after 60 epochs" in text
    assert "at most 2 finetune epochs" in text
    assert "| fp32 finetune + KD (control) | 88.75 | +0.25 | >= base - 0.3 | yes |" in text
    assert "| INT8 PTQ minmax (no finetune) | 88.00 | -0.50 | >= base - 0.3 | no |" in text
    assert "| no |  | 0.50 | ok |" in text  # no packed file; half the fp32 base's ORT latency
    assert text.count(cpu_table.PENDING) == len(cpu_table.rows(2, 2)) - 2
    assert not (out / "table.log").exists() or "$ " not in (out / "table.log").read_text()
    full = table.read_text()
    assert full.count("not measured yet") == len(cpu_table.rows(2, 2)) - 2
    with open(table.with_suffix(".csv")) as f:
        assert [r["key"] for r in csv.DictReader(f)] == ["fp32", "ptq_minmax"]


def test_latency_is_against_the_fp32_file_timed_in_the_same_run_where_it_is_the_bases():
    """A quantized row's export times its own fp32 twin (the base's architecture) beside its
    int8 file, under the same machine load: the ratio uses that; a pruned row's twin is the
    pruned model, so its ratio is against the base's own fp32 file."""
    onnx = {"latency_ms_bs1_int8": 0.5, "latency_ms_bs1_fp32": 2.0}
    base_lat = {"onnx": {1: 1.0, 64: 10.0}}
    got = cpu_table.Measured(_row("w4a4l"), runs=[{"test_acc": 90.0}], exports={"onnx": onnx})
    assert cpu_table.table_row(got, {"test_acc": 91.0}, base_lat)["ort_int8_bs1"] == "0.25"
    got = cpu_table.Measured(_row("l1_50_w4a4l"), runs=[{"test_acc": 90.0}], exports={"onnx": onnx})
    assert cpu_table.table_row(got, {"test_acc": 91.0}, base_lat)["ort_int8_bs1"] == "0.50"


def test_rows_of_an_earlier_table_are_kept_only_from_a_base_of_the_same_top1(tmp_path):
    """Run folders lost (a new machine) or left out by --only: the earlier .csv's rows stay,
    with their commands and the date and commit that measured them, when the earlier base
    scored the same; a row measured now replaces its kept line; another base keeps none."""
    out, table = tmp_path / "out", tmp_path / "t.md"

    def put(rel: str, m: dict) -> None:
        (out / rel).mkdir(parents=True, exist_ok=True)
        (out / rel / "metrics.json").write_text(json.dumps(m))

    def keys_and_top1() -> dict[str, str]:
        with open(table.with_suffix(".csv")) as f:
            return {r["key"]: r["top1"] for r in csv.DictReader(f)}

    put("base", {"test_acc": 88.5, "epochs": 60, "params": 1, "macs": 2})
    put("rows/fp32", {"test_acc": 88.75, "epochs": 2})
    put("rows/ptq_minmax", {"test_acc_int8": 88.0})
    argv = ["--render", "--out", str(out), "--table", str(table), "--ft", "2"]
    assert cpu_table.main(argv) == 0
    first = table.read_text()
    assert "Rows measured by an earlier run" not in first
    (out / "rows/fp32/metrics.json").unlink()  # its folder is gone
    put("rows/ptq_minmax", {"test_acc_int8": 87.0})  # measured again: the new number
    put("rows/int8_qat", {"test_acc": 88.25, "epochs": 2})
    assert cpu_table.main([*argv, "--only", "ptq_minmax,int8_qat"]) == 0
    assert keys_and_top1() == {"fp32": "88.75", "ptq_minmax": "87.00", "int8_qat": "88.25"}
    text = table.read_text()
    assert "kept from its .csv (their date and commit: measured): fp32." in text
    block = cpu_table.readme_block({"cpu": "c", "cores": "2", "date": "2026-12-09"}, {}, [
        {"measured": "2026-12-05 abc", **dict.fromkeys(k for k, _ in cpu_table.README_COLUMNS)},
        {"measured": "2026-12-08 def", **dict.fromkeys(k for k, _ in cpu_table.README_COLUMNS)},
    ], [], 2)  # fmt: skip
    assert "2 cores, rows measured 2026-12-05 to 2026-12-08." in block
    assert text.count(f"hydra.run.dir={out / 'rows/fp32'}\n") == 1  # its command, once
    with open(table.with_suffix(".csv")) as f:
        when = {r["key"]: r["measured"] for r in csv.DictReader(f)}
    assert when["fp32"] == when["int8_qat"] != ""  # the kept row carries its own
    table.with_suffix(".csv").write_text(
        table.with_suffix(".csv").read_text().replace(when["int8_qat"], "2026-01-01 0abc")
    )
    assert cpu_table.main(argv) == 0  # measured again, the same numbers: the first date stays
    with open(table.with_suffix(".csv")) as f:
        assert {r["key"]: r["measured"] for r in csv.DictReader(f)}["int8_qat"] == "2026-01-01 0abc"
    put("rows/ptq_entropy", {"test_acc_int8": 84.0})  # a missed goal, then its folder gone
    assert cpu_table.main(argv) == 0
    (out / "rows/ptq_entropy/metrics.json").unlink()
    old = cpu_table.FINDINGS["ptq_entropy"]
    text = table.with_suffix(".csv").read_text()
    table.with_suffix(".csv").write_text(text.replace(old, "what was known then"))
    assert cpu_table.main(argv) == 0
    with open(table.with_suffix(".csv")) as f:
        kept = next(r for r in csv.DictReader(f) if r["key"] == "ptq_entropy")
    assert kept["top1"] == "84.00" and kept["finding"] == old  # the words known now
    put("base", {"test_acc": 90.0, "epochs": 60, "params": 1, "macs": 2})  # another base
    assert cpu_table.main(argv) == 0
    assert keys_and_top1() == {"ptq_minmax": "87.00", "int8_qat": "88.25"}
    assert "Rows measured by an earlier run" not in table.read_text()


def test_the_trajectory_shows_a_row_still_rising_at_its_end():
    """The test top-1 after each finetune epoch (first seed), or after each pipeline stage."""
    history = [{"epoch": 1, "test_acc": 45.84}, {"epoch": 2, "test_acc": None}, {"test_acc": 61.5}]
    got = cpu_table.Measured(_row("w8a8"), runs=[{"test_acc": 61.5, "history": history}])
    line = cpu_table.table_row(got, {"test_acc": 88.3}, {})
    assert line["trajectory"] == "by epoch: 45.84, 61.50"
    stages = [{"kind": "prune", "test_acc": 13.8}, {"kind": "finetune", "test_acc": 83.2}]
    got = cpu_table.Measured(_row("l1_50"), runs=[{"test_acc": 83.2, "stages": stages}])
    line = cpu_table.table_row(got, {"test_acc": 88.3}, {})
    assert line["trajectory"] == "by stage: prune 13.80, finetune 83.20"
    assert cpu_table.table_row(cpu_table.Measured(_row("ptq_minmax")), {}, {})["trajectory"] == ""
