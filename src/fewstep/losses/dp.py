"""DP-DMD first-step diversity supervision (Wu et al. 2026, arXiv 2602.03139; specs/dp_dmd.md).

``L = L_DMD + lambda_div L_div``: the student's **first-step** prediction ``x0_hat(x_T; sigma_0)``
regresses onto ``sg(x0*)``, the clean prediction whose single deterministic step from ``x_T`` lands
on the teacher's deterministic K-step anchor ``z_k`` started from the *same* noise (section 3). The
method's own rollout (:class:`DPRollout`, which the engine uses instead of ``student.rollout``)
makes the student chain deterministic (DDIM) and, with ``detach``, cuts the graph after step 1, so
DMD trains steps 2..N and L_div trains step 1 (section 4).

EDM space throughout. Our own teachers are EDM. The diffusers adapter teachers (``models/adapters.py``)
are EDM too *as far as this term can tell*: they expose ``D(x, sigma)`` with ``x = x_vp / alpha``, the
student starts from ``x_T = sigma_0 z`` in that space, and the teacher's Euler step in EDM sigma is
exactly the VP DDIM step (section 2, property 9.2: the EDM formula on ``x/alpha, sigma/alpha`` equals
the VP formula). The clean sample x0 is the same object in both spaces, so the EDM-space ``x0*`` *is*
the VP target of section 3, and the x0-space MSE has the same value. Whether to reweight by
``SNR_T = 1/sigma_0^2`` depends on what the student network outputs, not on the space: an
eps-prediction adapter computes ``D = x - sigma eps_hat``, so its x0 errors are ``sigma_0`` times its
eps errors and section 3's reweighting applies (``dp.vp_reweight=true``); v-prediction, flow,
x0-prediction adapters and EDM-preconditioned nets (``c_out -> sigma_data``) output O(1) x0 changes per
unit of network output, so no reweighting (the default).

Target form (``dp.target``, a **(choice)** kept switchable; default ``x0``). Section 3 writes the target
two ways: ``x0`` regresses the first-step clean prediction onto ``x0*`` (the spec's EDM/VP form);
``velocity`` regresses the first-step flow velocity ``v_hat = (x_T^f - x0_hat)/t_0`` onto
``v* = (x_T^f - z_k^f)/(t_0 - t_k)``, in flow variables (state ``x^f = x/(1+sigma)``, time
``t = sigma/(1+sigma)``): the official code's loss for its rectified-flow SD3.5 teacher. As *targets*
they are the same point: ``x0* = x_T^f - t_0 v*`` (both land exactly on the anchor), for every
teacher family, since the EDM Euler step in sigma and the flow Euler step in t are one DDIM step. As
*losses* they differ by one factor: ``v`` is affine in ``x0`` at the fixed level ``t_0`` with slope
``-1/t_0``, so ``L_v = L_x0 / t_0^2`` per sample, ``1/t_0^2 = ((1 + sigma_0)/sigma_0)^2`` (``core.dp_target.
velocity_loss_weight``). The x0 form weights x0 errors by 1 (velocity errors by ``t_0^2``), the velocity
form weights x0 errors by ``1/t_0^2``; the weight is the same for every sample (the batch shares
``sigma_0``), so the two gradients are parallel and switching equals rescaling lambda_div by
``1/t_0^2``. The official student starts at ``t_0 = 1`` where the forms are identical; fewstep's
students start at a finite ``sigma_0`` (80: ``1/t_0^2 = (81/80)^2 = 1.0252``; sigma_0 = 1: 4).

Guidance (specs/guidance.md 3): the anchor rollout uses the teacher guided at ``dp.guidance``
(default: the run's ``--guidance``), as DP-DMD uses CFG 3.5 both there and in the DMD real score;
the base method guides its own real score. The student samples without guidance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fewstep.core.dp_target import flow_v_from_edm, snr, v_target_edm, x0_target_edm
from fewstep.core.guidance import guided
from fewstep.core.sampling import SAMPLERS, karras_sigmas
from fewstep.core.utils import mean_flat
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
)

# DP-DMD trains (and so must sample) a deterministic chain (section 2)
DEFAULTS = {"student": {"renoise": "ddim"}}
TARGETS = ("x0", "velocity")  # dp.target: the first-step loss in x0 space or in flow-velocity space


@dataclass
class DPConfig:
    anchor_k: int = 5             # anchor index K on the teacher grid (section 5); K = teacher_steps
    #                               (or -1) anchors on the teacher's final sample ("1-step dmd+dp")
    teacher_steps: int = 30       # N_T: teacher grid intervals (Karras rho=7, sigma_0 -> sigma_min, then 0)
    teacher_sampler: str = "euler"  # euler (official, first order) | heun (2 NFE per step, choice)
    sigma_min: float = 0.002      # smallest nonzero level of the teacher grid (EDM)
    detach: bool = True           # stop-gradient after the first student step (false = ablation, C2)
    vp_reweight: bool = False     # multiply L_div by SNR_T = 1/sigma_0^2 (= eps-space MSE); only for
    #                               eps-prediction teachers (see the module docstring)
    guidance: float | None = None  # guidance scale of the anchor rollout (None = the run's --guidance)
    target: str = "x0"            # x0 (section 3, EDM/VP form) | velocity (the official flow form:
    #                               MSE of flow velocities, = x0 form times ((1+sigma_0)/sigma_0)^2)

    def anchor(self) -> int:
        """The anchor index K in 1..teacher_steps."""
        return self.teacher_steps if self.anchor_k < 0 else self.anchor_k


def teacher_grid(sigma_0: float, cfg: DPConfig) -> torch.Tensor:
    """The teacher's N_T-step grid from the student's first level (section 5): ``[N_T + 1]`` float64,
    Karras rho = 7 from ``sigma_0`` to ``sigma_min``, then 0."""
    return karras_sigmas(cfg.teacher_steps, sigma_min=cfg.sigma_min, sigma_max=sigma_0)


def teacher_anchor(teacher, x_T: torch.Tensor, cond, sigmas: torch.Tensor, K: int,
                   sampler: str = "euler") -> torch.Tensor:
    """``z_k [B, ...]`` (float64): K deterministic teacher steps from ``x_T`` along ``sigmas``, no graph."""
    with torch.no_grad():
        return SAMPLERS[sampler](teacher, x_T, sigmas[:K + 1].to(x_T.device), cond)


def rollout_dp(student, batch: Batch, z: torch.Tensor, detach: bool = True) -> GenOut:
    """Deterministic (DDIM) rollout returning the first-step prediction as ``aux["first"]``; with
    ``detach`` the state after step 1 carries no graph, so later terms train steps 2..k only."""
    x_T = student.sigma(0) * z
    pred0 = student.denoise(x_T, 0, batch.cond)
    x0 = pred0
    if student.num_steps > 1:
        x = x0 + (student.sigma(1) / student.sigma(0)) * (x_T - x0)
        x = x.detach() if detach else x
        for i in range(1, student.num_steps):
            x0 = student.denoise(x, i, batch.cond)
            if i < student.num_steps - 1:
                x = x0 + (student.sigma(i + 1) / student.sigma(i)) * (x - x0)
    return GenOut(x=x0, x_T=x_T, sigma=student.sigma(student.num_steps - 1), aux={"first": pred0})


@dataclass
class DPRollout:
    """The student rollout DP-DMD hands the engine (section 4); ``detach`` = ``dp.detach``."""

    detach: bool = True

    def __call__(self, student, batch: Batch, z: torch.Tensor) -> GenOut:
        return rollout_dp(student, batch, z, self.detach)


class DPTerm(Term):
    """``L_div = mean_flat((x0_hat_theta(x_T; sigma_0) - sg(x0*))^2)`` ``[B]`` (section 3, EDM), or with
    ``dp.target=velocity`` ``mean_flat((v_hat_theta - sg(v*))^2)`` (section 3, flow; module docstring)."""

    name, phase, uses_sample = "dp", "generator", True

    def __init__(self, cfg: DPConfig, guidance: float = 1.0, null: int | None = None):
        self.cfg, self.guidance, self.null = cfg, guidance, null
        self._cache: dict = {}

    def setup(self, nets: Nets, ctx) -> None:
        """The student must sample the way it is trained: deterministically (section 2)."""
        s = nets.student
        if s.num_steps > 1 and s.renoise != "ddim":
            raise ConfigError("--extra dp trains a deterministic (DDIM) student chain; "
                              "pass student.renoise=ddim so sampling matches training")

    def _anchor(self, nets: Nets, batch: Batch, x_T: torch.Tensor) -> dict:
        """The teacher rollout and both target forms, cached per step (same x_T -> one rollout)."""
        c = self._cache
        if c.get("step") == batch.step and c["x_T"].shape == x_T.shape and torch.equal(c["x_T"], x_T):
            return c
        sigma_T, K = float(nets.student.sigma(0)), self.cfg.anchor()
        sigmas = teacher_grid(sigma_T, self.cfg)
        t0 = time.perf_counter()
        teacher = guided(nets.teacher, self.guidance, self.null)
        z_k = teacher_anchor(teacher, x_T.detach(), batch.cond, sigmas, K, self.cfg.teacher_sampler)
        sigma_k, x64 = float(sigmas[K]), x_T.detach().double()
        x0 = x0_target_edm(x64, z_k, sigma_T, sigma_k)  # sigma_k = 0: x0* = z_k
        v = v_target_edm(x64, z_k.double(), sigma_T, sigma_k)  # the official flow velocity target
        self._cache = {"step": batch.step, "x_T": x_T.detach(), "x0": x0.to(x_T.dtype).detach(),
                       "v": v.to(x_T.dtype).detach(), "sigma_k": sigma_k,
                       "secs": time.perf_counter() - t0}
        return self._cache

    def target(self, nets: Nets, batch: Batch, x_T: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """``(x0* [B, ...], sigma_k, teacher seconds)``, cached per step."""
        c = self._anchor(nets, batch, x_T)
        return c["x0"], c["sigma_k"], c["secs"]

    def velocity_target(self, nets: Nets, batch: Batch, x_T: torch.Tensor
                        ) -> tuple[torch.Tensor, float, float]:
        """``(v* [B, ...], sigma_k, teacher seconds)``: the flow velocity from ``(x_T, sigma_0)`` that
        reaches the anchor in one Euler step, in flow units (``x_t = x / (1 + sigma)``); cached per step."""
        c = self._anchor(nets, batch, x_T)
        return c["v"], c["sigma_k"], c["secs"]

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        first = gen.aux.get("first")
        if first is None:
            raise ConfigError("dp needs its own rollout (GenOut.aux['first'] is missing): another "
                              "method of this run brings a rollout of its own")
        if self.cfg.target == "velocity":  # the official flow form (module docstring)
            v_star, sigma_k, secs = self.velocity_target(nets, batch, gen.x_T)
            v_hat = flow_v_from_edm(gen.x_T.to(first), first, float(nets.student.sigma(0)))
            loss = mean_flat((v_hat - v_star.to(first)) ** 2)
        else:
            x0_star, sigma_k, secs = self.target(nets, batch, gen.x_T)
            loss = mean_flat((first - x0_star.to(first)) ** 2)
        if self.cfg.vp_reweight:  # SNR_T in EDM units = 1 / sigma_0^2 (section 3, "VP scale")
            loss = loss * snr(1.0, float(nets.student.sigma(0)))
        return LossOutput(loss, {"dp": loss.mean().detach(), "dp_teacher_s": torch.tensor(secs),
                                 "dp_sigma_k": torch.tensor(sigma_k)})


def build(cfg: DPConfig, ctx, weight: float) -> Method:
    """``Method(terms=[DPTerm], rollout=DPRollout(cfg.detach))``; weight = lambda_div."""
    if cfg.teacher_steps < 1 or not 1 <= cfg.anchor() <= cfg.teacher_steps:
        raise ConfigError(f"dp.anchor_k={cfg.anchor_k} must lie in 1..dp.teacher_steps="
                          f"{cfg.teacher_steps} (or -1 for the teacher's final sample)")
    if cfg.target not in TARGETS:
        raise ConfigError(f"dp.target must be one of {', '.join(TARGETS)}, got '{cfg.target}'")
    if cfg.target == "velocity" and cfg.vp_reweight:
        raise ConfigError("dp.vp_reweight=true rescales the x0-form loss to eps space; it does not "
                          "apply to dp.target=velocity (drop one of the two)")
    if cfg.teacher_sampler not in SAMPLERS:
        raise ConfigError(f"dp.teacher_sampler must be one of {', '.join(SAMPLERS)}, "
                          f"got '{cfg.teacher_sampler}'")
    term = DPTerm(cfg, guidance_scale(ctx, cfg.guidance, "dp.guidance"), null_cond(ctx))
    term.weight = weight
    return Method(terms=[term], rollout=DPRollout(cfg.detach))


def check_run(run_cfg) -> None:
    """The student must sample the way it is trained: deterministically (section 2)."""
    if run_cfg.student.steps > 1 and run_cfg.student.renoise != "ddim":
        raise ConfigError("--extra dp trains a deterministic (DDIM) student chain; "
                          "pass student.renoise=ddim so sampling matches training")


METHOD = MethodEntry(DPConfig, build, DEFAULTS, kind="extra", check=check_run)
