"""Post-training static INT8 with ONNX Runtime (QDQ, per-channel int8 weights, uint8
activations): `python calibrate.py ckpt=RUN/best.pt calib.method=minmax|percentile|entropy
[calib.batches=8 calib.batch_size=32] [dataset=NAME] hydra.run.dir=DIR`."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import configstore  # stores the config schemas in Hydra's ConfigStore on import
from compress.cli import user_errors
from compress.tasks import calibrate as calibrate_task


def run(cfg: DictConfig, run_dir: Path) -> float:
    """The entry's work on a composed config: tests call it in process."""
    with user_errors():
        metrics = calibrate_task.run(configstore.plain_config(cfg), run_dir)
        print(calibrate_task.table(metrics))
        print(f"INT8 model: {run_dir / 'model_int8.onnx'} (fp32: {run_dir / 'model.onnx'})")
        return metrics["map"] if "map" in metrics else metrics["test_acc"]


@hydra.main(version_base="1.3", config_path="conf", config_name="calibrate")
def main(cfg: DictConfig) -> float:
    return configstore.hydra_job(run, cfg)  # in a multirun a failing job is recorded, not fatal


if __name__ == "__main__":
    main()
    configstore.exit_if_jobs_failed()
