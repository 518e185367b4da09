"""The feature networks: small CNN classifiers whose penultimate features are a data set's metric space.

* ``digits8``: :class:`DigitsFeatNet` on 1x8x8 digits (BENCHMARKS.md), 128-d features, shipped as
  ``fewstep/assets/digits_featnet.safetensors`` + ``.json``; retrain with ``fewstep featnet``;
* ``mnist28``: :class:`MnistFeatNet` on 1x28x28 MNIST, 128-d features, shipped as
  ``fewstep/assets/mnist28_featnet.safetensors`` + ``.json``; retrain with
  ``fewstep featnet --data mnist28`` (docs/metrics.md).

They play the role Inception pool3 features play on CIFAR-10. GroupNorm only (no BatchNorm, no
dropout), so a sample's features do not depend on the other samples of its batch.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from fewstep.errors import ModelError

ASSET_NAME = "digits_featnet"


class _FeatNet(nn.Module):
    """``body`` (images -> penultimate features) + linear ``head`` (features -> class logits)."""

    body: nn.Sequential
    head: nn.Linear

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of images ``[B, 1, H, W]`` in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.features(x))


class DigitsFeatNet(_FeatNet):
    """conv(w0)-conv(w1)-maxpool-conv(w2)-global-avg-pool -> features ``[B, w2]`` -> linear -> logits.

    Input ``x``: ``[B, 1, 8, 8]`` in [-1, 1]. Every conv is 3x3 (padding 1) + GroupNorm + ReLU.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10, groups: int = 8):
        super().__init__()
        w0, w1, w2 = widths
        self.config = {"widths": list(widths), "num_classes": num_classes, "groups": groups}
        self.body = nn.Sequential(
            _block(1, w0, groups), _block(w0, w1, groups), nn.MaxPool2d(2), _block(w1, w2, groups),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(w2, num_classes)


class MnistFeatNet(_FeatNet):
    """For 1x28x28 MNIST: conv(w0)-maxpool-conv(w1)-conv(w2)-maxpool-conv(w3)-conv(w3)-global-avg-pool
    -> features ``[B, w3]`` -> linear -> logits. Every conv is 3x3 (padding 1) + GroupNorm + ReLU;
    resolution 28 -> 14 -> 7, receptive field 30 px (the whole digit) before the pooling."""

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 64, 128), num_classes: int = 10,
                 groups: int = 8):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.config = {"widths": list(widths), "num_classes": num_classes, "groups": groups}
        self.body = nn.Sequential(
            _block(1, w0, groups), nn.MaxPool2d(2), _block(w0, w1, groups), _block(w1, w2, groups),
            nn.MaxPool2d(2), _block(w2, w3, groups), _block(w3, w3, groups), nn.AdaptiveAvgPool2d(1),
            nn.Flatten())
        self.head = nn.Linear(w3, num_classes)


def _block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU())


# data set -> (asset file stem, network class, input shape)
FEATNETS: dict[str, tuple[str, type[nn.Module], tuple[int, int, int]]] = {
    "digits8": (ASSET_NAME, DigitsFeatNet, (1, 8, 8)),
    "mnist28": ("mnist28_featnet", MnistFeatNet, (1, 28, 28)),
}
_CLASSES = {cls.__name__: cls for _, cls, _ in FEATNETS.values()}


def default_weights_path(data: str = "digits8") -> Path:
    """The shipped weights of ``data``'s network, e.g. ``fewstep/assets/digits_featnet.safetensors``."""
    return Path(str(resources.files("fewstep") / "assets" / f"{FEATNETS[data][0]}.safetensors"))


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_featnet(path: Path | str | None = None, data: str = "digits8") -> nn.Module:
    """Load weights (safetensors) + the json beside them (default: ``data``'s shipped network); checks
    the sha256; the json's architecture name picks the class. Returns an eval-mode net."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_weights_path(data)
    meta_path = path.with_suffix(".json")
    retrain = f"fewstep featnet --data {data} --out {path}"
    if not path.is_file() or not meta_path.is_file():
        raise ModelError(f"feature network {path} (or its .json) is missing; reinstall fewstep or "
                         f"retrain it with: {retrain}")
    meta = json.loads(meta_path.read_text())
    if meta.get("sha256") and meta["sha256"] != sha256_file(path):
        raise ModelError(f"{path} does not match the sha256 in {meta_path.name}; the file is corrupt, "
                         f"retrain it with: {retrain}")
    arch = meta["architecture"]
    cls = _CLASSES.get(arch.get("name", "DigitsFeatNet"))
    if cls is None:
        raise ModelError(f"{meta_path} names an unknown architecture {arch.get('name')!r}; retrain it "
                         f"with: {retrain}")
    net = cls(tuple(arch["widths"]), arch["num_classes"], arch["groups"])
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)
