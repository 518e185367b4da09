"""Data sets: ``load_dataset(name_or_path, conditional=False, vae=None) -> Dataset`` (docs/architecture.md).

Importing this package is light (torch and numpy only); scikit-learn and PIL load on first use.
"""

from fewstep.data.datasets import BUILTINS, Dataset, dataset_from_record, load_dataset

__all__ = ["BUILTINS", "Dataset", "dataset_from_record", "load_dataset"]
