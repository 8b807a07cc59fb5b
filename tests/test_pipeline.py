from __future__ import annotations

import json

import pytest

from compress import engine
from compress.checkpoint import load_checkpoint
from compress.errors import ConfigError
from compress.pipeline import plan, run_pipeline
from tests.test_engine import tiny_cfg


def staged(*stages, **schedule) -> dict:
    cfg = tiny_cfg(epochs=1, **schedule)
    cfg["model"] = {"name": "vgg_small", "channels": [8, 8, 16, 16, 16, 16]}
    cfg["pruner"] = {"name": "normal", "percent": 0.5, "base": 1, "min_channels": None}
    cfg["schedule"]["stages"] = list(stages)
    return cfg


def test_two_stage_train_then_prune(tmp_path):
    summary = run_pipeline(staged("train", "prune"), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"00_train", "01_prune", "metrics.json"}
    assert (tmp_path / "00_train" / "best.pt").exists()
    assert (tmp_path / "01_prune" / "pruned.pt").exists()
    assert summary["stages"][1]["params"] < summary["stages"][0]["params"]


def test_three_stage_train_prune_quantize(tmp_path):
    quant = {
        "name": "w4a4",
        "weight": {"kind": "dorefa", "bits": 4},
        "act": {"kind": "dorefa", "bits": 4},
    }
    run_pipeline(
        staged("train", "prune", {"stage": "quantize", "quant": quant, "lr": 0.01}), tmp_path
    )
    q = tmp_path / "02_quantize"
    for f in ("best.pt", "last.pt", "metrics.json", "tb"):
        assert (q / f).exists()
    state = load_checkpoint(q / "best.pt")
    pruned = load_checkpoint(tmp_path / "01_prune" / "pruned.pt")
    assert state["quant"]["weight"]["bits"] == 4
    assert state["arch"]["channels"] == pruned["arch"]["channels"]  # stays pruned
    m = json.loads((q / "metrics.json").read_text())
    assert (m["w_bits"], m["a_bits"]) == (4, 4)


def test_fuse_stage_after_quantization(tmp_path):
    quant = {"name": "wbab", "weight": {"kind": "binary"}, "act": {"kind": "binary"}}
    summary = run_pipeline(staged("train", {"stage": "quantize", "quant": quant}, "fuse"), tmp_path)
    fuse = summary["stages"][-1]
    assert fuse["bn_after"] == 0 and fuse["top1_agreement"] == 100.0


def test_nonsensical_order_is_refused():
    with pytest.raises(ConfigError, match=r"schedule.stages\[0\]=prune needs trained weights"):
        plan(staged("prune", "train"))
    with pytest.raises(ConfigError, match=r"schedule.stages\[1\].stage='compress'"):
        plan(staged("train", "compress"))


def test_interrupted_pipeline_resumes_where_it_stopped(tmp_path, monkeypatch):
    cfg = staged("train", "prune", {"stage": "finetune", "epochs": 2})
    calls = {"n": 0}
    real = engine.evaluate

    def interrupt_second_finetune_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # train: 1 eval, prune: 2 evals, finetune: epoch 1 ok, epoch 2 dies
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    # the prune task evaluates through the classification task, i.e. engine.evaluate too
    monkeypatch.setattr(engine, "evaluate", interrupt_second_finetune_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "01_prune" / "stage.json").exists()
    assert not (tmp_path / "02_finetune" / "stage.json").exists()
    assert load_checkpoint(tmp_path / "02_finetune" / "last.pt")["epoch"] == 1
    train_ckpt = (tmp_path / "00_train" / "best.pt").stat().st_mtime_ns
    summary = run_pipeline({**cfg, "resume": True}, tmp_path)
    assert (tmp_path / "00_train" / "best.pt").stat().st_mtime_ns == train_ckpt  # skipped
    last = load_checkpoint(tmp_path / "02_finetune" / "last.pt")
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert summary["stages"][-1]["kind"] == "finetune"


def test_calibrate_stage_ends_a_pipeline_with_an_int8_model(tmp_path):
    pytest.importorskip("onnxruntime")
    calib = {
        "stage": "calibrate",
        "calib": {"method": "percentile", "batches": 2},
        "latency": False,
    }
    summary = run_pipeline(staged("train", "fuse", calib), tmp_path)
    last = summary["stages"][-1]
    assert last["kind"] == "calibrate" and last["calib_method"] == "percentile"
    assert (tmp_path / "02_calibrate" / "model_int8.onnx").exists()
    assert last["int8_top1_agreement"] >= 90 and last["int8_bytes"] < last["onnx_bytes"]
    with pytest.raises(ConfigError, match=r"stages\[1\]=calibrate must be the last stage"):
        plan(staged("train", "calibrate", "fuse"))
    with pytest.raises(ConfigError, match="calib.batches=0"):
        plan(staged("train", {"stage": "calibrate", "calib": {"batches": 0}}))


def test_export_stage_ends_train_prune_quantize_with_an_integer_model(tmp_path):
    """train -> prune -> quantize (QAT) -> export: the pruned QAT model as an integer ONNX
    graph, run in ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    w4a4p = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "pact", "bits": 4}}
    quantize = {"stage": "quantize", "name": "w4a4p", "quant": {"name": "w4a4p", **w4a4p}}
    summary = run_pipeline(
        staged("train", "prune", quantize, {"stage": "export", "latency": False}), tmp_path
    )
    last = summary["stages"][-1]
    assert last["kind"] == "export" and last["int8"] is True and last["pruned"] is True
    assert (tmp_path / "03_export" / "model_int8.onnx").stat().st_size == last["int8_bytes"]
    assert last["kernels"]["QLinearConv"] == last["qdq_integer_layers"] >= 4
    assert last["top1_agreement"] >= 90.0
    with pytest.raises(ConfigError, match=r"stages\[1\]=export must be the last stage"):
        plan(staged("train", "export", "fuse"))
    with pytest.raises(ConfigError, match=r"stages\[1\].format='tflite' is invalid"):
        plan(staged("train", {"stage": "export", "format": "tflite"}))
