"""Physically remove pruned channels: build the smaller model from its channel spec and copy
the kept weights into it. The result is an ordinary model whose `arch` holds the new spec."""

from __future__ import annotations

import torch
from torch import nn

from compress.models import create_model
from compress.models.plain import PlainNet
from compress.models.resnet import ResNet
from compress.prune.pruner import PruneError, prunable_units, shuffle_positions


def take_inputs(
    w: torch.Tensor, keep_in: torch.Tensor, groups: int, shuffle: int, cin_old: int
) -> torch.Tensor:
    """Cut a conv weight (out, cin_old / groups, kh, kw) down to the input channels `keep_in`
    of its producer, following them through a channel shuffle into their groups."""
    cin_new = len(keep_in)
    per_old, per_new = cin_old // groups, cin_new // groups
    out_per_group = w.shape[0] // groups
    new = w.new_zeros(w.shape[0], per_new, *w.shape[2:])
    pos_old = shuffle_positions(cin_old, shuffle)[keep_in]
    pos_new = shuffle_positions(cin_new, shuffle)
    for c_new in range(cin_new):
        g_old, j_old = divmod(int(pos_old[c_new]), per_old)
        g_new, j_new = divmod(int(pos_new[c_new]), per_new)
        if g_old != g_new:
            raise PruneError("kept channels left their group: the selection is not group-aware")
        rows = slice(g_new * out_per_group, (g_new + 1) * out_per_group)
        new[rows, j_new] = w[rows, j_old]
    return new


def _bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]


@torch.no_grad()
def thin(model: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """A new, smaller model holding only the kept channels of `model`."""
    units = prunable_units(model)
    counts = [len(k) for k in keep]
    arch = {k: v for k, v in model.arch.items() if k != "name"}
    small = create_model(model.arch["name"], **{**arch, "channels": counts})
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    names = {m: n for n, m in model.named_modules()}
    if isinstance(model, PlainNet):
        blocks = [m for m in model.features if hasattr(m, "conv")]
        readers = [
            *(b.conv for b in blocks[1:]),
            model.classifier.conv if model.head == "conv" else model.classifier,
        ]
        shuffles = [b.shuffle.groups if b.shuffle else 0 for b in blocks[1:]] + [0]
        for unit, idx, block, reader, shuffle in zip(
            units, keep, blocks, readers, shuffles, strict=True
        ):
            conv = names[block.conv]
            sd[f"{conv}.weight"] = sd[f"{conv}.weight"][idx]
            for k in _bn_keys(names[unit.bn]):
                sd[k] = sd[k][idx]
            rk = f"{names[reader]}.weight"
            if isinstance(reader, nn.Linear):
                sd[rk] = sd[rk][:, idx]
            else:
                sd[rk] = take_inputs(sd[rk], idx, reader.groups, shuffle, unit.channels)
    elif isinstance(model, ResNet):
        for idx, block in zip(keep, model.layers, strict=True):
            b = names[block]
            sd[f"{b}.conv1.weight"] = sd[f"{b}.conv1.weight"][idx]
            for k in _bn_keys(f"{b}.bn1"):
                sd[k] = sd[k][idx]
            sd[f"{b}.conv2.weight"] = sd[f"{b}.conv2.weight"][:, idx]
    small.load_state_dict(sd)
    return small.train(model.training)
