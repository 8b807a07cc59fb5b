"""Data sets (uint8 tensors in memory, or image folders streamed from disk) and their loaders."""

from compress.data.datasets import DataSet, Split, list_datasets, load_dataset, register_dataset
from compress.data.folder import (
    FolderDataSet,
    FolderLoader,
    FolderSplit,
    load_image_folder_stream,
)
from compress.data.loader import TensorLoader, random_crop_flip

__all__ = [
    "DataSet",
    "FolderDataSet",
    "FolderLoader",
    "FolderSplit",
    "Split",
    "TensorLoader",
    "list_datasets",
    "load_dataset",
    "load_image_folder_stream",
    "random_crop_flip",
    "register_dataset",
]
