from __future__ import annotations

import math

import pytest
import torch

from compress import engine
from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.engine import TrainConfig, lr_factor
from compress.errors import CheckpointError, ConfigError
from compress.models import create_model
from compress.spec import model_from_checkpoint
from compress.tasks.train import run as run_training


def tiny_cfg(**schedule) -> dict:
    return {
        "seed": 0,
        "device": "cpu",
        "resume": False,
        "init_from": None,
        "model": {"name": "resnet20", "channels": [4] * 9},
        "dataset": {
            "name": "synthetic",
            "num_train": 64,
            "num_test": 32,
            "crop_padding": 2,
            "flip": True,
        },
        "quant": {"weight": {"kind": "fp32"}, "act": {"kind": "fp32"}},
        "schedule": {"epochs": 3, "batch_size": 16, "lr": 0.05, "progress": False, **schedule},
    }


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", 0, "schedule.epochs=0 is invalid: expected an integer >= 1"),
        ("lr", -0.1, "schedule.lr=-0.1 is invalid: expected a learning rate > 0"),
        ("batch_size", 0, "schedule.batch_size=0 is invalid"),
        ("optimizer", "lbfgs", "expected one of sgd, adam, adamw"),
        ("precision", "int4", "schedule.precision='int4'"),
        ("typo", 1, "schedule.typo is not a known key"),
    ],
)
def test_schedule_validation(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({key: value})


def test_lr_schedules():
    cos = TrainConfig(epochs=10, lr_schedule="cosine")
    assert lr_factor(cos, 0, 10) == 1.0 and lr_factor(cos, 50, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 100, 10) == pytest.approx(0.0)
    step = TrainConfig(epochs=10, lr_schedule="step", milestones=[3, 6], gamma=0.1)
    assert [lr_factor(step, e * 10, 10) for e in (0, 3, 6)] == pytest.approx([1, 0.1, 0.01])
    one = TrainConfig(epochs=4, lr_schedule="onecycle")
    assert lr_factor(one, 0, 10) == pytest.approx(0.04) and lr_factor(one, 10, 10) == 1.0
    assert lr_factor(one, 40, 10) == pytest.approx(0.0)
    assert lr_factor(one, 5, 10) == pytest.approx(0.04 + 0.96 * 0.5)  # linear warmup
    assert lr_factor(one, 25, 10) == pytest.approx(0.5)  # cosine half way after the warmup
    warm = TrainConfig(epochs=10, lr_schedule="cosine", warmup_epochs=1)
    assert lr_factor(warm, 4, 10) == pytest.approx(0.5)
    assert math.isclose(lr_factor(warm, 10, 10), 1.0)


def test_checkpoint_is_atomic_and_round_trips(tmp_path):
    model = create_model("nin", channels=[8] * 8)
    path = save_checkpoint(tmp_path / "m.pt", {"arch": model.arch, "model": model.state_dict()})
    assert not (tmp_path / "m.pt.tmp").exists()
    state = load_checkpoint(path)
    rebuilt = model_from_checkpoint(state)
    assert rebuilt.arch == model.arch
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))


def test_corrupt_truncated_and_foreign_checkpoints(tmp_path):
    model = create_model("resnet20")
    path = save_checkpoint(tmp_path / "m.pt", {"arch": model.arch, "model": model.state_dict()})
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc.pt is corrupt or truncated"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.pt is a text file \(it begins 'not a"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a compress checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="holds a 'resnet20' model but model=nin"):
        model_from_checkpoint(load_checkpoint(path), expect="nin")


def test_training_learns_and_writes_run_files(tmp_path):
    metrics = run_training(tiny_cfg(epochs=4, lr=0.1), tmp_path)
    assert {"last.pt", "best.pt", "metrics.json", "tb"} <= {p.name for p in tmp_path.iterdir()}
    hist = metrics["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert metrics["best_test_acc"] == max(h["test_acc"] for h in hist)
    assert load_checkpoint(tmp_path / "best.pt")["test_acc"] == metrics["best_test_acc"]


def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    full = tmp_path / "full"
    run_training(tiny_cfg(), full)

    calls = {"n": 0}
    real_evaluate = engine.evaluate

    def interrupt_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    broken = tmp_path / "broken"
    monkeypatch.setattr(engine, "evaluate", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_cfg(), broken)
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    assert load_checkpoint(broken / "last.pt")["epoch"] == 1
    resumed = run_training({**tiny_cfg(), "resume": True}, broken)

    a = load_checkpoint(full / "last.pt")["model"]
    b = load_checkpoint(broken / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["epochs"] == 3 and len(resumed["history"]) == 3


def test_init_from_keeps_the_stored_architecture(tmp_path):
    run_training(tiny_cfg(epochs=1), tmp_path / "a")
    cfg = {**tiny_cfg(epochs=1), "init_from": str(tmp_path / "a" / "best.pt")}
    cfg["model"] = {"name": "resnet20"}  # default widths asked for; the checkpoint's win
    run_training(cfg, tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "last.pt")["arch"]["channels"] == [4] * 9
    cfg["model"] = {"name": "nin"}
    with pytest.raises(CheckpointError, match="holds a 'resnet20' model but model=nin"):
        run_training(cfg, tmp_path / "c")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="resume=true but .*last.pt does not exist"):
        run_training({**tiny_cfg(), "resume": True}, tmp_path)


def test_a_non_finite_loss_between_checks_is_caught():
    from torch import nn

    from compress.data import TensorLoader
    from compress.data.datasets import Split

    class NaNAtStep3(nn.Linear):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            NaNAtStep3.calls += 1
            out = super().forward(x.flatten(1))
            return out * float("nan") if NaNAtStep3.calls == 4 else out

    split = Split(torch.zeros(160, 1, 2, 2, dtype=torch.uint8), torch.zeros(160, dtype=torch.long))
    loader = TensorLoader(split, 16, (0.5,), (0.5,), train=True)
    model = NaNAtStep3(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    with pytest.raises(FloatingPointError, match="non-finite by step 9"):
        engine.train_one_epoch(model, loader, opt, sched, TrainConfig(progress=False))


def test_auto_settings_follow_the_device():
    from compress.engine import for_device

    auto = TrainConfig()
    assert (auto.precision, auto.channels_last) == ("auto", None)
    cpu = for_device(auto, torch.device("cpu"))
    assert (cpu.precision, cpu.channels_last) == ("fp32", False)
    cuda = for_device(auto, torch.device("cuda"))
    assert (cuda.precision, cuda.channels_last) == ("bf16", True)
    fixed = for_device(TrainConfig(precision="fp16", channels_last=False), torch.device("cuda"))
    assert (fixed.precision, fixed.channels_last) == ("fp16", False)


@pytest.mark.parametrize("native", [True, False])
def test_fast_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, native):
    from compress import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    fast = TrainConfig(precision="fast")
    cpu = engine.for_device(fast, torch.device("cpu"))
    assert (cpu.precision, cpu.channels_last) == ("bf16" if native else "fp32", False)
    assert engine.for_device(fast, torch.device("cuda")).precision == "bf16"
    assert engine.for_device(TrainConfig(), torch.device("cpu")).precision == "fp32"


def test_native_bf16_reads_both_cpu_features(monkeypatch):
    from compress import engine

    for avx512, amx in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert engine.cpu_has_native_bf16() is (avx512 or amx)


@pytest.mark.slow
def test_compiled_training_step_learns(tmp_path):
    metrics = run_training(tiny_cfg(epochs=2, compile=True), tmp_path)
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]


class _Column(torch.nn.Module):
    """Logits from one image column: class 0 reads the leftmost, class 1 the rightmost, so a
    mirror image swaps them and the flip-averaged logits are known by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x[:, 0, 0, 0], x[:, 0, 0, -1]
        return torch.stack([left, right, 0.5 * (left + right) + 0.01], 1)


def test_flip_tta_averages_an_image_and_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)

    class Batches(list):  # what evaluate reads of a loader: batches and a device
        device = torch.device("cpu")

    loader = Batches([(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)])
    got = engine.evaluate(_Column(), loader, tta=True)
    left, right = x[:, 0, 0, 0], x[:, 0, 0, -1]
    plain = torch.stack([left, right, 0.5 * (left + right) + 0.01], 1).argmax(1)
    # the mirror swaps classes 0 and 1: both get (left + right), class 2 keeps 2x its logit,
    # so the averaged prediction is class 2 exactly where its 0.02 margin wins
    mean = torch.stack([left + right, left + right, left + right + 0.02], 1).argmax(1)
    assert got["acc"] == pytest.approx(100.0 * (plain == y).float().mean().item())
    assert got["acc_tta"] == pytest.approx(100.0 * (mean == y).float().mean().item())
    assert got["acc_tta"] != got["acc"]  # the data make the two differ
    assert "acc_tta" not in engine.evaluate(_Column(), loader)


def test_tta_is_reported_beside_the_plain_accuracy(tmp_path):
    m = run_training(tiny_cfg(epochs=2, tta=True), tmp_path)
    assert all("test_acc_tta" in row for row in m["history"])
    assert m["test_acc_tta"] == m["history"][-1]["test_acc_tta"]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["test_acc"] == m["best_test_acc"]  # best.pt is chosen without TTA
    assert "test_acc_tta" not in run_training(tiny_cfg(epochs=1), tmp_path / "plain")


# ---------------------------------------------------------------- what an epoch reports
def _plain_fit(run_dir, writer=None, **schedule) -> dict:
    from compress.data import load_dataset
    from tests.test_distributed import PlainCNN

    torch.manual_seed(0)
    data = load_dataset("synthetic", num_train=64, num_test=30)
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 0.05, "progress": False, **schedule})
    return engine.fit(PlainCNN(), data, cfg, run_dir, torch.device("cpu"), writer=writer)


class _Writer:
    """A SummaryWriter's add_scalar, recorded."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def test_eval_every_evaluates_those_epochs_and_the_last(tmp_path, caplog):
    writer = _Writer()
    with caplog.at_level("INFO", logger="compress.engine"):
        summary = _plain_fit(tmp_path, writer, eval_every=2)
    accs = [row["test_acc"] for row in summary["history"]]
    assert accs[0] is None and accs[1] is not None and accs[2] is not None
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] in (2, 3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3  train loss ")
    assert "not evaluated" in lines[0] and "test loss" in lines[1] and "test loss" in lines[2]
    # the writer gets every number of every epoch, and no test numbers for epoch 1
    tags = {(tag, step) for tag, _, step in writer.scalars}
    assert ("train/loss", 1) in tags and ("test/acc", 1) not in tags and ("lr", 1) in tags
    assert {("test/acc", 2), ("test/acc", 3), ("test/loss", 3)} <= tags


def test_the_progress_bar_counts_epochs_from_one(tmp_path, monkeypatch):
    descs = []
    real = engine.tqdm

    def recording(*args, **kwargs):
        descs.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "tqdm", recording)
    _plain_fit(tmp_path)
    assert [d for d in descs if d and d.startswith("epoch")] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_grad_scaler_outside_fp16(precision):
    # a GradScaler enabled on a CPU-only machine warns and disables itself: only fp16 has one
    import warnings

    from compress.data import TensorLoader
    from compress.data.datasets import Split

    split = Split(torch.zeros(32, 1, 2, 2, dtype=torch.uint8), torch.zeros(32, dtype=torch.long))
    loader = TensorLoader(split, 16, (0.5,), (0.5,), train=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cfg = TrainConfig(progress=False, precision=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.train_one_epoch(model, loader, opt, sched, cfg)
    assert not [w for w in caught if "GradScaler" in str(w.message)]
    if not torch.cuda.is_available():  # the check sees what an enabled scaler does here
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.amp.GradScaler(enabled=True)
        assert [w for w in caught if "GradScaler" in str(w.message)]


@pytest.mark.parametrize(
    ("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_the_adam_optimizers_are_the_ones_named(name, cls):
    opt = engine.build_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer=name, lr=0.01))
    assert type(opt) is cls


def test_non_finite_weights_name_the_first_and_count_the_rest():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
        model[0].bias[0] = float("inf")
        model[1].weight[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite \(0.weight and 2 more\); lower"):
        engine.check_finite_weights(model)


def test_fit_flips_training_images_by_default_and_times_its_epochs(tmp_path, monkeypatch):
    import time

    seen = {}
    real = engine.make_loaders

    def recording(*args, **kwargs):
        seen["flip"] = kwargs["flip"]
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "make_loaders", recording)
    t0 = time.perf_counter()
    summary = _plain_fit(tmp_path, epochs=2)
    took = time.perf_counter() - t0
    assert seen["flip"] is True
    assert 0 < summary["wall_s"] <= took  # the epochs' own time, within the call's


CPU = torch.device("cpu")


class _ScoredTask(engine.ClassificationTask):
    """Classification's loss with another metric: `score`, falling after the first epoch, so
    best.pt must follow the task's metric, not the accuracy."""

    metric = "score"

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = list(scores)

    def evaluate(self, model, loader, precision="fp32", dist=None, tta=False):
        return {"score": self.scores.pop(0)}

    def keys(self, tta=False):
        return ("score",)

    def describe(self, metrics):
        return f"score {metrics['score']:.1f}"


def test_fit_follows_the_tasks_metric_into_history_best_pt_and_the_summary(tmp_path, caplog):
    from compress.data.datasets import load_synthetic

    data = load_synthetic(None, num_train=32, num_test=16)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, channels=[4] * 9)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False)
    with caplog.at_level("INFO", logger="compress.engine"):
        summary = engine.fit(model, data, cfg, tmp_path, CPU, task=_ScoredTask([5.0, 1.0, 2.0]))
    assert [h["test_score"] for h in summary["history"]] == [5.0, 1.0, 2.0]
    assert "test_acc" not in summary["history"][0]
    assert summary["test_score"] == 2.0 and summary["best_test_score"] == 5.0
    best = load_checkpoint(tmp_path / "best.pt")
    assert (best["epoch"], best["test_score"]) == (1, 5.0)
    assert "score 1.0" in caplog.text and "train loss" in caplog.text
    with pytest.raises(ValueError, match="pass the loss inside the task"):
        engine.fit(model, data, cfg, tmp_path, CPU, task=_ScoredTask([1.0]), loss_fn=print)
