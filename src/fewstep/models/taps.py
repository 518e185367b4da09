"""Forward hooks that return hidden states of a denoiser during its normal forward pass.

Used by DMD2's GAN head and SiDA's discriminator (the fake network's bottleneck) and by
Teacher-Feature Drifting (several teacher layers). Modules are addressed by dotted paths relative
to the denoiser, e.g. ``net.blocks.1`` (MLP), ``net.unet.mid_block`` (UNet2DModel) or
``model.enc.8x8_block3`` (EDM networks).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fewstep.core.utils import upcast
from fewstep.errors import ConfigError


def raw_unet(D: nn.Module):
    """The diffusers UNet2DModel inside one of our denoisers or an adapter, or None."""
    for path in ("net.unet", "unet", "G.net.unet", "G.unet"):
        try:
            unet = D.get_submodule(path)
        except AttributeError:
            continue
        if hasattr(unet, "mid_block"):  # EDM2 networks also call theirs "unet"
            return unet
    return None


def mlp_blocks(D: nn.Module):
    for path in ("net.blocks", "G.net.blocks"):
        try:
            return D.get_submodule(path)
        except AttributeError:
            continue
    return None


def edm_encoder(D: nn.Module):
    """The encoder ``ModuleDict`` of an EDM / EDM2 network (``model.enc`` / ``unet.enc``) inside one of
    our EDM denoisers or a student around it, or None."""
    for path in ("model.enc", "unet.enc", "G.model.enc", "G.unet.enc"):
        try:
            enc = D.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(enc, nn.ModuleDict) and len(enc):
            return enc
    return None


def _main_path(enc: nn.ModuleDict) -> list[str]:
    """Encoder entries on the main path (SongUNet's ``aux_*`` entries process the input pyramid)."""
    return [name for name in enc if "aux" not in name]


def edm_taps(D: nn.Module, tap_set: str = "mixed") -> list[str]:
    """Feature taps of an EDM / EDM2 network: the last encoder block of every resolution ("mixed") or
    only the lowest-resolution one ("deep"); [] for other networks."""
    enc = edm_encoder(D)
    if enc is None:
        return []
    pre, last = _prefix(D, enc), {}
    for name in _main_path(enc):  # "{res}x{res}_...", in order from high to low resolution
        last[name.split("_", 1)[0]] = name
    taps = [f"{pre}.{name}" for name in last.values()]
    return taps[-1:] if tap_set == "deep" else taps


def _prefix(D: nn.Module, module: nn.Module) -> str:
    for name, m in D.named_modules():
        if m is module:
            return name
    raise ConfigError("tap module is not part of the network")


def bottleneck_path(D: nn.Module) -> str:
    """The encoder output ("bottleneck") of a denoiser: UNet mid block, the last (lowest-resolution)
    encoder block of an EDM / EDM2 network, or the MLP's middle layer."""
    unet = raw_unet(D)
    if unet is not None:
        return _prefix(D, unet) + ".mid_block"
    enc = edm_encoder(D)
    if enc is not None:
        return f"{_prefix(D, enc)}.{_main_path(enc)[-1]}"
    blocks = mlp_blocks(D)
    if blocks is not None:
        return f"{_prefix(D, blocks)}.{(len(blocks) - 1) // 2}"
    raise ConfigError("cannot find a bottleneck in this network; name a tap module explicitly")


def resolve_module(D: nn.Module, path: str) -> nn.Module:
    try:
        return D.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in D.named_modules() if n][:40]
        raise ConfigError(f"no module '{path}' in the network; some names: {', '.join(names)}") from None


class _AllTapped(Exception):
    """Raised by a hook to end a forward pass once every tap has fired (``stop_when_done``)."""


@contextmanager
def capture(D: nn.Module, paths: list[str], stop_when_done: bool = False):
    """Record the outputs of the modules at ``paths`` during forward passes of ``D``.

    Yields a dict ``path -> tensor`` filled by the next forward call (the last call wins). With
    ``stop_when_done`` the first output of each module wins and the forward pass ends as soon as
    every tap has fired, so the layers after the last tap never run (feature-only passes)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for p in paths:
        def hook(_m, _inp, out, p=p):
            if stop_when_done and p in store:
                return
            out = out[0] if isinstance(out, tuple) else out
            # features leave the network for loss math: float32 even under autocast (train.precision)
            store[p] = upcast(out)
            if stop_when_done and len(store) == len(paths):
                raise _AllTapped
        handles.append(resolve_module(D, p).register_forward_hook(hook))
    try:
        yield store
    except _AllTapped:
        pass
    finally:
        for h in handles:
            h.remove()


def forward_with_taps(D: nn.Module, x, sigma, cond, paths: list[str]):
    """``(D(x, sigma, cond), {path: hidden state})``."""
    with capture(D, paths) as store:
        out = D(x, sigma, cond)
    return out, dict(store)
