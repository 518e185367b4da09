"""The digits feature network: a small CNN classifier for 1x8x8 digits (BENCHMARKS.md).

Its penultimate 128-d features are the metric space on ``digits8`` (the way Inception pool3 features are
on CIFAR-10). GroupNorm only (no BatchNorm, no dropout), so a sample's features do not depend on the
other samples of its batch. Shipped as ``fewstep/assets/digits_featnet.safetensors`` + ``.json``;
retrain with ``python -m fewstep.train.featnet``.
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


class DigitsFeatNet(nn.Module):
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

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, 128]`` of images ``[B, 1, 8, 8]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.features(x))


def _block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU())


def default_weights_path() -> Path:
    """The shipped weights ``fewstep/assets/digits_featnet.safetensors``."""
    return Path(str(resources.files("fewstep") / "assets" / f"{ASSET_NAME}.safetensors"))


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_featnet(path: Path | str | None = None) -> DigitsFeatNet:
    """Load weights (safetensors) + the json beside them; checks the sha256. Returns an eval-mode net."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_weights_path()
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ModelError(f"digits feature network {path} (or its .json) is missing; reinstall fewstep or "
                         "retrain it with: python -m fewstep.train.featnet")
    meta = json.loads(meta_path.read_text())
    if meta.get("sha256") and meta["sha256"] != sha256_file(path):
        raise ModelError(f"{path} does not match the sha256 in {meta_path.name}; the file is corrupt, "
                         "retrain it with: python -m fewstep.train.featnet")
    arch = meta["architecture"]
    net = DigitsFeatNet(tuple(arch["widths"]), arch["num_classes"], arch["groups"])
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)
