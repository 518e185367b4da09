"""Readers for user data: mixture files, ``.npy`` / ``.npz`` arrays and image folders.

Each reader returns plain numpy arrays (or a :class:`GaussianMixture`) after validating them; every
problem is a one-line :class:`DataError` that names the problem and the fix. Heavy imports (PIL,
yaml) happen inside the functions.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from fewstep.core.mixture import GaussianMixture
from fewstep.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIXTURE_SUFFIXES = (".json", ".yaml", ".yml")
ARRAY_SUFFIXES = (".npy", ".npz")
_MIXTURE_KEYS = {"means", "stds", "covs", "weights", "labels"}


# ----------------------------------------------------------------------------------------------
# mixture files


def _read_mapping(path: Path) -> dict:
    """Parse a ``.json`` / ``.yaml`` file into a dict."""
    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError
        raise DataError(f"mixture file {path} is unreadable ({_first_line(e)}); fix its syntax") from e
    if not isinstance(data, dict):
        raise DataError(f"mixture file {path} must hold a mapping with keys 'means' and 'stds' or 'covs'")
    return data


def _numeric(value, what: str, path: Path) -> np.ndarray:
    """Convert nested lists to a float64 array, or raise a DataError naming ``what``."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"mixture file {path}: '{what}' must be a rectangular list of numbers") from e
    if not np.isfinite(arr).all():
        raise DataError(f"mixture file {path}: '{what}' contains NaN or Inf; use finite numbers")
    return arr


def _mixture_covs(data: dict, K: int, d: int, path: Path) -> np.ndarray:
    """Covariances ``[K, d, d]`` from ``stds`` ([], [K] or [K, d]) or ``covs`` ([K, d, d])."""
    if ("stds" in data) == ("covs" in data):
        raise DataError(f"mixture file {path}: give exactly one of 'stds' ([K] or [K][d]) or "
                        "'covs' ([K][d][d])")
    if "stds" in data:
        stds = _numeric(data["stds"], "stds", path)
        if stds.ndim == 0:
            stds = np.full((K,), float(stds))
        if stds.ndim == 1 and stds.shape == (K,):
            stds = np.repeat(stds[:, None], d, axis=1)
        if stds.shape != (K, d):
            raise DataError(f"mixture file {path}: 'stds' has shape {list(stds.shape)}, expected [{K}] "
                            f"or [{K}, {d}] to match 'means'")
        if (stds <= 0).any():
            raise DataError(f"mixture file {path}: 'stds' must all be positive")
        return np.einsum("ki,ij->kij", stds**2, np.eye(d))
    covs = _numeric(data["covs"], "covs", path)
    if covs.shape != (K, d, d):
        raise DataError(f"mixture file {path}: 'covs' has shape {list(covs.shape)}, expected [{K}, {d}, {d}]")
    if not np.allclose(covs, covs.transpose(0, 2, 1), rtol=1e-6, atol=1e-12):
        raise DataError(f"mixture file {path}: 'covs' must be symmetric matrices")
    if (np.linalg.eigvalsh(covs) <= 0).any():
        raise DataError(f"mixture file {path}: 'covs' must be positive definite (all eigenvalues > 0)")
    return covs


def _mixture_labels(data: dict, K: int, weights, path: Path) -> torch.Tensor | None:
    """Optional ``labels`` [K]: the class of each component (classes 0..C-1, each owning a mode of
    positive weight), so a conditional model's condition is the class, not the component."""
    if data.get("labels") is None:
        return None
    labels = _numeric(data["labels"], "labels", path)
    if labels.shape != (K,) or (labels != np.round(labels)).any() or (labels < 0).any():
        raise DataError(f"mixture file {path}: 'labels' must be {K} class indices 0..C-1 (one per mode)")
    labels = labels.astype(np.int64)
    w = np.ones(K) if weights is None else weights.numpy()
    missing = [c for c in range(labels.max() + 1) if w[labels == c].sum() <= 0]
    if missing:
        raise DataError(f"mixture file {path}: classes {missing} own no mode of positive weight; number "
                        "the classes 0..C-1 without gaps")
    return torch.from_numpy(labels)


def read_mixture_file(path: Path) -> GaussianMixture:
    """Read an exact mixture from ``.json``/``.yaml``: ``means`` [K][d], ``stds``|``covs``, ``weights``
    and ``labels`` (optional: the class of each component)."""
    data = _read_mapping(path)
    unknown = sorted(set(data) - _MIXTURE_KEYS)
    if unknown:
        raise DataError(f"mixture file {path}: unknown keys {unknown}; allowed: means, stds, covs, weights, "
                        "labels")
    if "means" not in data:
        raise DataError(f"mixture file {path} has no 'means'; add 'means': [[x, y], ...] (one row per mode)")
    means = _numeric(data["means"], "means", path)
    if means.ndim != 2 or means.shape[0] == 0 or means.shape[1] == 0:
        raise DataError(f"mixture file {path}: 'means' must be a non-empty [K][d] list, got shape "
                        f"{list(means.shape)}")
    K, d = means.shape
    covs = _mixture_covs(data, K, d, path)
    weights = None
    if data.get("weights") is not None:
        weights = _numeric(data["weights"], "weights", path)
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise DataError(f"mixture file {path}: 'weights' must be {K} non-negative numbers with a "
                            "positive sum")
        weights = torch.from_numpy(weights)
    labels = _mixture_labels(data, K, weights, path)
    return GaussianMixture(torch.from_numpy(means), torch.from_numpy(covs), weights, labels)


# ----------------------------------------------------------------------------------------------
# arrays


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_numeric(arr: np.ndarray, what: str) -> None:
    """Raise unless ``arr`` has a real numeric dtype (bool, object, strings and complex fail)."""
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer)
                                     or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{what} has non-numeric dtype {arr.dtype}; save it as float32 (or uint8 images)")


def _check_magic(path: Path, magic: bytes, kind: str, fix: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(magic))
    except OSError as e:
        raise DataError(f"cannot read {path} ({_first_line(e)}); check its permissions") from e
    if head != magic:
        raise DataError(f"{path} is not a valid {kind} file; re-save it with {fix}")


def _load_npy(path: Path) -> np.ndarray:
    _check_magic(path, b"\x93NUMPY", ".npy", "numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which we never allow
        raise DataError(f"{path} holds Python objects (dtype=object); save a numeric array instead") from e
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npy file ({_first_line(e)}); re-save it with "
                        "numpy.save") from e


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    _check_magic(path, b"PK\x03\x04", ".npz", "numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if "x" not in keys:
                raise DataError(f"{path} has no array 'x' (keys: {keys}); save with numpy.savez(path, x=data,"
                                " y=labels)")
            x = z["x"]
            y = z["y"] if "y" in keys else None
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{path} holds Python objects (dtype=object); save numeric arrays instead") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({_first_line(e)}); re-save it with "
                        "numpy.savez") from e
    return x, y


def read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (any numeric dtype, checked later) and optional labels ``y`` from ``.npy`` / ``.npz``."""
    if path.suffix.lower() == ".npy":
        return _load_npy(path), None
    return _load_npz(path)


def as_vectors_or_images(x: np.ndarray, what: str) -> tuple[str, np.ndarray]:
    """Classify and convert ``x``: ``[N, D]`` -> vectors; ``[N, H, W]`` / ``[N, C, H, W]`` -> images.

    Returns ``(kind, float32 array)``; images are mapped to [-1, 1] (uint8/integer 0..255 -> x/127.5 - 1,
    float expected already in [-1, 1]).
    """
    check_numeric(x, what)
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{what} has shape {list(x.shape)} (rank {x.ndim}); expected [N, D] vectors or "
                        "[N, H, W] / [N, C, H, W] images")
    if x.size == 0 or x.shape[0] == 0:
        raise DataError(f"{what} is empty (shape {list(x.shape)}); provide at least 2 samples")
    if x.ndim == 4 and x.shape[1] > 4 and x.shape[3] in (1, 3):
        raise DataError(f"{what} looks channels-last {list(x.shape)}; transpose it to [N, C, H, W] "
                        "(x.transpose(0, 3, 1, 2))")
    if x.ndim == 2:
        out = x.astype(np.float32)
        _check_finite(out, what)
        return "vector", out
    if x.ndim == 3:
        x = x[:, None]
    return "image", images_to_unit_range(x, what)


def images_to_unit_range(x: np.ndarray, what: str) -> np.ndarray:
    """Map integer 0..255 images to [-1, 1] float32; check float images are finite and in [-1, 1]."""
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise DataError(f"{what}: integer images must lie in 0..255 (got {x.min()}..{x.max()}); "
                            "rescale or save as float in [-1, 1]")
        return (x.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    out = x.astype(np.float32)
    _check_finite(out, what)
    lo, hi = float(out.min()), float(out.max())
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise DataError(f"{what}: float images must lie in [-1, 1] (got {lo:.4g}..{hi:.4g}); rescale them "
                        "(e.g. x / 127.5 - 1 for 0..255) or save as uint8")
    return np.clip(out, -1.0, 1.0)


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise DataError(f"{what} contains {bad} NaN/Inf values; remove or replace them")


def check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """Validate labels ``[N]``: integer-valued, non-negative, one per sample. Returns int64."""
    if y.ndim != 1:
        raise DataError(f"{what}: labels 'y' must be one integer per sample [N], got shape {list(y.shape)}")
    if y.shape[0] != n:
        raise DataError(f"{what}: 'x' has {n} samples but 'y' has {y.shape[0]} labels; give one label per "
                        "sample")
    check_numeric(y, f"{what} labels 'y'")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{what}: labels 'y' must be integers 0..K-1, got non-integer values; save "
                            "them as int64")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise DataError(f"{what}: labels 'y' must be non-negative class indices 0..K-1 (found {y.min()})")
    return y


# ----------------------------------------------------------------------------------------------
# image folders


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_layout(folder: Path) -> tuple[list[Path], list[int], list[str] | None]:
    """Image files, their labels and class names (``None`` without class subfolders)."""
    top = _list_images(folder)
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(s.name, _list_images(s)) for s in subs]
    classes = [(name, files) for name, files in classes if files]
    if top and classes:
        raise DataError(f"{folder} has images both at the top level and in class subfolders; put every "
                        "image in a class subfolder or none")
    if classes:
        files = [f for _, fs in classes for f in fs]
        labels = [k for k, (_, fs) in enumerate(classes) for _ in fs]
        return files, labels, [name for name, _ in classes]
    if not top:
        raise DataError(f"{folder} contains no .png/.jpg/.jpeg images (nor class subfolders with images); "
                        "point to a folder of images")
    return top, [0] * len(top), None


def _read_image(path: Path) -> np.ndarray:
    """One image as uint8 ``[C, H, W]`` (C = 1 for grayscale, 3 for RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "1":
                im = im.convert("L")
            elif mode == "P":
                im = im.convert("RGB")
            elif mode not in ("L", "RGB"):
                raise DataError(f"image {path} has mode {mode}; convert it to RGB or grayscale (L)")
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError as e:
        raise DataError(f"cannot read image {path} (not a valid image file); remove or re-save it") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({_first_line(e)}); remove or re-save the file") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image_folder(folder: Path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """All images of a folder as float32 ``[N, C, H, W]`` in [-1, 1], labels from class subfolders."""
    files, labels, names = folder_layout(folder)
    arrays = []
    for f in files:
        a = _read_image(f)
        if arrays and a.shape != arrays[0].shape:
            first = files[0].relative_to(folder)
            raise DataError(f"images differ in size or channels: {first} is {_describe(arrays[0])}, "
                            f"{f.relative_to(folder)} is {_describe(a)}; resize/convert them to one format")
        arrays.append(a)
    x = images_to_unit_range(np.stack(arrays), str(folder))
    y = np.asarray(labels, dtype=np.int64) if names is not None else None
    return x, y, names


def _describe(a: np.ndarray) -> str:
    c, h, w = a.shape
    return f"{w}x{h} {'RGB' if c == 3 else 'grayscale'}"


def split_indices(n: int, what: str = "data", test_fraction: float = 0.1,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed split: ``numpy.random.RandomState(seed).permutation(n)``; the last ``round(f*n)`` are test."""
    if n < 2:
        raise DataError(f"{what} has {n} sample(s); provide at least 2 for a train/test split")
    n_test = min(n - 1, max(1, int(math.floor(test_fraction * n + 0.5))))
    perm = np.random.RandomState(seed).permutation(n)
    return perm[: n - n_test], perm[n - n_test:]
