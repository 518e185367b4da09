"""Embedding Loss (Ying et al., arXiv 2604.22379; specs/embedding_loss.md, docs/embedding-loss.md).

A supplementary generator term: the unbiased MMD^2 between the student's samples and a real batch
(same labels by construction) in the features of K freshly drawn, frozen random networks,

    EL = (1/K) sum_k MMD^2_u(psi_k(x_hat), psi_k(x_real)),   kappa = mean_s exp(-d^2 / (s h_k)),

with ``h_k`` the mean off-diagonal squared distance of the pooled 2B features (detached), or the
rho-normalised linear kernel (section 6). Its weight lambda is calibrated from the gradient-norm
ratio ||grad L_base|| / ||grad EL|| over the first generator updates (section 5).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from fewstep.core.kernels import mmd2_linear_unbiased, mmd2_unbiased_pooled
from fewstep.errors import ConfigError, FewstepError
from fewstep.losses.base import Batch, GenOut, LossOutput, Method, MethodEntry, Nets, Term, real_batch
from fewstep.models.embed import check_pool, draw_networks

KERNELS = ("gauss", "linear")
STANDARDIZE = ("pooled", "real", "sigma_data", "none")
SPACES = ("latent", "pixels")


@dataclass
class ELConfig:
    K: int = 4                   # embedding networks per generator update (section 3.1)
    kernel: str = "gauss"        # gauss (multi-bandwidth Gaussian, 2.2) | linear (rho-normalised, 6)
    multipliers: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])  # s: h -> s*h
    redraw: bool = True          # fresh networks every generator update (false: drawn once, iteration 0)
    pool: str = "mixed"          # mixed | convnet | resnet | dm_convnet (images); mixed | mlp | mlp_fixed
    width: int = 0               # override every pool width (0 = the pool's widths); cost/tests
    res_scale: bool = True       # images < 32 px: widths * res/32 (cost; false = spec widths everywhere)
    standardize: str = "pooled"  # vectors only: pooled | real | sigma_data | none (docs/embedding-loss.md)
    calibrate: bool = True       # lambda = weight * c * ratio (section 5); false: lambda = weight
    calib_steps: int = 20        # generator updates with a finite ratio before lambda freezes
    calib_c: float = 0.3         # c in lambda = c * median(g_base / g_EL)
    log_grads_every: int = 0     # after calibration, log g_base/g_EL/cosine every N updates (0 = off)
    space: str = "latent"        # latent students: the random networks see latents | pixels (decoded
    #                              by the VAE, gradient through the decoder; flow_and_latent.md 2).
    #                              Default = today's behaviour: the two have not been compared yet


# ---------------------------------------------------------------------------------------------
# the loss (sections 2.2-2.4, 6)
# ---------------------------------------------------------------------------------------------
def standardize(x_fake, x_real, mode: str, sigma_data: float = 0.5):
    """One affine map applied to both sides of vector data ``[B, d]`` (section 3.3), detached.

    ``pooled``: centre by the pooled 2B mean and divide by the pooled RMS radius per dimension (an
    isotropic scale keeps the data's geometry); ``real``: the same from the real batch only;
    ``sigma_data``: divide by the teacher's data scale; ``none``: identity."""
    if mode == "none":
        return x_fake, x_real
    if mode == "sigma_data":
        return x_fake / sigma_data, x_real / sigma_data
    ref = torch.cat([x_fake.detach(), x_real]) if mode == "pooled" else x_real
    mu = ref.mean(0)
    scale = ((ref - mu) ** 2).mean().sqrt().clamp_min(1e-12)
    return (x_fake - mu) / scale, (x_real - mu) / scale


def mmd2_linear_rho(ff: torch.Tensor, fr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased linear-kernel MMD^2 of ``ff / rho`` vs ``fr / rho``, ``rho^2 = mean_a ||z_a||^2`` over
    the pooled 2B features, detached (section 6). Returns ``(mmd2, rho^2)``."""
    rho2 = torch.cat([ff.detach(), fr]).pow(2).sum(1).mean().clamp_min(1e-30)
    return mmd2_linear_unbiased(ff, fr) / rho2, rho2


def embedding_loss(x_fake, x_real, nets, kernel: str = "gauss", multipliers=(0.25, 0.5, 1.0, 2.0, 4.0)):
    """``EL = mean_k MMD^2_u(psi_k(x_fake), psi_k(x_real))`` (0-dim) and the mean bandwidth ``h``
    (Gaussian) or ``rho^2`` (linear). ``x_fake [B, *shape]`` differentiable, ``x_real [B, *shape]``
    under no_grad; features are flattened fp32 (section 2.1)."""
    total, stat = 0.0, 0.0
    for net in nets:
        ff = net(x_fake.float()).flatten(1).float()
        with torch.no_grad():
            fr = net(x_real.float()).flatten(1).float()
        if kernel == "gauss":
            mmd2, s = mmd2_unbiased_pooled(ff, fr, multipliers)
        else:
            mmd2, s = mmd2_linear_rho(ff, fr)
        total, stat = total + mmd2, stat + s
    return total / len(nets), stat / len(nets)


# ---------------------------------------------------------------------------------------------
# the term and its lambda (section 5)
# ---------------------------------------------------------------------------------------------
def grad_stats(params, base_loss, term_loss, all_mean=None) -> tuple[float, float, float]:
    """``(||grad base||, ||grad EL||, cosine)`` over ``params`` (graphs retained for the engine).

    ``all_mean`` (a function averaging a float tensor over processes, from the engine) averages both
    gradients before the norms: every rank gets the same lambda, computed from the gradient that is
    applied (the process mean), as one process with the whole batch would for per-sample terms."""
    def grads(loss):
        if not (torch.is_tensor(loss) and loss.requires_grad):
            return [torch.zeros_like(p) for p in params]
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]

    gb, ge = grads(base_loss), grads(term_loss)
    if all_mean is not None and params:
        flat = all_mean(torch.cat([g.reshape(-1) for g in gb + ge]))
        sizes = [g.numel() for g in gb + ge]
        parts = [p.view_as(g) for p, g in zip(flat.split(sizes), gb + ge)]
        gb, ge = parts[:len(gb)], parts[len(gb):]
    nb = float(torch.stack([g.pow(2).sum() for g in gb]).sum().sqrt())
    ne = float(torch.stack([g.pow(2).sum() for g in ge]).sum().sqrt())
    dot = float(sum((a * b).sum() for a, b in zip(gb, ge)))
    return nb, ne, (dot / (nb * ne) if nb > 0 and ne > 0 else 0.0)


class ELTerm(Term):
    """Generator-phase EL on ``gen.x`` vs ``batch.real``; returns a 0-dim loss.

    ``calibrated_weight`` gives lambda: with ``calibrate`` on, ``weight * c * g_base/g_EL`` on each
    calibration update and ``weight * c * median(ratios)`` once ``calib_steps`` positive finite ratios
    are recorded; with it off, ``weight``."""

    name, phase, uses_sample, calibrates = "el", "generator", True, True

    def __init__(self, cfg: ELConfig, kind: str, shape, sigma_data: float, weight: float):
        self.cfg, self.kind, self.shape, self.sigma_data = cfg, kind, tuple(shape), sigma_data
        self.weight = weight                 # --extra el=WEIGHT (multiplies the calibrated lambda)
        self.ratios: dict[int, float] = {}   # generator step -> g_base / g_EL (calibration)
        self.frozen: float | None = None     # c * median(ratios) once calibrated
        self.updates = 0                     # generator updates seen (for log_grads_every)
        self._fixed, self._logs = None, {}
        self.decode = None                   # latents -> pixels when el.space=pixels (set by build)

    def networks(self, batch: Batch, device) -> list:
        """K networks seeded from ``(seed, step, k)``, or the iteration-0 draw when not redrawing."""
        if self.cfg.redraw:
            return self._draw(batch.seed, batch.step, device)
        if self._fixed is None or next(self._fixed[0].parameters()).device != torch.device(device):
            self._fixed = self._draw(batch.seed, 0, device)
        return self._fixed

    def _draw(self, seed: int, iteration: int, device) -> list:
        c = self.cfg
        return draw_networks(self.kind, self.shape, c.K, seed, iteration, c.pool, device, c.width or None,
                             c.res_scale)

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        x_fake, x_real = gen.x, real_batch(batch, "el").to(gen.x.device).detach()
        if self.decode is not None:  # random networks on decoded pixels, gradient through the decoder
            x_fake = self.decode(x_fake)
            with torch.no_grad():
                x_real = self.decode(x_real)
        if min(len(x_fake), len(x_real)) < 2:
            raise FewstepError("el needs at least 2 samples per process (unbiased MMD); raise train.batch")
        if self.kind == "vector":
            x_fake, x_real = standardize(x_fake.float(), x_real.float(), self.cfg.standardize,
                                         self.sigma_data)
        loss, stat = embedding_loss(x_fake, x_real, self.networks(batch, gen.x.device),
                                    self.cfg.kernel, self.cfg.multipliers)
        # the engine logs ``out.terms`` after calling calibrated_weight, so that method adds to it
        self._logs = {"el": loss.detach(), "el_h" if self.cfg.kernel == "gauss" else "el_rho2": stat}
        return LossOutput(loss, self._logs)

    def warming_up(self) -> bool:
        return self.cfg.calibrate and self.frozen is None

    def calibrated_weight(self, params, base_loss, term_loss, step: int, all_mean=None) -> float:
        """lambda for this generator update (section 5); ``base_loss`` is the weighted base sum;
        ``all_mean`` averages over processes (see :func:`grad_stats`)."""
        c, self.updates = self.cfg, self.updates + 1
        calibrating = c.calibrate and self.frozen is None
        if calibrating or (c.log_grads_every and self.updates % c.log_grads_every == 0):
            g_base, g_el, cos = grad_stats(params, base_loss, term_loss, all_mean)
            self._logs.update(el_g_base=g_base, el_g_el=g_el, el_cos=cos)
        if not calibrating:
            return self.weight * (self.frozen if c.calibrate else 1.0)
        # a zero norm carries no scale (DMD's first update has g_base = 0: fake == teacher), so only
        # positive finite ratios count towards calib_steps and the median
        ratio = g_base / g_el if g_base > 0 and g_el > 0 and math.isfinite(g_base / g_el) else None
        if ratio is not None:
            self.ratios[int(step)] = self._logs["el_ratio"] = ratio
        if len(self.ratios) >= c.calib_steps:
            self.frozen = c.calib_c * statistics.median(self.ratios.values())
        if ratio is None:
            ratio = statistics.median(self.ratios.values()) if self.ratios else 0.0
        return self.weight * c.calib_c * ratio

    def state_dict(self) -> dict:
        return {"ratios": dict(self.ratios), "frozen": self.frozen, "updates": self.updates}

    def load_state_dict(self, d: dict) -> None:
        self.ratios = {int(k): float(v) for k, v in d["ratios"].items()}
        self.frozen, self.updates = d["frozen"], int(d["updates"])


def check_config(cfg: ELConfig, kind: str) -> None:
    """Raise ``ConfigError`` for impossible settings."""
    if cfg.kernel not in KERNELS:
        raise ConfigError(f"el.kernel='{cfg.kernel}'; choose one of {', '.join(KERNELS)}")
    if cfg.standardize not in STANDARDIZE:
        raise ConfigError(f"el.standardize='{cfg.standardize}'; choose one of {', '.join(STANDARDIZE)}")
    if cfg.K < 1 or cfg.calib_steps < 1 or not cfg.multipliers or min(cfg.multipliers) <= 0:
        raise ConfigError("el.K and el.calib_steps must be >= 1 and el.multipliers positive")
    check_pool(kind, cfg.pool)


def build(cfg: ELConfig, ctx, weight: float) -> Method:
    """EL as an extra: one generator term, weight from ``--extra el=WEIGHT``; with ``el.space=pixels``
    on latent data the random networks are drawn for, and fed, decoded pixels."""
    if cfg.space not in SPACES:
        raise ConfigError(f"el.space='{cfg.space}'; choose one of {', '.join(SPACES)}")
    pixels = cfg.space == "pixels" and ctx.decode is not None
    kind, shape = ("image", ctx.pixel_shape) if pixels else (ctx.kind, ctx.shape)
    check_config(cfg, kind)
    term = ELTerm(cfg, kind, shape, ctx.sigma_data, weight)
    term.decode = ctx.decode if pixels else None
    return Method(terms=[term])


METHOD = MethodEntry(ELConfig, build, kind="extra")
