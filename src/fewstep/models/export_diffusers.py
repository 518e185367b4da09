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
    kind: str                      # "euler" | "lcm" | "cm"
    exact_pipeline: bool
    notes: list[str] = field(default_factory=list)


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
    from diffusers import UNet2DModel

    copy = UNet2DModel.from_config(unet.config)
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


def _own_unet_plan(G, sigmas: list[float], renoise: str) -> Plan:
    """Students of fewstep's own UNet teachers (EDMPrecond around UNetRaw)."""
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel

    k = len(sigmas)
    if k > 2 or (k == 2 and renoise != "fresh"):
        raise ModelError(f"a {k}-step {renoise} student of a fewstep UNet teacher has no diffusers "
                         "scheduler that reproduces it (CMStochasticIterativeScheduler holds 1-step students "
                         "and 2-step fresh ones); see docs/bring-your-model.md")
    raw = G.net.unet
    config = {kk: v for kk, v in dict(raw.config).items() if not kk.startswith("_")}
    num_classes = int(G.num_classes or 0)
    config.update(class_embed_type=None, num_class_embeds=num_classes or None)
    unet = UNet2DModel.from_config(config)
    state = raw.state_dict()
    if num_classes:  # fewstep's bias-free Linear(one-hot) is an embedding table: W[:, c]
        state["class_embedding.weight"] = G.net.embed_label.weight.detach().T.contiguous()
    unet.load_state_dict(state)
    sigma_min = float(G.boundary_sigma_min) if G.boundary else 0.0
    n, rho = _cm_grid(sigmas, sigma_min)
    sched = CMStochasticIterativeScheduler(num_train_timesteps=n, sigma_min=sigma_min, sigma_max=sigmas[0],
                                           sigma_data=float(G.sigma_data), rho=rho, clip_denoised=False)
    sched.set_timesteps(k)
    _check_levels(sched.sigmas[:-1], sigmas, "CMStochasticIterativeScheduler")
    if k == 2:  # CM re-noises with sqrt(sigma^2 - sigma_min^2)
        _check_levels([math.sqrt(sigmas[1] ** 2 - sigma_min**2)], sigmas[1:], "CM re-noising")
    return Plan(unet.float().eval(), sched, "cm", True)


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
@torch.no_grad()
def sample_exported(unet, scheduler, z: torch.Tensor, class_labels=None, generator=None) -> torch.Tensor:
    """The exact k-step sampler of an exported student with diffusers' own classes (the documented
    "few lines"): diffusers' loop after ``scheduler.set_timesteps(k)``, started at fewstep's ``sigma_0 z``
    (``init_noise_sigma`` for Euler / CM; for LCM ``sqrt(1 - abar_0) z``, which is sigma_0 z in VP units,
    where ``pipe()`` uses ``z``). ``generator`` draws the re-noising noise."""
    if not getattr(scheduler, "num_inference_steps", None):
        raise ModelError("call scheduler.set_timesteps(k) first")
    x = z * scheduler.init_noise_sigma
    if type(scheduler).__name__ == "LCMScheduler":
        x = z * (1 - scheduler.alphas_cumprod[scheduler.timesteps[0]]) ** 0.5
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, class_labels=class_labels).sample
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
def verify_export(out: Path, student, G, n: int = 4) -> float:
    """Reload ``out`` with diffusers' own classes and compare :func:`sample_exported` with the student on
    ``n`` samples (same noise stream). Returns the max |difference|; refuses above ``CHECK_ATOL``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    shape = (n, c, *((size, size) if isinstance(size, int) else size))
    labels = torch.arange(n) % student.num_classes if student.num_classes else None
    z, ours = student_on_diffusers_noise(student, shape, labels, seed=0)
    g = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=g)  # z was the first draw
    pipe.scheduler.set_timesteps(student.num_steps)
    theirs = sample_exported(pipe.unet, pipe.scheduler, z, unet_class_labels(G, labels), generator=g)
    diff = float((ours.double() - theirs.double()).abs().max())
    bound = CHECK_ATOL * max(1.0, float(ours.abs().max()))  # float32 rounding scales with the output
    if not diff <= bound:
        raise ModelError(f"the written pipeline in {out} differs from the student by {diff:.3g} "
                         f"(> {bound:.3g}); please report this")
    return diff


# --- writing ------------------------------------------------------------------------------------------
def export_diffusers(run: str | Path, out: str | Path) -> dict:
    """``fewstep export RUN --format diffusers --out DIR``: write ``DIR`` (model_index.json, unet/,
    scheduler/, fewstep_export.json), check it, and return the export record."""
    from diffusers import ConsistencyModelPipeline

    from fewstep.models.io import load_model
    from fewstep.models.student import Student

    G, meta = load_model(run)
    if meta.get("role") != "student":
        raise ModelError(f"{run} is a teacher; export --format diffusers writes distilled students")
    G = G.float().eval()
    sigmas, renoise = [float(s) for s in meta["sigmas"]], meta.get("renoise", "fresh")
    plan = plan_export(G, sigmas, renoise)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; choose a new --out directory")
    ConsistencyModelPipeline(unet=plan.unet, scheduler=plan.scheduler).save_pretrained(out)
    check = verify_export(out, Student(G, sigmas, renoise=renoise).eval(), G)
    k = len(sigmas)
    record = {"format": "fewstep-diffusers-export", "student": str(Path(run).resolve()),
              "pipeline": "ConsistencyModelPipeline", "scheduler": type(plan.scheduler).__name__,
              "steps": k, "sigmas": sigmas, "renoise": renoise, "pipeline_is_exact": plan.exact_pipeline,
              "self_check_max_abs_diff": check,
              "usage": f"DiffusionPipeline.from_pretrained(DIR)(batch_size=N, num_inference_steps={k}, "
                       "output_type='np')", "notes": plan.notes}
    (out / "fewstep_export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
