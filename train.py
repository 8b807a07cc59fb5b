"""Train a model as the composed config says: `python train.py model=nin quant=w2a2`.

Thin Hydra entry point; the work is done by `compress.pipeline.run_pipeline`.

Data-parallel: `torchrun --nproc_per_node=N train.py ...` (compress/distributed.py;
`schedule.batch_size` is per process, the global batch N x batch_size). hydra.run.dir is not
needed: rank 0's Hydra picks the run directory (hydra.run.dir, or the dated default) and tells
the other ranks, which run Hydra in a throwaway temporary folder without `.hydra/` or a log
file and remove it at exit, so only rank 0 writes anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import configstore  # stores the config schemas in Hydra's ConfigStore on import
from compress.cli import user_errors
from compress.distributed import (
    Dist,
    distributed_argv,
    env_rank,
    env_world,
    init_from_env,
    quiet_unless_alone,
    rank_scratch,
    scratch_removed,
)
from compress.errors import CompressError, ConfigError
from compress.pipeline import run_pipeline
from compress.tasks.common import resolve_device
from compress.tasks.train import headline


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
            text, score = headline(metrics)
            if dist.is_main:
                print(f"{text}  run dir: {run_dir}")
            return score
        except (CompressError, FloatingPointError):
            quiet_unless_alone(dist.rank)
            raise
        finally:
            dist.shutdown()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return configstore.hydra_job(run, cfg)  # in a multirun a failing job is recorded, not fatal


if __name__ == "__main__":
    with user_errors():
        scratch = rank_scratch()
        sys.argv = distributed_argv(sys.argv, scratch)
    with scratch_removed(scratch):
        main()
    configstore.exit_if_jobs_failed()  # the sweep report is written; say not every job finished
