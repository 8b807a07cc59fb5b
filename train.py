"""Train a model as the composed config says: `python train.py model=nin quant=w2a2`.

Thin Hydra entry point; the work is done by `compress.pipeline.run_pipeline`.

Data-parallel: `torchrun --nproc_per_node=N train.py ...` (compress/distributed.py;
`schedule.batch_size` is per process, the global batch N x batch_size). hydra.run.dir is not
needed: rank 0's Hydra picks the run directory (hydra.run.dir, or the dated default) and tells
the other ranks, which run Hydra in a throwaway temporary folder without `.hydra/` or a log
file and remove it at exit, so only rank 0 writes anything.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import configstore  # stores the config schemas in Hydra's ConfigStore on import
from compress.cli import user_errors
from compress.distributed import Dist, env_rank, env_world, init_from_env
from compress.errors import CompressError, ConfigError
from compress.pipeline import run_pipeline
from compress.tasks.common import resolve_device

ERROR_GRACE_S = 3.0  # see _quiet_unless_alone


def run(cfg: DictConfig, run_dir: Path) -> float:
    """The entry's work on a composed config: tests call it in process."""
    torchrun = env_world()[1] > 1
    with user_errors(run_dir if env_rank() == 0 else None):
        dist = init_from_env(resolve_device(cfg.get("device", "auto"))) if torchrun else Dist()
        try:
            run_dir = Path(dist.broadcast_object(str(run_dir)))  # rank 0's, on every rank
            if dist.enabled and cfg.schedule.get("stages"):
                raise ConfigError(
                    "schedule.stages (a pipeline) does not run under torchrun yet: run each "
                    "stage as its own torchrun ... train.py command (init_from=PATH)"
                )
            if dist.is_main:
                OmegaConf.save(cfg, run_dir / "config.yaml")
            metrics = run_pipeline(configstore.plain_config(cfg), run_dir)
            if dist.is_main:
                print(
                    f"test accuracy: {metrics['test_acc']:.2f}% "
                    f"(best {metrics['best_test_acc']:.2f}%)  run dir: {run_dir}"
                )
            return metrics["test_acc"]
        except (CompressError, FloatingPointError):
            _quiet_unless_alone(dist.rank)
            raise
        finally:
            dist.shutdown()


def _quiet_unless_alone(rank: int) -> None:
    """On ranks other than 0, wait a moment before an error is printed: rank 0 meets the same
    config / checkpoint error and prints its line, and torchrun then stops this rank, so the
    user reads one line, not one per process. An error of this rank alone still prints."""
    if rank != 0:
        time.sleep(ERROR_GRACE_S)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


def distributed_argv(argv: list[str], scratch: str) -> list[str]:
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


if __name__ == "__main__":
    scratch = None
    with user_errors():
        if env_world()[1] > 1 and env_rank() != 0:
            scratch = tempfile.mkdtemp(prefix=f"compress-rank{env_rank()}-")
            # torchrun stops the other ranks with SIGTERM when one fails: exit through the
            # `finally` below, so the scratch folder goes too
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        sys.argv = distributed_argv(sys.argv, scratch or "")
    try:
        main()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
