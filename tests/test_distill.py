"""Knowledge distillation: the loss against its formula, alpha=0 as plain training bit for bit,
a frozen teacher, `teacher=self` in runs and pipelines, and bad input as one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from compress.checkpoint import load_checkpoint
from compress.config import validate_distill
from compress.distill import Distiller, cross_entropy_loss, kd_loss
from compress.errors import CheckpointError, ConfigError
from compress.models import create_model
from compress.pipeline import run_pipeline
from compress.tasks import train as train_task
from tests.test_engine import tiny_cfg

KD = {"kind": "kd", "teacher": "self", "temperature": 4.0, "alpha": 0.9}


def reference_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    """Hinton et al.: T^2 * mean over the batch of sum_c q_c (log q_c - log p_c), with
    p = softmax(s / T), q = softmax(t / T), written out in float64."""
    total = 0.0
    for srow, trow in zip(s.double().tolist(), t.double().tolist(), strict=True):
        ps = [math.exp(v / temp) for v in srow]
        qs = [math.exp(v / temp) for v in trow]
        zs, zt = sum(ps), sum(qs)
        total += sum(
            (q / zt) * (math.log(q / zt) - math.log(p / zs)) for p, q in zip(ps, qs, strict=True)
        )
    return temp * temp * total / len(s)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 8.0])
def test_kd_loss_equals_the_reference_formula(temp):
    g = torch.Generator().manual_seed(int(temp))
    s, t = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    assert kd_loss(s, t, temp).item() == pytest.approx(reference_kd(s, t, temp), rel=1e-5)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)  # same logits: no loss


def test_distiller_mixes_the_kl_and_label_losses():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(5, 4)
    x, out, y = torch.randn(8, 5), torch.randn(8, 4, requires_grad=True), torch.randint(0, 4, (8,))
    d = Distiller(teacher, cross_entropy_loss(0.1), temperature=3.0, alpha=0.7)
    t = teacher(x).detach()
    want = (
        0.7 * reference_kd(out.detach(), t, 3.0)
        + 0.3 * F.cross_entropy(out, y, label_smoothing=0.1).item()
    )
    loss = d(x, out, y)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_the_teacher_stays_in_eval_mode_and_unchanged():
    torch.manual_seed(0)
    teacher = create_model("resnet20", channels=[4] * 9)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(teacher, cross_entropy_loss())
    d.train()  # the loop puts everything in training mode; the teacher must not follow
    assert not teacher.training
    x = torch.randn(4, 3, 32, 32)
    student = create_model("resnet20", channels=[4] * 9)
    d(x, student(x), torch.tensor([0, 1, 2, 3])).backward()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics too


def _trained(tmp_path, epochs=1):
    cfg = tiny_cfg(epochs=epochs)
    train_task.run(cfg, tmp_path / "base")
    return tmp_path / "base" / "best.pt"


def test_alpha_zero_is_plain_training_bit_for_bit(tmp_path):
    base = _trained(tmp_path)
    w4 = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "dorefa", "bits": 4}}
    plain = {**tiny_cfg(epochs=2), "init_from": str(base), "quant": w4}
    kd = {**plain, "distill": {**KD, "alpha": 0.0}}
    a = train_task.run(plain, tmp_path / "plain")
    b = train_task.run(kd, tmp_path / "kd")
    wa = load_checkpoint(tmp_path / "plain" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "kd" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["history"] == b["history"]
    assert b["distill"] == {"teacher": "self", "temperature": 4.0, "alpha": 0.0}
    # and alpha > 0 really changes training
    c = train_task.run({**kd, "distill": KD}, tmp_path / "kd9")
    wc = load_checkpoint(tmp_path / "kd9" / "last.pt")["model"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert c["history"][-1]["train_loss"] != a["history"][-1]["train_loss"]


def test_an_interrupted_kd_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The teacher (`self`: init_from again after the restart) is rebuilt on resume."""
    from compress import engine

    base = _trained(tmp_path)
    cfg = {**tiny_cfg(epochs=2), "init_from": str(base), "distill": KD}
    train_task.run(cfg, tmp_path / "full")
    real = engine.evaluate
    calls = {"n": 0}

    def interrupt_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_task.run(cfg, tmp_path / "cut")
    monkeypatch.setattr(engine, "evaluate", real)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    train_task.run({**cfg, "resume": True}, tmp_path / "cut")
    full = load_checkpoint(tmp_path / "full" / "last.pt")
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert full["best_acc"] == cut["best_acc"] and full["history"] == cut["history"]


def test_teacher_from_a_file_and_bad_teachers(tmp_path):
    base = _trained(tmp_path)
    cfg = {**tiny_cfg(epochs=1), "distill": {**KD, "teacher": str(base)}}
    metrics = train_task.run(cfg, tmp_path / "from_file")  # a fresh student, a file's teacher
    assert metrics["distill"]["teacher"] == str(base)
    missing = {**cfg, "distill": {**KD, "teacher": str(tmp_path / "nope.pt")}}
    with pytest.raises(CheckpointError, match=r"^distill.teacher=.*nope.pt: checkpoint .* does"):
        train_task.run(missing, tmp_path / "a")
    with pytest.raises(ConfigError, match="^distill.teacher=self distills from the weights the"):
        train_task.run({**tiny_cfg(epochs=1), "distill": KD}, tmp_path / "b")
    five = tiny_cfg(epochs=1)
    five["dataset"]["num_classes"] = 5
    train_task.run(five, tmp_path / "five")
    other = {**cfg, "distill": {**KD, "teacher": str(tmp_path / "five" / "best.pt")}}
    with pytest.raises(ConfigError, match=r"predicts \(5,\) classes but dataset=synthetic .* 10"):
        train_task.run(other, tmp_path / "c")


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"kind": "hinton"}, "distill.kind='hinton' is invalid: expected one of none, kd"),
        ({"alpha": 1.5}, r"distill.alpha=1.5 is invalid: expected a weight in \[0, 1\]"),
        ({"alpha": -0.1}, r"distill.alpha=-0.1 is invalid"),
        ({"temperature": 0}, "distill.temperature=0 is invalid: expected a temperature > 0"),
        ({"temperature": float("inf")}, "distill.temperature=inf is invalid"),
        ({"teacher": ""}, "distill.teacher='' is invalid: expected self"),
        ({"temp": 2}, "distill.temp is not a known key: expected one of alpha, kind, teacher"),
    ],
)
def test_bad_distill_config_is_one_line(d, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate_distill(d)


def test_distill_config_composes_and_fails_at_start(entry, tmp_path):
    from tests.test_config import compose_cfg

    cfg = compose_cfg("train", ["distill=kd"])
    assert cfg.distill.kind == "kd" and cfg.distill.teacher == "self"
    code, _, err = entry(
        "train", "dataset=synthetic", "distill=kd", "distill.alpha=2", run_dir=tmp_path / "x"
    )
    assert code == 2 and "error: distill.alpha=2 is invalid" in err, err


def test_pipeline_teacher_self_is_the_uncompressed_model(tmp_path):
    """prune -> finetune (KD) -> quantize (KD): `self` in both KD stages is the pipeline's
    input, not the pruned (or finetuned) model the stage starts from."""
    base = _trained(tmp_path)
    cfg = tiny_cfg(epochs=1)
    cfg.update(init_from=str(base), distill=KD)
    cfg["pruner"] = {"name": "normal", "percent": 0.25, "min_channels": 1}
    w4 = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "dorefa", "bits": 4}}
    cfg["schedule"]["stages"] = ["prune", "finetune", {"stage": "quantize", "quant": w4}]
    run_pipeline(cfg, tmp_path / "pipe")
    for folder in ("01_finetune", "02_quantize"):
        metrics = json.loads((tmp_path / "pipe" / folder / "metrics.json").read_text())
        assert metrics["distill"]["teacher"] == str(base), folder
