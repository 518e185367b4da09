"""The k-step student: a denoiser G applied on a fixed sigma grid (DMD2 section 4, dmd.md section 4).

``x_T = sigma_0 z``; step i predicts ``x0_i = G(x_i; sigma_i, c)`` and moves to ``sigma_{i+1}`` either
by re-noising with fresh noise (DMD2: ``x_{i+1} = x0_i + sigma_{i+1} eps``) or deterministically
(DDIM / Euler, DP-DMD: ``x_{i+1} = x0_i + sigma_{i+1}/sigma_i (x_i - x0_i)``). The output is the last
``x0``. One-step students (k = 1) are ``x = G(sigma_0 z; sigma_0)``.
"""

from __future__ import annotations

import torch
from torch import nn

from fewstep.core.utils import append_dims

# DMD2's 4-step levels on the ascending 1000-point Karras grid (indices 999/749/499/249, dmd.md 4)
DEFAULT_LEVELS = {1: [80.0], 2: [80.0, 2.504], 3: [80.0, 17.50, 0.1681],
                  4: [80.0, 17.50, 2.504, 0.1681]}


def default_sigmas(steps: int, sigma_max: float = 80.0) -> list[float]:
    """Default student levels: DMD2's grid positions for k <= 4, else a Karras grid."""
    if steps in DEFAULT_LEVELS and sigma_max >= 80.0:
        return list(DEFAULT_LEVELS[steps])
    from fewstep.core.sampling import karras_sigmas

    return karras_sigmas(steps, sigma_min=0.1681, sigma_max=min(sigma_max, 80.0),
                         append_zero=False).tolist()


class Student(nn.Module):
    """k-step generator around a trainable denoiser ``G`` (initialised from the teacher)."""

    def __init__(self, G: nn.Module, sigmas: list[float], renoise: str = "fresh"):
        super().__init__()
        if not sigmas or any(b >= a for a, b in zip(sigmas, sigmas[1:])) or min(sigmas) <= 0:
            raise ValueError(f"student sigmas must be positive and strictly decreasing, got {sigmas}")
        if renoise not in ("fresh", "ddim"):
            raise ValueError(f"renoise must be 'fresh' or 'ddim', got {renoise!r}")
        self.G = G
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float64), persistent=False)
        self.renoise = renoise
        self.num_classes = getattr(G, "num_classes", 0)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def sigma(self, i: int) -> float:
        return float(self.sigmas[i])

    def denoise(self, x: torch.Tensor, i: int, cond) -> torch.Tensor:
        """``x0_i = G(x; sigma_i, cond)``."""
        return self.G(x, torch.full((x.shape[0],), self.sigma(i), device=x.device, dtype=x.dtype), cond)

    def move(self, x: torch.Tensor, x0: torch.Tensor, i: int, eps: torch.Tensor | None) -> torch.Tensor:
        """From level i (state ``x``, prediction ``x0``) to level i + 1."""
        s_next = self.sigma(i + 1)
        if self.renoise == "ddim":
            return x0 + (s_next / self.sigma(i)) * (x - x0)
        return x0 + s_next * eps

    def forward(self, z: torch.Tensor, cond=None, noises: list[torch.Tensor] | None = None):
        """Full rollout with gradient: ``z [B, ...] ~ N(0, I)`` -> sample ``[B, ...]``.

        ``noises[i]`` is the re-noising noise after step i (fresh mode); drawn if omitted.
        """
        x = self.sigma(0) * z
        for i in range(self.num_steps):
            x0 = self.denoise(x, i, cond)
            if i == self.num_steps - 1:
                return x0
            eps = None
            if self.renoise == "fresh":
                eps = noises[i] if noises is not None else torch.randn_like(x0)
            x = self.move(x, x0, i, eps)
        raise AssertionError("unreachable")

    @torch.no_grad()
    def sample(self, z: torch.Tensor, cond=None, generator: torch.Generator | None = None):
        noises = None
        if self.renoise == "fresh" and self.num_steps > 1:
            noises = [torch.randn(z.shape, generator=generator).to(z) for _ in range(self.num_steps - 1)]
        return self(z, cond, noises)


def noise_to_level(x0: torch.Tensor, sigma: float, eps: torch.Tensor) -> torch.Tensor:
    """``x0 + sigma eps`` (used by backward simulation)."""
    return x0 + append_dims(torch.full((x0.shape[0],), sigma, device=x0.device, dtype=x0.dtype),
                            x0.ndim) * eps
