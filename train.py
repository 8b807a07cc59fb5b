"""Train a model as the composed config says: `python train.py model=nin quant=w2a2`.

Thin Hydra entry point; the work is done by `compress.pipeline.run_pipeline`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import configstore  # stores the config schemas in Hydra's ConfigStore on import
from compress.cli import user_errors
from compress.pipeline import run_pipeline


def run(cfg: DictConfig, run_dir: Path) -> float:
    """The entry's work on a composed config: tests call it in process."""
    with user_errors(run_dir):
        OmegaConf.save(cfg, run_dir / "config.yaml")
        metrics = run_pipeline(configstore.plain_config(cfg), run_dir)
        print(
            f"test accuracy: {metrics['test_acc']:.2f}% (best {metrics['best_test_acc']:.2f}%)"
            f"  run dir: {run_dir}"
        )
        return metrics["test_acc"]


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
