"""Diff-Instruct (Luo et al. 2023, arXiv 2305.18455; specs/diff_instruct.md).

Generator: the Integral-KL gradient (spec section 2; ``DI_EDMLoss.gloss`` in pkulwj1994/diff_instruct)
through the surrogate ``sum_{C,H,W} (D_fake - D_real) * x`` with both networks under no_grad, so that
after the engine's batch mean ``d loss / dx = (D_fake - D_real) / B`` per sample; ``ln sigma ~
N(-1.2, 1.2^2)``, no per-sample normaliser. Fake score: the EDM denoising loss (log-normal sigma,
``lambda(sigma)``, summed over elements) on generated samples. Guidance (``--guidance``) enters the
real score only, as in DMD (specs/guidance.md 3).

Not reproduced: the EDM augmentation pipe on the critic's inputs (our teachers take no augment
labels, spec section 6 says to disable it then) and the shared-dropout RNG restore (spec section 2
step 2; our networks have no dropout, so both evaluations are deterministic anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.core.guidance import guided
from fewstep.core.precond import P_MEAN, P_STD, edm_denoising_loss
from fewstep.core.utils import append_dims, sum_flat
from fewstep.losses.base import (
    Batch,
    GenOut,
    LossOutput,
    Method,
    MethodEntry,
    Nets,
    Term,
    guidance_scale,
    null_cond,
)

# the method's own settings for shared config sections (applied before presets and overrides):
# 1 critic : 1 generator, critic first; sigma_init = 1.0 (README CIFAR-10); Adam beta=(0, 0.999),
# no gradient clipping (spec section 5)
_ADAM = {"betas": [0.0, 0.999], "grad_clip": 0.0}  # eps 1e-8 and weight decay 0: engine defaults
DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": True, "critic_first": True},
            "student": {"init_sigma": 1.0},
            "optim": dict(_ADAM), "fake_optim": dict(_ADAM)}


@dataclass
class DIConfig:
    p_mean: float = P_MEAN         # ln sigma ~ N(p_mean, p_std^2) for both terms (EDM training law)
    p_std: float = P_STD
    loss_scaling: float = 1.0      # generator loss scale (--ls)
    fake_loss_scaling: float = 1.0  # fake-score loss scale (--sgls)


def lognormal_sigma(rnd, stream: str, p_mean: float, p_std: float, like: torch.Tensor) -> torch.Tensor:
    """Per-sample EDM noise levels ``sigma [B]`` with ``ln sigma ~ N(p_mean, p_std^2)``."""
    return (p_mean + p_std * rnd.randn(stream).to(like)).exp()


def ikl_loss(x, sigma, eps, D_real_fn, D_fake_fn, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """IKL surrogate ``[B]`` = ``sum_{C,H,W} (D_fake - D_real) * x`` and ``D_fake - D_real [B, ...]``.

    The networks see ``x + sigma eps`` under no_grad, so only the last factor ``x`` carries gradient
    (spec section 2 step 3): ``d/dx sum_b loss_b = D_fake - D_real``, i.e. ``sigma^2 (s_q - s_p)``.
    """
    with torch.no_grad():
        x_sigma = x + append_dims(sigma, x.ndim) * eps
        diff = D_fake_fn(x_sigma, sigma, cond) - D_real_fn(x_sigma, sigma, cond)
    return sum_flat(diff * x), diff


class IKL(Term):
    """Diff-Instruct generator term; ``d loss.mean() / dx = loss_scaling (D_fake - D_real) / B``."""

    name, phase, uses_sample = "ikl", "generator", True

    def __init__(self, cfg: DIConfig, guidance: float = 1.0, null: int | None = None):
        self.cfg, self.guidance, self.null = cfg, guidance, null

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        x = gen.x
        sigma = lognormal_sigma(batch.rnd, "ikl_sigma", self.cfg.p_mean, self.cfg.p_std, x)
        eps = batch.rnd.randn("ikl_noise", *x.shape[1:]).to(x)
        real = guided(nets.teacher, self.guidance, self.null)
        loss, diff = ikl_loss(x, sigma, eps, real, nets.fake, batch.cond)
        # the loss value has no fixed sign or scale (spec section 6): also log the gradient's size
        return LossOutput(self.cfg.loss_scaling * loss,
                          {"ikl": loss.mean().detach(), "ikl_grad_rms": diff.pow(2).mean().sqrt()})


def edm_fake_loss(fake, y, cond, sigma, eps, sigma_data: float) -> torch.Tensor:
    """EDM loss ``[B]`` = ``lambda(sigma) sum_{C,H,W} (D(y + sigma eps; sigma) - y)^2`` (EDM eq. 8,
    ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``), summed over elements as in EDM."""
    return edm_denoising_loss(fake, y, sigma, eps, cond, sigma_data, reduce=sum_flat)


class FakeScore(Term):
    """Critic: D_fake learns the denoiser of the generator distribution on ``sg(x)``."""

    name, phase, uses_sample = "fake", "fake_score", True

    def __init__(self, cfg: DIConfig, sigma_data: float = 0.5):
        self.cfg, self.sigma_data = cfg, sigma_data

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        y = gen.x.detach()
        sigma = lognormal_sigma(batch.rnd, "fake_sigma", self.cfg.p_mean, self.cfg.p_std, y)
        eps = batch.rnd.randn("fake_noise", *y.shape[1:]).to(y)
        loss = self.cfg.fake_loss_scaling * edm_fake_loss(nets.fake, y, batch.cond, sigma, eps,
                                                          self.sigma_data)
        return LossOutput(loss, {"fake": loss.mean().detach()})


def build(cfg: DIConfig, ctx) -> Method:
    """Diff-Instruct: IKL generator term + EDM fake-score term (fake net initialised from the teacher)."""
    terms = [IKL(cfg, guidance_scale(ctx), null_cond(ctx)), FakeScore(cfg, ctx.sigma_data)]
    return Method(terms=terms, needs_fake=True)


METHOD = MethodEntry(DIConfig, build, DEFAULTS)
