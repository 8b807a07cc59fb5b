"""An interrupted-then-resumed run ends exactly as an uninterrupted one: not only last.pt's
weights (tests/test_engine.py) but best.pt (weights, test_acc, epoch), best_acc in last.pt and
metrics.json, and the history, for a plain run, a pipeline and an INT8 QAT run.

The schedule is built so that the best epoch is not the last: the LR is multiplied by 4 after
epoch 2, which knocks the model back to about chance in epochs 3 and 4 (seed 0: fp32 18.8,
20.3, 9.4, 10.9%; INT8 QAT 10.9, 20.3, 10.9, 9.4%; the pipeline's middle stage 29.7, 28.1,
9.4, 3.1%: 6 or more of the 64 test images between best and any later epoch). The run is
interrupted in epoch 3, after best.pt was written in epoch 1 or 2, so a resumed run that forgot
the best accuracy so far would overwrite best.pt with a worse model; the tests assert that
precondition.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress import engine
from compress.checkpoint import load_checkpoint
from compress.pipeline import run_pipeline
from compress.tasks.train import run as run_training
from tests.test_engine import tiny_cfg

INT8 = {"name": "int8_qat", "weight": {"kind": "int8"}, "act": {"kind": "int8"}}
# epochs 1-2 at lr 0.05 learn; then lr 0.2 (gamma 4 at the milestone) for epochs 3-4
RISING = {"epochs": 4, "lr": 0.05, "lr_schedule": "step", "milestones": [2], "gamma": 4}
DONE = 2  # epochs finished when the run is interrupted (in epoch 3's evaluation)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two threads run these tiny models
    ~30x slower. Both runs of a test use the same count, so their results stay bit-identical."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(cfg: dict) -> dict:
    """tiny_cfg's run on 8x8 images (resnet20's global pool takes any size: 16x fewer pixels),
    8 channels and twice the images, so that it learns enough in 2 epochs to then get worse."""
    cfg["dataset"].update(image_size=8, num_train=128, num_test=64)
    cfg["model"]["channels"] = [8] * 9
    return cfg


def interrupt_at_evaluation(monkeypatch, n: int) -> None:
    """engine.evaluate raises KeyboardInterrupt on its n-th call (as if ^C during it)."""
    calls = {"n": 0}
    real = engine.evaluate

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def assert_best_is_not_last(run: Path) -> None:
    """The precondition: best.pt holds an epoch before the interruption, and every epoch run
    after it is strictly worse (so forgetting best_acc would overwrite best.pt)."""
    best = load_checkpoint(run / "best.pt")
    accs = [h["test_acc"] for h in json.loads((run / "metrics.json").read_text())["history"]]
    assert best["epoch"] <= DONE < len(accs), (best["epoch"], accs)
    assert best["test_acc"] == max(accs) == accs[best["epoch"] - 1], accs
    assert max(accs[DONE:]) < best["test_acc"], accs


def assert_interrupted_after_best(run: Path) -> None:
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == DONE and len(last["history"]) == DONE
    assert last["best_acc"] == load_checkpoint(run / "best.pt")["test_acc"]
    assert not (run / "metrics.json").exists()


def assert_same_ending(full: Path, resumed: Path) -> None:
    fb, rb = load_checkpoint(full / "best.pt"), load_checkpoint(resumed / "best.pt")
    assert (rb["epoch"], rb["test_acc"]) == (fb["epoch"], fb["test_acc"])
    assert_same_tensors(fb["model"], rb["model"])
    fl, rl = load_checkpoint(full / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert_same_tensors(fl["model"], rl["model"])
    assert rl["best_acc"] == fl["best_acc"] == fb["test_acc"]
    assert rl["epoch"] == fl["epoch"]
    # exact: the same steps on the same data in the same order give the same floats
    assert rl["history"] == fl["history"]
    fm = json.loads((full / "metrics.json").read_text())
    rm = json.loads((resumed / "metrics.json").read_text())
    assert rm["best_test_acc"] == fm["best_test_acc"] == fb["test_acc"]
    assert rm["test_acc"] == fm["test_acc"] and rm["epochs"] == fm["epochs"]
    assert rm["history"] == fm["history"] == fl["history"]


def interrupted_then_resumed(cfg: dict, run: Path, monkeypatch, n: int, runner=run_training):
    interrupt_at_evaluation(monkeypatch, n)
    with pytest.raises(KeyboardInterrupt):
        runner(cfg, run)
    monkeypatch.undo()


def test_resumed_run_keeps_best_pt_best_acc_and_history(tmp_path, monkeypatch):
    cfg = small(tiny_cfg(**RISING))
    run_training(cfg, tmp_path / "full")
    assert_best_is_not_last(tmp_path / "full")

    broken = tmp_path / "broken"
    interrupted_then_resumed(cfg, broken, monkeypatch, n=DONE + 1)
    assert_interrupted_after_best(broken)
    best_before = (broken / "best.pt").read_bytes()
    run_training({**cfg, "resume": True}, broken)
    assert_same_ending(tmp_path / "full", broken)
    assert (broken / "best.pt").read_bytes() == best_before  # never rewritten after the resume


def test_resumed_int8_qat_run_keeps_best_pt_best_acc_and_history(tmp_path, monkeypatch):
    cfg = small(tiny_cfg(**RISING))
    cfg["quant"] = {**INT8, "freeze_bn_epoch": 3}  # BN frozen from epoch 4: after the resume
    run_training(cfg, tmp_path / "full")
    assert_best_is_not_last(tmp_path / "full")
    observers = [
        k for k in load_checkpoint(tmp_path / "full" / "best.pt")["model"] if "max_val" in k
    ]
    assert observers  # best.pt holds the int8 activation ranges, compared below too

    broken = tmp_path / "broken"
    interrupted_then_resumed(cfg, broken, monkeypatch, n=DONE + 1)
    assert_interrupted_after_best(broken)
    run_training({**cfg, "resume": True}, broken)
    assert_same_ending(tmp_path / "full", broken)


def test_resumed_pipeline_keeps_best_pt_best_acc_and_history(tmp_path, monkeypatch):
    """train -> finetune (RISING, interrupted in its epoch 3) -> finetune: the last stage starts
    from the middle stage's best.pt, so a wrong best.pt there changes the last stage too."""
    cfg = small(tiny_cfg(epochs=1))
    cfg["schedule"]["stages"] = [
        "train",
        {"stage": "finetune", "name": "rising", **RISING},
        {"stage": "finetune", "name": "tune", "epochs": 1, "lr": 0.01},
    ]
    full, broken = tmp_path / "full", tmp_path / "broken"
    run_pipeline(cfg, full)
    assert_best_is_not_last(full / "01_rising")
    tune = load_checkpoint(full / "02_tune" / "last.pt")["config"]
    assert tune["init_from"] == str(full / "01_rising" / "best.pt")

    # evaluations: 1 in the train stage, DONE in the rising stage, then the interrupted one
    interrupted_then_resumed(cfg, broken, monkeypatch, n=1 + DONE + 1, runner=run_pipeline)
    assert (broken / "00_train" / "stage.json").exists()
    assert not (broken / "01_rising" / "stage.json").exists()
    assert_interrupted_after_best(broken / "01_rising")
    run_pipeline({**cfg, "resume": True}, broken)
    for stage in ("00_train", "01_rising", "02_tune"):
        assert_same_ending(full / stage, broken / stage)
    fs = json.loads((full / "metrics.json").read_text())["stages"]
    rs = json.loads((broken / "metrics.json").read_text())["stages"]
    keys = ("stage", "kind", "test_acc", "best_test_acc", "epochs")
    assert [{k: s[k] for k in keys} for s in rs] == [{k: s[k] for k in keys} for s in fs]
