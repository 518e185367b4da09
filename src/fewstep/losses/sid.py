"""SiD / SiDA (Zhou et al. 2024/2025, arXiv 2404.04057, 2410.14919; specs/sid.md).

Generator (spec section 2, ``SID_EDMLoss`` in mingyuanzhou/SiD): at ``x_t = x_g + sigma_t eps`` with
``f_phi`` the teacher and ``f_psi`` the fake score, per element
``(f_phi - f_psi) * [(f_phi - x_g) - alpha (f_phi - f_psi)] / omega``, ``omega = mean|x_g - f_phi|``
(no grad), summed per sample, times ``loss_scaling_g``. Gradient flows through ``x_g`` *and*
through ``x_t`` into both frozen networks (no stop-gradient, unlike DMD / Diff-Instruct).
Fake score: the EDM loss on generated samples (``di.edm_fake_loss``).
SiDA (section 5, ``adversarial=True``): the channel mean of the fake network's encoder output is a
discriminator logit map (no extra parameters); the critic adds ``L_D``, the generator ``L_GAN``.

Guidance follows SiD-LSG (Zhou et al. 2024, arXiv 2406.01561; mingyuanzhou/SiD-LSG
``training/sid_training_loop.py``): four scales in the standard form, kappa1 = ``cfg_train_fake`` (the
fake score's guided output in its own EDM loss), kappa2 = kappa3 = ``cfg_eval_fake`` (the fake score,
twice, in the generator loss), kappa4 = ``cfg_eval_real`` (the teacher in the generator loss); each
defaults to ``--guidance`` (their runs set all equal). When a fake scale is not 1 the fake-score
training drops labels to the null label with probability ``fake_p_uncond`` (their 10%), so the
fake network's unconditional branch learns the generator distribution too.

Not reproduced: the augmentation pipe and dropout (our networks have neither); SiDA's critic
clipping *by value* at 1.0 (the engine clips by norm: set ``fake_optim.grad_clip`` if needed);
``nan_to_num`` on gradients (the engine refuses a non-finite step instead). NaN samples are masked
out of the loss values here, as the spec says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewstep.core.guidance import guided
from fewstep.core.precond import P_MEAN, P_STD, RHO, SIGMA_MAX, SIGMA_MIN, edm_denoising_loss, edm_loss_weight
from fewstep.core.utils import append_dims, mean_flat, sum_flat
from fewstep.errors import ConfigError
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
    real_batch,
)
from fewstep.losses.di import edm_fake_loss, lognormal_sigma
from fewstep.models.taps import bottleneck_path, capture, forward_with_taps

# 1 fake step : 1 generator step, fake first; sigma_init = 2.5; Adam beta=(0, 0.999), no clipping
_ADAM = {"betas": [0.0, 0.999], "grad_clip": 0.0}  # eps 1e-8 and weight decay 0: engine defaults
DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": True, "critic_first": True},
            "student": {"init_sigma": 2.5},
            "optim": dict(_ADAM), "fake_optim": dict(_ADAM)}


@dataclass
class SiDConfig:
    alpha: float | None = None     # SiD mixing coefficient; None = 1.2 (SiD) or 1.0 (SiDA)
    tmax: int = 800                # generator noise: u ~ U[0, tmax/1000] mapped to sigma (section 2)
    use_omega: bool = True         # divide by omega (issue #3: removing it changes the effective alpha)
    omega_min: float = 1e-5        # omega = clip(mean|x_g - f_phi|, omega_min)
    loss_scaling_g: float = 100.0  # generator SiD loss scale
    p_mean: float = P_MEAN         # fake-score / discriminator noise: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = P_STD
    loss_scaling: float = 1.0      # fake-score loss scale
    adversarial: bool = False      # SiDA: add the discriminator / GAN terms (section 5)
    loss_scaling_d: float = 1.0    # SiDA discriminator loss scale
    loss_scaling_g_gan: float = 0.01  # SiDA generator GAN loss scale
    gan_start_images: int = 200_000  # SiDA: GAN term off for the first this many training images
    gan_mix: float = 0.5           # SiDA after warm-up: (1 - mix) SiD + mix GAN
    gan_logit_clamp: float = 10.0  # generator-side logit clamp (the D loss uses raw logits)
    cfg_train_fake: float | None = None  # SiD-LSG kappa1: fake-score guidance in its own loss (None: the
    #                                      run's --guidance, as are the next two)
    cfg_eval_fake: float | None = None   # kappa2 = kappa3: fake-score guidance in the generator loss
    cfg_eval_real: float | None = None   # kappa4: teacher (real score) guidance in the generator loss
    fake_p_uncond: float = 0.1     # fake-score label dropout when a fake scale != 1 (SiD-LSG: 10%)

    @property
    def alpha_value(self) -> float:
        return self.alpha if self.alpha is not None else (1.0 if self.adversarial else 1.2)


def sid_sigma(u: torch.Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
              rho: float = RHO) -> torch.Tensor:
    """``sigma_t = (sigma_max^(1/rho) + (1 - u)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for ``u [B]``
    (section 2): u = 0 -> sigma_min, u = 0.8 -> 24.41, u = 1 -> sigma_max."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + (1 - u) * (b - a)) ** rho


def sid_omega(x_g: torch.Tensor, f_phi: torch.Tensor, omega_min: float) -> torch.Tensor:
    """``omega [B] = clip(mean_{C,H,W} |x_g - f_phi|, omega_min)``, without gradient (section 2)."""
    with torch.no_grad():
        return mean_flat((x_g - f_phi).abs()).clamp(min=omega_min)


def sid_elements(f_phi, f_psi, x_g, alpha: float) -> torch.Tensor:
    """``(f_phi - f_psi) * [(f_phi - x_g) - alpha (f_phi - f_psi)]`` elementwise ``[B, ...]``."""
    a = f_phi - f_psi
    return a * ((f_phi - x_g) - alpha * a)


def finite_samples(*ts: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: samples whose entries are finite in every tensor (NaN samples are dropped)."""
    return torch.stack([torch.isfinite(t).flatten(1).all(1) for t in ts]).all(0)


def fake_with_logits(fake, x, sigma, cond, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f_psi(x; sigma), logits)``; logits = channel mean of the encoder output at ``path``:
    ``[B, 1, h, w]`` for a UNet mid block, ``[B, 1]`` for an MLP hidden layer ``[B, W]``."""
    D_x, feats = forward_with_taps(fake, x, sigma, cond, [path])
    return D_x, feats[path].mean(dim=1, keepdim=True)


def bce_mean(logits: torch.Tensor, target: float) -> torch.Tensor:
    """BCE-with-logits, mean-reduced over every logit of the batch (a scalar)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def d_loss(l_real, l_fake, sigma, sigma_data: float) -> torch.Tensor:
    """SiDA discriminator loss ``[B]`` = ``lambda(sigma) (BCE(l_real, 1) + BCE(l_fake, 0)) / 2``."""
    return edm_loss_weight(sigma, sigma_data) * 0.5 * (bce_mean(l_real, 1.0) + bce_mean(l_fake, 0.0))


def gan_loss(l_fake, omega, clamp: float) -> torch.Tensor:
    """SiDA generator loss ``[B]`` = ``BCE(clamp(l_fake), 1) / omega`` (before the C*H*W and scale)."""
    return bce_mean(l_fake.clamp(-clamp, clamp), 1.0) / omega


class SiDGenerator(Term):
    """SiD (and SiDA) generator term: gradient through ``x_g`` and ``x_t`` into both networks."""

    name, phase, uses_sample = "sid", "generator", True

    def __init__(self, cfg: SiDConfig, real_w: float = 1.0, fake_w: float = 1.0, null: int | None = None):
        self.cfg, self.path = cfg, None
        self.real_w, self.fake_w, self.null = real_w, fake_w, null  # kappa4, kappa2 = kappa3

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        cfg, x_g = self.cfg, gen.x
        sigma = sid_sigma(batch.rnd.rand("sid_u").to(x_g) * (cfg.tmax / 1000))
        x_t = x_g + append_dims(sigma, x_g.ndim) * batch.rnd.randn("sid_noise", *x_g.shape[1:]).to(x_g)
        f_phi = guided(nets.teacher, self.real_w, self.null)(x_t, sigma, batch.cond)
        if cfg.adversarial:
            self.path = self.path or bottleneck_path(nets.fake)
            f_psi, l_fake = fake_with_logits(nets.fake, x_t, sigma, batch.cond, self.path)
        else:
            f_psi = guided(nets.fake, self.fake_w, self.null)(x_t, sigma, batch.cond)
        omega = sid_omega(x_g, f_phi, cfg.omega_min) if cfg.use_omega else torch.ones_like(sigma)
        sid = sum_flat(sid_elements(f_phi, f_psi, x_g, cfg.alpha_value)) / omega
        keep = finite_samples(x_g, f_phi, f_psi)
        loss = cfg.loss_scaling_g * torch.where(keep, sid, torch.zeros_like(sid))
        logs = {"sid": sid[keep].mean().detach(), "sid_omega": omega.mean(), "sid_dropped": (~keep).sum()}
        if cfg.adversarial and batch.step * (batch.global_batch or len(batch.z)) >= cfg.gan_start_images:
            numel = x_g[0].numel()  # match the pixel-summed SiD loss (section 5)
            gan = cfg.loss_scaling_g_gan * numel * gan_loss(l_fake[keep], omega, cfg.gan_logit_clamp)
            loss = (1 - cfg.gan_mix) * loss + cfg.gan_mix * torch.where(keep, gan, torch.zeros_like(gan))
            logs["sid_gan"] = gan.mean().detach()
        return LossOutput(loss, logs)


class FakeScore(Term):
    """Critic: EDM loss of ``f_psi`` on ``sg(x_g)``; with SiDA also ``L_D`` on real vs generated
    samples, sharing sigma, the noise and the fake-branch forward with the denoising loss."""

    name, phase, uses_sample = "fake", "fake_score", True

    def __init__(self, cfg: SiDConfig, sigma_data: float = 0.5, train_w: float = 1.0,
                 dropout: bool = False, null: int | None = None):
        self.cfg, self.sigma_data, self.path = cfg, sigma_data, None
        self.train_w, self.dropout, self.null = train_w, dropout, null  # kappa1; SiD-LSG's dropout

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        cfg, y = self.cfg, gen.x.detach()
        sigma = lognormal_sigma(batch.rnd, "fake_sigma", cfg.p_mean, cfg.p_std, y)
        eps = batch.rnd.randn("fake_noise", *y.shape[1:]).to(y)
        if not cfg.adversarial:
            cond = batch.cond
            if self.dropout and cond is not None:  # the null branch learns the generator too
                drop = batch.rnd.rand("fake_uncond").to(cond.device) < cfg.fake_p_uncond
                cond = torch.where(drop, torch.full_like(cond, self.null), cond)
            fake_D = guided(nets.fake, self.train_w, self.null)
            fake = edm_fake_loss(fake_D, y, cond, sigma, eps, self.sigma_data)
            return self._out(cfg.loss_scaling * fake, y, {"fake": fake})
        self.path = self.path or bottleneck_path(nets.fake)
        with capture(nets.fake, [self.path]) as store:  # the logits share the fake branch's forward
            fake = edm_denoising_loss(nets.fake, y, sigma, eps, batch.cond, self.sigma_data, sum_flat)
        l_fake = store[self.path].mean(dim=1, keepdim=True)
        n = append_dims(sigma, y.ndim) * eps
        real = real_batch(batch, "the SiDA discriminator").to(y)
        _, l_real = fake_with_logits(nets.fake, real + n, sigma, batch.cond, self.path)
        keep = finite_samples(y, l_real)  # the BCEs are batch means: leave NaN samples out
        disc = d_loss(l_real[keep], l_fake[keep], sigma, self.sigma_data)
        logs = {"fake": fake, "sida_d": disc, "d_real_acc": (l_real > 0).float().mean(),
                "d_fake_acc": (l_fake < 0).float().mean()}
        return self._out(cfg.loss_scaling * fake + cfg.loss_scaling_d * disc, y, logs)

    @staticmethod
    def _out(loss, y, logs) -> LossOutput:
        keep = finite_samples(y) & torch.isfinite(loss)  # NaN samples are dropped (section 3)
        logs = {k: (v[keep].mean() if v.ndim else v).detach() for k, v in logs.items()}
        return LossOutput(torch.where(keep, loss, torch.zeros_like(loss)), logs)


def build(cfg: SiDConfig, ctx) -> Method:
    """SiD (or SiDA with ``adversarial``): generator term + fake-score term; no extra parameters.
    The SiD-LSG scales default to the run's ``--guidance``."""
    real_w = guidance_scale(ctx, cfg.cfg_eval_real, "sid.cfg_eval_real")
    fake_w = guidance_scale(ctx, cfg.cfg_eval_fake, "sid.cfg_eval_fake")
    train_w = guidance_scale(ctx, cfg.cfg_train_fake, "sid.cfg_train_fake")
    if not 0 <= cfg.fake_p_uncond < 1:
        raise ConfigError(f"sid.fake_p_uncond must be in [0, 1), got {cfg.fake_p_uncond}")
    if cfg.adversarial and (fake_w != 1 or train_w != 1):
        raise ConfigError("SiDA (sid.adversarial) reads logits from the fake network's own forward pass "
                          "and cannot guide it; pass sid.cfg_eval_fake=1 sid.cfg_train_fake=1")
    dropout = fake_w != 1 or train_w != 1  # SiD-LSG's use_context_dropout_train_fake
    terms = [SiDGenerator(cfg, real_w, fake_w, null_cond(ctx)),
             FakeScore(cfg, ctx.sigma_data, train_w, dropout, null_cond(ctx))]
    return Method(terms=terms, needs_fake=True)


METHOD = MethodEntry(SiDConfig, build, DEFAULTS)
