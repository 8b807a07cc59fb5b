"""Data-parallel training under torchrun: the process group, read from torchrun's environment.

`torchrun --nproc_per_node=N train.py ...` starts N copies of the entry point with RANK,
WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set. `init_from_env`
joins them into one process group (NCCL on CUDA, one GPU per process; gloo on the CPU) and
returns a `Dist`; without torchrun (WORLD_SIZE unset or 1) it returns a single-process `Dist`
whose helpers are no-ops, so the training loop has one code path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from compress.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. `enabled`: more than one process (a process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files (checkpoints, logs, TensorBoard, metrics)."""
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, world) for the data loaders; None when single-process."""
        return (self.rank, self.world) if self.enabled else None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all processes, in place; returns it."""
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` (picklable) on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's `obj` (picklable), in rank order, on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: nn.Module, src: int = 0) -> None:
        """Copy rank `src`'s buffers (BN running statistics) to every process."""
        if self.enabled:
            for b in module.buffers():
                tdist.broadcast(b, src=src)

    def shutdown(self) -> None:
        """Leave the process group (a no-op when there is none)."""
        if self.enabled and tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


def env_world() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) as torchrun set them; (0, 1, 0, 1)
    without torchrun."""

    def get(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return default if value in (None, "") else int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} in the environment is not an integer") from None

    world = get("WORLD_SIZE", 1)
    rank, local_rank = get("RANK", 0), get("LOCAL_RANK", 0)
    return rank, world, local_rank, get("LOCAL_WORLD_SIZE", world)


def env_rank() -> int:
    """This process's rank from the environment (0 without torchrun); needs no process group."""
    return env_world()[0] if env_world()[1] > 1 else 0


def current() -> Dist:
    """The `Dist` of the process group already joined, or a single-process one."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return Dist()
    world = tdist.get_world_size()
    _, _, local_rank, _ = env_world()
    return Dist(tdist.get_rank(), world, local_rank, world > 1)


def init_from_env(device: torch.device | str) -> Dist:
    """Join torchrun's process group for training on `device`; a no-op without torchrun.

    Idempotent: a process group already joined is reused. On CUDA each process takes GPU
    LOCAL_RANK and the backend is NCCL; on the CPU it is gloo.
    """
    device = torch.device(device)
    rank, world, local_rank, local_world = env_world()
    if tdist.is_available() and tdist.is_initialized():  # joined by the caller (any launcher)
        dist = current()
        if not dist.enabled:
            return dist
        backend = str(tdist.get_backend())
        if device.type == "cuda" and "nccl" not in backend:
            raise ConfigError(
                f"the process group uses {backend}, but device=cuda needs nccl: "
                "initialize it with backend=nccl, or use device=cpu"
            )
        if device.type == "cuda":
            torch.cuda.set_device(dist.local_rank)
        return dist
    if world <= 1:
        return Dist()
    if not tdist.is_available():
        raise ConfigError(
            f"torchrun started {world} processes but this PyTorch build has no "
            "torch.distributed: run one process (python train.py ...)"
        )
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise ConfigError(
                f"torchrun started {local_world} processes but this machine has {gpus} GPUs: "
                f"use --nproc_per_node={gpus} or fewer (one GPU per process)"
            )
        if not tdist.is_nccl_available():
            raise ConfigError(
                "device=cuda under torchrun needs the nccl backend, which this PyTorch build "
                "lacks: use device=cpu (gloo)"
            )
        torch.cuda.set_device(local_rank)
        tdist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        if not tdist.is_gloo_available():
            raise ConfigError(
                "device=cpu under torchrun needs the gloo backend, which this PyTorch build lacks"
            )
        tdist.init_process_group("gloo")
    return Dist(rank, world, local_rank, True)


def check_resume_world(saved: Any, world: int, path: Any) -> None:
    """A resumed run must use the world size its last.pt was written with (the data order,
    steps per epoch and LR schedule depend on it)."""
    saved = int(saved or 1)
    if saved == world:
        return
    how = (
        "resume without torchrun (or with --nproc_per_node=1)"
        if saved == 1
        else f"resume with --nproc_per_node={saved}"
    )
    raise ConfigError(f"{path} was written by a {saved}-process run; {how}")


# ---------------------------------------------------------------- the entry point's side
ERROR_GRACE_S = 3.0  # see quiet_unless_alone


def quiet_unless_alone(rank: int) -> None:
    """On ranks other than 0, wait a moment before an error is printed: rank 0 meets the same
    config / checkpoint error and prints its line, and torchrun then stops this rank, so the
    user reads one line, not one per process. An error of this rank alone still prints."""
    if rank != 0:
        time.sleep(ERROR_GRACE_S)


def distributed_argv(argv: list[str], scratch: str | None) -> list[str]:
    """The command line for this process under torchrun (unchanged without it).

    Refuses a multirun. On ranks other than 0: Hydra runs in `scratch` (the real run directory
    comes from rank 0) without writing `.hydra/` or a log file.
    """
    if env_world()[1] <= 1:
        return argv
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise ConfigError(
            "torchrun runs one training run: drop -m/--multirun (start one torchrun per "
            "sweep point)"
        )
    if env_rank() == 0:
        return argv
    drop = ("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging=")
    kept = [a for a in argv[1:] if not a.lstrip("+~").startswith(drop)]
    return [
        argv[0],
        *kept,
        f"hydra.run.dir={scratch}",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
    ]


def rank_scratch() -> str | None:
    """A throwaway folder for Hydra on ranks other than 0 under torchrun (None otherwise).

    torchrun stops the other ranks with SIGTERM when one fails: they exit through
    `scratch_removed`, so the folder goes too."""
    if env_world()[1] <= 1 or env_rank() == 0:
        return None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return tempfile.mkdtemp(prefix=f"compress-rank{env_rank()}-")


@contextlib.contextmanager
def scratch_removed(scratch: str | None) -> Iterator[None]:
    try:
        yield
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
