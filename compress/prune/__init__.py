"""Network slimming on any traceable model: a channel-dependency graph, channel selection,
physical thinning, and the BN sparsity penalty."""

from compress.prune.graph import ChannelGraph, Group, PruneError, apply_widths_, bn_scale_importance
from compress.prune.pruner import channel_graph, mask_, select_channels, thin
from compress.prune.slimming import regularize_bn_, slimming_scales

__all__ = [
    "ChannelGraph",
    "Group",
    "PruneError",
    "apply_widths_",
    "bn_scale_importance",
    "channel_graph",
    "mask_",
    "regularize_bn_",
    "select_channels",
    "slimming_scales",
    "thin",
]
