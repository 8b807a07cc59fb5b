"""Network slimming: sparse training, channel selection, and physical thinning."""

from compress.prune.pruner import PruneError, mask_, prunable_units, select_channels
from compress.prune.slimming import BNSparsity
from compress.prune.thin import thin

__all__ = ["BNSparsity", "PruneError", "mask_", "prunable_units", "select_channels", "thin"]
