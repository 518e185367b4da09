"""Exponential moving average of weights with EDM's half-life rule."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(step: int, halflife: float, rampup: float | None = 0.05) -> float:
    """Decay for one update: ``0.5 ** (1 / halflife)``, with EDM's ramp-up
    ``halflife <= rampup * (step + 1)``; ``step`` is the 0-based index of the averaging update (the
    teacher's iteration; the student's generator update) and ``halflife`` counts those updates.
    ``halflife = 0`` means no averaging."""
    if halflife <= 0:
        return 0.0
    if rampup:
        halflife = min(halflife, rampup * (step + 1))
    return 0.5 ** (1.0 / max(halflife, 1e-8))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * model`` for parameters; buffers are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
