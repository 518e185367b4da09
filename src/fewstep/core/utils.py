"""Small shape helpers shared by every formula."""

from __future__ import annotations

import functools

import torch


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample ``[B]`` tensor broadcasts against ``[B, ...]``.

    ``append_dims(sigma, x.ndim) * x`` works for 2-D points ``[B, D]`` and images ``[B, C, H, W]``.
    """
    extra = ndim - t.ndim
    if extra < 0:
        raise ValueError(f"tensor has {t.ndim} dims, more than the target {ndim}")
    return t[(...,) + (None,) * extra]


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return sigma as a ``[B]`` tensor on ``x``'s device and dtype (scalars are broadcast)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def mean_flat(t: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: ``[B, ...] -> [B]``."""
    return t.flatten(1).mean(dim=1)


def sum_flat(t: torch.Tensor) -> torch.Tensor:
    """Sum over all non-batch dimensions: ``[B, ...] -> [B]``."""
    return t.flatten(1).sum(dim=1)


HALF = (torch.bfloat16, torch.float16)


def upcast(a):
    """A bfloat16/float16 tensor as float32; anything else (float32/64 tensors, non-tensors) as is."""
    return a.float() if isinstance(a, torch.Tensor) and a.dtype in HALF else a


def full_precision(fn):
    """Run ``fn`` outside autocast, with half-precision tensor arguments cast to float32 (float32 and
    float64 arguments are left alone). For kernel math (MMD, drifting fields) whose distance matmuls
    autocast would otherwise run in bf16/fp16 (``train.precision``, docs/scaling.md)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        args, kwargs = [upcast(a) for a in args], {k: upcast(v) for k, v in kwargs.items()}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return wrapped
