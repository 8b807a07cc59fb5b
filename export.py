"""Export a checkpoint to ONNX and check it in ONNX Runtime against PyTorch:
`python export.py ckpt=RUN/best.pt [format=onnx] [dataset=NAME] hydra.run.dir=DIR`."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import configstore  # stores the config schemas in Hydra's ConfigStore on import
from compress.cli import user_errors
from compress.tasks import export as export_task


def run(cfg: DictConfig, run_dir: Path) -> float:
    """The entry's work on a composed config: tests call it in process."""
    with user_errors():
        metrics = export_task.run(configstore.plain_config(cfg), run_dir)
        print(export_task.table(metrics))
        print(f"exported model: {metrics.get('model_file', run_dir / 'model.onnx')}")
        return metrics["test_acc"]


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> float:
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
