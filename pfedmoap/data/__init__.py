"""Datasets (a registry with one ``create_dataset`` entry point), partitioners and feature caching."""

from . import datasets as _datasets  # noqa: F401  (registers the built-in datasets)
from . import partition
from . import real as _real  # noqa: F401  (registers the on-disk datasets)
from .registry import DatasetBundle, DatasetOptions, LabeledImages, create_dataset, list_datasets, register_dataset

__all__ = [
    "DatasetBundle",
    "DatasetOptions",
    "LabeledImages",
    "create_dataset",
    "list_datasets",
    "partition",
    "register_dataset",
]
