"""Export a checkpoint to ONNX and check it in ONNX Runtime against PyTorch:
`python export.py ckpt=RUN/best.pt [format=onnx] [dataset=NAME] hydra.run.dir=DIR`."""

from __future__ import annotations

from pathlib import Path

import hydra
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
        return metrics["map"] if "map" in metrics else metrics["test_acc"]


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> float:
    return configstore.hydra_job(run, cfg)  # in a multirun a failing job is recorded, not fatal


if __name__ == "__main__":
    main()
    configstore.exit_if_jobs_failed()
