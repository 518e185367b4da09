"""Shared test utilities: a pinned random source and tiny analytic/neural denoisers."""

from __future__ import annotations

import torch

from fewstep.train.rng import StepRandom


class FixedRandom(StepRandom):
    """A StepRandom whose streams can be pinned to given tensors (``overrides[stream]``)."""

    def __init__(self, batch: int, seed: int = 0, step: int = 0, overrides: dict | None = None,
                 dtype=torch.float64):
        super().__init__(seed, step, batch)
        self.overrides = overrides or {}
        self.dtype = dtype

    def randn(self, stream, *shape, dtype=None):
        if stream in self.overrides:
            return self.overrides[stream]
        return super().randn(stream, *shape, dtype=dtype or self.dtype)

    def rand(self, stream, *shape, dtype=None):
        if stream in self.overrides:
            return self.overrides[stream]
        return super().rand(stream, *shape, dtype=dtype or self.dtype)

    def randint(self, stream, low, high, *shape):
        if stream in self.overrides:
            return self.overrides[stream]
        return super().randint(stream, low, high, *shape)


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(mu, s^2 I): D = (s^2 x + sigma^2 mu)/(s^2 + sigma^2); mu is a parameter
    so tests can check which networks receive gradients."""

    def __init__(self, mu, s: float):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.as_tensor(mu, dtype=torch.float64).clone())
        self.s, self.num_classes, self.sigma_data = s, 0, 0.5

    def forward(self, x, sigma, cond=None):
        s2, sig2 = self.s**2, sigma.to(x.dtype)[:, None] ** 2
        return (s2 * x + sig2 * self.mu) / (s2 + sig2)
