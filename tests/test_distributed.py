"""Data-parallel training (torchrun, DistributedDataParallel) on 2 CPU processes with gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress import distributed
from compress.checkpoint import load_checkpoint
from compress.data import TensorLoader, load_dataset
from compress.distributed import Dist, check_resume_world, init_from_env
from compress.engine import Callback, TrainConfig, _from_sync_bn, _to_sync_bn, fit
from compress.errors import ConfigError
from compress.quant import quantize_

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset=synthetic",
    "dataset.num_train=64",
    "dataset.num_test=32",
    "schedule.epochs=2",
    "model=resnet20",
    "model.channels=[4,4,4,4,4,4,4,4,4]",
    "device=cpu",
    "schedule.progress=false",
]
TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV}
    # TMPDIR: where the other ranks' throwaway Hydra folders go (they must be gone afterwards)
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return {
        **env,
        "HYDRA_FULL_ERROR": "0",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmpdir),
    }


def _train(tmp: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launch, str(ROOT / "train.py"), *TINY, *overrides],
        cwd=tmp,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---------------------------------------------------------------- in-process pieces
def test_sharded_loader_splits_the_global_batch():
    """The ranks' batches together are, image for image and crop for crop, the batch of one
    process with world x batch_size; every rank gets the same number of training batches."""
    data = load_dataset("synthetic", num_train=70, num_test=33)
    kw = dict(mean=data.mean, std=data.std, train=True, crop_padding=2, flip=True, seed=3)
    single = TensorLoader(data.train, 16, **kw)
    shards = [TensorLoader(data.train, 8, shard=(r, 2), **kw) for r in range(2)]
    for loader in (single, *shards):
        loader.set_epoch(1)
    assert len(single) == len(shards[0]) == len(shards[1]) == 70 // 2 // 8
    for (x, y), (x0, y0), (x1, y1) in zip(single, *shards, strict=True):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
    tests = [TensorLoader(data.test, 10, data.mean, data.std, shard=(r, 2)) for r in range(2)]
    seen = torch.cat([y for t in tests for _, y in t])
    assert len(seen) == 33 and sorted(seen.tolist()) == sorted(data.test.labels.tolist())
    with pytest.raises(ConfigError, match="shard"):
        TensorLoader(data.train, 8, data.mean, data.std, shard=(2, 2))


def test_single_process_and_bad_input(monkeypatch):
    for k in TORCH_ENV:
        monkeypatch.delenv(k, raising=False)
    d = init_from_env("cpu")
    assert d == Dist() and d.is_main and not d.enabled and d.shard is None
    t = torch.ones(3)
    assert d.all_reduce_sum(t) is t and d.broadcast_object({"a": 1}) == {"a": 1}
    d.barrier()
    d.shutdown()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        ConfigError, match="^torchrun started 4 processes but this machine has 2 GPUs"
    ):
        init_from_env("cuda")
    with pytest.raises(
        ConfigError, match="last.pt was written by a 2-process run; resume with --nproc_per_node=2$"
    ):
        check_resume_world(2, 1, "last.pt")
    with pytest.raises(ConfigError, match="1-process run; resume without torchrun"):
        check_resume_world(None, 2, "last.pt")
    check_resume_world(None, 1, "last.pt")


def test_sync_bn_round_trip():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    params, buffers = list(model.parameters()), list(model.buffers())
    classes = _to_sync_bn(model)
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[2][0], nn.SyncBatchNorm)
    _from_sync_bn(model, classes)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is nn.BatchNorm1d
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(model.buffers(), buffers, strict=True))


# ---------------------------------------------------------------- 2 processes, engine level
class PlainCNN(nn.Module):
    """No BatchNorm: N processes x B images must train exactly like 1 process x N*B."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, 10)
        self.arch = {"name": "plain_cnn", "source": "test"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


PACT = {
    "weight": {"kind": "dorefa", "bits": 4},
    "act": {"kind": "pact", "bits": 4},
    "keep_first_last": False,
}


class SeesUnwrapped(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def after_step(self, model: nn.Module) -> None:
        assert not isinstance(model, nn.parallel.DistributedDataParallel)
        self.calls += 1


def _plain_run(run_dir: Path, batch_size: int, dist: Dist | None) -> dict:
    torch.manual_seed(0)
    model = PlainCNN()
    quantize_(model, PACT)
    data = load_dataset("synthetic", num_train=64, num_test=30)
    cfg = TrainConfig(epochs=2, batch_size=batch_size, lr=0.05, progress=False)
    cb = SeesUnwrapped()
    summary = fit(model, data, cfg, run_dir, torch.device("cpu"), dist=dist, callbacks=[cb])
    assert cb.calls == 2 * 64 // (batch_size * (dist.world if dist else 1))
    return summary


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives process `rank` of `world` on this host."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    dist = init_from_env("cpu")
    try:
        assert distributed.current() == dist
        summary = _plain_run(Path(run_dir), 8, dist)
        torch.save(summary, Path(run_dir).parent / f"summary{rank}.pt")
    finally:
        dist.shutdown()


def test_two_processes_match_one_process_exactly(tmp_path):
    """PACT QAT of a BN-free net: 2 processes x 8 images == 1 process x 16, up to float
    rounding (measured max |weight difference| 7e-7; bound 1e-5); the same test metrics on
    every rank; rank 0 alone writes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp_dir, single_dir = tmp_path / "ddp" / "run", tmp_path / "single"
    ddp_dir.mkdir(parents=True)
    torch.multiprocessing.spawn(_worker, args=(2, port, str(ddp_dir)), nprocs=2, join=True)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _plain_run(single_dir, 16, None)
    finally:
        torch.set_num_threads(old)
    ranks = [torch.load(tmp_path / "ddp" / f"summary{r}.pt") for r in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]  # all-reduced: every rank agrees
    assert ranks[0]["best_test_acc"] == ranks[1]["best_test_acc"]
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["best.pt", "last.pt"]
    a, b = load_checkpoint(ddp_dir / "last.pt"), load_checkpoint(single_dir / "last.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["model"].keys() == b["model"].keys()  # the unwrapped model (no "module." prefix)
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert diff < 1e-5, diff
    assert any("clip" in k or "alpha" in k for k in a["model"])  # PACT's learned clips trained
    for r, s in zip(ranks[0]["history"], single["history"], strict=True):
        assert r["test_acc"] == s["test_acc"]
        assert r["test_loss"] == pytest.approx(s["test_loss"], rel=1e-5)
        assert r["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)
        assert r["lr"] == pytest.approx(s["lr"])


# ---------------------------------------------------------------- torchrun train.py
@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_torchrun_matches_global_batch_and_only_rank0_writes(tmp_path):
    """`torchrun --nproc_per_node=2 train.py` without hydra.run.dir: one dated run folder, no
    stray folders, the same files as a single-process run. Against 1 process x 16 images the
    run differs only through BatchNorm (statistics over 8 images per process instead of 16;
    sync_bn needs CUDA): measured 0.4% on the first epoch's train loss and 0.3% on the final
    test loss; bounds 3% and 5%."""
    ddp = _train(tmp_path, "schedule.batch_size=8", nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("test accuracy:") == 1  # rank 0 alone prints the result
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1, runs  # one run folder, the one rank 0's Hydra chose
    run = runs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "tmpdir"]
    scratch = [p for p in (tmp_path / "tmpdir").iterdir() if p.name.startswith("compress-")]
    assert scratch == []  # the other rank's throwaway Hydra folder is gone
    expected = {".hydra", "best.pt", "config.yaml", "last.pt", "metrics.json", "tb", "train.log"}
    assert {p.name for p in run.iterdir()} == expected
    assert len(list((run / "tb").iterdir())) == 1  # one events file: rank 0's
    log = (run / "train.log").read_text()
    assert log.count("epoch 2/2") == 1  # rank 0 alone logs

    single = _train(tmp_path, "schedule.batch_size=16", "hydra.run.dir=" + str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "single" / "last.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1
    ha, hb = a["history"], b["history"]
    assert ha[0]["train_loss"] == pytest.approx(hb[0]["train_loss"], rel=0.03)
    assert ha[-1]["test_loss"] == pytest.approx(hb[-1]["test_loss"], rel=0.05)
    assert [h["lr"] for h in ha] == pytest.approx([h["lr"] for h in hb])  # same steps / epoch

    # resuming under another world size: one line naming the right --nproc_per_node
    resumed = _train(tmp_path, "schedule.batch_size=8", "resume=true", f"hydra.run.dir={run}")
    assert resumed.returncode == 2
    lines = [ln for ln in resumed.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [
        f"error: {run / 'last.pt'} was written by a 2-process run; resume with --nproc_per_node=2"
    ], resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    # and the other way round, under torchrun: one line, not one per process
    resumed = _train(
        tmp_path,
        "schedule.batch_size=8",
        "resume=true",
        f"hydra.run.dir={tmp_path / 'single'}",
        nproc=2,
    )
    assert resumed.returncode != 0
    lines = [ln for ln in resumed.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [
        f"error: {tmp_path / 'single' / 'last.pt'} was written by a 1-process run; resume "
        "without torchrun (or with --nproc_per_node=1)"
    ], resumed.stderr[-2000:]
    # rank 1, stopped by torchrun after rank 0 failed, still removed its scratch folder
    assert not [p for p in (tmp_path / "tmpdir").iterdir() if p.name.startswith("compress-")]


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_torchrun_pact_qat(tmp_path):
    """quant=w4a4p (PACT's learned clips are parameters DDP averages) under 2 processes."""
    out = _train(tmp_path, "quant=w4a4p", "schedule.batch_size=8", "hydra.run.dir=run", nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["world_size"] == 2 and state["quant"]
    alphas = [v for k, v in state["model"].items() if "alpha" in k or "clip" in k]
    assert alphas and any((a != 6.0).any() for a in alphas)  # the clips trained
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    assert '"a_bits": 4' in metrics and '"world_size": 2' in metrics


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_torchrun_distills_from_a_plain_state_dict(tmp_path):
    """init_from a state_dict trained elsewhere, KD from it (teacher=self) under 2 processes:
    every rank builds the same frozen teacher; rank 0 records it."""
    from compress.models import create_model

    torch.manual_seed(0)
    torch.save(create_model("resnet20", channels=[4] * 9).state_dict(), tmp_path / "theirs.pth")
    out = _train(
        tmp_path,
        f"init_from={tmp_path / 'theirs.pth'}",
        "distill=kd",
        "quant=w4a4p",
        "schedule.batch_size=8",
        "hydra.run.dir=run",
        nproc=2,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distill"]["teacher"] == "self"
    assert metrics["init"]["kind"] == "state_dict"
