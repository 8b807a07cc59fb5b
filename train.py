"""Train a model as the composed config says: `python train.py model=nin quant=w2a2`.

Thin Hydra entry point; the work is done by `compress.pipeline.run_pipeline`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import configstore  # noqa: F401  (stores the config schemas in Hydra's ConfigStore)
from compress.cli import user_errors
from compress.pipeline import run_pipeline


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(run_dir):
        OmegaConf.save(cfg, run_dir / "config.yaml")
        plain = OmegaConf.to_container(cfg, resolve=True)
        # The data root as written (e.g. ${oc.env:COMPRESS_DATA_DIR,data}): prune / fuse
        # re-resolve it at their run time instead of trusting where the data lived today.
        root = OmegaConf.to_container(cfg.dataset, resolve=False).get("root")
        if isinstance(root, str) and "${" in root:
            plain["dataset"]["root_template"] = root
        metrics = run_pipeline(plain, run_dir)
        print(
            f"test accuracy: {metrics['test_acc']:.2f}% (best {metrics['best_test_acc']:.2f}%)"
            f"  run dir: {run_dir}"
        )
        return metrics["test_acc"]


if __name__ == "__main__":
    main()
