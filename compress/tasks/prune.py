"""The prune task: slim checkpoint `cfg["ckpt"]` as `cfg["pruner"]` says, save `pruned.pt`.

One shot, no training: `pruner.steps > 1` (prune and finetune in turns) is a pipeline stage
(compress.pipeline), which calls this task once per step with `reference` set to the stage's
input, so every step's `percent` counts from the original model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.cli import write_json
from compress.config import PrunerConfig, TrainSettings, defaults, validate_pruner
from compress.data import TensorLoader
from compress.data.loader import check_flip
from compress.errors import ConfigError
from compress.prune import Reference, build_importance, channel_graph, select_channels, thin
from compress.prune.pruner import needs_bn
from compress.spec import arch_name, checkpoint_state, model_from_checkpoint, model_overrides
from compress.tasks.common import (
    eval_loader,
    is_detection,
    load_data,
    model_metrics,
    resolve_device,
    source_checkpoint,
    source_dataset_cfg,
    task_for,
)


class TrainBatches:
    """The first `n` batches of training images, in the order training's first epoch takes
    them (its augmentation included); the loader is made when they are first read."""

    def __init__(self, data: Any, cfg: dict[str, Any], n: int, device: torch.device) -> None:
        self.data, self.n, self.device = data, n, device
        wanted = int((cfg.get("schedule") or {}).get("batch_size", TrainSettings.batch_size))
        self.batch_size = max(1, min(wanted, len(data.train)))
        self.seed = int(cfg.get("seed", 0))
        dataset = cfg.get("dataset") or {}
        self.crop_padding = int(dataset.get("crop_padding", 4))
        self.flip = check_flip(dataset.get("flip", True))
        self._loader: Any = None

    def loader(self) -> Any:
        if self._loader is None:
            d, bs = self.data, self.batch_size
            if hasattr(d, "loaders"):  # a streaming data set builds its own
                self._loader = d.loaders(bs, bs, self.device, seed=self.seed)[0]
            else:
                self._loader = TensorLoader(
                    d.train,
                    bs,
                    d.mean,
                    d.std,
                    self.device,
                    train=True,
                    crop_padding=self.crop_padding,
                    flip=self.flip,
                    seed=self.seed,
                )
        return self._loader

    def __len__(self) -> int:
        return min(self.n, len(self.loader()))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(iter(self.loader()), self.n)


def pruner_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's `pruner` group, checked, with every key (defaults where left out)."""
    p = {**defaults(PrunerConfig), **dict(cfg.get("pruner") or {})}
    validate_pruner(p)
    return p


def run(
    cfg: dict[str, Any],
    run_dir: str | Path,
    reference: str | Path | None = None,
    metrics_file: str = "metrics.json",
) -> dict[str, Any]:
    """Prune once and write `pruned.pt` and `metrics_file`; returns the metrics.

    `reference`: the checkpoint `pruner.percent` and `pruner.min_ratio` refer to (a pipeline's
    iterative stage passes its input; default: `ckpt` itself).
    """
    p = pruner_settings(cfg)
    if p["steps"] > 1:
        raise ConfigError(
            f"pruner.steps={p['steps']} prunes and finetunes in turns, and prune.py does not "
            "train: use a pipeline stage (schedule.stages=[..., {stage: prune, pruner: "
            f"{{steps: {p['steps']}}}}}] in train.py), or pruner.steps=1 here"
        )
    run_dir, state = source_checkpoint(cfg, run_dir, "prune.py")
    model = model_from_checkpoint(state)  # as trained: quantized layers and learned clips
    data = load_data(source_dataset_cfg(cfg, state), int(cfg.get("seed", 0)))
    device = resolve_device(cfg.get("device", "cpu"))
    task = task_for(data)
    if is_detection(data) and p["importance"] == "taylor":
        raise ConfigError(
            "pruner.importance=taylor scores channels by a classification loss's gradients: "
            "use l1, l2, fpgm or bn_scale for a detector"
        )
    bn = needs_bn(p["importance"])
    graph = channel_graph(model, data.image_shape, require_bn=bn)
    frozen, total, why = graph.frozen_channels()
    ref = None
    if reference is not None:
        original = model_from_checkpoint(load_checkpoint(reference))
        ref = Reference.of(channel_graph(original, data.image_shape, require_bn=bn))
    has_train = len(data.train) > 0
    batches = TrainBatches(data, cfg, p["batches"], device) if has_train else None
    # scored on the device (taylor runs the model), selected and thinned on the CPU
    importance = build_importance(p["importance"], model.to(device), graph.groups, batches)
    model.cpu()
    keep = select_channels(
        graph,
        p["name"],
        p["percent"],
        p["base"],
        p["min_channels"],
        importance,
        scope=p["scope"],
        target=p["target"],
        min_ratio=p["min_ratio"],
        reference=ref,
    )
    small = thin(model, keep, data.image_shape, require_bn=bn)
    before, after = model_metrics(model, data), model_metrics(small, data)
    accs = {}
    for tag, m in (("before", model), ("after", small)):
        accs[tag] = task.evaluate(m.to(device), eval_loader(data, device))[task.metric]
    # a classifier's test_acc_before / test_acc / best_test_acc, a detector's map_before / ...
    key = "test_acc" if task.metric == "acc" else task.metric
    scores = {f"{key}_before": accs["before"], key: accs["after"], f"best_{key}": accs["after"]}
    metrics = {
        "model": arch_name(model.arch),
        "model_overrides": model_overrides(model.arch),
        "dataset": data.name,
        "pruner": p["name"],
        "importance": p["importance"],
        "scope": p["scope"],
        "target": p["target"],
        "percent": p["percent"],
        "base": p["base"],
        "min_ratio": p["min_ratio"],
        "channels_before": [g.channels for g in graph.groups],
        "frozen_channels": {"frozen": frozen, "of": total, "why": why},
        "channels": [len(k) for k in keep],
        **scores,
        "params_before": before["params"],
        "macs_before": before["macs"],
        "size_bytes_before": before["size_bytes"],
        **after,
        "params_ratio": after["params"] / before["params"],
        "macs_ratio": after["macs"] / before["macs"],
    }
    if ref is not None:
        metrics.update(
            reference=str(reference),
            channels_reference=ref.channels,
            macs_reference=ref.macs,
            macs_ratio_reference=after["macs"] / ref.macs,
        )
    save_checkpoint(
        run_dir / "pruned.pt",
        checkpoint_state(
            small,
            dataset=data.name,
            config=state.get("config"),
            pruned_from=str(cfg["ckpt"]),
            **{f"test_{task.metric}": accs["after"]},
        ),
    )
    write_json(run_dir / metrics_file, metrics)
    return metrics
