"""A k-step student as a diffusers pipeline directory (``fewstep export RUN --format diffusers``).

fewstep's :class:`~fewstep.models.student.Student` starts at ``x = sigma_0 z`` (EDM space), predicts
``x0_i = G(x_i; sigma_i)`` and moves to ``sigma_{i+1}`` deterministically (``ddim``: ``x0 + sigma_{i+1}
(x - x0) / sigma_i``) or with fresh noise (``fresh``: ``x0 + sigma_{i+1} eps``); the output is the last x0.
Which diffusers classes reproduce that (docs/bring-your-model.md, "Students out"):

* the pipeline is ``ConsistencyModelPipeline``: of diffusers' UNet2DModel pipelines it is the only one
  that draws ``z * scheduler.init_noise_sigma``, calls ``scale_model_input`` and passes class labels
  (``DDPMPipeline`` starts from unscaled noise and has no labels);
* students of diffusers DDPM-family teachers, ``ddim``: ``EulerDiscreteScheduler`` (k-diffusion Euler is
  exactly the ddim move; ``init_noise_sigma = sigma_0`` with linspace/trailing spacing). Its training
  table (``trained_betas``, :func:`level_table`) holds the student's k levels at the slots
  ``set_timesteps(k)`` visits; the pipeline then feeds the UNet those slot indices instead of the
  teacher's fractional ``t(sigma_i)``, so the first layer of the UNet's time MLP is re-fitted to map the
  new timesteps' embeddings to the old ones (exact at the k timesteps, :func:`refit_time_embedding`);
* students of diffusers DDPM-family teachers, ``fresh``: ``LCMScheduler`` (DMD2's choice) re-noises
  ``sqrt(abar') x0 + sqrt(1 - abar') eps`` = fresh in VP units, on a table built the same way (its
  visited slots are never 0, where LCM's boundary scalings return the input). No diffusers scheduler
  with fresh re-noising starts from
  ``sigma_0 z``: LCM starts from unit-variance noise, the DDPM convention, i.e. ``x_T = sqrt(1 +
  sigma_0^2) z``. ``pipe(num_inference_steps=k)`` is therefore the student's chain from a start a factor
  ``sqrt(1 + 1/sigma_0^2)`` larger; :func:`sample_exported` is the exact few lines;
* students of fewstep's own UNet teachers (EDM preconditioning around a UNet2DModel fed
  ``1000 c_noise = 250 ln sigma``): ``CMStochasticIterativeScheduler``, whose c_in, (boundary) c_skip /
  c_out, timestep ``250 ln sigma`` and ``x0 + sqrt(sigma^2 - sigma_min^2) eps`` re-noising are fewstep's
  with ``sigma_min = 0`` (``boundary_sigma_min`` for consistency students). Its k-step grid is a Karras
  ramp, which holds any 1- or 2-level student (2-level: ``fresh`` only); others are refused.

Every export is checked before it is written: the scheduler's own ``set_timesteps(k)`` must return the
student's levels, and the written pipeline is run against the student on a few samples.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.errors import ModelError

LEVEL_RTOL = 2e-6   # exported levels vs the student's (diffusers' float32 tables)
CHECK_ATOL = 1e-4   # pipeline vs fewstep on the self-check samples
LCM_TIMESTEP_SCALING = 1e6  # LCM's boundary scalings c_skip = 0.25/((1e6 t)^2 + 0.25) ~ 0, c_out = 1


@dataclass
class Plan:
    unet: torch.nn.Module
    scheduler: object
    kind: str                      # "euler" | "lcm" | "cm" | "edm_euler"
    exact_pipeline: bool           # pipe(num_inference_steps=k) is the student
    notes: list[str] = field(default_factory=list)
    set_timesteps: dict | None = None   # scheduler.set_timesteps(**this) gives the student's levels
    pipe_sigmas: list[float] | None = None  # the levels pipe(num_inference_steps=k) visits, if others


# --- building blocks ----------------------------------------------------------------------------------
def betas_for_levels(sigmas_ascending: list[float]) -> list[float]:
    """``trained_betas`` whose table is ``abar_j = 1/(1 + sigma_j^2)`` (ascending sigma)."""
    abar = [1 / (1 + s * s) for s in sigmas_ascending]
    return [1 - abar[0]] + [1 - abar[j] / abar[j - 1] for j in range(1, len(abar))]


def level_table(levels_ascending: list[float], slots: list[int], size: int) -> list[float]:
    """A ``size``-entry sigma table holding ``levels_ascending[i]`` at ``slots[i]``.

    diffusers rebuilds the table in float32 as ``cumprod(1 - betas)``, so a single jump to a large
    sigma (a beta near 1) would lose digits; the other slots ramp geometrically in sigma between the
    levels and halve below the first one, so every factor ``1 - beta`` is moderate (or rounds to 1)."""
    table = [0.0] * size
    for (a, sa), (b, sb) in zip(zip(slots, levels_ascending), zip(slots[1:], levels_ascending[1:])):
        for j in range(a, b + 1):
            table[j] = sa * (sb / sa) ** ((j - a) / (b - a))
    table[slots[0]] = levels_ascending[0]
    for j in range(slots[0] - 1, -1, -1):
        table[j] = table[j + 1] / 2
    return table


RAMP = 16  # table slots per level gap (per-slot sigma ratio <= 1.5 for DMD2's levels)


def refit_time_embedding(unet: torch.nn.Module, t_new: torch.Tensor, t_old: torch.Tensor) -> float:
    """Re-fit ``time_embedding.linear_1`` so that timestep ``t_new[i]`` produces the time embedding
    ``t_old[i]`` did (both go through the same sinusoidal ``time_proj``). The min-norm solution of
    ``W' e(t_new_i) = W e(t_old_i)`` is exact when the ``e(t_new_i)`` are independent (k <= channels).
    Returns the largest relative residual."""
    proj, lin = unet.time_proj, unet.time_embedding.linear_1
    with torch.no_grad():
        e_new = proj(t_new.float()).double()
        e_old = proj(t_old.float()).double()
        target = e_old @ lin.weight.double().T
        w = (torch.linalg.pinv(e_new) @ target).T
        lin.weight.copy_(w.to(lin.weight.dtype))
        got = e_new @ lin.weight.double().T
    return float((got - target).abs().max() / target.abs().max().clamp_min(1e-30))


def _check_levels(got, want, what: str) -> None:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=LEVEL_RTOL, atol=0):
        raise ModelError(f"{what} cannot reproduce the student's levels {want.tolist()} (it gives "
                         f"{got.tolist()}); please report this")


def _plain_unet_copy(unet):
    copy = type(unet).from_config(unet.config)  # UNet2DModel, or a text student's UNet2DConditionModel
    copy.load_state_dict(unet.state_dict())
    return copy.float().eval()


def _first_channels(unet, channels: int):
    """A learned-variance UNet (2C outputs) keeps its first C: fewstep uses only those."""
    from diffusers import UNet2DModel

    if unet.config.out_channels == channels:
        return unet
    config = {**dict(unet.config), "out_channels": channels}
    out = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    state = unet.state_dict()
    state["conv_out.weight"], state["conv_out.bias"] = state["conv_out.weight"][:channels], \
        state["conv_out.bias"][:channels]
    out.load_state_dict(state)
    return out.eval()


# --- plans -----------------------------------------------------------------------------------------
def _ddpm_plan(G, sigmas: list[float], renoise: str) -> Plan:
    """Students of diffusers DDPM-family teachers (G is a DiffusersDDPMDenoiser)."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    from fewstep.core.schedules import sigma_to_t

    if G.boundary:
        raise ModelError("consistency students of diffusers teachers (method cd) cannot be exported: "
                         "diffusers' DDPM-family schedulers have no EDM boundary parameterisation")
    if G.quantize:
        raise ModelError("a UNet with integer (learned) time embeddings cannot be re-timed for export")
    k, ascending = len(sigmas), sorted(sigmas)
    unet = _first_channels(_plain_unet_copy(G.unet), G.shape[0])
    # the time the student's UNet saw: the Student hands G float32 sigmas (x's dtype)
    t_old = sigma_to_t(torch.tensor(sigmas, dtype=torch.float32).double(), G.sigma_table).float()
    if renoise == "ddim":
        # linspace spacing visits slots 0, m, 2m, ... (init_noise_sigma = sigma_0 as for trailing);
        # one level has no gap to ramp over, so it sits at the top of a halving ramp instead
        size, spacing = ((k - 1) * RAMP + 1, "linspace") if k > 1 else (RAMP, "trailing")
        slots = [i * RAMP for i in range(k)] if k > 1 else [RAMP - 1]
        sched = EulerDiscreteScheduler(num_train_timesteps=size, timestep_spacing=spacing,
                                       trained_betas=betas_for_levels(level_table(ascending, slots, size)),
                                       interpolation_type="linear", final_sigmas_type="zero",
                                       prediction_type=G.prediction_type)
        sched.set_timesteps(k)
        _check_levels(sched.sigmas[:-1], sigmas, "EulerDiscreteScheduler")
        _check_levels([sched.init_noise_sigma], sigmas[:1], "EulerDiscreteScheduler's init_noise_sigma")
        kind, exact, notes = "euler", True, []
    else:
        # LCM with original_inference_steps = k on k m slots visits m-1, 2m-1, ..., km-1 (never 0,
        # where its boundary scalings would return the input)
        size, slots = k * RAMP, [(i + 1) * RAMP - 1 for i in range(k)]
        sched = LCMScheduler(num_train_timesteps=size, original_inference_steps=k,
                             trained_betas=betas_for_levels(level_table(ascending, slots, size)),
                             timestep_scaling=LCM_TIMESTEP_SCALING, prediction_type=G.prediction_type,
                             clip_sample=False)
        sched.set_timesteps(k)
        abar = sched.alphas_cumprod.double()[sched.timesteps]
        _check_levels(((1 - abar) / abar).sqrt(), sigmas, "LCMScheduler")
        kind, exact = "lcm", False
        notes = [f"pipe(num_inference_steps={k}) starts from unit-variance noise (the DDPM/LCM convention, "
                 f"x_T = sqrt(1 + sigma_0^2) z) where fewstep starts at sigma_0 z: a factor "
                 f"{math.sqrt(1 + sigmas[0] ** -2):.8f} on the first input; fewstep.models.export_diffusers."
                 "sample_exported samples the student exactly"]
    residual = refit_time_embedding(unet, torch.as_tensor(sched.timesteps).float(), t_old)
    if not residual <= 1e-5:  # also NaN (e.g. a log-Fourier time embedding at timestep 0)
        raise ModelError(f"re-fitting the UNet's time embedding to {k} timesteps left a relative residual "
                         f"{residual:.2g}; the UNet's first channel count is too small for {k} levels")
    return Plan(unet, sched, kind, exact, notes)


def _cm_grid(sigmas: list[float], sigma_min: float) -> tuple[int, float]:
    """(num_train_timesteps, rho) whose CM Karras ramp gives these 1 or 2 levels."""
    if len(sigmas) == 1:
        return 2, 7.0
    s0, s1 = sigmas
    if sigma_min == 0:
        return 3, math.log(s0 / s1) / math.log(2)  # ramp 1/2: s1 = s0 2^-rho
    lo, hi = 1e-3, 1e3  # s1(rho) = ((s0^(1/rho) + smin^(1/rho)) / 2)^rho decreases in rho

    def level(rho):
        return ((s0 ** (1 / rho) + sigma_min ** (1 / rho)) / 2) ** rho

    if not level(hi) < s1 < level(lo):
        raise ModelError(f"a 2-level consistency student with levels {sigmas} is outside the "
                         "CMStochasticIterativeScheduler's Karras family")
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if level(mid) > s1 else (lo, mid)
    return 3, math.sqrt(lo * hi)


def karras_levels(ramp, s_max: float, s_min: float, rho: float):
    """EDM eq. 5 at ramp positions in [0, 1] (numpy or torch, float64), as diffusers' Karras schedulers."""
    return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def karras_ramp(levels, s_max: float, s_min: float, rho: float) -> list[float]:
    """The inverse: ramp positions at which a Karras schedule from s_max to s_min has these levels."""
    a, b = s_max ** (1 / rho), s_min ** (1 / rho)
    return [(a - s ** (1 / rho)) / (a - b) for s in levels]


RAMP_SEARCH_TOL = 0.9 * LEVEL_RTOL  # leaves room for diffusers' float32 cast of the levels (6e-8)
RAMP_SEARCH_MAX_N = 4096          # num_train_timesteps bound of the integer-ramp search (~5 s)
RHO_RANGE = (1.5, 30.0)


def _rho_for_last(levels, s_min: float, ramp_last):
    """rho (vectorised) at which the Karras ramp position ``ramp_last`` holds the last level exactly."""
    import numpy as np

    s0, s_last = levels[0], levels[-1]
    if s_min == 0:  # s_last = s0 (1 - r)^rho
        return np.log(s_last / s0) / np.log1p(-ramp_last)
    lo = np.full(ramp_last.shape, math.log(RHO_RANGE[0]))
    hi = np.full(ramp_last.shape, math.log(RHO_RANGE[1]))
    for _ in range(50):  # the position of s_last decreases in rho
        mid = (lo + hi) / 2
        r = (s0 ** (1 / np.exp(mid)) - s_last ** (1 / np.exp(mid))) / \
            (s0 ** (1 / np.exp(mid)) - s_min ** (1 / np.exp(mid)))
        lo, hi = np.where(r > ramp_last, mid, lo), np.where(r > ramp_last, hi, mid)
    return np.exp((lo + hi) / 2)


def cm_integer_ramp(levels: list[float], s_min: float) -> tuple[int, float, list[int]] | None:
    """(num_train_timesteps N, rho, ramp indices j_i) such that CMStochasticIterativeScheduler's Karras
    ramp ``j_i / (N - 1)`` (custom ``timesteps``) gives every level to ``RAMP_SEARCH_TOL`` relative; the
    smallest such N, or None. For each N and each integer position of the last level, rho is solved from
    the last level and the other positions are rounded: a simultaneous rational approximation of the
    levels' ramp positions with one continuous parameter (rho)."""
    import numpy as np

    s = np.asarray(levels, dtype=np.float64)
    r_hi, r_lo = (np.asarray(karras_ramp([s[-1]], s[0], s_min, rho)) for rho in RHO_RANGE)
    n = len(s)
    while n <= RAMP_SEARCH_MAX_N:  # blocks of about 2e5 (N, position) pairs, smallest N first
        ns = np.arange(n, min(n + max(16, min(n, 200_000 // n)), RAMP_SEARCH_MAX_N + 1))
        q = ns - 1
        lo, hi = np.ceil(r_lo * q).astype(np.int64), np.floor(np.minimum(r_hi * q, q - 1)).astype(np.int64)
        counts = np.maximum(hi - lo + 1, 0)
        qq = np.repeat(q, counts)
        jl = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        rho = _rho_for_last(s, s_min, jl / qq)
        ok, js = np.isfinite(rho), [jl]
        for si in s[-2:0:-1]:
            a, b = s[0] ** (1 / rho), s_min ** (1 / rho)
            j = np.round((a - si ** (1 / rho)) / (a - b) * qq)
            ok &= np.abs(karras_levels(j / qq, s[0], s_min, rho) / si - 1) <= RAMP_SEARCH_TOL
            js.insert(0, j)
        ok &= np.abs(karras_levels(jl / qq, s[0], s_min, rho) / s[-1] - 1) <= RAMP_SEARCH_TOL
        ok &= np.all(np.diff(np.stack([np.zeros_like(jl), *js]), axis=0) > 0, axis=0)
        if ok.any():
            i = int(np.argmax(ok))
            return int(qq[i]) + 1, float(rho[i]), [0] + [int(j[i]) for j in js]
        n = int(ns[-1]) + 1
    return None


def fit_rho(levels: list[float]) -> float:
    """rho whose k-point Karras schedule from levels[0] to levels[-1] (what ``EDMEulerScheduler.
    set_timesteps(k)`` builds) is closest to the interior levels in log (exact for k <= 3 when a
    rho in RHO_RANGE holds them). A bounded 1-D minimisation in ln rho (scipy's Brent method)."""
    from scipy.optimize import minimize_scalar

    k = len(levels)
    if k <= 2:
        return 7.0
    pos = [i / (k - 1) for i in range(1, k - 1)]

    def loss(log_rho):
        rho = math.exp(log_rho)
        return sum((math.log(karras_levels(p, levels[0], levels[-1], rho)) - math.log(s)) ** 2
                   for p, s in zip(pos, levels[1:-1]))

    fit = minimize_scalar(loss, bounds=(math.log(0.25), math.log(1000.0)), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(fit.x)


def _own_unet_copy(G):
    """fewstep's UNetRaw as a plain UNet2DModel (labels: the bias-free Linear(one-hot) is an embedding
    table, W[:, c])."""
    from diffusers import UNet2DModel

    raw = G.net.unet
    config = {kk: v for kk, v in dict(raw.config).items() if not kk.startswith("_")}
    num_classes = int(G.num_classes or 0)
    config.update(class_embed_type=None, num_class_embeds=num_classes or None)
    unet = UNet2DModel.from_config(config)
    state = raw.state_dict()
    if num_classes:
        state["class_embedding.weight"] = G.net.embed_label.weight.detach().T.contiguous()
    unet.load_state_dict(state)
    return unet.float().eval()


def own_unet_timesteps(sigmas: list[float]) -> torch.Tensor:
    """The timesteps fewstep's UNetRaw sees at these levels: ``1000 (ln sigma / 4)`` computed in float32
    from the float32 sigma the Student hands G (EDMPrecond's c_noise, UNetRaw's TIMESTEP_SCALE)."""
    from fewstep.models.unet import TIMESTEP_SCALE

    return (TIMESTEP_SCALE * (torch.tensor(sigmas, dtype=torch.float32).log() / 4)).float()


def _own_unet_plan(G, sigmas: list[float], renoise: str) -> Plan:
    """Students of fewstep's own UNet teachers (EDMPrecond around UNetRaw)."""
    if getattr(G, "objective", "edm") != "edm":
        raise ModelError("students of fewstep flow-objective UNet teachers are not exported to diffusers: "
                         "no diffusers scheduler has the rectified-flow scalings starting from sigma_0 z")
    unet = _own_unet_copy(G)
    if len(sigmas) == 1 or renoise == "fresh":
        return _cm_plan(G, unet, sigmas)
    if G.boundary:
        raise ModelError(f"a {len(sigmas)}-step ddim consistency student of a fewstep UNet teacher "
                         "cannot be exported: EDMEulerScheduler (the ddim move) has EDM scalings, not the "
                         "boundary ones")
    return _edm_euler_plan(G, unet, sigmas)


def _check_cm_renoise(sigmas: list[float], sigma_min: float) -> None:
    """CM re-noises to ``sqrt(sigma^2 - sigma_min^2)`` (openai/consistency_models), fewstep to sigma."""
    worst = max((1 - math.sqrt(1 - (sigma_min / s) ** 2) for s in sigmas[1:]), default=0.0)
    if worst > LEVEL_RTOL:
        raise ModelError(f"a {len(sigmas)}-step consistency student with levels {sigmas} cannot be exported: "
                         "CMStochasticIterativeScheduler re-noises to sqrt(sigma^2 - sigma_min^2), fewstep "
                         f"to sigma (relative {worst:.2g} > {LEVEL_RTOL:g} at sigma_min={sigma_min:g})")


def _cm_plan(G, unet, sigmas: list[float]) -> Plan:
    """1-step students and ``fresh`` ones: CMStochasticIterativeScheduler (c_in, EDM / boundary scalings,
    timestep 250 ln sigma and fresh re-noising are fewstep's; no re-fit)."""
    from diffusers import CMStochasticIterativeScheduler

    k = len(sigmas)
    sigma_min = float(G.boundary_sigma_min) if G.boundary else 0.0
    _check_cm_renoise(sigmas, sigma_min)
    common = dict(sigma_min=sigma_min, sigma_max=sigmas[0], sigma_data=float(G.sigma_data),
                  clip_denoised=False)
    if k <= 2:  # the default grid holds them: pipe(num_inference_steps=k) is the student
        n, rho = _cm_grid(sigmas, sigma_min)
        sched = CMStochasticIterativeScheduler(num_train_timesteps=n, rho=rho, **common)
        sched.set_timesteps(k)
        _check_levels(sched.sigmas[:-1], sigmas, "CMStochasticIterativeScheduler")
        return Plan(unet, sched, "cm", True, set_timesteps={"num_inference_steps": k})
    found = cm_integer_ramp(sigmas, sigma_min)
    if found is None:
        raise ModelError(f"no CMStochasticIterativeScheduler grid of <= {RAMP_SEARCH_MAX_N} timesteps holds "
                         f"the levels {sigmas} to {RAMP_SEARCH_TOL:.2g}; Karras-shaped levels (fewstep's "
                         "defaults) fit, or export a ddim student")
    n, rho, ramp = found
    timesteps = ramp[::-1]  # diffusers takes them descending and reverses them into the ramp
    sched = CMStochasticIterativeScheduler(num_train_timesteps=n, rho=rho, **common)
    other = CMStochasticIterativeScheduler.from_config(sched.config)
    other.set_timesteps(k)
    sched.set_timesteps(timesteps=timesteps)
    _check_levels(sched.sigmas[:-1], sigmas, "CMStochasticIterativeScheduler with custom timesteps")
    pipe_sigmas = [float(s) for s in other.sigmas[:-1]]
    exact = bool(torch.allclose(other.sigmas[:-1].double(), sched.sigmas[:-1].double(),
                                rtol=LEVEL_RTOL, atol=0))
    notes = [] if exact else [
        f"pipe(timesteps={timesteps}) is the student exactly; pipe(num_inference_steps={k}) runs the same "
        f"network at the scheduler's default levels {[round(s, 6) for s in pipe_sigmas]} instead"]
    return Plan(unet, sched, "cm", exact, notes, set_timesteps={"timesteps": timesteps},
                pipe_sigmas=pipe_sigmas)


def _edm_euler_plan(G, unet, sigmas: list[float]) -> Plan:
    """``ddim`` students with k >= 2: EDMEulerScheduler. Its EDM scalings ("epsilon": c_out = +sigma
    sigma_data / sqrt(sigma^2 + sigma_data^2), as EDM's) and Euler step to the next sigma are the ddim
    move; its timestep is ``0.25 ln sigma`` where fewstep's UNet takes ``250 ln sigma``, so the time
    MLP's first layer is re-fitted. ``set_timesteps(sigmas=ramp)`` (a Karras ramp position per level)
    holds any levels; ``set_timesteps(k)`` the Karras ramp ``linspace(0, 1, k)`` with the fitted rho."""
    from diffusers import EDMEulerScheduler

    k = len(sigmas)
    rho = fit_rho(sigmas)
    sched = EDMEulerScheduler(sigma_min=sigmas[-1], sigma_max=sigmas[0], sigma_data=float(G.sigma_data),
                              sigma_schedule="karras", rho=rho, prediction_type="epsilon",
                              final_sigmas_type="zero")
    ramp = karras_ramp(sigmas, sigmas[0], sigmas[-1], rho)
    ramp[0], ramp[-1] = 0.0, 1.0
    other = EDMEulerScheduler.from_config(sched.config)
    other.set_timesteps(k)
    sched.set_timesteps(sigmas=torch.tensor(ramp, dtype=torch.float64))
    _check_levels(sched.sigmas[:-1], sigmas, "EDMEulerScheduler with a custom ramp")
    # the exact loop's timesteps map to what the student's UNet saw; pipe()'s too when the first layer
    # has room (pipe() visits nearby levels when the student's are not a k-point Karras ramp)
    t_old, t_exact, t_pipe = own_unet_timesteps(sigmas), sched.timesteps.float(), other.timesteps.float()
    same = torch.equal(t_pipe, t_exact)
    fits = [] if same else [(torch.cat([t_exact, t_pipe]), torch.cat([t_old, t_old]))]
    for t_new, t_tgt in [*fits, (t_exact, t_old)]:
        fitted = copy.deepcopy(unet)
        residual = refit_time_embedding(fitted, t_new, t_tgt)
        if residual <= 1e-5:
            break
    unet, pipe_fitted = fitted, same or len(t_new) > k
    if not residual <= 1e-5:
        raise ModelError(f"re-fitting the UNet's time embedding to {k} timesteps left a relative residual "
                         f"{residual:.2g}; the UNet's first channel count is too small for {k} levels")
    pipe_sigmas = [float(s) for s in other.sigmas[:-1]]
    s0 = sigmas[0]
    notes = [f"pipe(num_inference_steps={k}) starts from sqrt(sigma_max^2 + 1) z (EDMEulerScheduler's "
             f"init_noise_sigma) where fewstep starts at sigma_0 z: a factor {math.sqrt(1 + s0 ** -2):.8f} "
             f"on the first input, and visits the levels {[round(s, 6) for s in pipe_sigmas]}"
             + ("" if pipe_fitted else " at timesteps the time embedding was not re-fitted for (the UNet's "
                                       "first layer has no room for both sets)")
             + "; fewstep.models.export_diffusers.sample_exported with the recorded set_timesteps samples "
               "the student exactly"]
    return Plan(unet, sched, "edm_euler", False, notes,
                set_timesteps={"sigmas": ramp}, pipe_sigmas=pipe_sigmas)


def plan_export(G, sigmas: list[float], renoise: str) -> Plan:
    from fewstep.core.precond import EDMPrecond
    from fewstep.models.adapters import DiffusersDDPMDenoiser, DiffusersFlowDenoiser
    from fewstep.models.unet import UNetRaw

    if isinstance(G, DiffusersDDPMDenoiser):
        return _ddpm_plan(G, sigmas, renoise)
    if isinstance(G, EDMPrecond) and isinstance(G.net, UNetRaw):
        return _own_unet_plan(G, sigmas, renoise)
    if isinstance(G, DiffusersFlowDenoiser):
        raise ModelError("students of flow-matching teachers are not exported to diffusers yet: no "
                         "flow scheduler starts from sigma_0 z (see docs/bring-your-model.md)")
    net = type(getattr(G, "net", G)).__name__
    raise ModelError(f"this student's network ({net}) has no diffusers UNet2DModel form; export "
                     "--format diffusers takes students of diffusers UNet2DModel teachers and of fewstep "
                     "UNet teachers")


# --- sampling the export --------------------------------------------------------------------------------
def set_student_timesteps(scheduler, set_timesteps: dict) -> None:
    """``scheduler.set_timesteps`` with an export record's ``set_timesteps`` (JSON: EDMEulerScheduler's
    ``sigmas`` ramp must be a float64 tensor)."""
    kwargs = dict(set_timesteps)
    if "sigmas" in kwargs:
        kwargs["sigmas"] = torch.tensor(kwargs["sigmas"], dtype=torch.float64)
    scheduler.set_timesteps(**kwargs)


@torch.no_grad()
def sample_exported(unet, scheduler, z: torch.Tensor, class_labels=None, generator=None,
                    set_timesteps: dict | None = None, encoder_hidden_states=None) -> torch.Tensor:
    """The exact k-step sampler of an exported student with diffusers' own classes (the documented
    "few lines"): diffusers' loop after ``scheduler.set_timesteps(k)`` (or, given the export record's
    ``set_timesteps``, after :func:`set_student_timesteps`), started at fewstep's ``sigma_0 z``
    (``init_noise_sigma`` for Euler / CM; ``sigmas[0]`` for EDMEuler, whose init_noise_sigma is
    ``sqrt(sigma_max^2 + 1)``; for LCM ``sqrt(1 - abar_0) z``, which is sigma_0 z in VP units, where
    ``pipe()`` uses ``z``). ``generator`` draws the re-noising noise. Text students (a
    UNet2DConditionModel) take their prompts' ``encoder_hidden_states [B, L, d]`` instead of labels."""
    if set_timesteps is not None:
        set_student_timesteps(scheduler, set_timesteps)
    elif not getattr(scheduler, "num_inference_steps", None):
        raise ModelError("call scheduler.set_timesteps(k) first")
    name = type(scheduler).__name__
    x = z * scheduler.init_noise_sigma
    if name == "LCMScheduler":
        x = z * (1 - scheduler.alphas_cumprod[scheduler.timesteps[0]]) ** 0.5
    elif name == "EDMEulerScheduler":
        x = z * scheduler.sigmas[0]
    for t in scheduler.timesteps:
        cond = {"class_labels": class_labels} if encoder_hidden_states is None else \
            {"encoder_hidden_states": encoder_hidden_states}
        out = unet(scheduler.scale_model_input(x, t), t, **cond).sample
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def unet_class_labels(G, labels):
    """fewstep labels -> the exported UNet's class indices (a diffusers teacher's null slot is skipped)."""
    from fewstep.models.adapters import _UNetAdapter

    if labels is None:
        return None
    return G._labels(labels, len(labels), labels.device) if isinstance(G, _UNetAdapter) else labels


def student_on_diffusers_noise(student, shape, labels, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, fewstep's sample) with the noise drawn as diffusers draws it: one generator seeded ``seed``
    gives z, then one re-noising draw per step."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    noises = [torch.randn(shape, generator=g) for _ in range(student.num_steps - 1)]
    with torch.no_grad():
        return z, student(z, labels, noises=noises if student.renoise == "fresh" else None)


@torch.no_grad()
def verify_export(out: Path, student, G, n: int = 4,
                  set_timesteps: dict | None = None) -> tuple[float, float]:
    """Reload ``out`` with diffusers' own classes and compare :func:`sample_exported` with the student on
    ``n`` samples (same noise stream); refuses above ``CHECK_ATOL``. Also measures
    ``pipe(num_inference_steps=k)`` against the student's images (``output_type="np"``, [0, 1]).
    Returns (max |exact - student|, max |pipe image - student image|)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    shape = (n, c, *((size, size) if isinstance(size, int) else size))
    labels = torch.arange(n) % student.num_classes if student.num_classes else None
    z, ours = student_on_diffusers_noise(student, shape, labels, seed=0)
    g = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=g)  # z was the first draw
    theirs = sample_exported(pipe.unet, pipe.scheduler, z, unet_class_labels(G, labels), generator=g,
                             set_timesteps=set_timesteps or {"num_inference_steps": student.num_steps})
    diff = float((ours.double() - theirs.double()).abs().max())
    bound = CHECK_ATOL * max(1.0, float(ours.abs().max()))  # float32 rounding scales with the output
    if not diff <= bound:
        raise ModelError(f"the written pipeline in {out} differs from the student by {diff:.3g} "
                         f"(> {bound:.3g}); please report this")
    images = pipe(batch_size=n, class_labels=unet_class_labels(G, labels),
                  num_inference_steps=student.num_steps, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    pipe_diff = float(abs(images - (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max())
    return diff, pipe_diff


# --- writing ------------------------------------------------------------------------------------------
def _write_checked(plan: Plan, out: Path, student, G, steps: dict) -> tuple[float, float]:
    """Save the pipeline next to ``out``, check it (:func:`verify_export`), and only then move it to
    ``out``: a failed check leaves nothing behind."""
    import shutil

    from diffusers import ConsistencyModelPipeline
    from diffusers.utils import logging as diffusers_logging

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    level, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()  # the reload's accelerate / progress chatter is not the user's
    diffusers_logging.disable_progress_bar()
    try:
        ConsistencyModelPipeline(unet=plan.unet, scheduler=plan.scheduler).save_pretrained(partial)
        checks = verify_export(partial, student, G, set_timesteps=steps)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        diffusers_logging.set_verbosity(level)
        if bars:
            diffusers_logging.enable_progress_bar()
    if out.exists():
        out.rmdir()  # checked empty above
    partial.rename(out)
    return checks


def export_diffusers(run: str | Path, out: str | Path) -> dict:
    """``fewstep export RUN --format diffusers --out DIR``: write ``DIR`` (model_index.json, unet/,
    scheduler/, fewstep_export.json), check it, and return the export record."""
    from fewstep.models.io import load_model
    from fewstep.models.student import Student

    G, meta = load_model(run)
    if meta.get("role") != "student":
        raise ModelError(f"{run} is a teacher; export --format diffusers writes distilled students")
    G = G.float().eval()
    if hasattr(G, "prompts"):  # a text student: a StableDiffusionPipeline around its UNet
        from fewstep.models.export_text import export_text_student

        return export_text_student(run, out, G, meta)
    sigmas, renoise = [float(s) for s in meta["sigmas"]], meta.get("renoise", "fresh")
    plan = plan_export(G, sigmas, renoise)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; choose a new --out directory")
    k = len(sigmas)
    steps = plan.set_timesteps or {"num_inference_steps": k}
    check, pipe_check = _write_checked(plan, out, Student(G, sigmas, renoise=renoise).eval(), G, steps)
    call = f"timesteps={steps['timesteps']}" if "timesteps" in steps else f"num_inference_steps={k}"
    record = {"format": "fewstep-diffusers-export", "student": str(Path(run).resolve()),
              "pipeline": "ConsistencyModelPipeline", "scheduler": type(plan.scheduler).__name__,
              "steps": k, "sigmas": sigmas, "renoise": renoise, "pipeline_is_exact": plan.exact_pipeline,
              "set_timesteps": steps, "pipe_sigmas": plan.pipe_sigmas or sigmas,
              "self_check_max_abs_diff": check, "pipe_num_inference_steps_max_image_diff": pipe_check,
              "usage": f"DiffusionPipeline.from_pretrained(DIR)(batch_size=N, {call}, output_type='np')"
                       if "sigmas" not in steps else
                       "fewstep.models.export_diffusers.sample_exported(pipe.unet, pipe.scheduler, z, "
                       "set_timesteps=<set_timesteps of fewstep_export.json>) (exact; "
                       f"pipe(num_inference_steps={k}) approximately)",
              "notes": plan.notes + ([] if plan.exact_pipeline else [
                  f"measured on the self-check samples: pipe(num_inference_steps={k}) images differ from the "
                  f"student's by at most {pipe_check:.2g} (images in [0, 1])"])}
    (out / "fewstep_export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
