"""Karras sigma grid and deterministic/stochastic samplers (EDM Algorithm 2; k-diffusion sampling).

Every sampler is a free function ``sampler(D, x, sigmas, cond=None, ...) -> x`` where ``x`` is
already at noise level ``sigmas[0]`` (``x = sigma_0 * z``), ``sigmas`` is descending and ends in 0,
and ``D(x, sigma [B], cond) -> x0_hat``. Samplers run in float64 as EDM does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewstep.core.precond import RHO, SIGMA_MAX, SIGMA_MIN

Denoiser = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO, append_zero: bool = True) -> torch.Tensor:
    """EDM eq. 5: ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.

    Descending, float64, ``n`` points plus a trailing 0 when ``append_zero``.
    """
    if n < 1:
        raise ValueError("a sigma grid needs at least one point")
    i = torch.arange(n, dtype=torch.float64)
    frac = i / max(n - 1, 1)
    sig = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, sig.new_zeros(1)]) if append_zero else sig


def _call(D: Denoiser, x: torch.Tensor, sigma: float | torch.Tensor, cond) -> torch.Tensor:
    sigma_b = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return D(x, sigma_b, cond).to(x.dtype)


def sample_euler(D: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond=None,
                 callback: Callable | None = None) -> torch.Tensor:
    """Deterministic Euler on the PF-ODE ``dx/dsigma = (x - D(x; sigma)) / sigma``; NFE = len(sigmas)-1."""
    x = x.double()
    for i in range(len(sigmas) - 1):
        denoised = _call(D, x, sigmas[i], cond)
        d = (x - denoised) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_heun(D: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0, noise_fn: NoiseFn | None = None,
                callback: Callable | None = None) -> torch.Tensor:
    """EDM Algorithm 2 (``edm_sampler``). Deterministic when ``s_churn = 0``; NFE = 2N - 1 for N steps.

    ``noise_fn(x) -> eps`` supplies the churn noise (defaults to ``torch.randn_like``), so tests can
    pin it.
    """
    x = x.double()
    n = len(sigmas) - 1
    noise_fn = noise_fn or torch.randn_like
    for i in range(n):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t + gamma * t
        if gamma > 0:
            x = x + (t_hat**2 - t**2).sqrt() * s_noise * noise_fn(x)
        d = (x - _call(D, x, t_hat, cond)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next > 0:
            d_prime = (x_next - _call(D, x_next, t_next, cond)) / t_next
            x_next = x + (t_next - t_hat) * (d + d_prime) / 2
        x = x_next
        if callback is not None:
            callback(i, x, None)
    return x


def heun_nfe(steps: int) -> int:
    """Network evaluations of deterministic Heun with ``steps`` intervals ending at 0: 2N - 1."""
    return 2 * steps - 1


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def sampler_nfe(sampler: str, steps: int) -> int:
    return heun_nfe(steps) if sampler == "heun" else steps


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The number of grid intervals that gives ``nfe`` evaluations (Heun needs an odd NFE)."""
    if sampler == "heun":
        if nfe % 2 == 0:
            raise ValueError(f"Heun uses 2N-1 evaluations, so --nfe must be odd (got {nfe}); "
                             "use --sampler euler for even NFE")
        return (nfe + 1) // 2
    return nfe


def flow_times(steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """Descending flow times ``[steps + 1]`` (float64): ``linspace(1, t_min, steps)`` then 0, the grid
    of diffusers' ``FlowMatchEulerDiscreteScheduler`` without shift (its default ``t_min`` is 1/1000;
    shifted grids of diffusers teachers come from diffusers itself, ``models.adapters.flow_schedule``)."""
    t = torch.linspace(1.0, t_min, steps, dtype=torch.float64)
    return torch.cat([t, t.new_zeros(1)])


@torch.no_grad()
def sample_flow_euler(velocity, z: torch.Tensor, times: torch.Tensor, cond=None) -> torch.Tensor:
    """Euler in flow time from pure noise: ``x_1 = z``, ``x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)``
    with ``velocity(x_t [B, ...], t [B], cond) -> v`` (``v = eps - x0``); returns ``x_0``. One network
    evaluation per step, starting where the EDM sigma is infinite."""
    x = z.double()
    for t, t_next in zip(times[:-1], times[1:]):
        v = velocity(x.to(z.dtype), torch.full((len(x),), float(t), device=z.device, dtype=z.dtype), cond)
        x = x + (float(t_next) - float(t)) * v.double()
    return x
