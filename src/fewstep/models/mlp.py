"""A sigma-conditioned MLP raw net for vector data (2-D toy mixtures and other ``[B, d]`` data).

It is the ``F_theta`` of EDM eq. 7: ``core.precond.EDMPrecond`` wraps it as ``D(x, sigma, cond)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierEmbedding(nn.Module):
    """Fixed sinusoidal embedding of ``c_noise [B] -> [B, emb_dim]``: ``[cos(f_i c), sin(f_i c)]``.

    The frequencies ``f_i`` are geometric in ``[1, 1000]``. EDM's ``c_noise = ln(sigma)/4`` spans
    about ``[-1.55, 1.1]`` for sigma in ``[0.002, 80]``, so the lowest frequency is a monotone
    feature over the whole range and the highest resolves sigma to a fraction of a percent.
    """

    def __init__(self, emb_dim: int = 64, f_min: float = 1.0, f_max: float = 1000.0):
        super().__init__()
        if emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"emb_dim must be an even number >= 2, got {emb_dim}")
        freqs = torch.exp(torch.linspace(math.log(f_min), math.log(f_max), emb_dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class SigmaMLP(nn.Module):
    """Raw net ``F(x_in [B, d], c_noise [B], labels [B, C] | None) -> [B, d]``.

    Input: ``concat(x_in, fourier(c_noise), W_y labels)`` with a bias-free label embedding ``W_y``, so
    a zero one-hot (EDM's "unconditional") embeds to zero. ``blocks`` is an ``nn.ModuleList`` of
    ``depth`` hidden layers, each ``Sequential(Linear, SiLU)``: a forward hook on ``blocks[i]`` sees the
    post-activation hidden state ``[B, hidden]`` (Teacher-Feature Drifting taps these). The output layer
    is zero-initialised, so ``F == 0`` at init and ``D = c_skip x`` (the exact denoiser of
    ``N(0, sigma_data^2 I)`` data, edm_core.md section 9.3).
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, emb_dim: int = 64,
                 num_classes: int = 0):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or num_classes < 0:
            raise ValueError(f"SigmaMLP needs dim, hidden, depth >= 1 and num_classes >= 0 "
                             f"(got dim={dim}, hidden={hidden}, depth={depth}, num_classes={num_classes})")
        self.dim, self.num_classes = dim, num_classes
        self.embed_noise = FourierEmbedding(emb_dim)
        self.embed_label = nn.Linear(num_classes, emb_dim, bias=False) if num_classes else None
        width_in = dim + emb_dim + (emb_dim if num_classes else 0)
        widths = [width_in] + [hidden] * depth
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(widths[i], widths[i + 1]), nn.SiLU()) for i in range(depth))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """``x_in [B, d]``, ``c_noise [B]``, ``labels [B, C]`` one-hot (or None) -> ``F [B, d]``."""
        dtype = self.out.weight.dtype
        parts = [x_in.to(dtype), self.embed_noise(c_noise).to(dtype)]
        if self.embed_label is not None:
            if labels is None:  # a conditional net called without labels: zero one-hot (EDM)
                labels = x_in.new_zeros(x_in.shape[0], self.num_classes)
            parts.append(self.embed_label(labels.to(dtype)))
        h = torch.cat(parts, dim=1)
        for block in self.blocks:
            h = block(h)
        return self.out(h)
