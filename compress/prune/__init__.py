"""Pruning on any traceable model: a channel-dependency graph, importance criteria (network
slimming's BN scales, filter norms, Taylor, geometric median), channel selection, physical
thinning, and the BN sparsity penalty."""

from compress.prune.graph import (
    ChannelGraph,
    Group,
    PruneError,
    apply_widths_,
    register_channelwise,
)
from compress.prune.importance import (
    IMPORTANCES,
    bn_scale_importance,
    build_importance,
    fpgm_importance,
    l1_importance,
    l2_importance,
    taylor_importance,
)
from compress.prune.pruner import (
    Reference,
    agp_schedule,
    channel_graph,
    mask_,
    select_channels,
    thin,
)
from compress.prune.slimming import regularize_bn_, slimming_scales

__all__ = [
    "IMPORTANCES",
    "ChannelGraph",
    "Group",
    "PruneError",
    "Reference",
    "agp_schedule",
    "apply_widths_",
    "bn_scale_importance",
    "build_importance",
    "channel_graph",
    "fpgm_importance",
    "l1_importance",
    "l2_importance",
    "mask_",
    "register_channelwise",
    "regularize_bn_",
    "select_channels",
    "slimming_scales",
    "taylor_importance",
    "thin",
]
