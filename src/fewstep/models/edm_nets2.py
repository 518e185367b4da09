"""fewstep's own, parameter-compatible version of the EDM2 network (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696): the magnitude-preserving UNet
(paper Figure 21) with its module and parameter names from NVlabs/edm2 ``training/networks_edm2.py``
(``unet.enc.64x64_conv.weight``, ``unet.emb_fourier.freqs``, ``unet.dec.8x8_in0.attn_qkv.weight``, ...).

One deliberate difference: EDM2 rewrites each weight in place with its normalised value on every
training-mode forward ("forced weight normalisation", paper eq. 66). fewstep does not: that in-place
write breaks autograd when a network is called several times before ``backward`` (multi-step students,
fake-score nets), and the forward pass normalises the weight anyway (eq. 47), so the function computed
is the same; only the optimiser's geometry differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """``x`` scaled to unit root-mean-square magnitude over ``dim`` (default: all but the first)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_at_least_fp32(x.dtype))
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x depthwise FIR down/upsampling (``mode`` keep | down | up)."""
    if mode == "keep":
        return x
    f = np.float32(f)
    if f.ndim != 1 or len(f) % 2:
        raise ValueError(f"resample filter must be 1-D of even length, got {f.tolist()}")
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    k = torch.as_tensor(np.outer(f, f)[None, None], dtype=x.dtype, device=x.device)
    c = x.shape[1]
    if mode == "down":
        return nn.functional.conv2d(x, k.tile(c, 1, 1, 1), groups=c, stride=2, padding=(pad,))
    return nn.functional.conv_transpose2d(x, (4 * k).tile(c, 1, 1, 1), groups=c, stride=2, padding=(pad,))


def mp_silu(x):
    """Magnitude-preserving SiLU (eq. 81)."""
    return nn.functional.silu(x) / 0.596


def mp_sum(a, b, t: float = 0.5):
    """Magnitude-preserving weighted sum (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a, b, dim: int = 1, t: float = 0.5):
    """Magnitude-preserving concatenation (eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([(c / math.sqrt(na) * (1 - t)) * a, (c / math.sqrt(nb) * t) * b], dim=dim)


class MPFourier(nn.Module):
    """Fourier features ``sqrt(2) cos(x f + phi)`` with fixed random ``f``, ``phi`` (eq. 75)."""

    EDM_CLASS = "MPFourier"

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        dt = _at_least_fp32(x.dtype)
        y = x.to(dt).outer(self.freqs.to(dt)) + self.phases.to(dt)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel=[k, k]``) or linear layer (``kernel=[]``), eq. 47."""

    EDM_CLASS = "MPConv"

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = normalize(self.weight.to(_at_least_fp32(self.weight.dtype)))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))


class Block(nn.Module):
    """Encoder (``flavor='enc'``: skip projection + pixel norm first) or decoder block (Figure 21)."""

    EDM_CLASS = "Block"

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[int] = (1, 1),
                 attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_filter, self.resample_mode = list(resample_filter), resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.clip_act = dropout, clip_act
        self.res_balance, self.attn_balance = res_balance, attn_balance
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm, then split
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = self.attn_proj(torch.einsum("nhqk,nhck->nhcq", w, v).reshape(*x.shape))
            x = mp_sum(x, y, self.attn_balance)
        return x if self.clip_act is None else x.clamp(-self.clip_act, self.clip_act)


class EDM2UNet(nn.Module):
    """The EDM2 UNet ``F(x [B,C,H,W], c_noise [B], labels [B,K] | None)``; an extra constant-one input
    channel, magnitude-preserving skips (``mp_cat``) and a learned output gain (zero at init)."""

    EDM_CLASS = "UNet"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, resample_filter: Sequence[int] = (1, 1),
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        block = dict(resample_filter=resample_filter, channels_per_head=channels_per_head, dropout=dropout,
                     res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(label_dim, cemb, []) if label_dim else None
        self.enc, cout = nn.ModuleDict(), img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, channels, [3, 3])
                cout = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", "down", **block)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, "enc",
                                                            attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", "up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, "dec",
                                                            attention=res in attn_resolutions, **block)
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            label_emb = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label_emb, self.label_balance)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
