"""Data sets (uint8 tensors in memory) and the batched, on-device loader."""

from compress.data.datasets import DataSet, Split, list_datasets, load_dataset, register_dataset
from compress.data.loader import TensorLoader, random_crop_flip

__all__ = ["DataSet", "Split", "TensorLoader", "list_datasets", "load_dataset",
           "random_crop_flip", "register_dataset"]
