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

Guidance (specs/guidance.md 3): the anchor rollout uses the teacher guided at ``dp.guidance``
(default: the run's ``--guidance``), as DP-DMD uses CFG 3.5 both there and in the DMD real score;
the base method guides its own real score. The student samples without guidance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fewstep.core.dp_target import snr, x0_target_edm
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
    """``L_div = mean_flat((x0_hat_theta(x_T; sigma_0) - sg(x0*))^2)`` ``[B]`` (section 3, EDM)."""

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

    def target(self, nets: Nets, batch: Batch, x_T: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """``(x0* [B, ...], sigma_k, teacher seconds)``, cached per step (same x_T -> one rollout)."""
        c = self._cache
        if c.get("step") == batch.step and c["x_T"].shape == x_T.shape and torch.equal(c["x_T"], x_T):
            return c["x0"], c["sigma_k"], c["secs"]
        sigma_T, K = float(nets.student.sigma(0)), self.cfg.anchor()
        sigmas = teacher_grid(sigma_T, self.cfg)
        t0 = time.perf_counter()
        teacher = guided(nets.teacher, self.guidance, self.null)
        z_k = teacher_anchor(teacher, x_T.detach(), batch.cond, sigmas, K, self.cfg.teacher_sampler)
        sigma_k = float(sigmas[K])
        x0 = x0_target_edm(x_T.detach().double(), z_k, sigma_T, sigma_k)  # sigma_k = 0: x0* = z_k
        secs = time.perf_counter() - t0
        self._cache = {"step": batch.step, "x_T": x_T.detach(), "x0": x0.to(x_T.dtype).detach(),
                       "sigma_k": sigma_k, "secs": secs}
        return self._cache["x0"], sigma_k, secs

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        first = gen.aux.get("first")
        if first is None:
            raise ConfigError("dp needs its own rollout (GenOut.aux['first'] is missing): another "
                              "method of this run brings a rollout of its own")
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
