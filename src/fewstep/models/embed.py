"""Random embedding networks for the Embedding Loss (specs/embedding_loss.md section 3).

Each network is drawn from a pool with PyTorch default initialisation, seeded from
``(run_seed, iteration, k)``, frozen (``requires_grad_(False)``) and in eval mode. It maps a batch
``[B, *shape]`` to per-sample features (flattened by the loss). No pool network contains
BatchNorm: in train mode it normalises the fake and real sets by their own statistics and makes a
sample's features depend on its batch (section 3.2); instance norm and GroupNorm are per-sample.

Pools (``pool=``):
* images: ``mixed`` (ConvNet variant w.p. 3/4, ResNet-lite w.p. 1/4), ``convnet`` (ConvNet
  variants only), ``resnet`` (ResNet-lite only), ``dm_convnet`` (one architecture: DM's ConvNet,
  the middle width (128 at >= 32 px), instance norm, ReLU, average pool; weights still random);
  below 32 px the widths shrink with the resolution (:func:`pool_widths`);
* vectors: ``mixed`` = ``mlp`` (random MLPs, section 3.3), ``mlp_fixed`` (one architecture: two
  hidden layers of width 128, ReLU).
"""

from __future__ import annotations

import hashlib
import math
import random

import torch
from torch import nn

from fewstep.errors import ConfigError, FewstepError

IMAGE_POOLS = ("mixed", "convnet", "resnet", "dm_convnet")
VECTOR_POOLS = ("mixed", "mlp", "mlp_fixed")
WIDTHS = (64, 128, 256)
CONV_ACTS = {"relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.2), "silu": nn.SiLU}
MLP_ACTS = {**CONV_ACTS, "tanh": nn.Tanh}


def derive_seed(*parts) -> int:
    """A 63-bit seed from ints/strings; the same hash as ``train.rng.derive_seed`` (models must not
    import train)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------
def make_norm(kind: str, c: int) -> nn.Module:
    """``instance`` = GroupNorm(C, C) (affine), ``group`` = GroupNorm(8, C); per-sample either way.
    With a narrow ``width`` override the group count falls to gcd(8, C)."""
    return nn.GroupNorm(c if kind == "instance" else math.gcd(8, c), c)


def convnet(in_ch: int, res: int, width: int, act: str, pool: str, norm: str) -> nn.Sequential:
    """DM's ConvNet: ``D = log2(res/4)`` blocks of conv3x3 (bias) -> norm -> act -> 2x2 pool, so the
    final map is 4x4 (D >= 1; for resolutions not of the form 4 * 2^D the map is larger than 4x4).
    ``[B, in_ch, res, res] -> [B, width, 4, 4]``."""
    depth = max(1, int(math.log2(res / 4)))
    layers, c = [], in_ch
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), make_norm(norm, width), CONV_ACTS[act](),
                   nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)]
        c = width
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block with instance norm and ReLU; 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), make_norm("instance", c_out),
                                  nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1), make_norm("instance", c_out))
        self.skip = nn.Identity() if (stride == 1 and c_in == c_out) else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride), make_norm("instance", c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def pool_widths(res: int, res_scale: bool = True) -> tuple[int, ...]:
    """ConvNet widths ``{64, 128, 256}`` (the ResNet-lite stem uses the first), times ``res / 32`` below
    32 px when ``res_scale`` (>= 8): at 8 px the spec's widths cost about 2.4 teacher-UNet steps for
    K = 4 networks (0.5 narrowed); the spec's pool was designed at 32-64 px (docs/embedding-loss.md)."""
    scale = min(1.0, res / 32) if res_scale else 1.0
    return tuple(max(8, int(w * scale)) for w in WIDTHS)


def resnet_lite(in_ch: int, widths: tuple[int, int, int], res: int = 32) -> nn.Sequential:
    """Stem conv3x3 -> 3 stages of 2 basic blocks (stride 2 at the start of stages 2 and 3) ->
    adaptive average pool to 4x4, or to the final map when it is smaller (``res < 16``: upsampling
    would only replicate features, which leaves both kernels' values unchanged).
    ``[B, in_ch, res, res] -> [B, widths[-1], 4, 4]``."""
    layers = [nn.Conv2d(in_ch, widths[0], 3, padding=1), make_norm("instance", widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        layers += [BasicBlock(c, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(min(4, math.ceil(res / 4))))


def mlp(dim: int, hidden: int, width: int, act: str) -> nn.Sequential:
    """``hidden`` layers of Linear -> act, no norm layers; the embedding is the last hidden
    activation. ``[B, dim] -> [B, width]``."""
    layers, d = [], dim
    for _ in range(hidden):
        layers += [nn.Linear(d, width), MLP_ACTS[act]()]
        d = width
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def check_pool(kind: str, pool: str) -> None:
    """Raise ``ConfigError`` for a pool name that does not exist for this data kind."""
    names = IMAGE_POOLS if kind == "image" else VECTOR_POOLS
    if pool not in names:
        raise ConfigError(f"el.pool='{pool}' is not a {kind} pool; choose one of {', '.join(names)}")


def _image_net(rng: random.Random, shape, pool: str, width: int | None, res_scale: bool) -> nn.Module:
    in_ch, res = shape[0], min(shape[1:])
    widths = pool_widths(res, res_scale)
    if pool == "dm_convnet":
        return convnet(in_ch, res, width or widths[1], "relu", "avg", "instance")
    if pool == "resnet" or (pool == "mixed" and rng.random() < 0.25):
        w = width or widths[0]
        return resnet_lite(in_ch, (w, 2 * w, 4 * w), res)
    return convnet(in_ch, res, width or rng.choice(widths), rng.choice(list(CONV_ACTS)),
                   rng.choice(("avg", "max")), rng.choice(("instance", "group")))


def _vector_net(rng: random.Random, shape, pool: str, width: int | None, res_scale: bool) -> nn.Module:
    if pool == "mlp_fixed":
        return mlp(shape[0], 2, width or 128, "relu")
    return mlp(shape[0], rng.choice((2, 3)), width or rng.choice(WIDTHS), rng.choice(list(MLP_ACTS)))


def draw_network(kind: str, shape, seed: int, pool: str = "mixed", width: int | None = None,
                 res_scale: bool = True) -> nn.Module:
    """One frozen eval-mode network from ``pool``; architecture and default-init weights are a pure
    function of ``seed`` (built on CPU without touching the global RNG). ``width`` replaces every
    pool width (ResNet-lite: stages ``w, 2w, 4w``); ``res_scale``: see :func:`pool_widths`."""
    check_pool(kind, pool)
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = (_image_net if kind == "image" else _vector_net)(rng, tuple(shape), pool, width, res_scale)
    return net.requires_grad_(False).eval()


def draw_networks(kind: str, shape, K: int, run_seed: int, iteration: int, pool: str = "mixed",
                  device: torch.device | str = "cpu", width: int | None = None,
                  res_scale: bool = True) -> list[nn.Module]:
    """``K`` networks, the k-th seeded from ``(run_seed, iteration, k)`` (identical on every rank)."""
    return [draw_network(kind, shape, derive_seed(run_seed, iteration, k, "el"), pool, width, res_scale)
            .to(device) for k in range(K)]


def check_no_batchnorm(net: nn.Module) -> nn.Module:
    """Return ``net``; raise ``FewstepError`` if it contains any BatchNorm layer (section 3.2)."""
    bad = [name or type(net).__name__ for name, m in net.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bad:
        raise FewstepError(f"embedding network has BatchNorm at {', '.join(bad[:3])}: it hides the "
                           "fake/real set statistics EL must see; use GroupNorm or instance norm")
    return net
