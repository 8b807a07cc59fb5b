"""Mid-epoch checkpoints (`schedule.checkpoint_every`) and preemption (SIGTERM / SIGUSR1 /
SIGUSR2): a run stopped inside an epoch and resumed ends with the uninterrupted run's weights,
best accuracy and history, bit for bit, on in-memory and streamed data, in one process and
under DistributedDataParallel; under submitit the job is requeued as a resuming one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

import train
from compress import engine
from compress.checkpoint import load_checkpoint
from compress.cli import Preempted, user_errors
from compress.data import folder as folder_data
from compress.data import load_dataset
from compress.distributed import init_from_env
from compress.engine import Callback, TrainConfig, fit
from compress.errors import ConfigError
from tests.conftest import ROOT
from tests.test_config import compose_cfg
from tests.test_data_folder import write_folder
from tests.test_distributed import PlainCNN, torchrun_env

TRAIN = (
    "model=resnet20",
    "model.channels=[4,4,4,4,4,4,4,4,4]",
    "schedule.epochs=2",
    "schedule.batch_size=16",
    "schedule.lr=0.05",
    "schedule.progress=false",
    "device=cpu",
)
# tests/test_engine.py's tiny run: 64 images, batch 16 -> 4 steps per epoch; two epochs
RUN = (
    "dataset=synthetic",
    "dataset.num_train=64",
    "dataset.num_test=32",
    "dataset.crop_padding=2",
    *TRAIN,
)


def train_in_process(run_dir: Path, *overrides: str) -> int:
    """train.py's work on a composed config, as the `entry` fixture does; the exit code."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        train.run(compose_cfg("train", list(overrides)), run_dir)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny runs take a second instead of tens on a busy machine,
    and every run of a comparison adds its floats in the same order."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert train_in_process(run_dir, *RUN) == 0
    return run_dir


def assert_same_run(a: Path, b: Path) -> None:
    """The same weights, optimizer state, best accuracy and history, bit for bit."""
    la, lb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert la["model"].keys() == lb["model"].keys()
    assert all(torch.equal(la["model"][k], lb["model"][k]) for k in la["model"])
    sa, sb = la["optimizer"]["state"], lb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert la["epoch"] == lb["epoch"] and la["best_acc"] == lb["best_acc"]
    assert la["history"] == lb["history"]
    assert "step" not in lb  # the run ended at an epoch's end
    ba, bb = load_checkpoint(a / "best.pt"), load_checkpoint(b / "best.pt")
    assert ba["epoch"] == bb["epoch"]
    assert all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])


def during_step(monkeypatch, step: int, action: Callable[[], None]) -> None:
    """Call `action` during optimizer step `step` (counted over the run from 1), after the
    optimizer's update: the LR scheduler steps once when it is built and once per step."""
    calls = {"n": 0}
    real = LambdaLR.step

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step + 1:
            action()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LambdaLR, "step", counting)


def send(signum: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), signum)


def keyboard_interrupt() -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------- the config key
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "10"])
def test_a_bad_checkpoint_every_is_one_line(value):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"checkpoint_every": value})
    assert str(e.value) == (
        f"schedule.checkpoint_every={value!r} is invalid: expected null (at epoch ends only) "
        "or a number of optimizer steps >= 1"
    )
    TrainConfig.from_dict({"checkpoint_every": None})
    TrainConfig.from_dict({"checkpoint_every": 1000})


def test_a_bad_checkpoint_every_stops_train_py_in_one_line(tmp_path, capsys):
    assert train_in_process(tmp_path, *RUN, "schedule.checkpoint_every=0") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: schedule.checkpoint_every=0 is invalid: expected null (at epoch ends only) or a "
        "number of optimizer steps >= 1"
    ]
    assert not (tmp_path / "last.pt").exists()


# ---------------------------------------------------------------- in-memory data, one process
def test_checkpoint_every_then_ctrl_c_resumes_to_the_same_run(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    """checkpoint_every=2: last.pt at steps 2, 4 (the epoch's end), 6; Ctrl-C in step 7 (step
    3 of epoch 2) keeps step 6's, and the resumed run skips its 2 batches of epoch 2."""
    run = tmp_path / "run"
    during_step(monkeypatch, 7, keyboard_interrupt)
    assert train_in_process(run, *RUN, "schedule.checkpoint_every=2") == 130
    monkeypatch.undo()
    assert "continue with resume=true" in capsys.readouterr().err
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"], state["steps_per_epoch"]) == (1, 2, 4)
    assert len(state["history"]) == 1 and [s["n"] for s in state["train_sums"]] == [32]

    # the position is in steps: another batch size is refused in one line
    assert train_in_process(run, *RUN, "schedule.batch_size=8", "resume=true") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {run / 'last.pt'} was saved at step 2 of 4 in epoch 2, but this run has 8 "
        "steps per epoch: resume with the same schedule.batch_size and data"
    ]

    assert train_in_process(run, *RUN, "schedule.checkpoint_every=2", "resume=true") == 0
    assert_same_run(uninterrupted, run)


@pytest.mark.parametrize(
    ("signum", "step", "epoch", "in_epoch"),
    [(signal.SIGTERM, 7, 2, 3), (signal.SIGUSR1, 4, 1, 4)],  # 4: before the epoch's evaluation
)
def test_a_signal_saves_at_the_next_step_and_the_resume_is_the_same_run(
    signum, step, epoch, in_epoch, uninterrupted, tmp_path, monkeypatch, capsys, caplog
):
    """No checkpoint_every: the signal alone saves, at the end of the step it arrived in, and
    the run exits with 128 + its number after one line saying how to continue."""
    run = tmp_path / "run"
    before = signal.getsignal(signum)
    during_step(monkeypatch, step, send(signum))
    assert train_in_process(run, *RUN) == 128 + signum
    monkeypatch.undo()
    assert signal.getsignal(signum) is before  # fit's handlers are gone again
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln] == [
        f"preempted ({signal.Signals(signum).name}): the run is saved at step {in_epoch}/4 of "
        f"epoch {epoch} in {run / 'last.pt'}; continue with resume=true hydra.run.dir={run}"
    ]
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"]) == (epoch - 1, in_epoch)
    assert not (run / "metrics.json").exists()

    with caplog.at_level("INFO", logger="compress.engine"):
        assert train_in_process(run, *RUN, "resume=true") == 0
    assert f"resuming at step {in_epoch}/4 of epoch {epoch} of 2" in caplog.text
    assert_same_run(uninterrupted, run)


def sigterm_after_evaluation(monkeypatch, n: int) -> None:
    """SIGTERM to this process right after the n-th test evaluation of the run."""
    real = engine.evaluate
    calls = {"n": 0}

    def evaluate_then_signal(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(engine, "evaluate", evaluate_then_signal)


def test_a_signal_during_evaluation_stops_after_the_epoch_is_saved(
    uninterrupted, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    sigterm_after_evaluation(monkeypatch, 1)
    assert train_in_process(run, *RUN) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert f"the run is saved after epoch 1 in {run / 'last.pt'}" in capsys.readouterr().err
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1 and "step" not in state
    assert train_in_process(run, *RUN, "resume=true") == 0
    assert_same_run(uninterrupted, run)


def test_a_signal_during_the_last_evaluation_lets_the_run_finish(
    uninterrupted, tmp_path, monkeypatch, caplog
):
    # everything is done and saved: the run ends as usual (exit 0) and says the signal came
    run = tmp_path / "run"
    sigterm_after_evaluation(monkeypatch, 2)  # the second of two epochs
    with caplog.at_level("WARNING", logger="compress.engine"):
        assert train_in_process(run, *RUN) == 0
    assert "SIGTERM arrived as training ended: the run finishes" in caplog.text
    assert_same_run(uninterrupted, run)


# ---------------------------------------------------------------- streamed image folder
def children() -> list[int]:
    """The pids of this process's children (DataLoader workers), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == os.getpid():
                pids.append(int(stat.parent.name))
    return pids


def sigterm_to_the_job() -> None:
    """As SLURM signals a job: SIGTERM to every process, the workers too, from outside."""
    workers = children()
    assert workers, "no DataLoader worker to signal"
    subprocess.run(["kill", "-TERM", *map(str, workers), str(os.getpid())], check=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_image_folder_resumes_inside_the_epoch(workers, tmp_path, monkeypatch):
    """dataset.streaming=true (FolderLoader): 18 images, batch 4 -> 4 steps per epoch. The
    resumed epoch reads only the samples of its last batch, and the run ends identical. With
    workers, SIGTERM to every process of the job (as SLURM sends it) leaves the workers alive
    until the main process has saved."""
    if workers and not Path("/proc/self/stat").exists():
        pytest.skip("finds the DataLoader workers in /proc")
    root = write_folder(tmp_path / "folder")
    streamed = (
        *TRAIN,
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.streaming=true",
        f"dataset.workers={workers}",
        "dataset.image_size=16",
        "schedule.batch_size=4",
    )
    full, run = tmp_path / "full", tmp_path / "run"
    assert train_in_process(full, *streamed) == 0
    signum = signal.SIGTERM if workers else signal.SIGUSR1
    during_step(monkeypatch, 7, sigterm_to_the_job if workers else send(signum))
    assert train_in_process(run, *streamed, "schedule.checkpoint_every=3") == 128 + signum
    monkeypatch.undo()
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"], state["steps_per_epoch"]) == (1, 3, 4)

    reads = {"n": 0}
    real = folder_data.SeededSamples.__getitem__

    def counted(self, i):
        reads["n"] += 1
        return real(self, i)

    monkeypatch.setattr(folder_data.SeededSamples, "__getitem__", counted)
    assert train_in_process(run, *streamed, "schedule.checkpoint_every=3", "resume=true") == 0
    if not workers:  # (workers count in their own memory)
        assert reads["n"] == 4  # one batch: the three before it were not read again
    assert_same_run(full, run)


# ---------------------------------------------------------------- two processes (gloo)
class SignalAt(Callback):
    """Send `signum` to this process during optimizer step `step` of the run."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.n = step, signum, 0

    def after_step(self, model: nn.Module) -> None:
        self.n += 1
        if self.n == self.step:
            os.kill(os.getpid(), self.signum)


def _ddp_fit(run_dir: Path, dist, callbacks=(), resume_state=None) -> dict:
    torch.manual_seed(0)
    data = load_dataset("synthetic", num_train=64, num_test=30)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, progress=False, checkpoint_every=3)
    return fit(
        PlainCNN(),
        data,
        cfg,
        run_dir,
        torch.device("cpu"),
        dist=dist,
        callbacks=callbacks,
        resume_state=resume_state,
    )


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    engine.STOP_POLL_STEPS = 1  # the ranks agree every step: the stop lands inside the epoch
    tmp_dir = Path(tmp)
    dist = init_from_env("cpu")
    try:
        for d in ("full", "stopped"):
            (tmp_dir / d).mkdir(exist_ok=True)
        _ddp_fit(tmp_dir / "full", dist)
        # the signal reaches rank 1 alone, in step 7 (step 3 of epoch 2)
        signals = [SignalAt(7, signal.SIGUSR1)] if rank == 1 else []
        with pytest.raises(Preempted) as e:
            _ddp_fit(tmp_dir / "stopped", dist, callbacks=signals)
        state = load_checkpoint(tmp_dir / "stopped" / "last.pt")  # on disk: rank 0 waited
        record = {"code": e.value.code, "main": e.value.main, "step": state["step"]}
        record["sums"] = [s["n"] for s in state["train_sums"]]
        _ddp_fit(tmp_dir / "stopped", dist, resume_state=state)
        torch.save(record, tmp_dir / f"rank{rank}.pt")
    finally:
        dist.shutdown()


@pytest.mark.slow  # two processes, three runs: about 5 s alone (make test-slow)
def test_two_processes_stop_together_and_resume_to_the_same_run(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # rank 0 never got the signal: it stopped at the same step as rank 1, as if it had got it
    # (so it hands it on: submitit requeues from rank 0), and printed the line
    assert (r0["code"], r0["main"]) == (128 + signal.SIGUSR1, True)
    assert (r1["code"], r1["main"]) == (128 + signal.SIGUSR1, False)
    assert r0["step"] == r1["step"] == 3 and r0["sums"] == [24, 24]
    a, b = (
        load_checkpoint(tmp_path / "full" / "last.pt"),
        load_checkpoint(tmp_path / "stopped" / "last.pt"),
    )
    assert a["world_size"] == b["world_size"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"] == b["history"] and a["best_acc"] == b["best_acc"]


def _ddp_last_step_worker(rank: int, world: int, port: int, tmp: str) -> None:
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    assert engine.STOP_POLL_STEPS > 4  # no poll inside the 4-step epoch but at its end
    dist = init_from_env("cpu")
    try:
        signals = [SignalAt(4, signal.SIGUSR1)] if rank == 1 else []  # epoch 1's last step
        with pytest.raises(Preempted):
            _ddp_fit(Path(tmp), dist, callbacks=signals)
        state = load_checkpoint(Path(tmp) / "last.pt")
        torch.save({"step": state.get("step"), "epoch": state["epoch"]}, Path(tmp) / f"r{rank}.pt")
    finally:
        dist.shutdown()


@pytest.mark.slow  # heavy for the fast suite (make test-slow)
def test_two_processes_poll_for_a_stop_at_the_last_step_of_an_epoch(tmp_path):
    # the ranks agree every STOP_POLL_STEPS steps and at each epoch's last step: a signal in
    # that step stops both there, before the evaluation
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, str(tmp_path))
    torch.multiprocessing.spawn(_ddp_last_step_worker, args=args, nprocs=2, join=True)
    for r in range(2):
        assert torch.load(tmp_path / f"r{r}.pt") == {"step": 4, "epoch": 0}, r


# ---------------------------------------------------------------- submitit's requeue
class FakeSlurm:
    """What submitit's SignalHandler asks of its JobEnvironment (no SLURM here)."""

    global_rank = 0

    def __init__(self) -> None:
        self.requeued: int | None = None

    def _requeue(self, countdown: int) -> None:
        self.requeued = countdown


def test_under_submitit_the_requeued_job_resumes(tmp_path, capsys):
    """The engine saved and raised Preempted; the entry hands the signal to submitit's own
    handler, which requeues the job: with resume=true among its overrides."""
    utils = pytest.importorskip("submitit.core.utils")
    job_environment = pytest.importorskip("submitit.core.job_environment")
    launchers = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.submitit_launcher")
    overrides = ["model=nin", "resume=false", "schedule.checkpoint_every=100"]
    delayed = utils.DelayedSubmission(
        launchers.SlurmLauncher(), overrides, "hydra.sweep.dir", 0, "job_id_for_0", {}
    )
    delayed.set_timeout(60, 3)
    paths = utils.JobPaths(tmp_path / "submitit", job_id="42")
    paths.folder.mkdir(parents=True)
    slurm = FakeSlurm()
    handler = job_environment.SignalHandler(slurm, paths, delayed)
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        with pytest.raises(SystemExit) as e, user_errors(tmp_path / "run"):
            raise Preempted(signal.SIGUSR2, "the run is saved at step 3/4 of epoch 2 in X")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert e.value.code == 128 + signal.SIGUSR2  # ours, not submitit's exit(-1)
    assert slurm.requeued == 3
    requeued = utils.DelayedSubmission.load(paths.submitted_pickle)
    assert requeued.args[0] == ["model=nin", "schedule.checkpoint_every=100", "resume=true"]
    assert requeued.args[1:3] == ("hydra.sweep.dir", 0)
    err = capsys.readouterr().err.splitlines()  # and submitit's log lines
    assert [ln for ln in err if ln.startswith("preempted")] == [
        "preempted (SIGUSR2): the run is saved at step 3/4 of epoch 2 in X; continue with "
        f"resume=true hydra.run.dir={tmp_path / 'run'}"
    ]


# ---------------------------------------------------------------- train.py as a user runs it
def _train_py(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    env["OMP_NUM_THREADS"] = "1"  # the same float sums in every run
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *RUN, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigterm_to_train_py_saves_and_the_resume_finishes_identical(tmp_path):
    """SIGTERM to `python train.py` once its first mid-epoch last.pt is written: exit 143
    with one line, and `resume=true hydra.run.dir=DIR` ends as the uninterrupted run."""
    longer = ("dataset.num_train=1024", "schedule.checkpoint_every=8")
    full, run = tmp_path / "full", tmp_path / "run"
    ref = _train_py(full, *longer)
    stopped = _train_py(run, *longer)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and stopped.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("preempted")]
    assert len(lines) == 1 and lines[0].startswith("preempted (SIGTERM): the run is saved ")
    assert lines[0].endswith(f"; continue with resume=true hydra.run.dir={run}")
    assert load_checkpoint(run / "last.pt")["epoch"] < 2
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    resumed = _train_py(run, *longer, "resume=true")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_run(full, run)
