"""Prune a trained model and save the physically smaller one:
`python prune.py ckpt=RUN/best.pt pruner=regular pruner.percent=0.5 pruner.base=16`, or without
sparse training `pruner.importance=l1|l2|taylor|fpgm` (`pruner.target=macs`: percent of MACs)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import configstore  # stores the config schemas in Hydra's ConfigStore on import
from compress.cli import user_errors
from compress.tasks import prune as prune_task


def run(cfg: DictConfig, run_dir: Path) -> float:
    """The entry's work on a composed config: tests call it in process."""
    with user_errors():
        m = prune_task.run(configstore.plain_config(cfg), run_dir)
        print(
            f"pruner {m['pruner']}: importance {m['importance']}, scope {m['scope']}, "
            f"{m['percent']} of the {m['target']} removed"
        )
        print(f"channels {m['channels_before']} -> {m['channels']}")
        fz = m["frozen_channels"]
        why = "; ".join(f"{n} {reason}" for reason, n in fz["why"].items())
        print(f"{fz['frozen']} of {fz['of']} channels frozen" + (f": {why}" if why else ""))
        print(
            f"params {m['params_before']} -> {m['params']} ({100 * m['params_ratio']:.1f}%), "
            f"MACs {m['macs_before']} -> {m['macs']} ({100 * m['macs_ratio']:.1f}%)"
        )
        if "map" in m:
            print(f"test mAP {m['map_before']:.2f} -> {m['map']:.2f} (before finetuning)")
        else:
            print(
                f"test accuracy {m['test_acc_before']:.2f}% -> {m['test_acc']:.2f}% "
                "(before finetuning)"
            )
        print(
            f"pruned checkpoint: {run_dir / 'pruned.pt'}  finetune with: "
            f"python train.py {m['model_overrides']} init_from={run_dir / 'pruned.pt'}"
        )
        return m["map"] if "map" in m else m["test_acc"]


@hydra.main(version_base="1.3", config_path="conf", config_name="prune")
def main(cfg: DictConfig) -> float:
    return configstore.hydra_job(run, cfg)  # in a multirun a failing job is recorded, not fatal


if __name__ == "__main__":
    main()
    configstore.exit_if_jobs_failed()
