"""DPM-Solver++ (multistep, 2nd order; Lu et al. 2022, arXiv 2211.01095) through diffusers'
``EDMDPMSolverMultistepScheduler``: the alternative a user would pick instead of distilling.

The scheduler expects the *raw* network output F of an EDM-preconditioned model and applies
``D = c_skip x + c_out F`` itself, so any denoiser ``D(x, sigma, cond)`` is fed to it as
``F = (D - c_skip x) / c_out`` (exact inverse). One network evaluation per scheduler step.
"""

from __future__ import annotations

import torch


def sample_dpmpp(D, z: torch.Tensor, nfe: int, cond=None, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, sigma_data: float = 0.5) -> torch.Tensor:
    """``nfe`` DPM-Solver++(2M) steps on the Karras grid from ``z [B, ...] ~ N(0, I)``."""
    from diffusers import EDMDPMSolverMultistepScheduler

    sched = EDMDPMSolverMultistepScheduler(sigma_min=sigma_min, sigma_max=sigma_max,
                                           sigma_data=sigma_data, algorithm_type="dpmsolver++",
                                           solver_order=2, final_sigmas_type="zero")
    sched.set_timesteps(nfe, device=z.device)
    x = z.double() * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i].to(x)
        denoised = D(x, sigma.expand(x.shape[0]), cond).to(x)
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        x = sched.step((denoised - c_skip * x) / c_out, t, x).prev_sample
    return x
