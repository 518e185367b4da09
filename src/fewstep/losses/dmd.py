"""DMD / DMD2 (Yin et al. 2024, arXiv 2311.18828 and 2405.14867; specs/dmd.md).

Generator: the distribution-matching gradient ``g = (D_fake - D_real) / mean|x - D_real|`` (DMD eq.
7-8 with DMD2's per-sample normaliser) through the surrogate ``0.5 ||x - sg(x - g)||^2``; fake score:
EDM denoising loss on generated samples; optional DMD2 GAN head on the fake network's bottleneck;
optional DMD v1 regression on teacher ODE pairs (L2: LPIPS needs torchvision, which we avoid).
Classifier-free guidance (``--guidance``, specs/guidance.md 3) enters the real score only, as DMD2's
``real_guidance_scale`` (its fake score is never guided), and the regression pairs, which are
samples of the guided teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.core.guidance import guided
from fewstep.core.precond import edm_denoising_loss
from fewstep.core.sampling import karras_sigmas, sample_heun
from fewstep.core.utils import append_dims, mean_flat
from fewstep.errors import ConfigError
from fewstep.losses.base import (
    Batch,
    GenOut,
    LossOutput,
    Method,
    MethodEntry,
    Nets,
    Term,
    check_non_negative,
    guidance_scale,
    null_cond,
    real_batch,
)
from fewstep.models.taps import bottleneck_path, forward_with_taps

# the method's own settings for shared config sections (applied before presets and overrides)
DEFAULTS = {"schedule": {"ratio": 5, "gen_offset": 0, "critic_on_gen_steps": True, "critic_first": False}}


@dataclass
class DMDConfig:
    min_step: int = 20            # DM-loss sigma index range on the ascending 1000-point Karras grid
    max_step: int = 980           # (inclusive): sigma in [0.00323, 72.05]
    gan_gen_weight: float = 0.0   # DMD2 gen_cls_loss_weight (0 = no GAN head)
    gan_disc_weight: float = 1e-2  # DMD2 cls_loss_weight for the critic's GAN loss
    gan_max_index: int = 1000     # diffusion-GAN noising: index ~ U{0..gan_max_index-1}
    normalizer: str = "sample"    # the gradient's divisor mean|x - D_real|: per sample (DMD2) | batch
    #                               (its mean over the processes' batches) | none (1); issue 20.2
    reg_weight: float = 0.0       # DMD v1 regression weight (0 = off; paper: 0.25 with LPIPS)
    reg_pairs: int = 256          # teacher ODE pairs precomputed for the regression term
    reg_batch: int = 64           # pairs per generator update
    reg_nfe: int = 35             # teacher Heun NFE for the pairs

    def check(self) -> None:
        check_non_negative(self, "dmd", NON_NEGATIVE)
        check_normalizer(self, "dmd")


NORMALIZERS = ("sample", "batch", "none")


def check_normalizer(cfg, section: str) -> None:
    if cfg.normalizer not in NORMALIZERS:
        raise ConfigError(f"{section}.normalizer='{cfg.normalizer}'; choose one of {', '.join(NORMALIZERS)}")


NON_NEGATIVE = ("min_step", "gan_gen_weight", "gan_disc_weight", "reg_weight", "reg_pairs", "reg_batch")


def ascending_grid(n: int = 1000) -> torch.Tensor:
    """``K[i]``, i = 0..n-1: the Karras grid flipped to ascending order (K[0]=0.002, K[-1]=80)."""
    return karras_sigmas(n, append_zero=False).flip(0)


def dm_gradient(x, sigma, eps, D_real_fn, D_fake_fn, cond, normalizer: str = "sample",
                all_mean=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD gradient ``g [B, ...]`` and normaliser ``w [B]`` at noise ``x + sigma eps`` (no grad).

    ``normalizer``: ``sample`` divides each sample by its own ``mean|x - D_real|`` (DMD2); ``batch``
    by that quantity's mean over the processes' batches (``all_mean``), which keeps samples near
    the data mean at large sigma from dominating in low dimension; ``none`` divides by 1."""
    with torch.no_grad():
        x_sigma = x + append_dims(sigma, x.ndim) * eps
        D_real = D_real_fn(x_sigma, sigma, cond)
        D_fake = D_fake_fn(x_sigma, sigma, cond)
        w = mean_flat((x - D_real).abs())  # CS / ||mu_real - x||_1, no epsilon (dmd.md 2.1)
        if normalizer == "batch":
            w = (all_mean or (lambda t: t))(w.mean()).expand_as(w)
        elif normalizer == "none":
            w = torch.ones_like(w)
        g = torch.nan_to_num((D_fake - D_real) / append_dims(w, x.ndim))
    return g, w


class DistributionMatching(Term):
    """DMD generator term; ``d loss.mean() / dx = g / numel`` exactly. The real score is the teacher
    guided at ``guidance`` with null label ``null`` (``core.guidance``; w = 1: the teacher itself)."""

    name, phase, uses_sample = "dm", "generator", True

    def __init__(self, cfg: DMDConfig, guidance: float = 1.0, null: int | None = None):
        self.cfg, self.K = cfg, ascending_grid()
        self.guidance, self.null = guidance, null

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        x = gen.x
        idx = batch.rnd.randint("dm_index", self.cfg.min_step, self.cfg.max_step + 1)
        sigma = self.K[idx.cpu()].to(x)
        eps = batch.rnd.randn("dm_noise", *x.shape[1:]).to(x)
        real = guided(nets.teacher, self.guidance, self.null)
        g, w = dm_gradient(x, sigma, eps, real, nets.fake, batch.cond, self.cfg.normalizer, batch.all_mean)
        loss = 0.5 * mean_flat((x - (x - g).detach()) ** 2)
        return LossOutput(loss, {"dm": loss.mean().detach(), "dm_norm_w": w.mean()})


def fake_score_loss(fake, x, cond, sigma, eps, sigma_data: float) -> torch.Tensor:
    """EDM denoising loss of the fake network on generated samples ``[B]``, weight
    ``lambda = sigma^-2 + sigma_data^-2`` = EDM's ``(sigma^2 + sigma_data^2)/(sigma sigma_data)^2``
    (dmd.md 2.2), mean over elements."""
    return edm_denoising_loss(fake, x, sigma, eps, cond, sigma_data)


class FakeScore(Term):
    """Critic: D_fake learns the generator distribution's denoiser on ``sg(x)``, sigma = K[U{0..999}]."""

    name, phase, uses_sample = "fake", "fake_score", True

    def __init__(self, cfg: DMDConfig, sigma_data: float = 0.5):
        self.cfg, self.K, self.sigma_data = cfg, ascending_grid(), sigma_data

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        x = gen.x.detach()
        sigma = self.K[batch.rnd.randint("fake_index", 0, len(self.K)).cpu()].to(x)
        eps = batch.rnd.randn("fake_noise", *x.shape[1:]).to(x)
        loss = fake_score_loss(nets.fake, x, batch.cond, sigma, eps, self.sigma_data)
        return LossOutput(loss, {"fake": loss.mean().detach()})


class GANHead(nn.Module):
    """DMD2's ``cls_pred_branch`` scaled down: bottleneck features -> one logit per sample."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        if spatial:
            groups = 32 if channels % 32 == 0 else 1
            self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                      nn.GroupNorm(groups, channels), nn.SiLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))
        else:
            self.body = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h).squeeze(1)


def gan_logits(nets: Nets, x, sigma, cond) -> torch.Tensor:
    """Logits ``[B]`` of the head on the fake network's bottleneck at ``(x, sigma)``."""
    path = bottleneck_path(nets.fake)
    _, feats = forward_with_taps(nets.fake, x, sigma, cond, [path])
    return nets.head(feats[path])


def _diffusion_gan_noise(x, rnd, stream, K, max_index):
    idx = rnd.randint(stream + "_index", 0, max_index)
    sigma = K[idx.cpu()].to(x)
    return x + append_dims(sigma, x.ndim) * rnd.randn(stream + "_noise", *x.shape[1:]).to(x), sigma


class GANGenerator(Term):
    """Non-saturating generator loss ``softplus(-l_fake)`` through the frozen fake net and head."""

    name, phase, uses_sample = "gan_g", "generator", True

    def __init__(self, cfg: DMDConfig):
        self.cfg, self.K = cfg, ascending_grid()

    def __call__(self, nets, batch, gen) -> LossOutput:
        x_n, sigma = _diffusion_gan_noise(gen.x, batch.rnd, "gan_g", self.K, self.cfg.gan_max_index)
        loss = F.softplus(-gan_logits(nets, x_n, sigma, batch.cond))
        return LossOutput(loss, {"gan_g": loss.mean().detach()})


class GANDiscriminator(Term):
    """Critic GAN loss ``softplus(l_fake) + softplus(-l_real)`` on independently noised images."""

    name, phase, uses_sample = "gan_d", "discriminator", True

    def __init__(self, cfg: DMDConfig):
        self.cfg, self.K = cfg, ascending_grid()

    def __call__(self, nets, batch, gen) -> LossOutput:
        xf, sf = _diffusion_gan_noise(gen.x.detach(), batch.rnd, "gan_df", self.K, self.cfg.gan_max_index)
        real = real_batch(batch, "the GAN discriminator")
        xr, sr = _diffusion_gan_noise(real, batch.rnd, "gan_dr", self.K, self.cfg.gan_max_index)
        l_fake, l_real = gan_logits(nets, xf, sf, batch.cond), gan_logits(nets, xr, sr, batch.cond)
        loss = F.softplus(l_fake) + F.softplus(-l_real)
        return LossOutput(loss, {"gan_d": loss.mean().detach(),
                                 "d_real_acc": (l_real > 0).float().mean(),
                                 "d_fake_acc": (l_fake < 0).float().mean()})


class Regression(Term):
    """DMD v1 regression ``||G(z_ref) - y_ref||^2`` on precomputed (guided) teacher Heun pairs."""

    name, phase, uses_sample = "reg", "generator", False

    def __init__(self, cfg: DMDConfig, guidance: float = 1.0, null: int | None = None):
        self.cfg, self.guidance, self.null = cfg, guidance, null
        self.z_ref = self.y_ref = self.c_ref = None

    def setup(self, nets: Nets, ctx) -> None:
        """Run the teacher's deterministic Heun sampler from fixed noise (once, before training)."""
        device = next(nets.student.parameters()).device
        g = torch.Generator().manual_seed(ctx.seed + 7919)
        z_ref = torch.randn(self.cfg.reg_pairs, *ctx.shape, generator=g).to(device)
        c_ref = (torch.arange(self.cfg.reg_pairs) % ctx.num_classes).to(device) if ctx.num_classes else None
        sigmas = karras_sigmas((self.cfg.reg_nfe + 1) // 2).to(device)
        with torch.no_grad():
            teacher = guided(nets.teacher, self.guidance, self.null)
            self.y_ref = sample_heun(teacher, z_ref.double() * sigmas[0], sigmas, c_ref).float()
        self.z_ref, self.c_ref = z_ref, c_ref

    def __call__(self, nets, batch, gen) -> LossOutput:
        idx = batch.rnd.randint("reg_index", 0, len(self.z_ref), 1)[:self.cfg.reg_batch, 0]
        idx = idx.to(self.z_ref.device)
        c = None if self.c_ref is None else self.c_ref[idx]
        loss = mean_flat((nets.student(self.z_ref[idx], c) - self.y_ref[idx]) ** 2)
        return LossOutput(loss, {"reg": loss.mean().detach()})


def build(cfg: DMDConfig, ctx) -> Method:
    """DMD2 terms. ``ctx`` gives ``sigma_data``, the fake network's bottleneck channels and the
    real-score guidance (``ctx.guidance``; the fake score is never guided)."""
    w = guidance_scale(ctx)
    terms = [DistributionMatching(cfg, w, null_cond(ctx)), FakeScore(cfg, ctx.sigma_data)]
    head = None
    if cfg.gan_gen_weight > 0:
        head = GANHead(ctx.bottleneck_channels, ctx.bottleneck_spatial)
        terms += [_weighted(GANGenerator(cfg), cfg.gan_gen_weight),
                  _weighted(GANDiscriminator(cfg), cfg.gan_disc_weight)]
    if cfg.reg_weight > 0:
        terms.append(_weighted(Regression(cfg, w, null_cond(ctx)), cfg.reg_weight))
    return Method(terms=terms, needs_fake=True, head=head)


def _weighted(term, weight: float):
    term.weight = weight
    return term


METHOD = MethodEntry(DMDConfig, build, DEFAULTS)
