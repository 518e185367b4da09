"""DP-DMD's first-step target (Wu et al. 2026, arXiv 2602.03139; specs/dp_dmd.md sections 2-3).

Every family writes ``x_t = alpha_t x0 + sigma_t eps`` (flow: alpha = 1 - t, sigma = t; VP:
alpha = sqrt(abar), sigma = sqrt(1 - abar); EDM: alpha = 1). The deterministic (DDIM) step from
level a to level b given a clean prediction is ``x_b = alpha_b x0 + sigma_b/sigma_a (x_a - alpha_a x0)``
(section 2). ``x0*`` is the unique clean prediction whose single such step from ``(x_T, T)`` lands
exactly on the teacher's anchor ``z_k`` (section 3).

``alpha``/``sigma`` arguments are Python scalars, 0-dim tensors or per-sample ``[B]`` tensors; ``x``
tensors are ``[B, ...]`` (2-D points or images), broadcast with ``append_dims``.
"""

from __future__ import annotations

import torch

from fewstep.core.utils import append_dims, mean_flat


def _b(v, x: torch.Tensor) -> torch.Tensor:
    """A scalar or ``[B]`` coefficient as a tensor that broadcasts against ``x [B, ...]``."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v if v.ndim == 0 else append_dims(v, x.ndim)


def ddim_step(x_a: torch.Tensor, x0: torch.Tensor, alpha_a, sigma_a, alpha_b, sigma_b) -> torch.Tensor:
    """Deterministic step a -> b (section 2): ``alpha_b x0 + sigma_b/sigma_a (x_a - alpha_a x0)``.

    ``x_a, x0 [B, ...]`` -> ``x_b [B, ...]``. For EDM (alpha = 1) and flow it is one Euler step of the
    probability-flow ODE.
    """
    alpha_a, sigma_a = _b(alpha_a, x_a), _b(sigma_a, x_a)
    alpha_b, sigma_b = _b(alpha_b, x_a), _b(sigma_b, x_a)
    return alpha_b * x0 + (sigma_b / sigma_a) * (x_a - alpha_a * x0)


def x0_target(x_T: torch.Tensor, z_k: torch.Tensor, alpha_T, sigma_T, alpha_k, sigma_k) -> torch.Tensor:
    """General target (section 3): ``x0* = (sigma_T z_k - sigma_k x_T)/(alpha_k sigma_T - sigma_k alpha_T)``.

    ``x_T, z_k [B, ...]`` -> ``[B, ...]``; ``ddim_step(x_T, x0*, T -> k) == z_k`` (property 9.1).
    The denominator vanishes only when the two levels have the same SNR (k == T).
    """
    alpha_T, sigma_T = _b(alpha_T, x_T), _b(sigma_T, x_T)
    alpha_k, sigma_k = _b(alpha_k, x_T), _b(sigma_k, x_T)
    return (sigma_T * z_k - sigma_k * x_T) / (alpha_k * sigma_T - sigma_k * alpha_T)


def x0_target_edm(x_T: torch.Tensor, z_k: torch.Tensor, sigma_T, sigma_k) -> torch.Tensor:
    """EDM case (alpha = 1): ``x0* = (sigma_T z_k - sigma_k x_T) / (sigma_T - sigma_k)``; ``[B, ...]``.

    Written out (not via :func:`x0_target`) so the EDM path costs three elementwise ops.
    """
    sigma_T, sigma_k = _b(sigma_T, x_T), _b(sigma_k, x_T)
    return (sigma_T * z_k - sigma_k * x_T) / (sigma_T - sigma_k)


def v_target_flow(x_T: torch.Tensor, z_k: torch.Tensor, t_T, t_k) -> torch.Tensor:
    """Flow velocity target (official code, section 3): ``v* = (x_T - z_k) / (t_T - t_k)``; ``[B, ...]``.

    The average velocity that reaches the anchor in one Euler step: ``x_T + (t_k - t_T) v* = z_k``.
    """
    t_T, t_k = _b(t_T, x_T), _b(t_k, x_T)
    return (x_T - z_k) / (t_T - t_k)


def flow_x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    """``x0 = x_t - t v`` (flow convention ``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``; section 2)."""
    return x_t - _b(t, x_t) * v


# --- the velocity form on EDM-space states (flow teachers; flow_and_latent.md section 1) ---------------
# The denoiser contract keeps EDM variables: a state ``x`` at level ``sigma`` is the flow state
# ``x_t = x / (1 + sigma)`` at time ``t = sigma / (1 + sigma)``. The functions below write the flow
# quantities directly in ``(x, sigma)`` so that nothing subtracts two numbers close to 1 (``t_T - t_k``
# when both levels are near pure noise): every formula is exact in float64 at sigma up to ~1e8.


def flow_time(sigma):
    """``t = sigma / (1 + sigma)`` (the inverse of ``sigma = t / (1 - t)``)."""
    return sigma / (1 + sigma)


def v_target_edm(x_T: torch.Tensor, z_k: torch.Tensor, sigma_T, sigma_k) -> torch.Tensor:
    """:func:`v_target_flow` for EDM-space states: ``v* = ((1 + sigma_k) x_T - (1 + sigma_T) z_k) /
    (sigma_T - sigma_k)``; ``[B, ...]``.

    Derivation: ``x_t = x / (1 + sigma)`` and ``t_T - t_k = (sigma_T - sigma_k) / ((1 + sigma_T)
    (1 + sigma_k))`` in ``(x_T^flow - z_k^flow) / (t_T - t_k)``. At ``sigma_T -> inf`` (``t_T = 1``) it is
    the official ``(x1 - z_tk) / (1 - t_k)`` with ``x1 = x_T / (1 + sigma_T)``.
    """
    sigma_T, sigma_k = _b(sigma_T, x_T), _b(sigma_k, x_T)
    return ((1 + sigma_k) * x_T - (1 + sigma_T) * z_k) / (sigma_T - sigma_k)


def flow_v_from_edm(x: torch.Tensor, D: torch.Tensor, sigma) -> torch.Tensor:
    """The flow velocity ``v = eps - x0`` a clean prediction ``D`` implies at the EDM state ``(x, sigma)``:
    ``v = (x_t - D) / t = (x - (1 + sigma) D) / sigma``; ``[B, ...]`` (a flow net's own output, since its
    ``D = x_t - t v``, core.precond.flow_scalings)."""
    sigma = _b(sigma, x)
    return (x - (1 + sigma) * D) / sigma


def velocity_loss_weight(sigma_T):
    """``1 / t_T^2 = ((1 + sigma_T) / sigma_T)^2`` (scalar or ``[B]``): at a fixed level ``T``,
    ``v = (x_t - x0) / t_T`` is affine in ``x0`` with slope ``-1/t_T``, so
    ``mean_flat((v_hat - v*)^2) == velocity_loss_weight(sigma_T) * mean_flat((x0_hat - x0*)^2)``."""
    return ((1 + sigma_T) / sigma_T) ** 2


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """``eps = (x_t - alpha x0) / sigma``; ``[B, ...]``."""
    return (x_t - _b(alpha, x_t) * x0) / _b(sigma, x_t)


def snr(alpha, sigma):
    """``SNR = alpha^2 / sigma^2`` (scalar or ``[B]``); in EDM units (alpha = 1) it is ``1/sigma^2``."""
    return alpha**2 / sigma**2


def vp_reweighted_mse(x0_hat: torch.Tensor, x0_star: torch.Tensor, alpha_T, sigma_T) -> torch.Tensor:
    """``SNR_T * mean_flat((x0_hat - x0*)^2)`` ``[B]`` (section 3, "VP scale").

    Equals ``mean_flat((eps_hat - eps*)^2)`` with ``eps = (x_T - alpha_T x0)/sigma_T`` (property 9.10):
    the x0-space error of an eps-predicting network is amplified by ``sigma_T/alpha_T``.
    """
    w = snr(torch.as_tensor(alpha_T, dtype=x0_hat.dtype, device=x0_hat.device),
            torch.as_tensor(sigma_T, dtype=x0_hat.dtype, device=x0_hat.device))
    return w * mean_flat((x0_hat - x0_star) ** 2)
