"""Training and evaluation loops, optimizer and LR schedule, with resumable checkpoints.

`fit` is a plain loop: for each epoch, train, evaluate, log, checkpoint (`last.pt` every epoch,
`best.pt` when test accuracy improves). All state needed to continue (weights, optimizer,
scheduler, epoch, RNG) is in `last.pt`, and the data order of epoch k depends only on
(seed, k), so a resumed run ends with the same weights as an uninterrupted one. A run that
diverges (a NaN or inf training loss, weight or test loss) stops with a DivergenceError before
it writes that epoch's checkpoints: `best.pt` never comes from a diverged epoch.

Inside an epoch (ImageNet epochs take hours): `schedule.checkpoint_every=N` also writes
`last.pt` every N optimizer steps, and a preemption signal (SIGTERM, SIGUSR1, SIGUSR2: what
SLURM sends before it preempts or times out a job) makes the loop save the same state at the
next step boundary and stop with `compress.cli.Preempted` (see `StopSignals`). Such a `last.pt`
holds, besides the epoch-end state, the step within the epoch, the epoch's running train
loss / accuracy sums and the fp16 GradScaler; the loaders skip the batches already trained
without changing the order or the augmentation of the rest (`set_epoch(epoch, start)`), so
a run resumed there also ends with the uninterrupted run's weights.

Data-parallel (under torchrun, `compress.distributed`): `fit` wraps the model in
DistributedDataParallel, each process reads its shard of every epoch, and
`schedule.batch_size` is the batch of ONE process: the global batch (what the optimizer and
the LR schedule see per step) is world_size x batch_size, and a run with N processes x B
matches a single process with N*B images per step (exactly so without BatchNorm or with
`schedule.sync_bn=true`, whose SyncBatchNorm needs CUDA; plain BN normalizes each process's
B images by their own statistics). Train metrics and the evaluation (each process evaluates
its shard of the test set) are summed over processes, so every rank sees the same numbers and
agrees on `best`; rank 0 alone logs, writes checkpoints (which record `world_size`: a resume
must use the same one) and TensorBoard. Callbacks get the unwrapped model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compress.checkpoint import save_checkpoint
from compress.cli import Preempted
from compress.config import (  # noqa: F401  (re-exported: the choices lived here)
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    TrainSettings,
    validate_schedule,
)
from compress.data import DataSet, TensorLoader
from compress.distill import LossFn, cross_entropy_loss
from compress.distributed import Dist, check_resume_world, current
from compress.errors import ConfigError, DivergenceError
from compress.spec import checkpoint_state

log = logging.getLogger(__name__)

# what schedulers send before they kill a job: SLURM SIGTERM (and --signal=USR1@T / USR2@T,
# submitit's preemption signal), torchrun SIGTERM to every worker
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
# under torchrun the ranks agree on stopping every this many steps (and at each epoch's end):
# one tiny all-reduce and host sync, not one per step; a single process looks every step
STOP_POLL_STEPS = 25
# an epoch's progress handed to `train_one_epoch`'s `at_step`: (steps done, () -> its state)
StepHook = Callable[[int, Callable[[], dict[str, Any]]], None]


@dataclass
class TrainConfig(TrainSettings):
    """The `schedule` config group minus `stages`: how long and how to train. Fields and
    defaults: compress.config.TrainSettings; checks: compress.config.validate_schedule."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "schedule") -> TrainConfig:
        """Check a `schedule` dict and build the config (`stages`, the pipeline's, is dropped)."""
        validate_schedule(d, prefix)
        return cls(**{k: v for k, v in d.items() if k != "stages"})

    def validate(self, p: str = "schedule") -> None:
        validate_schedule(asdict(self), p)


def cpu_has_native_bf16() -> bool:
    """AVX-512-BF16 or AMX: bf16 autocast halves a CIFAR ResNet's training step there, and is
    several times slower than fp32 on CPUs without them."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def for_device(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """The `auto` / `fast` settings made concrete: on CUDA bf16 autocast and channels_last (the
    GPU fast path), elsewhere NCHW and fp32 (`auto`) or bf16 where the CPU has it (`fast`)."""
    cuda = device.type == "cuda"
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    elif precision == "fast":
        precision = "bf16" if cuda or cpu_has_native_bf16() else "fp32"
    channels_last = cuda if cfg.channels_last is None else cfg.channels_last
    return replace(cfg, precision=precision, channels_last=channels_last)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW; no weight decay on BN parameters and biases (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    opt = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return opt(groups, lr=cfg.lr)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """LR multiplier at optimizer step `step` (per-step schedules, linear warmup first)."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.lr_schedule == "onecycle":  # 25% warmup from lr/25, cosine to ~0
        warmup = warmup or 0.25 * total
        if step < warmup:
            return 0.04 + 0.96 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if cfg.lr_schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


class Callback:
    """Hooks into the loop; subclasses override what they need (sparsity, weight clipping, ...)."""

    def after_backward(self, model: nn.Module) -> None: ...

    def after_step(self, model: nn.Module) -> None: ...

    def on_epoch_end(self, epoch: int, model: nn.Module, writer: Any) -> None: ...


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("schedule.precision=fp16 needs a CUDA device: use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class Step(NamedTuple):
    """One training step's result: the loss minimised, the images it saw, and how many of them
    the model got right (None where a task has no training accuracy, as detection)."""

    loss: torch.Tensor
    n: int
    correct: torch.Tensor | None


class Task(Protocol):
    """What the loop needs of a kind of problem (classification, detection): the loss of a batch,
    the test metrics, and which of them `best.pt` follows. Chosen by the data set, so the loop
    has no `if detection:` in it (compress.detection.task.DetectionTask is the other one)."""

    name: str
    metric: str  # the `evaluate` key that `best` follows; higher is better

    def step(self, model: nn.Module, batch: Any) -> Step: ...

    def evaluate(
        self,
        model: nn.Module,
        loader: Any,
        precision: str = "fp32",
        dist: Dist | None = None,
        tta: bool = False,
    ) -> dict[str, float]: ...

    def keys(self, tta: bool = False) -> tuple[str, ...]: ...

    def describe(self, metrics: dict[str, Any]) -> str: ...


class ClassificationTask:
    """(images, labels) batches: `loss_fn(x, logits, y)` (cross-entropy with the schedule's label
    smoothing, or a compress.distill.Distiller around it), top-1 as the metric."""

    name = "classification"
    metric = "acc"

    def __init__(self, loss_fn: LossFn | None = None, label_smoothing: float = 0.0) -> None:
        self.loss_fn = cross_entropy_loss(label_smoothing) if loss_fn is None else loss_fn

    def step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Step:
        x, y = batch
        out = model(x)
        loss = self.loss_fn(x, out, y)
        return Step(loss, len(y), (out.detach().argmax(1) == y).sum())

    def evaluate(
        self,
        model: nn.Module,
        loader: TensorLoader,
        precision: str = "fp32",
        dist: Dist | None = None,
        tta: bool = False,
    ) -> dict[str, float]:
        return evaluate(model, loader, precision, dist, tta)  # the module's, looked up per call

    def keys(self, tta: bool = False) -> tuple[str, ...]:
        """What `evaluate` returns, in this order."""
        return ("loss", "acc", "acc_tta") if tta else ("loss", "acc")

    def describe(self, metrics: dict[str, Any]) -> str:
        text = f"test loss {metrics['loss']:.4f} acc {metrics['acc']:.2f}%"
        if "acc_tta" in metrics:
            text += f" (flip TTA {metrics['acc_tta']:.2f}%)"
        return text


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: TensorLoader,
    precision: str = "fp32",
    dist: Dist | None = None,
    tta: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over a loader; with `tta`, also
    `acc_tta`: the accuracy of the logits averaged over each image and its horizontal mirror
    (flip test-time augmentation, one more forward pass).

    With `dist` enabled, `loader` holds this rank's shard and the sums are added over ranks:
    every rank returns the numbers of the whole test set.
    """
    model.eval()
    # sums stay on the device (no host sync per batch); the loss sum in float64, as a Python
    # float would be
    loss = torch.zeros((), dtype=torch.float64, device=loader.device)
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    correct_tta = torch.zeros((), dtype=torch.long, device=loader.device)
    n = 0
    for x, y in loader:
        with autocast(loader.device, precision):
            out = model(x)
            mirrored = model(x.flip(-1)) if tta else None
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        if mirrored is not None:
            correct_tta += ((out.float() + mirrored.float()).argmax(1) == y).sum()
        n += len(y)
    if dist is not None and dist.enabled:
        if tta:
            dist.all_reduce_sum(correct_tta)
        loss, correct, n = _sum_over_ranks(dist, loss, correct, n)
    result = {"acc": 100.0 * correct.item() / max(n, 1), "loss": loss.item() / max(n, 1)}
    if tta:
        result["acc_tta"] = 100.0 * correct_tta.item() / max(n, 1)
    return result


def _sum_over_ranks(
    dist: Dist, loss: torch.Tensor, correct: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss sum, correct, count) added over all ranks: one all-reduce of a float64 vector."""
    sums = torch.stack([loss.double(), correct.double(), loss.new_tensor(n, dtype=torch.float64)])
    dist.all_reduce_sum(sums)
    return sums[0].to(loss.dtype), sums[1].round().long(), int(sums[2].round().item())


def train_one_epoch(
    model: nn.Module,
    loader: TensorLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    callbacks: Sequence[Callback] = (),
    desc: str = "train",
    dist: Dist | None = None,
    loss_fn: LossFn | None = None,
    resume: dict[str, Any] | None = None,
    at_step: StepHook | None = None,
    task: Task | None = None,
) -> dict[str, float | None]:
    """One epoch. `model` may be DDP-wrapped; callbacks get the module underneath. With `dist`
    enabled the returned loss / accuracy are over all ranks' images. `task`: what a batch's
    loss is (default: a ClassificationTask of `loss_fn(x, logits, y)`, itself by default
    cross-entropy with the schedule's label smoothing; a compress.distill.Distiller around it
    for KD). The accuracy is None for a task without one (detection).

    `resume`: the state of this epoch saved inside it ({step, sums, scaler}, as `at_step`
    gives it; `loader` set to start at that step): the running sums and the GradScaler go on
    from there. `at_step(done, state)`: called after every optimizer step with the steps done
    in the epoch and a function that returns the epoch's state at this boundary (a host sync;
    call it only to save); it may stop the epoch by raising."""
    task = _task(task, loss_fn, cfg)
    model.train()
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    inner = inner.module if isinstance(inner, nn.parallel.DistributedDataParallel) else inner
    show = cfg.progress and (dist is None or dist.is_main)
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16")
    total_loss = torch.zeros((), device=loader.device)
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    n, start = 0, 0
    if resume is not None:
        start, sums = int(resume["step"]), resume["sums"]
        total_loss.fill_(sums["loss"])  # exact: a float32 kept as a Python float
        correct.fill_(int(sums["correct"]))
        n = int(sums["n"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])

    def state(done: int) -> dict[str, Any]:
        sums = {"loss": total_loss.item(), "correct": int(correct.item()), "n": n}
        return {"step": done, "sums": sums, "scaler": scaler.state_dict() or None}

    bar = tqdm(
        loader,
        desc=desc,
        leave=False,
        disable=None if show else True,
        initial=start,
        total=len(loader),
    )
    counted = True  # whether the task counts correct answers
    for step, batch in enumerate(bar, start):
        with autocast(loader.device, cfg.precision):
            result = task.step(model, batch)
        loss = result.loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for cb in callbacks:
            cb.after_backward(inner)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        for cb in callbacks:
            cb.after_step(inner)
        total_loss += loss.detach() * result.n
        if result.correct is None:
            counted = False
        else:
            correct += result.correct
        n += result.n
        # A host sync on a GPU: check now and then (the running sum keeps any NaN / inf), and
        # after the last step below, whatever the number of steps
        if step % 25 == 24 and not torch.isfinite(total_loss):
            raise DivergenceError(
                f"training diverged: the loss became non-finite by step {step}; lower schedule.lr"
            )
        if at_step is not None:
            at_step(step + 1, functools.partial(state, step + 1))
    if dist is not None and dist.enabled:
        total_loss, correct, n = _sum_over_ranks(dist, total_loss, correct, n)
    if not torch.isfinite(total_loss):  # summed over ranks: every rank stops
        raise DivergenceError(
            f"training diverged: the loss became non-finite by step {len(loader) - 1}; "
            "lower schedule.lr"
        )
    check_finite_weights(inner, dist)
    acc = 100.0 * correct.item() / max(n, 1) if counted else None
    return {"acc": acc, "loss": total_loss.item() / max(n, 1)}


def _task(task: Task | None, loss_fn: LossFn | None, cfg: TrainConfig) -> Task:
    if task is None:
        return ClassificationTask(loss_fn, cfg.label_smoothing)
    if loss_fn is not None:
        raise ValueError("pass the loss inside the task (ClassificationTask(loss_fn)), not both")
    return task


def check_finite_weights(model: nn.Module, dist: Dist | None = None) -> None:
    """Raise DivergenceError when a parameter or a BN running statistic of `model` holds a NaN
    or inf (the last optimizer step of an epoch can make them so after the loss was computed).
    Other buffers are not checked: a model may keep an inf on purpose (a -inf attention mask).
    One host sync; with `dist` enabled the verdict is all ranks' (BN buffers are per rank)."""
    bn = nn.modules.batchnorm._BatchNorm
    stats = [
        (f"{name}.{k}" if name else k, t)
        for name, m in model.named_modules()
        if isinstance(m, bn)
        for k, t in m.named_buffers(recurse=False)
    ]
    named = [(k, t) for k, t in [*model.named_parameters(), *stats] if t.is_floating_point()]
    if not named:
        return
    finite = torch.stack([t.detach().isfinite().all() for _, t in named])
    bad = (~finite).sum().double()
    if dist is not None and dist.enabled:
        bad = bad.reshape(1)
        dist.all_reduce_sum(bad)
    if bad.item() == 0:
        return
    names = [k for (k, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
    where = names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "") if names else ""
    raise DivergenceError(
        "training diverged: the weights became non-finite"
        + (f" ({where})" if where else " on another process")
        + "; lower schedule.lr"
    )


def make_loaders(
    data: DataSet,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    *,
    crop_padding: int,
    flip: bool | str,
    shard: tuple[int, int] | None,
) -> tuple[TensorLoader, TensorLoader]:
    """(train, test) loaders; `shard=(rank, world_size)`: this rank's part of both (None: all)."""
    if hasattr(data, "loaders"):  # a streaming data set (image folders) builds its own
        sharded = {} if shard is None else {"shard": shard}
        return data.loaders(
            cfg.batch_size,
            cfg.eval_batch_size,
            device,
            seed,
            channels_last=cfg.channels_last,
            **sharded,
        )
    train = TensorLoader(
        data.train,
        cfg.batch_size,
        data.mean,
        data.std,
        device,
        train=True,
        crop_padding=crop_padding,
        flip=flip,
        seed=seed,
        channels_last=cfg.channels_last,
        shard=shard,
    )
    test = TensorLoader(
        data.test,
        cfg.eval_batch_size,
        data.mean,
        data.std,
        device,
        channels_last=cfg.channels_last,
        shard=shard,
    )
    return train, test


def _to_sync_bn(model: nn.Module) -> dict[str, type]:
    """Swap every BatchNorm of `model` for SyncBatchNorm in place (the same parameters and
    buffers); returns {name: original class} for `_from_sync_bn`."""
    bn = nn.modules.batchnorm._BatchNorm
    classes = {
        name: type(m)
        for name, m in model.named_modules()
        if isinstance(m, bn) and not isinstance(m, nn.SyncBatchNorm) and name
    }
    for name in classes:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(owner, child)))
    return classes


def _from_sync_bn(model: nn.Module, classes: dict[str, type]) -> None:
    """Undo `_to_sync_bn`: the original BatchNorm classes, holding the trained tensors."""
    for name, cls in classes.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        sync = getattr(owner, child)
        bn = cls(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
        for key, p in sync._parameters.items():
            setattr(bn, key, p)
        for key, b in sync._buffers.items():
            setattr(bn, key, b)
        bn.train(sync.training)
        setattr(owner, child, bn)


def _wrap(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """The model the training step calls: DDP over `model` when data-parallel."""
    if not dist.enabled:
        return model
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return nn.parallel.DistributedDataParallel(model, device_ids=[index])
    return nn.parallel.DistributedDataParallel(model)


def _kept(history: list[dict[str, Any]], best: float, key: str = "test_acc") -> str:
    """Which epoch best.pt holds (the first to reach the best `key`), for an error."""
    epoch = next((h["epoch"] for h in history if h.get(key) == best), None)
    return f"best.pt holds epoch {epoch}" if epoch else "no best.pt was written"


class StopSignals:
    """The signals a scheduler sends before it kills a job, caught while `fit` runs, so that
    the loop saves at the next step boundary instead of losing the epoch.

    The handler only records the first signal (writing a file at an arbitrary point of the
    program is unsafe); `fit` asks after each step (`requested`), writes last.pt and raises
    compress.cli.Preempted, and the entry point then hands the signal on to the handler that
    was there before (compress.cli.hand_on_signal: submitit requeues the job). Installed from
    the main thread only (Python's rule; elsewhere nothing is caught) and restored after.
    Under torchrun the ranks decide together: they sum which signals each got every
    STOP_POLL_STEPS steps and at each epoch's end, so all stop at the same step, with the same
    signal, even when only some got it.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)  # SIGUSR1 / SIGUSR2 are POSIX only
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._catch)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _catch(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def requested(self, dist: Dist, device: torch.device, poll: bool = True) -> bool:
        """Whether to stop here. Under torchrun a collective when `poll` (every rank asks at
        the same points), and False between polls."""
        if not dist.enabled:
            return self.signum is not None
        if not poll:
            return False
        votes = torch.zeros(signal.NSIG, device=device)  # which signals reached which ranks
        if self.signum is not None:
            votes[self.signum] = 1.0
        got = dist.all_reduce_sum(votes).nonzero().flatten().tolist()
        if got and self.signum is None:  # stop as if it had come here too (rank 0 hands it on)
            self.signum = int(got[0])
        return bool(got)

    def stopped(self, where: str, dist: Dist) -> Preempted:
        """The exception that ends the run, once rank 0 has written `where`."""
        dist.barrier()  # no rank exits (torchrun would then stop rank 0) before last.pt is on disk
        if dist.is_main:
            log.warning("stopping on %s: %s", self.name, where)
        return Preempted(self.signum or signal.SIGTERM, where, main=dist.is_main)


def _gather_sums(dist: Dist, sums: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Every rank's running epoch sums, in rank order (a collective under torchrun): a resumed
    rank goes on from its own, so the epoch's numbers are the uninterrupted ones exactly."""
    if not dist.enabled:
        return [sums]
    table = torch.zeros(dist.world, 3, dtype=torch.float64, device=device)
    row = [sums["loss"], sums["correct"], sums["n"]]
    table[dist.rank] = torch.tensor(row, dtype=torch.float64)
    dist.all_reduce_sum(table)  # the other rows add zeros: every value arrives exactly
    return [{"loss": r[0], "correct": int(r[1]), "n": int(r[2])} for r in table.tolist()]


def _in_epoch(state: dict[str, Any], steps: int, dist: Dist, path: Path) -> dict[str, Any] | None:
    """This rank's part of a last.pt saved inside an epoch ({step, sums, scaler}, what
    train_one_epoch resumes from); None for one saved at an epoch's end."""
    step = int(state.get("step") or 0)
    if not step:
        return None
    saved = int(state.get("steps_per_epoch") or 0)
    if saved != steps:
        raise ConfigError(
            f"{path} was saved at step {step} of {saved} in epoch {state['epoch'] + 1}, but this "
            f"run has {steps} steps per epoch: resume with the same schedule.batch_size and data"
        )
    sums = state["train_sums"][dist.rank if dist.enabled else 0]
    return {"step": step, "sums": sums, "scaler": state.get("scaler")}


def fit(
    model: nn.Module,
    data: DataSet,
    cfg: TrainConfig,
    run_dir: str | Path,
    device: torch.device,
    seed: int = 0,
    resume_state: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    crop_padding: int = 4,
    flip: bool | str = True,
    writer: Any = None,
    dist: Dist | None = None,
    loss_fn: LossFn | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """Train `model` for `cfg.epochs`; returns the run's summary.

    Evaluates every `cfg.eval_every` epochs and after the last one.

    `resume_state`: a `last.pt` dict to continue from. `extra_state`: plain data saved in every
    checkpoint (the arch, quant config, data set name and composed config).

    `dist`: the process group (default: the one joined, if any; see compress.distributed).
    When enabled the model trains under DistributedDataParallel with `cfg.batch_size` images
    per process per step, and only rank 0 logs, writes `writer` and the checkpoints.

    `task`: the loss, metrics and `best` of the problem (default: a ClassificationTask of
    `loss_fn(x, logits, y)`, cross-entropy by default); a loss that is a module (a Distiller
    and its teacher) is moved to the device and memory format of the model. History rows and
    the summary name the task's metrics `test_<key>` (test_acc, test_loss; test_map, ...) and
    the one `best` follows `best_test_<metric>`.
    """
    dist = current() if dist is None else dist
    cfg = for_device(cfg, device)
    run_dir = Path(run_dir)
    task = _task(task, loss_fn, cfg)
    target = f"test_{task.metric}"  # the history key best.pt follows
    loss_module = getattr(task, "loss_fn", None)
    for m in (model, loss_module) if isinstance(loss_module, nn.Module) else (model,):
        m.to(device)
        if cfg.channels_last:
            m.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.enabled and device.type != "cuda":
        raise ConfigError(
            "schedule.sync_bn=true needs CUDA (SyncBatchNorm runs on GPUs only): "
            "use device=cuda, or schedule.sync_bn=false"
        )
    train_loader, test_loader = make_loaders(
        data, cfg, device, seed, crop_padding=crop_padding, flip=flip, shard=dist.shard
    )
    if len(train_loader) == 0:
        per = f" x {dist.world} processes" if dist.enabled else ""
        raise ConfigError(
            f"schedule.batch_size={cfg.batch_size}{per} is larger than the "
            f"{len(data.train)} training images"
        )
    steps = len(train_loader)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps))
    start, best, history, wall = 0, -1.0, [], 0.0
    in_epoch: dict[str, Any] | None = None  # the state of epoch `start` when saved inside it
    if resume_state is not None:
        check_resume_world(resume_state.get("world_size", 1), dist.world, run_dir / "last.pt")
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        torch.set_rng_state(resume_state["rng"])
        if "cuda_rng" in resume_state and device.type == "cuda":
            torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
        start, best = resume_state["epoch"], resume_state["best_acc"]
        history, wall = list(resume_state["history"]), resume_state["wall_s"]
        in_epoch = _in_epoch(resume_state, steps, dist, run_dir / "last.pt")
        if dist.is_main and in_epoch:
            log.info(
                "resuming at step %d/%d of epoch %d of %d (best %.2f%%)",
                in_epoch["step"],
                steps,
                start + 1,
                cfg.epochs,
                best,
            )
        elif dist.is_main:
            log.info("resuming from epoch %d of %d (best %.2f%%)", start, cfg.epochs, best)
    extra = {**(extra_state or {}), "world_size": dist.world}
    main = dist.is_main
    last = run_dir / "last.pt"
    stop = StopSignals()

    def resumable(
        epoch: int, wall_s: float, test_acc: float | None, state: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """last.pt: all a resumed run needs at the start of epoch `epoch` (0-based); `state`:
        the model's checkpoint_state when already taken."""
        return {
            **(checkpoint_state(model, **extra) if state is None else state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best_acc": best,
            "rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
            "history": history,
            "wall_s": wall_s,
            target: test_acc,
        }

    def at_step(epoch: int, t0: float, done: int, progress: Callable[[], dict[str, Any]]) -> None:
        """After each step: save last.pt every `checkpoint_every` steps of the run, and save and
        stop on a preemption signal. Every rank gets here at the same steps, so the
        collectives (stop poll, sums, weight check) match."""
        every = cfg.checkpoint_every
        due = every is not None and done < steps and (epoch * steps + done) % every == 0
        poll = done % STOP_POLL_STEPS == 0 or done == steps
        stopping = stop.requested(dist, device, poll)
        if not (due or stopping):
            return
        state = progress()
        sums = _gather_sums(dist, state["sums"], device)
        if not all(math.isfinite(r["loss"]) for r in sums):  # keep the last good last.pt
            raise DivergenceError(
                f"training diverged: the loss became non-finite by step {done - 1}; "
                "lower schedule.lr"
            )
        check_finite_weights(model, dist)
        if main:
            previous = history[-1].get(target) if history else None
            elapsed = wall + time.perf_counter() - t0
            in_state = {"step": done, "steps_per_epoch": steps, "train_sums": sums}
            save_checkpoint(
                last, {**resumable(epoch, elapsed, previous), **in_state, "scaler": state["scaler"]}
            )
        if stopping:
            where = f"the run is saved at step {done}/{steps} of epoch {epoch + 1} in {last}"
            raise stop.stopped(where, dist)

    sync_bn = _to_sync_bn(model) if cfg.sync_bn and dist.enabled else {}
    try:
        stop.install()
        net = _wrap(model, dist, device)
        if cfg.compile:
            net = torch.compile(net)
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            resume = in_epoch if epoch == start else None
            if resume:
                train_loader.set_epoch(epoch, start=resume["step"])
            else:
                train_loader.set_epoch(epoch)
            tr = train_one_epoch(
                net,
                train_loader,
                optimizer,
                scheduler,
                cfg,
                callbacks,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                dist=dist,
                resume=resume,
                at_step=functools.partial(at_step, epoch, t0),
                task=task,
            )
            evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            te: dict[str, Any] = dict.fromkeys(task.keys(cfg.tta))  # not evaluated: None
            if evaluated:
                # BN running statistics are per process: every rank evaluates (and rank 0
                # saves) rank 0's
                dist.broadcast_buffers(model)
                te = task.evaluate(model, test_loader, cfg.precision, dist, cfg.tta)
                bad = {k: v for k, v in te.items() if not math.isfinite(v)}
                if bad:  # before any checkpoint of this epoch
                    k, v = next(iter(bad.items()))
                    what = "test loss" if k == "loss" else f"test {k}"
                    raise DivergenceError(
                        f"training diverged: the {what} is {v} after epoch "
                        f"{epoch + 1} ({_kept(history, best, target)}); lower schedule.lr"
                    )
            wall += time.perf_counter() - t0
            row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"]}
            tta_keys = [k for k in te if k.endswith("_tta")]  # after lr, as they came
            row |= {f"test_{k}": v for k, v in te.items() if k not in tta_keys}
            row["lr"] = optimizer.param_groups[0]["lr"]
            row |= {f"test_{k}": te[k] for k in tta_keys}
            history.append(row)
            if main:
                acc = "" if tr["acc"] is None else f" acc {tr['acc']:.2f}%"
                log.info(
                    "epoch %d/%d  train loss %.4f%s  %s  (%.0fs)",
                    epoch + 1,
                    cfg.epochs,
                    tr["loss"],
                    acc,
                    task.describe(te) if evaluated else "not evaluated",
                    time.perf_counter() - t0,
                )
            if writer is not None and main:
                for k, v in row.items():
                    if k != "epoch" and v is not None:  # None: an epoch without evaluation
                        writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
            for cb in callbacks:
                cb.on_epoch_end(epoch + 1, model, writer if main else None)
            # every rank has the same (all-reduced) accuracy, so all agree on `best`
            score = te[task.metric]
            improved = evaluated and score > best
            if improved:
                best = score
            if main:
                state = checkpoint_state(model, **extra)
                if improved:
                    save_checkpoint(
                        run_dir / "best.pt", {**state, "epoch": epoch + 1, target: score}
                    )
                save_checkpoint(last, resumable(epoch + 1, wall, score, state))
            # a signal during the evaluation: stop now that the epoch is saved (after the last
            # epoch the run just finishes)
            if epoch + 1 < cfg.epochs and stop.requested(dist, device):
                raise stop.stopped(f"the run is saved after epoch {epoch + 1} in {last}", dist)
    finally:
        stop.restore()
        _from_sync_bn(model, sync_bn)
    if stop.signum is not None and main:
        log.warning("%s arrived as training ended: the run finishes", stop.name)
    dist.barrier()  # rank 0's checkpoints are on disk when any rank returns
    final = history[-1]
    return {
        **{k: v for k, v in final.items() if k.startswith("test_") and k != "test_loss"},
        f"best_{target}": best,
        "epochs": cfg.epochs,
        "wall_s": wall,
        "history": history,
    }
