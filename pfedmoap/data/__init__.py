"""Datasets (a registry with one ``create_dataset`` entry point), partitioners and feature caching."""

from . import coop as _coop  # noqa: F401  (registers CoOp's datasets)
from . import datasets as _datasets  # noqa: F401  (registers the built-in datasets)
from . import domains as _domains  # noqa: F401  (registers the domain datasets)
from . import imagenet as _imagenet  # noqa: F401  (registers ImageNet and its variants)
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
