"""TensorBoard's HParams dashboard: every train run logs its compression settings and final
metrics into its own tb/ events file (read back here as TensorBoard reads it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from compress.tasks import prune as prune_task
from compress.tasks import train as train_task
from compress.tasks.train import flat_hparams, hparam_value
from tests.test_engine import tiny_cfg

W4A4 = {
    "name": "w4a4",
    "weight": {"kind": "dorefa", "bits": 4},
    "act": {"kind": "dorefa", "bits": 4},
}
KD = {"kind": "kd", "teacher": "self", "temperature": 4.0, "alpha": 0.9}


def read_tb(tb: Path) -> tuple[dict, dict, EventAccumulator]:
    """(hparam name: (type, value), metric names, the accumulator) of a run's tb/ folder."""
    events = list(tb.iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents"), events
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = {tag: HParamsPluginData.FromString(blob) for tag, blob in content.items()}
    exp = data["_hparams_/experiment"].experiment
    start = data["_hparams_/session_start_info"].session_start_info
    assert data["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS
    types = {i.name: i.type for i in exp.hparam_infos}
    assert set(types) == set(start.hparams)
    values = {}
    for name, v in start.hparams.items():
        kind = v.WhichOneof("kind")
        values[name] = getattr(v, kind)
        want = {
            "bool_value": api_pb2.DATA_TYPE_BOOL,
            "string_value": api_pb2.DATA_TYPE_STRING,
            "number_value": api_pb2.DATA_TYPE_FLOAT64,
        }[kind]
        assert types[name] == want, name
    metrics = {m.name.tag for m in exp.metric_infos}
    return values, metrics, acc


def test_a_train_run_logs_its_hparams_and_final_metrics(tmp_path):
    cfg = {**tiny_cfg(epochs=1), "quant": W4A4}
    m = train_task.run(cfg, tmp_path)
    hp, metrics, acc = read_tb(tmp_path / "tb")
    assert hp == {
        "model": "resnet20",
        "dataset": "synthetic",
        "quant": "w4a4",
        "quant.weight.kind": "dorefa",
        "quant.weight.bits": 4.0,
        "quant.act.kind": "dorefa",
        "quant.act.bits": 4.0,
        "pruned": False,
        "distill": False,
        "sparsity": False,
        "schedule.epochs": 1.0,
        "schedule.lr": 0.05,
        "schedule.batch_size": 16.0,
        "schedule.optimizer": "sgd",
        "schedule.lr_schedule": "cosine",
        "schedule.weight_decay": 5e-4,
        "seed": 0.0,
        "world_size": 1.0,
        "init_from": "",
    }
    names = ("test_acc", "best_test_acc", "params", "macs", "size_bytes", "latency_ms")
    assert metrics == {f"hparam/{k}" for k in names}
    for k in names:  # the metric scalars, in the same run, at the last epoch
        (event,) = acc.Scalars(f"hparam/{k}")
        assert event.step == 1 and event.value == pytest.approx(m[k], rel=1e-6), k
    assert "test/acc" in acc.Tags()["scalars"]  # fit's own scalars: the same events file
    assert not [p for p in (tmp_path / "tb").iterdir() if p.is_dir()]  # no run subfolder


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_a_pruned_distilled_finetune_logs_its_pruner_and_teacher(tmp_path):
    base = tmp_path / "base"
    train_task.run({**tiny_cfg(epochs=1), "sparsity": {"enabled": True, "s": 1e-3}}, base)
    hp, _, _ = read_tb(base / "tb")
    assert hp["sparsity"] is True and hp["sparsity.s"] == pytest.approx(1e-3)
    pruner = {"importance": "l1", "percent": 0.25, "scope": "layer"}
    prune_task.run({"ckpt": str(base / "best.pt"), "pruner": pruner}, tmp_path / "prune")
    pruned = str(tmp_path / "prune" / "pruned.pt")
    cfg = {**tiny_cfg(epochs=1), "init_from": pruned, "distill": KD}
    train_task.run(cfg, tmp_path / "finetune")
    hp, _, _ = read_tb(tmp_path / "finetune" / "tb")
    assert hp["pruned"] is True and hp["distill"] is True and hp["init_from"] == pruned
    assert {k: v for k, v in hp.items() if k.startswith(("pruner.", "distill."))} == {
        "pruner.name": "normal",
        "pruner.importance": "l1",
        "pruner.percent": 0.25,
        "pruner.scope": "layer",
        "pruner.target": "channels",
        "distill.teacher": "self",
        "distill.temperature": 4.0,
        "distill.alpha": 0.9,
    }
    assert json.loads((tmp_path / "finetune" / "metrics.json").read_text())["distill"]


def test_hparam_values_are_tensorboard_types():
    assert [hparam_value(v) for v in (True, 3, 0.5, "w4a4")] == [True, 3, 0.5, "w4a4"]
    assert hparam_value(None) == "none" and hparam_value(Path("a/b.pt")) == "a/b.pt"
    assert hparam_value([4, 8]) == "[4, 8]" and hparam_value({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    nested = {"quant": {"weight": {"kind": "lsq", "bits": 4}, "keep": []}, "pruned": False}
    assert flat_hparams(nested) == {
        "quant.weight.kind": "lsq",
        "quant.weight.bits": 4,
        "quant.keep": "[]",
        "pruned": False,
    }
