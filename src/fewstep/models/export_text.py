"""A text student as a ``StableDiffusionPipeline`` directory (``fewstep export RUN --format diffusers``).

The teacher pipeline's tokenizer, text encoder and VAE around the student's own UNet2DConditionModel,
with the scheduler that samples it in k steps: the plan of students of diffusers DDPM-family teachers
(``export_diffusers._ddpm_plan``): ``ddim`` students get an ``EulerDiscreteScheduler`` on a table that
holds their k levels (the pipeline's ``latents * init_noise_sigma`` is fewstep's ``sigma_0 z``, so
``pipe(prompt, num_inference_steps=k, guidance_scale=1, latents=z)`` is the student exactly); ``fresh``
students get an ``LCMScheduler`` (the pipeline starts from ``z`` where fewstep starts from ``sigma_0 z``;
``export_diffusers.sample_exported`` with the prompts' hidden states is exact). The UNet's time
embedding is re-fitted to the exported timesteps in both. ``guidance_scale=1``: the student learned the
guided distribution when distilled with ``--guidance`` and samples unguided. As the teacher pipeline,
7x7 latents need ``latents=z`` and a height/width that is a multiple of 8 (``models/text.py``).

Every export is checked before it is moved into place: the written pipeline, reloaded by diffusers,
is run against the student on a few samples of its prompts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from fewstep.errors import ModelError
from fewstep.models.export_diffusers import (
    CHECK_ATOL,
    _ddpm_plan,
    sample_exported,
    student_on_diffusers_noise,
)


def pipeline_size(pipe, latent: int) -> int:
    """The height/width the pipeline accepts for ``latent``-sized latents given as ``latents=``: the VAE
    factor times the side, rounded up to a multiple of 8 (its check; given latents are used as they are)."""
    return 8 * math.ceil(pipe.vae_scale_factor * latent / 8)


@torch.no_grad()
def verify_text_export(out: Path, student, G, n: int = 4) -> tuple[float, float]:
    """(max |exact loop - student|, max |pipe(...) latents - student|) on ``n`` samples of the student's
    prompts; refuses the first above ``CHECK_ATOL``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(n) % len(G.prompts)
    prompts = [G.prompts[i] for i in labels.tolist()]
    emb = pipe.encode_prompt(prompts, "cpu", 1, False)[0]  # the pipeline's own text encoding
    shape = (n, *G.shape)
    z, ours = student_on_diffusers_noise(student, shape, labels, seed=0)
    g = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=g)  # z was the first draw
    theirs = sample_exported(pipe.unet, pipe.scheduler, z, generator=g, encoder_hidden_states=emb,
                             set_timesteps={"num_inference_steps": student.num_steps})
    diff = float((ours.double() - theirs.double()).abs().max())
    bound = CHECK_ATOL * max(1.0, float(ours.abs().max()))
    if not diff <= bound:
        raise ModelError(f"the written pipeline in {out} differs from the student by {diff:.3g} "
                         f"(> {bound:.3g}); please report this")
    size = pipeline_size(pipe, shape[-1])
    lat = pipe(prompts, num_inference_steps=student.num_steps, guidance_scale=1.0, latents=z, height=size,
               width=size, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    return diff, float((lat.double() - ours.double()).abs().max())


def _write(out: Path, parts, plan, student, G) -> tuple[float, float]:
    from fewstep.models.text import save_text_pipeline

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save_text_pipeline(partial, parts.vae, parts.text_encoder, parts.tokenizer, plan.unet, plan.scheduler)
        checks = verify_text_export(partial, student, G)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # checked empty by the caller
    partial.rename(out)
    return checks


def export_text_student(run, out, G, meta: dict) -> dict:
    """Write, check and describe the pipeline of text student ``G`` (a ``PromptDenoiser``)."""
    from fewstep.models.student import Student
    from fewstep.models.text import load_text_pipeline

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; choose a new --out directory")
    teacher = meta.get("teacher") or ""
    if not (Path(teacher) / "model_index.json").is_file():
        raise ModelError(f"the text student's teacher pipeline {teacher!r} is gone; its tokenizer, text "
                         "encoder and VAE are part of the export: restore it")
    sigmas, renoise = [float(s) for s in meta["sigmas"]], meta.get("renoise", "fresh")
    plan = _ddpm_plan(G.net, sigmas, renoise)
    k = len(sigmas)
    check, pipe_check = _write(out, load_text_pipeline(teacher), plan, Student(G, sigmas, renoise).eval(), G)
    record = {"format": "fewstep-diffusers-export", "student": str(Path(run).resolve()),
              "pipeline": "StableDiffusionPipeline", "scheduler": type(plan.scheduler).__name__,
              "steps": k, "sigmas": sigmas, "renoise": renoise, "pipeline_is_exact": plan.exact_pipeline,
              "set_timesteps": {"num_inference_steps": k}, "pipe_sigmas": sigmas, "prompts": G.prompts,
              "self_check_max_abs_diff": check, "pipe_num_inference_steps_max_latent_diff": pipe_check,
              "usage": f"StableDiffusionPipeline.from_pretrained(DIR)(prompt, num_inference_steps={k}, "
                       f"guidance_scale=1, latents=z, height=H, width=W)",
              "notes": plan.notes + ["7x7 latents: pass latents=z [B, 4, 7, 7] and height=width=32 (the "
                                     "pipeline takes multiples of 8 only)"]}
    (out / "fewstep_export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
