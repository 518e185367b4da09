"""Generated samples made by any tool, read for ``fewstep eval --samples FILE --data D``.

Accepted (docs/bring-your-model.md): an image folder (``.png``/``.jpg``, optional class subfolders), or an
``.npy`` / ``.npz`` array (``.npz``: key ``x``, ``images`` or ``samples``, or its only array; labels from
``y`` / ``labels`` / ``class_labels``) holding

* images ``[N, C, H, W]`` as float centred in [-1, 1] (fewstep's convention, ``fewstep sample --out
  s.npz``; values beyond [-1, 1] are kept unclipped, as ``fewstep eval MODEL`` scores them),
* images ``[N, H, W, C]`` as float in [0, 1] (diffusers' ``output_type="np"``) or uint8 0..255 (PIL),
  ``[N, H, W]`` for one channel,
* vectors ``[N, D]``.

The layout is decided by the data set's shape ``(C, H, W)`` (so ``[N, 8, 8, 1]`` is NHWC for 1x8x8
digits), the range by the layout and dtype; anything else is a one-line :class:`DataError`. Channels-
first floats without a single negative value are refused rather than guessed (diffusers'
``output_type="pt"`` writes [0, 1]; samples of [-1, 1]-centred data essentially never lack negatives).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from fewstep.data import loaders as L
from fewstep.errors import DataError

IMAGE_KEYS = ("x", "images", "samples")
LABEL_KEYS = ("y", "labels", "class_labels")
RANGE_SLACK = 1e-3  # float rounding of writers (e.g. x / 2 + 0.5 in float16)


def read_samples(path: str | Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples for a data set of per-sample ``shape`` -> (float32 ``[N, *shape]`` in the data's space,
    int64 labels ``[N]`` or None)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"samples {path} do not exist; pass an .npz/.npy file or an image folder")
    if path.is_dir():
        x, y, _ = L.read_image_folder(path)
        x = _as_images(x, shape, str(path), assume_nchw=True)
    elif path.suffix.lower() in L.ARRAY_SUFFIXES:
        x, y = _read_array(path)
        x = _as_vectors(x, shape, str(path)) if len(shape) == 1 else _as_images(x, shape, str(path))
    else:
        raise DataError(f"unsupported samples file {path}; use .npz, .npy or a folder of images")
    if x.shape[0] < 2:
        raise DataError(f"{path} holds {x.shape[0]} sample(s); metrics need at least 2")
    if y is not None:
        y = L.check_labels(np.asarray(y), x.shape[0], str(path))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), (
        None if y is None else torch.from_numpy(y))


def read_latents(path: str | Path, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latent samples ``[N, c, h, w]`` (the VAE's scaled latents, as ``fewstep sample`` writes in ``z``
    and diffusers' ``output_type="latent"`` returns) -> float32 tensor and labels (or None). An ``.npz``
    key ``z`` comes first (a ``fewstep sample`` file also holds the decoded ``x``)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in L.ARRAY_SUFFIXES:
        raise DataError(f"latent samples {path} must be an existing .npz/.npy file (with --vae)")
    x, y = _read_array(path, first=("z",))
    L.check_numeric(x, str(path))
    if tuple(x.shape[1:]) != tuple(shape) or x.ndim != len(shape) + 1:
        raise DataError(f"{path} holds {list(x.shape)}, but the VAE's latents are {list(shape)} per sample; "
                        "pass the latents ([N, c, h, w]), or drop --vae for decoded images")
    x = x.astype(np.float32)
    if not np.isfinite(x).all() or x.shape[0] < 2:
        raise DataError(f"{path} must hold at least 2 finite latent samples")
    if y is not None:
        y = L.check_labels(np.asarray(y), x.shape[0], str(path))
    return torch.from_numpy(np.ascontiguousarray(x)), None if y is None else torch.from_numpy(y)


def _read_array(path: Path, first: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray | None]:
    if path.suffix.lower() == ".npy":
        return L.read_array_file(path)[0], None
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = next((k for k in (*first, *IMAGE_KEYS) if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise DataError(f"{path} has arrays {keys} but none named {' / '.join(IMAGE_KEYS)}; save "
                                "the samples as numpy.savez(path, x=samples)")
            label = next((k for k in LABEL_KEYS if k in keys and k != key), None)
            return z[key], (z[label] if label else None)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{path} holds Python objects (dtype=object); save numeric arrays instead") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({e}); re-save it with numpy.savez") from e


def _as_vectors(x: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    L.check_numeric(x, what)
    if x.ndim != 2 or x.shape[1] != shape[0]:
        raise DataError(f"{what} has shape {list(x.shape)}; the data set holds {shape[0]}-D vectors, so "
                        f"give [N, {shape[0]}]")
    out = x.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{what} contains NaN/Inf values; remove or replace them")
    return out


def _layout(x: np.ndarray, shape: tuple[int, ...], what: str) -> str:
    c, h, w = shape
    if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        return "NHW"
    if x.ndim == 4 and x.shape[1:] == (c, h, w):
        return "NCHW"
    if x.ndim == 4 and x.shape[1:] == (h, w, c):
        return "NHWC"
    raise DataError(f"{what} has shape {list(x.shape)}; for {c}x{h}x{w} data give [N, {c}, {h}, {w}] "
                    f"(float in [-1, 1]) or [N, {h}, {w}, {c}] (float in [0, 1] or uint8)")


def _as_images(x: np.ndarray, shape: tuple[int, ...], what: str, assume_nchw: bool = False) -> np.ndarray:
    """Any accepted layout/range -> float32 NCHW in [-1, 1]."""
    L.check_numeric(x, what)
    layout = "NCHW" if assume_nchw else _layout(x, shape, what)
    if assume_nchw and tuple(x.shape[1:]) != tuple(shape):
        raise DataError(f"images in {what} are {list(x.shape[1:])} (C, H, W) but the data set's are "
                        f"{list(shape)}; resize them or pick the matching --data")
    if layout == "NHW":
        x, layout = x[:, None], "NCHW"
    elif layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    if np.issubdtype(x.dtype, np.integer):
        return L.images_to_unit_range(x, what)  # 0..255 -> [-1, 1], range checked there
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{what} contains {int((~np.isfinite(x)).sum())} NaN/Inf values; remove them")
    lo, hi = float(x.min()), float(x.max())
    if layout == "NHWC":  # diffusers' output_type="np": (x / 2 + 0.5).clamp(0, 1)
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise DataError(f"{what}: channels-last float images must lie in [0, 1] as diffusers writes them "
                            f"(got {lo:.4g}..{hi:.4g}); channels-first floats are read as [-1, 1]")
        return np.clip(2 * x - 1, -1, 1)
    if lo >= 0 and not assume_nchw:  # [-1, 1]-centred samples without a negative value: a 0..1/0..255 set
        kind = "diffusers' output_type='pt' ([0, 1])" if hi <= 1 + RANGE_SLACK else "0..255 floats"
        raise DataError(f"{what}: channels-first float images must be centred in [-1, 1] but none is "
                        f"negative ({lo:.4g}..{hi:.4g}, looks like {kind}); rescale to [-1, 1], or save "
                        "channels-last [0, 1] floats or uint8")
    return x  # not clipped: fewstep's own samples are not, so the metrics match `fewstep eval MODEL`
