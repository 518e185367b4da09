"""EDM preconditioning and training-noise distribution (Karras et al. 2022, arXiv 2206.00364).

``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), labels)`` (EDM Table 1),
as ``EDMPrecond`` in NVlabs/edm ``training/networks.py``. The consistency-model boundary variant
(Song et al. 2023, Appendix C) shifts c_skip/c_out so that ``D(x; sigma_min) = x`` exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fewstep.core.utils import HALF, append_dims, as_sigma, mean_flat

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


def flow_scalings(sigma: torch.Tensor):
    """A rectified-flow velocity net in EDM form (flow_and_latent.md section 1): with ``t = sigma /
    (1 + sigma)`` the net sees ``x_t = x / (1 + sigma)`` and time ``t``, predicts ``v = eps - x0``, and
    ``D = x_t - t v``: ``c_skip = c_in = 1 / (1 + sigma)``, ``c_out = -t``, ``c_noise = t``; each ``[B]``."""
    c_in = 1 / (1 + sigma)
    t = sigma * c_in
    return c_in, -t, c_in, t


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(D, y: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond,
                   weight: torch.Tensor, reduce=mean_flat) -> torch.Tensor:
    """``weight * reduce((D(y + sigma eps; sigma, cond) - y)^2)`` per sample ``[B]`` for ``y, eps
    [B, ...]``, ``sigma, weight [B]``: every denoiser fewstep trains (teachers and fake scores) is
    trained with this one function."""
    D_y = D(y + append_dims(sigma, y.ndim) * eps, sigma, cond)
    return weight * reduce((D_y - y) ** 2)


def edm_denoising_loss(D, y: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond,
                       sigma_data: float = SIGMA_DATA, reduce=mean_flat) -> torch.Tensor:
    """EDM's denoising loss per sample ``[B]`` (EDM eq. 2 with the weight of eq. 8):
    ``lambda(sigma) * reduce((D(y + sigma eps; sigma, cond) - y)^2)``. ``reduce`` is ``mean_flat``
    (teachers, DMD's fake score) or ``sum_flat`` (EDM's own sum, used by Diff-Instruct and SiD)."""
    return denoising_loss(D, y, sigma, eps, cond, edm_loss_weight(sigma, sigma_data), reduce)


def flow_matching_loss(D, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond) -> torch.Tensor:
    """Rectified-flow loss ``mean_flat((v_hat - (eps - x0))^2)`` per sample ``[B]`` at ``x_t = (1 - t) x0
    + t eps`` (SD3), through the denoiser contract: ``sigma = t / (1 - t)``, ``x = x_t / (1 - t) = x0 +
    sigma eps`` and ``D - x0 = t (v - v_hat)``, so the weight is ``1 / t^2``."""
    sigma = t / (1 - t)
    return denoising_loss(D, x0, sigma, eps, cond, 1 / t**2)


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


def precond_dtype(net_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the preconditioning arithmetic around a network with parameters in ``net_dtype``:
    that dtype, except float32 for half-precision nets (a bf16 teacher, ``train.teacher_dtype``), so
    sigma, ``c_noise`` and the skip ``c_skip x`` keep float32 resolution (as EDM's ``use_fp16``)."""
    return torch.float32 if net_dtype in HALF else net_dtype


class EDMPrecond(nn.Module):
    """Wrap a raw network ``F(x_in [B,...], c_noise [B], labels [B,C] | None)`` as ``D(x, sigma, cond)``.

    The raw network runs in its own parameter dtype; the skip combination runs in that dtype too
    (float32 by default, float64 in identity tests) and the result is returned in ``x``'s dtype.
    ``boundary=True`` selects the consistency-model scalings (used by consistency students).
    """

    def __init__(self, net: nn.Module, num_classes: int = 0, sigma_data: float = SIGMA_DATA,
                 sigma_min: float = 0.0, sigma_max: float = math.inf, boundary: bool = False,
                 boundary_sigma_min: float = SIGMA_MIN, objective: str = "edm"):
        super().__init__()
        if objective not in ("edm", "flow"):
            raise ValueError(f"objective must be 'edm' or 'flow', got {objective!r}")
        self.net = net
        self.objective = objective  # "flow": the net predicts a rectified-flow velocity (flow_scalings)
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.boundary = boundary
        self.boundary_sigma_min = boundary_sigma_min

    def scalings(self, sigma: torch.Tensor):
        if self.objective == "flow":
            return flow_scalings(sigma)
        if self.boundary:
            return boundary_scalings(sigma, self.sigma_data, self.boundary_sigma_min)
        return edm_scalings(sigma, self.sigma_data)

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        x_in = x.to(precond_dtype(dtype))
        sigma = as_sigma(sigma, x_in)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        labels = one_hot(cond, self.num_classes, x.shape[0], x_in)
        F_x = self.net((append_dims(c_in, x.ndim) * x_in).to(dtype), c_noise, labels)
        D_x = append_dims(c_skip, x.ndim) * x_in + append_dims(c_out, x.ndim) * F_x.to(x_in.dtype)
        if self.boundary and self.objective == "flow":
            D_x = self._to_boundary(x_in, sigma, D_x)
        return D_x.to(x.dtype)

    def _to_boundary(self, x: torch.Tensor, sigma: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """A flow net's ``D`` re-expressed with the consistency scalings: ``F`` of the EDM form of the
        same ``D``, then ``b_skip x + b_out F`` (so ``D(x, sigma_min) = x`` exactly)."""
        c_skip, c_out, _, _ = edm_scalings(sigma, self.sigma_data)
        b_skip, b_out, _, _ = boundary_scalings(sigma, self.sigma_data, self.boundary_sigma_min)
        F = (D - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)
        return append_dims(b_skip, x.ndim) * x + append_dims(b_out, x.ndim) * F

    def flow_times(self, steps: int) -> torch.Tensor:
        """Flow times for ``flow_euler``: diffusers' default FlowMatchEuler grid (``linspace(1, 1/1000,
        steps)``, no shift, then 0; float64)."""
        from fewstep.core.sampling import flow_times

        return flow_times(steps)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """A flow net's velocity ``v(x_t, t)`` in its native variables (``t [B]`` in [0, 1], 1 = noise),
        for samplers that start at pure noise (``t = 1`` has no EDM sigma)."""
        if self.objective != "flow":
            raise ValueError("velocity() needs a flow teacher (model objective 'flow')")
        dtype = next(self.net.parameters()).dtype
        labels = one_hot(cond, self.num_classes, x_t.shape[0], x_t.to(dtype))
        return self.net(x_t.to(dtype), t.to(dtype), labels).to(x_t.dtype)
