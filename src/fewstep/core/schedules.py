"""Noise schedules and conversions between parameterisations and the denoiser D(x; sigma).

EDM space: ``x_sigma = x_0 + sigma * eps``. Other families are mapped at the boundary
(EDM Table 1 and k-diffusion ``external.py``):

* VP / DDPM: ``x_vp = sqrt(abar) x_0 + sqrt(1 - abar) eps``, ``sigma = sqrt((1 - abar) / abar)``,
  ``x_vp = x / sqrt(sigma^2 + 1)``.
* v-prediction: ``v = alpha eps - sigma_vp x_0`` with ``alpha = sqrt(abar)``.
* Rectified flow (SD3 convention A): ``x_s = (1 - s) x_0 + s eps``, ``v = eps - x_0``,
  ``sigma = s / (1 - s)``.

All functions take ``x`` in EDM space and ``sigma [B]`` and broadcast with ``append_dims``.
"""

from __future__ import annotations

import torch

from fewstep.core.utils import append_dims


# --- eps-prediction --------------------------------------------------------------------------
def eps_to_denoised(x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``D = x - sigma * eps`` (c_skip = 1, c_out = -sigma)."""
    return x - append_dims(sigma, x.ndim) * eps


def denoised_to_eps(x: torch.Tensor, sigma: torch.Tensor, D_x: torch.Tensor) -> torch.Tensor:
    """``eps = (x - D) / sigma``, the PF-ODE derivative dx/dsigma."""
    return (x - D_x) / append_dims(sigma, x.ndim)


# --- v-prediction ----------------------------------------------------------------------------
def v_to_denoised(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v`` (sigma_data = 1 scalings)."""
    s = append_dims(sigma, x.ndim)
    return x / (s**2 + 1) - s / (s**2 + 1).sqrt() * v


def denoised_to_v(x: torch.Tensor, sigma: torch.Tensor, D_x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`v_to_denoised`: ``v = alpha eps - sigma_vp x_0`` in VP units."""
    s = append_dims(sigma, x.ndim)
    alpha, sigma_vp = 1 / (s**2 + 1).sqrt(), s / (s**2 + 1).sqrt()
    eps = (x - D_x) / s
    return alpha * eps - sigma_vp * D_x


# --- rectified flow (convention A: data at s = 0, noise at s = 1) ----------------------------
def sigma_to_flow_s(sigma: torch.Tensor) -> torch.Tensor:
    """``s = sigma / (1 + sigma)``."""
    return sigma / (1 + sigma)


def flow_s_to_sigma(s: torch.Tensor) -> torch.Tensor:
    """``sigma = s / (1 - s)``."""
    return s / (1 - s)


def flow_to_denoised(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``D = x / (1 + sigma) - sigma / (1 + sigma) * v`` with ``v = eps - x_0`` (derivation:
    x_s = x / (1 + sigma) and x_0 = x_s - s v)."""
    s = append_dims(sigma, x.ndim)
    return x / (1 + s) - s / (1 + s) * v


def denoised_to_flow(x: torch.Tensor, sigma: torch.Tensor, D_x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flow_to_denoised`: ``v = eps - x_0``."""
    return denoised_to_eps(x, sigma, D_x) - D_x


# --- discrete DDPM tables --------------------------------------------------------------------
def vp_sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)``, ascending in t (float64)."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """Fractional timestep for ``sigma`` by linear interpolation in ``ln sigma`` over the ascending
    table ``sigmas [T]`` (k-diffusion ``DiscreteSchedule.sigma_to_t``); clamped to the table."""
    log_sigmas = sigmas.double().log()
    log_sigma = sigma.double().log().clamp(log_sigmas[0], log_sigmas[-1])
    if quantize:
        return (log_sigma[:, None] - log_sigmas[None]).abs().argmin(dim=1).to(sigma.dtype)
    hi = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(sigmas) - 1)
    lo = hi - 1
    w = ((log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0, 1)
    return (lo + w).to(sigma.dtype)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sigma_to_t`: interpolate ``ln sigma`` between floor(t) and ceil(t)."""
    log_sigmas = sigmas.double().log()
    t = t.double().clamp(0, len(sigmas) - 1)
    lo, hi = t.floor().long(), t.ceil().long()
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def cfg_denoised(D_uncond: torch.Tensor, D_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance in denoiser space: ``D_w = D_u + w (D_c - D_u)``."""
    return D_uncond + w * (D_cond - D_uncond)
