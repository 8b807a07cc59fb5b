"""Importance criteria: a score per channel of each coupled group, higher = kept first.

`IMPORTANCES` maps `pruner.importance` to a builder `(model, groups, batches) -> Importance`;
the importance is a callable `(model, group) -> scores` (as Torch-Pruning's importance
classes), so the pruner ranks channels without knowing the criterion. A coupled group (a
residual stream: several producers, several BNs) is scored once, its channels' scores averaged
over the layers that make them.

- bn_scale: |BN gamma| (network slimming, Liu et al. 2017): comparable across layers because
  sparse training pushed the unimportant ones towards zero; used as is.
- l1 / l2: the norm of the filter that produces the channel (Li et al. 2017, "Pruning Filters
  for Efficient ConvNets").
- taylor: |sum of activation x gradient| at the channel's BN outputs, per sample, averaged over
  training batches (Molchanov et al. 2019): the first-order change of the loss when the channel
  is masked (mask_ zeroes exactly those outputs).
- fpgm: the summed distance of a filter to the other filters of its layer (He et al. 2019,
  "Filter Pruning via Geometric Median"): filters near the geometric median are the ones the
  others can stand in for, so they go first.

Filter norms, distances and loss changes have a different scale in every layer, so these four
divide each group's scores by the group's mean (Torch-Pruning's default 'mean' normaliser):
one global threshold then compares how much a channel stands out within its own layer.

Depthwise convs are not producers: they carry channel i to channel i and are thinned with the
channels the layer before them makes; their k x k filter does not make a channel, so it takes
no part in l1 / l2 / fpgm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compress.detection.models import core_of
from compress.errors import CompressError, check_choice
from compress.prune.group import Group, Importance

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Builder = Callable[[nn.Module, Sequence[Group], Batches | None], Importance]
NO_BATCHES = (
    "pruner.importance=taylor needs batches of training data (it measures gradients of the "
    "loss) and got none: use a data set with training images, or pruner.importance=bn_scale, "
    "l1, l2 or fpgm"
)


def bn_scale_importance(model: nn.Module, group: Group) -> torch.Tensor:
    """Network slimming's importance: |BN gamma| per channel, averaged over the BNs that scale
    the channel (a residual stream or a depthwise conv has several)."""
    total = torch.zeros(group.channels)
    count = torch.zeros(group.channels)
    for bn, chans, classes in group.bns:
        gamma = model.get_submodule(bn).weight.detach().abs().float().cpu()
        total.index_add_(0, classes, gamma[chans])
        count.index_add_(0, classes, torch.ones(len(classes)))
    return total / count.clamp_min(1)


def mean_normalised(scores: torch.Tensor) -> torch.Tensor:
    """`scores` divided by their mean (left as they are when that is not positive)."""
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _over_producers(
    model: nn.Module, group: Group, per_filter: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`per_filter` of each producer's filters (rows: the group's channels of that layer, as
    flat vectors), averaged over the producers of each channel."""
    total = torch.zeros(group.channels, dtype=torch.float64)
    count = torch.zeros(group.channels, dtype=torch.float64)
    for name, chans, classes in group.producers:
        w = model.get_submodule(name).weight.detach().double().cpu()[chans].flatten(1)
        total.index_add_(0, classes, per_filter(w))
        count.index_add_(0, classes, torch.ones(len(classes), dtype=torch.float64))
    return (total / count.clamp_min(1)).float()


def l1_importance(model: nn.Module, group: Group) -> torch.Tensor:
    """The L1 norm of each channel's producing filters, averaged over producers (raw)."""
    return _over_producers(model, group, lambda w: w.abs().sum(1))


def l2_importance(model: nn.Module, group: Group) -> torch.Tensor:
    """The L2 norm of each channel's producing filters, averaged over producers (raw)."""
    return _over_producers(model, group, lambda w: w.norm(dim=1))


def _median_distances(w: torch.Tensor) -> torch.Tensor:
    # exact pairwise distances (not the matmul shortcut, whose rounding blurs close filters)
    return torch.cdist(w[None], w[None], compute_mode="donot_use_mm_for_euclid_dist")[0].sum(1)


def fpgm_importance(model: nn.Module, group: Group) -> torch.Tensor:
    """Each filter's summed distance to the other filters of its layer that make this group's
    channels, averaged over producers (raw)."""
    return _over_producers(model, group, _median_distances)


def _normalised(fn: Importance) -> Importance:
    def score(model: nn.Module, group: Group) -> torch.Tensor:
        return mean_normalised(fn(model, group))

    return score


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch: each sample's activations get the gradient of its
    own loss (in eval mode the samples do not interact)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N, C): summed over the positions."""
    return t.flatten(2).sum(2) if t.dim() > 2 else t


@torch.no_grad()
def _accumulate(
    totals: list[torch.Tensor],
    groups: Sequence[Group],
    prods: dict[str, torch.Tensor],
    n: int,
) -> None:
    for g, total in zip(groups, totals, strict=True):
        est = torch.zeros(n, g.channels, dtype=torch.float64)
        for bn, chans, classes in g.bns:
            est.index_add_(1, classes, prods[bn][:, chans])
        total += est.abs().sum(0)


def taylor_importance(
    model: nn.Module,
    groups: Sequence[Group],
    batches: Batches | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = summed_cross_entropy,
) -> Importance:
    """First-order Taylor importance (Molchanov et al. 2019), measured once for all `groups`.

    Masking a channel zeroes its BN outputs a, so the loss changes by about -sum a * dL/da over
    the channel's BN outputs (all of them: a residual stream has several) and positions. The
    score of a channel is |that sum| per sample, averaged over the samples of `batches`
    ((images, labels) of training data), then divided by the group's mean. The model runs in
    eval mode (running BN statistics, as the pruned model will), its weights untouched.
    """
    if batches is None:
        raise CompressError(NO_BATCHES)
    names = sorted({bn for g in groups for bn, _, _ in g.bns})
    acts: dict[str, torch.Tensor] = {}

    def keep_output(name: str) -> Callable[..., torch.Tensor]:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            acts[name] = out
            return out.clone()  # an in-place op after the BN (`out += x`) leaves `out` be

        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep_output(n)) for n in names]
    totals = [torch.zeros(g.channels, dtype=torch.float64) for g in groups]
    device = next(model.parameters()).device
    was_training, seen = model.training, 0
    model.eval()
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        for x, y in tqdm(batches, desc="taylor importance", total=total, leave=False, disable=None):
            acts.clear()
            # an input that needs a gradient: every activation gets one, even of frozen layers
            x = x.to(device).detach().requires_grad_()
            with torch.enable_grad():
                loss = loss_fn(model(x), y.to(device))
                outs = [acts[n] for n in names]
                grads = torch.autograd.grad(loss, outs, allow_unused=True)
            prods = {  # (N, C) of each BN, on the CPU in float64
                n: torch.zeros(a.shape[:2], dtype=torch.float64)
                if g is None
                else _per_channel(a.detach() * g).double().cpu()
                for n, a, g in zip(names, outs, grads, strict=True)
            }
            _accumulate(totals, groups, prods, len(x))
            seen += len(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise CompressError(NO_BATCHES)
    scores = [mean_normalised((t / seen).float()) for t in totals]

    def taylor(_model: nn.Module, group: Group) -> torch.Tensor:
        return scores[group.index]

    return taylor


def _weights_only(fn: Importance) -> Builder:
    def build(model: nn.Module, groups: Sequence[Group], batches: Batches | None) -> Importance:
        return fn

    return build


IMPORTANCES: dict[str, Builder] = {
    "bn_scale": _weights_only(bn_scale_importance),  # comparable as is (sparse training)
    "l1": _weights_only(_normalised(l1_importance)),
    "l2": _weights_only(_normalised(l2_importance)),
    "taylor": taylor_importance,
    "fpgm": _weights_only(_normalised(fpgm_importance)),
}


def build_importance(
    name: str, model: nn.Module, groups: Sequence[Group], batches: Batches | None = None
) -> Importance:
    """The importance `pruner.importance=name` for these groups of `model`; `batches` of
    training data for the criteria that need gradients (taylor)."""
    check_choice("pruner.importance", name, IMPORTANCES)
    return IMPORTANCES[name](core_of(model), groups, batches)  # the names are the core's
