"""Fold BatchNorm into the layers before it and prove the result equivalent:
`python fuse.py ckpt=RUN/best.pt [dataset=NAME] hydra.run.dir=DIR`."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import configstore  # stores the config schemas in Hydra's ConfigStore on import
from compress.cli import user_errors
from compress.tasks import fuse as fuse_task


def run(cfg: DictConfig, run_dir: Path) -> float:
    """The entry's work on a composed config: tests call it in process."""
    with user_errors():
        metrics = fuse_task.run(configstore.plain_config(cfg), run_dir)
        print(fuse_task.table(metrics))
        print(f"fused checkpoint: {run_dir / 'fused.pt'}")
        return metrics["map"] if "map" in metrics else metrics["test_acc"]


@hydra.main(version_base="1.3", config_path="conf", config_name="fuse")
def main(cfg: DictConfig) -> float:
    return configstore.hydra_job(run, cfg)  # in a multirun a failing job is recorded, not fatal


if __name__ == "__main__":
    main()
    configstore.exit_if_jobs_failed()
