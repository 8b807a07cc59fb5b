"""compress: quantize, prune and fuse CNNs, driven by config."""

from compress.errors import CompressError

__all__ = ["CompressError"]
__version__ = "0.1.0"
