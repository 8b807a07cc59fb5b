"""The prune task: slim checkpoint `cfg["ckpt"]` as `cfg["pruner"]` says, save `pruned.pt`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.checkpoint import save_checkpoint
from compress.cli import write_json
from compress.engine import evaluate
from compress.prune import channel_graph, select_channels, thin
from compress.prune.pruner import validate as validate_pruner
from compress.spec import arch_name, checkpoint_state, model_from_checkpoint, model_overrides
from compress.tasks.common import (
    eval_loader,
    load_data,
    model_metrics,
    resolve_device,
    source_checkpoint,
    source_dataset_cfg,
)


def run(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    p = dict(cfg["pruner"])
    kind, percent = p.get("name", "normal"), p.get("percent", 0.5)
    base, min_channels = p.get("base", 1), p.get("min_channels")
    validate_pruner(kind, percent, base, min_channels)
    run_dir, state = source_checkpoint(cfg, run_dir, "prune.py")
    model = model_from_checkpoint(state)  # as trained: quantized layers and learned clips
    data = load_data(source_dataset_cfg(cfg, state), int(cfg.get("seed", 0)))
    device = resolve_device(cfg.get("device", "cpu"))
    graph = channel_graph(model, data.image_shape)
    keep = select_channels(graph, kind, percent, base, min_channels)
    small = thin(model, keep, data.image_shape)
    before, after = model_metrics(model, data), model_metrics(small, data)
    accs = {}
    for tag, m in (("before", model), ("after", small)):
        accs[tag] = evaluate(m.to(device), eval_loader(data, device))["acc"]
    metrics = {
        "model": arch_name(model.arch),
        "model_overrides": model_overrides(model.arch),
        "dataset": data.name,
        "pruner": kind,
        "percent": percent,
        "base": base,
        "channels_before": [g.channels for g in graph.groups],
        "channels": [len(k) for k in keep],
        "test_acc_before": accs["before"],
        "test_acc": accs["after"],
        "best_test_acc": accs["after"],
        "params_before": before["params"],
        "macs_before": before["macs"],
        "size_bytes_before": before["size_bytes"],
        **after,
        "params_ratio": after["params"] / before["params"],
        "macs_ratio": after["macs"] / before["macs"],
    }
    save_checkpoint(
        run_dir / "pruned.pt",
        checkpoint_state(
            small,
            dataset=data.name,
            config=state.get("config"),
            pruned_from=str(cfg["ckpt"]),
            test_acc=accs["after"],
        ),
    )
    write_json(run_dir / "metrics.json", metrics)
    return metrics
