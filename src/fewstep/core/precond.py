"""EDM preconditioning and training-noise distribution (Karras et al. 2022, arXiv 2206.00364).

``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), labels)`` (EDM Table 1),
as ``EDMPrecond`` in NVlabs/edm ``training/networks.py``. The consistency-model boundary variant
(Song et al. 2023, Appendix C) shifts c_skip/c_out so that ``D(x; sigma_min) = x`` exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fewstep.core.utils import append_dims, as_sigma, mean_flat

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
P_MEAN = -1.2
P_STD = 1.2


def edm_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """EDM Table 1 scalings for ``sigma [B]`` -> ``(c_skip, c_out, c_in, c_noise)``, each ``[B]``."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def boundary_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA,
                      sigma_min: float = SIGMA_MIN):
    """Consistency-model scalings (CM Appendix C): c_skip(sigma_min) = 1, c_out(sigma_min) = 0.

    Note the root keeps ``sigma``, not ``sigma - sigma_min`` (openai/consistency_models).
    """
    _, _, c_in, c_noise = edm_scalings(sigma, sigma_data)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_denoising_loss(D, y: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond,
                       sigma_data: float = SIGMA_DATA, reduce=mean_flat) -> torch.Tensor:
    """EDM's denoising loss per sample ``[B]`` (EDM eq. 2 with the weight of eq. 8):
    ``lambda(sigma) * reduce((D(y + sigma eps; sigma, cond) - y)^2)`` for ``y, eps [B, ...]``,
    ``sigma [B]``. ``reduce`` is ``mean_flat`` (teachers, DMD's fake score) or ``sum_flat`` (EDM's own
    sum, used by Diff-Instruct and SiD). Every denoiser fewstep trains — teachers and fake scores —
    is trained with this one function."""
    D_y = D(y + append_dims(sigma, y.ndim) * eps, sigma, cond)
    return edm_loss_weight(sigma, sigma_data) * reduce((D_y - y) ** 2)


def sample_lognormal_sigma(n: int, generator: torch.Generator | None = None,
                           p_mean: float = P_MEAN, p_std: float = P_STD,
                           device=None, dtype=torch.float32) -> torch.Tensor:
    """EDM training noise levels: ``ln sigma ~ N(p_mean, p_std^2)``, shape ``[n]``."""
    z = torch.randn(n, generator=generator, device=device, dtype=dtype)
    return (p_mean + p_std * z).exp()


def one_hot(cond: torch.Tensor | None, num_classes: int, batch: int, like: torch.Tensor):
    """Class labels ``[B]`` (long; -1 = unconditional) -> one-hot ``[B, C]``; None -> zeros.

    A conditional model called without labels sees the zero vector, as in EDM.
    """
    if num_classes == 0:
        return None
    out = torch.zeros(batch, num_classes, device=like.device, dtype=like.dtype)
    if cond is not None:
        valid = cond >= 0
        out[valid] = nn.functional.one_hot(cond[valid].long(), num_classes).to(like.dtype)
    return out


class EDMPrecond(nn.Module):
    """Wrap a raw network ``F(x_in [B,...], c_noise [B], labels [B,C] | None)`` as ``D(x, sigma, cond)``.

    The raw network runs in its own parameter dtype; the skip combination runs in that dtype too
    (float32 by default, float64 in identity tests) and the result is returned in ``x``'s dtype.
    ``boundary=True`` selects the consistency-model scalings (used by consistency students).
    """

    def __init__(self, net: nn.Module, num_classes: int = 0, sigma_data: float = SIGMA_DATA,
                 sigma_min: float = 0.0, sigma_max: float = math.inf, boundary: bool = False,
                 boundary_sigma_min: float = SIGMA_MIN):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.boundary = boundary
        self.boundary_sigma_min = boundary_sigma_min

    def scalings(self, sigma: torch.Tensor):
        if self.boundary:
            return boundary_scalings(sigma, self.sigma_data, self.boundary_sigma_min)
        return edm_scalings(sigma, self.sigma_data)

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        x_in = x.to(dtype)
        sigma = as_sigma(sigma, x_in)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        labels = one_hot(cond, self.num_classes, x.shape[0], x_in)
        F_x = self.net(append_dims(c_in, x.ndim) * x_in, c_noise, labels)
        D_x = append_dims(c_skip, x.ndim) * x_in + append_dims(c_out, x.ndim) * F_x.to(dtype)
        return D_x.to(x.dtype)
