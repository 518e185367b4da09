"""Data sets: ``load_dataset(name_or_path, conditional=False) -> Dataset`` (docs/architecture.md).

Importing this package is light (torch and numpy only); scikit-learn and PIL load on first use.
"""

from fewstep.data.datasets import BUILTINS, Dataset, load_dataset

__all__ = ["BUILTINS", "Dataset", "load_dataset"]
