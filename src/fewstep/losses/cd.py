"""Consistency distillation (Song et al. 2023, arXiv 2303.01469; specs/consistency.md section 3).

Per sample: ``n ~ U{0..N-2}`` on the descending Karras grid ``t_0 = sigma_max > ... > t_{N-1} =
sigma_min``, ``t = t_n``, ``t' = t_{n+1}``, ``x_t = x_0 + t z`` from *real* data; one teacher Heun (or
Euler) step ``x_t -> x_{t'}`` under no_grad; loss ``d(f_theta(x_t, t), sg(f_theta-(x_{t'}, t')))`` with
``f_theta = student.G`` (boundary parameterisation, section 2: ``f(x, sigma_min) = x``) and the EMA
target ``f_theta- = target.G`` (``theta- <- mu theta- + (1 - mu) theta`` after each step).

Distances: ``l2`` (mean squared difference per sample, the CD "l2"), ``l1`` (mean absolute) and
``pseudo_huber`` (``sqrt(||.||^2 + c^2) - c``, iCT's ``c = 0.00054 sqrt(C H W)``). LPIPS is not offered
(it needs torchvision/VGG weights). No dropout in our networks, so no RNG restore is needed (section 3).
Guidance (``--guidance``): the teacher's ODE step uses the guided denoiser (guided consistency
distillation, as LCM; specs/guidance.md 3), so the student's trajectories are the guided teacher's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fewstep.core.guidance import guided
from fewstep.core.precond import RHO, SIGMA_MAX, SIGMA_MIN
from fewstep.core.sampling import karras_sigmas
from fewstep.core.utils import append_dims, mean_flat, sum_flat
from fewstep.errors import ConfigError
from fewstep.losses.base import (
    Batch,
    LossOutput,
    Method,
    MethodEntry,
    Nets,
    Term,
    guidance_scale,
    null_cond,
    real_batch,
)

# one student update per iteration, no critic
DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": False, "critic_first": False}}

SOLVERS, DISTANCES = ("heun", "euler"), ("l2", "l1", "pseudo_huber")


@dataclass
class CDConfig:
    num_points: int = 18           # N: points of the descending Karras grid (CIFAR-10 CD: 18)
    solver: str = "heun"           # teacher ODE step t -> t': heun | euler
    distance: str = "l2"           # l2 (mean squared) | l1 (mean abs) | pseudo_huber
    huber_c: float = 0.00054       # pseudo-Huber c = huber_c * sqrt(C*H*W) (iCT)
    target_mu: float = 0.95        # target EMA rate (ImageNet-64 CD; 0 = sg(f_theta), CIFAR JAX)
    sigma_min: float = SIGMA_MIN   # grid ends (t_{N-1}, t_0) and Karras rho
    sigma_max: float = SIGMA_MAX
    rho: float = RHO


def cd_grid(cfg: CDConfig) -> torch.Tensor:
    """``t_n [N]``, descending: ``t_0 = sigma_max``, ``t_{N-1} = sigma_min`` (float64)."""
    return karras_sigmas(cfg.num_points, cfg.sigma_min, cfg.sigma_max, cfg.rho, append_zero=False)


def teacher_step(D, x, t, t_next, cond, solver: str = "heun") -> torch.Tensor:
    """One PF-ODE step ``x [B, ...]`` at ``t [B]`` -> ``t_next [B]`` (``t_next > 0``), per-sample levels:
    ``d = (x - D(x; t)) / t``, Euler ``x + (t' - t) d``; Heun averages with ``d'`` at the Euler point."""
    h = append_dims(t_next - t, x.ndim)
    d = (x - D(x, t, cond)) / append_dims(t, x.ndim)
    x_euler = x + h * d
    if solver == "euler":
        return x_euler
    d_next = (x_euler - D(x_euler, t_next, cond)) / append_dims(t_next, x.ndim)
    return x + h * (d + d_next) / 2


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, huber_c: float = 0.00054) -> torch.Tensor:
    """Per-sample distance ``[B]`` between ``a, b [B, ...]`` (section 3; pseudo-Huber: section 4.5)."""
    if kind == "l2":
        return mean_flat((a - b) ** 2)
    if kind == "l1":
        return mean_flat((a - b).abs())
    c = huber_c * math.sqrt(a[0].numel())
    return (sum_flat((a - b) ** 2) + c**2).sqrt() - c


class ConsistencyDistillation(Term):
    """CD term on noised real data (``uses_sample = False``): trains the student's ``G`` directly."""

    name, phase, uses_sample = "cd", "generator", False

    def __init__(self, cfg: CDConfig, guidance: float = 1.0, null: int | None = None):
        self.cfg, self.t = cfg, cd_grid(cfg)
        self.guidance, self.null = guidance, null

    def __call__(self, nets: Nets, batch: Batch, gen=None) -> LossOutput:
        cfg, x0 = self.cfg, real_batch(batch, "cd")  # CD noises real data (Song et al. 2023, Alg. 2)
        n = batch.rnd.randint("cd_index", 0, cfg.num_points - 1).cpu()  # U{0..N-2}: t' always exists
        t, t_next = self.t[n].to(x0), self.t[n + 1].to(x0)
        x_t = x0 + append_dims(t, x0.ndim) * batch.rnd.randn("cd_noise", *x0.shape[1:]).to(x0)
        with torch.no_grad():
            teacher = guided(nets.teacher, self.guidance, self.null)
            x_next = teacher_step(teacher, x_t, t, t_next, batch.cond, cfg.solver)
            target = nets.target.G(x_next, t_next, batch.cond)
        loss = distance(nets.student.G(x_t, t, batch.cond), target, cfg.distance, cfg.huber_c)
        return LossOutput(loss, {"cd": loss.mean().detach(), "cd_t": t.mean()})


def build(cfg: CDConfig, ctx) -> Method:
    """CD: the student uses the boundary scalings; the engine keeps the EMA target at rate ``target_mu``."""
    if cfg.solver not in SOLVERS or cfg.distance not in DISTANCES:
        raise ConfigError(f"cd.solver must be one of {SOLVERS} and cd.distance one of {DISTANCES}, "
                          f"got '{cfg.solver}', '{cfg.distance}'")
    if cfg.num_points < 2 or not 0.0 <= cfg.target_mu <= 1.0:
        raise ConfigError(f"cd.num_points must be >= 2 and 0 <= cd.target_mu <= 1, got "
                          f"{cfg.num_points}, {cfg.target_mu}")
    term = ConsistencyDistillation(cfg, guidance_scale(ctx), null_cond(ctx))
    return Method(terms=[term], target_rate=cfg.target_mu, boundary=True)


METHOD = MethodEntry(CDConfig, build, DEFAULTS)
