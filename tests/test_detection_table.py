"""bench/detection_table.py: a row of the detection table comes from its runs' metrics.json
(unit tests on hand-made metrics; the script end to end is `--tiny`, run by hand)."""

from __future__ import annotations

import json
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import detection_table  # noqa: E402


def _put(root, rel: str, m: dict) -> None:
    (root / rel).mkdir(parents=True, exist_ok=True)
    (root / rel / "metrics.json").write_text(json.dumps(m))


def test_a_row_reads_its_runs_goal_and_speed_ups(tmp_path):
    """mAP from the training run, mAP in ORT and latency from its export; the speed-up of a
    QAT row is against the fp32 twin its export timed (the same machine load), of a pruned row
    against the base's own file (its twin is the pruned model)."""
    _put(tmp_path, "fp32", {"map": 17.8, "map50": 23.2, "params": 10, "macs": 100})
    _put(tmp_path, "fp32/export", {"latency_ms_bs1_fp32": 8.0})
    _put(tmp_path, "fp32/export_ov", {"latency_ms_bs1_fp32": 6.0})
    _put(tmp_path, "int8_qat", {"map": 17.3, "map50": 23.0, "params": 10, "macs": 100})
    qat = {"map_runtime": 17.2, "onnx_bytes": 5, "latency_ms_bs1_int8": 2.0}
    qat |= {"images": 1000, "images_same_detections": 406}
    _put(tmp_path, "int8_qat/export", {**qat, "latency_ms_bs1_fp32": 4.0})
    _put(tmp_path, "int8_qat/export_ov", {"latency_ms_bs1_int8": 3.0})
    row = detection_table.table_row("int8_qat", "int8 QAT", 1.0, tmp_path, "")
    assert (row["mAP"], row["mAP in ORT"], row["delta"], row["met"]) == (17.3, 17.2, -0.5, "yes")
    assert row["ORT speed-up"] == 2.0  # 4.0 / 2.0: its own fp32 twin, not the base's 8.0
    assert row["same detections in ORT"] == "406 / 1000"
    assert row["OV speed-up"] == 2.0  # no twin timed in OpenVINO: the base's 6.0 / 3.0
    _put(tmp_path, "pruned30", {"map": 15.0, "params": 7, "macs": 70})
    _put(tmp_path, "pruned30/export", {"latency_ms_bs1_fp32": 5.0})
    row = detection_table.table_row("pruned30", "pruned", 2.0, tmp_path, "")
    assert (row["delta"], row["met"], row["ORT speed-up"]) == (-2.8, "no", 1.6)  # 8.0 / 5.0
    failed = detection_table.table_row("w4a4l", "LSQ W4A4", 3.0, tmp_path, "exit 1: boom")
    assert failed["status"] == "failed: exit 1: boom" and "mAP" not in failed
