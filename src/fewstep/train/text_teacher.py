"""Text-to-image teachers trained by fewstep (issue 19): ``fewstep teacher --data mnist28 --text --vae DIR``.

The parts are the ecosystem's (``models.text.build_text_pipeline``: a CLIPTokenizer over fewstep's
vocabulary, a small CLIPTextModel, a small UNet2DConditionModel, the given VAE, an
EulerDiscreteScheduler), initialised from the run seed. Only the UNet trains, on the VAE's cached
latents of the data; the text encoder stays frozen at its random initialisation, as Stable Diffusion
keeps its CLIP encoder frozen (Rombach et al. 2022, section 4.3.2): distinct prompts still give distinct
hidden states (tests/test_text_teacher.py checks it), which is all cross-attention needs to tell them
apart. Each distinct prompt is encoded once (``models/text_cond.py``).

Conditions: each training image of class ``c`` gets a template of its class drawn from the step's
``template`` stream (prompt ``c * len(TEMPLATES) + j`` of ``models.text.template_prompts``), then prompt
dropout to the empty prompt with probability ``train.p_uncond`` (``train.teacher.drop_labels``).

The output directory is the ``StableDiffusionPipeline`` layout with the EMA UNet (diffusers loads and
samples it) plus fewstep's model.json / model.safetensors (the UNet with its training prompts' table:
what ``load_teacher``, ``eval``, ``sample`` and ``distill`` without ``--prompts`` read) and the run files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fewstep.core.utils import append_dims
from fewstep.data import Dataset
from fewstep.errors import ConfigError
from fewstep.models.text import (
    DIGIT_NAMES,
    TEMPLATES,
    TextPipelineConfig,
    TextTeacher,
    build_text_pipeline,
    load_text_pipeline,
    save_text_pipeline,
    template_prompts,
)
from fewstep.models.text_cond import PromptDenoiser, prompt_denoiser


def build_text_teacher(cfg, data: Dataset, seed: int) -> tuple[PromptDenoiser, TextTeacher]:
    """The untrained pipeline (sizes from ``model.channels`` / ``model.layers_per_block``) loaded as a
    trainable :class:`PromptDenoiser` over the data's template prompts, and its parts (for export)."""
    if not data.is_latent:
        raise ConfigError("--text trains on VAE latents; pass --vae DIR")
    if not 0 < data.num_classes <= len(DIGIT_NAMES):
        raise ConfigError(f"--text needs digit labels 0..9 (the prompts name digits); '{data.name}' has "
                          f"{data.num_classes} classes")
    sizes = TextPipelineConfig(channels=list(cfg.model.channels), layers_per_block=cfg.model.layers_per_block)
    with tempfile.TemporaryDirectory(prefix="fewstep-text-") as tmp:  # everything is read into memory
        with torch.random.fork_rng(devices=[]):
            build_text_pipeline(Path(tmp) / "sd", cfg.data.vae, sizes, seed=seed)
        parts = load_text_pipeline(Path(tmp) / "sd")
    net = prompt_denoiser(parts, template_prompts(data.num_classes))
    net.net.unet.requires_grad_(True)
    return net.train(), parts


def template_conditions(y: torch.Tensor, rnd) -> torch.Tensor:
    """Labels ``[B]`` -> prompt indices ``[B]``: a template of each image's class, drawn uniformly from
    the step's ``template`` stream (for the global batch, sliced: independent of the process count)."""
    j = rnd.randint("template", 0, len(TEMPLATES)).to(y.device)
    return y * len(TEMPLATES) + j


def ddpm_eps_loss(D, x: torch.Tensor, cond, rnd, sigma_table: torch.Tensor) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14) per sample ``[B]``: ``t ~ U{0..T-1}``,
    ``mean ||eps - eps_hat(x_t, t)||^2``, written through the denoiser contract.

    Why this and not EDM's loss: it is the objective the pipeline's scheduler (and every SD checkpoint
    users bring, diffusers' train_text_to_image.py) trains with, uniform over the training timesteps,
    so the net is right where the scheduler samples: from sigma_T = 14.6, which EDM's log-normal draw
    (ln sigma ~ N(-1.2, 1.2^2): ln 14.6 is 3.2 standard deviations up) reaches in under 0.1% of draws.
    Through D it is exact: in EDM space ``x = y + sigma_t n`` is ``x_t / sqrt(abar_t)`` and
    ``eps_hat = (x - D) / sigma_t``, so ``n - eps_hat = (D - y) / sigma_t``
    (the adapter feeds the UNet the integer timestep of the table's sigma back)."""
    t = rnd.randint("t", 0, len(sigma_table)).cpu()
    sigma = sigma_table[t].to(device=x.device, dtype=x.dtype)
    s = append_dims(sigma, x.ndim)
    D_x = D(x + s * rnd.randn("noise", *x.shape[1:]).to(x), sigma, cond)
    return ((D_x - x) / s).square().flatten(1).mean(1)


def export_text_pipeline(out: Path, parts: TextTeacher, ema: PromptDenoiser) -> None:
    """The pipeline directory around the EMA UNet (the scheduler from the adapter's config)."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(ema.net.scheduler_config)
    save_text_pipeline(out, parts.vae, parts.text_encoder, parts.tokenizer, ema.net.unet, scheduler)
