"""Classifier-free guidance in denoiser space (Ho & Salimans 2022; specs/guidance.md section 2).

``D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null))`` — the "standard
form" of DMD2 (``sd_guidance.py``), FastGen (``x0 + (w - 1)(x0 - x0_neg)``), SiD-LSG and diffusers
pipelines: w = 1 is the plain conditional denoiser, w = 0 the unconditional one, w > 1 guides.
The other convention in the wild, ``cond + w' (cond - uncond)`` (FastVideo), is the same family with
``w' = w - 1``: their w' = 2.5 is our w = 3.5. The formula is affine in D, so it is the same in
x0, eps and score space (``eps = (x - D) / sigma`` is affine in D for fixed x and sigma).

A denoiser ``D(x, sigma [B], cond [B])`` declares its unconditional branch with the attribute named
:data:`NULL_ATTR` (``null_label``): the label value that selects the null condition, or ``None`` /
absent when it has none (a class-conditional teacher trained without label dropout). fewstep's own
networks and exact mixtures use ``-1`` (the zero one-hot of the denoiser contract).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewstep.core.schedules import cfg_denoised
from fewstep.errors import ModelError

NULL_ATTR = "null_label"   # the attribute a guidable denoiser sets (None / absent = not guidable)
NULL_LABEL = -1            # fewstep's null label: zero one-hot / null embedding (own nets, mixtures)


def null_label(D) -> int | None:
    """The label of ``D``'s unconditional branch, or None when it has none (the one default)."""
    value = getattr(D, NULL_ATTR, None)
    return None if value is None else int(value)


def check_guidable(num_classes: int, null: int | None, w: float, what: str = "--guidance") -> None:
    """Refuse a guidance scale ``w != 1`` for a teacher without an unconditional branch (one line;
    ``what`` names the setting: a flag or a config key)."""
    if w == 1:
        return
    asked = f"{what} {w:g}" if what.startswith("--") else f"{what}={w:g}"
    if not num_classes:
        raise ModelError(f"{asked} asks for classifier-free guidance, which needs a class-conditional "
                         "teacher, and this one is unconditional; train one with data.conditional=true")
    if null is None:
        raise ModelError(f"{asked} asks for classifier-free guidance, which needs a teacher trained with "
                         "label dropout, and this one has no unconditional branch; retrain it with "
                         "data.conditional=true train.p_uncond=0.1, or use guidance 1")


def guided_denoise(D, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, w: float,
                   null: int = NULL_LABEL) -> torch.Tensor:
    """``D_w(x, sigma, cond)`` for ``x [B, ...]``, ``sigma [B]``, labels ``cond [B]``.

    Both branches run in one batched call of ``2B`` rows (null first, as diffusers and SiD-LSG stack
    them); w = 1 is the plain conditional call (one evaluation, bit for bit)."""
    if w == 1:
        return D(x, sigma, cond)
    if cond is None:
        raise ValueError("classifier-free guidance needs class labels (cond is None)")
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    both = D(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([torch.full_like(cond, null), cond]))
    D_null, D_cond = both.chunk(2)
    return cfg_denoised(D_null, D_cond, w)


def guided(D, w: float, null: int | None = None) -> Callable:
    """``D`` itself when ``w == 1``, else the guided denoiser ``(x, sigma, cond) -> D_w`` with the null
    label ``null`` (default: ``D``'s own, :func:`null_label`). Samplers and loss terms take either."""
    if w == 1:
        return D
    null = null_label(D) if null is None else null
    check_guidable(int(getattr(D, "num_classes", 0) or 0), null, w)
    return lambda x, sigma, cond=None: guided_denoise(D, x, sigma, cond, w, null)
