"""Data sets (uint8 tensors in memory, or image folders streamed from disk) and their loaders."""

from compress.data.catalog import load_dataset
from compress.data.datasets import DataSet, Split
from compress.data.folder import (
    FolderDataSet,
    FolderLoader,
    FolderSplit,
    load_image_folder_stream,
)
from compress.data.loader import TensorLoader, random_crop_flip
from compress.data.registry import list_datasets, register_dataset

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
