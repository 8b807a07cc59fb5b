"""Store a quantized checkpoint's weights at their real bit widths and prove the round trip
exact: `python pack.py ckpt=RUN/best.pt [hydra.run.dir=DIR]` writes DIR/packed.pt and
DIR/metrics.json (real file sizes). The library side is compress/pack.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import configstore  # hydra_job / exit_if_jobs_failed, shared by every entry point
from compress.cli import user_errors
from compress.pack import pack_checkpoint, table


@dataclass
class PackRun:
    """conf/pack.yaml: Hydra rejects any other key."""

    ckpt: str = MISSING  # the quantized checkpoint to pack
    seed: int = 0  # of the random batch the round trip is checked on
    batch: int = 4  # images in that batch
    image_size: int = 32  # their height and width (the channels come from the checkpoint)


ConfigStore.instance().store(name="base_pack", node=PackRun)


def run(cfg: DictConfig, run_dir: Path) -> float:
    """The entry's work on a composed config: tests call it in process."""
    with user_errors():
        ckpt = None if OmegaConf.is_missing(cfg, "ckpt") else cfg.ckpt
        metrics = pack_checkpoint(ckpt, run_dir, cfg.seed, cfg.batch, cfg.image_size)
        print(table(metrics))
        print(f"packed checkpoint: {run_dir / 'packed.pt'}")
        return metrics["ratio"]


@hydra.main(version_base="1.3", config_path="conf", config_name="pack")
def main(cfg: DictConfig) -> float:
    return configstore.hydra_job(run, cfg)  # in a multirun a failing job is recorded, not fatal


if __name__ == "__main__":
    main()
    configstore.exit_if_jobs_failed()
