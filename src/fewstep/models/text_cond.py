"""Text conditions as the engine's labels: a prompt table in front of a text-to-image denoiser (issue 19).

The engine's ``cond`` is a ``LongTensor [B]`` (docs/architecture.md, "The denoiser contract"); a text
teacher's UNet2DConditionModel cross-attends to hidden states ``[B, L, d]``. :class:`PromptDenoiser` holds
the text encoder's output for a fixed list of prompts (encoded once, a buffer) and feeds prompt ``c``'s
embedding for label ``c`` and the empty prompt's for the null label ``-1`` -- the null condition of
classifier-free guidance, as diffusers' pipelines use it. So guidance (``core/guidance.py``), student
rollouts, every loss, checkpoints and exports see labels exactly as for a class-conditional teacher, and
the student and the fake score (deep copies of the teacher) are copies of its UNet2DConditionModel with
the same table: no loss and no engine file learns about text (DESIGN.md, "A method is sealed").

``cond_classes[c]`` is the data class prompt ``c`` names when it is one of fewstep's digit prompts
(``models.text.prompt_class``), else -1; the engine draws real images of that class for the real batch
(EL's MMD, CD's x0) and refuses when a prompt names none.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fewstep.core.precond import SIGMA_MIN
from fewstep.errors import ModelError
from fewstep.models.adapters import DiffusersDDPMDenoiser
from fewstep.models.text import NULL_PROMPT, prompt_class

TEXT_KEYS = {"type", "unet_config", "alphas_cumprod", "prediction_type", "quantize", "scheduler_config",
             "prompts", "embed_shape"}
TEXT_OPTIONAL = {"boundary": False, "boundary_sigma_min": SIGMA_MIN}


class PromptDenoiser(nn.Module):
    """``D(x, sigma, cond [B] prompt indices)`` over ``net`` (a text-conditional
    :class:`DiffusersDDPMDenoiser`); ``embeds [P + 1, L, d]`` are the prompts' hidden states, the last
    row the empty prompt's."""

    null_label = -1  # the empty prompt: core.guidance.NULL_ATTR

    def __init__(self, net: DiffusersDDPMDenoiser, embeds: torch.Tensor, prompts: list[str],
                 encoded: bool = True):
        super().__init__()
        if embeds.ndim != 3 or len(embeds) != len(prompts) + 1:
            raise ModelError(f"prompt embeddings {list(embeds.shape)} do not match {len(prompts)} prompts "
                             "plus the empty one")
        self.net, self.prompts = net, list(prompts)
        self.register_buffer("embeds", embeds.float().clone())
        self.register_buffer("cond_classes", torch.tensor([prompt_class(p) for p in prompts]),
                             persistent=False)
        self.num_classes = len(prompts)
        # encoded from a prompt list (not zeros awaiting saved weights): a resumed run's checkpoint
        # must then hold the same table, else the prompt file changed under the run
        self.encoded = encoded
        self.sigma_min, self.sigma_max, self.sigma_data = net.sigma_min, net.sigma_max, net.sigma_data
        self.shape = getattr(net, "shape", None)

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        saved = state.get(prefix + "embeds")
        if self.encoded and saved is not None and not torch.equal(saved.to(self.embeds), self.embeds):
            raise ModelError("the saved prompt table differs from the prompts given now (was the prompt "
                             "file edited after the run started?); restore the file or use a new --out")
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    @property
    def boundary(self) -> bool:  # consistency students switch the adapter's boundary scalings
        return self.net.boundary

    @boundary.setter
    def boundary(self, value: bool) -> None:
        self.net.boundary = bool(value)

    def hidden_states(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``[B, L, d]`` for prompt indices ``cond [B]`` (``None`` / ``-1``: the empty prompt)."""
        null = len(self.prompts)
        if cond is None:
            return self.embeds[null].expand(batch, *self.embeds.shape[1:])
        cond = torch.as_tensor(cond, device=self.embeds.device)
        if cond.is_floating_point() or cond.ndim != 1:
            raise ModelError("this text teacher takes prompt indices [B] as cond (the engine's labels)")
        if (cond >= null).any():
            raise ModelError(f"prompt index {int(cond.max())} is out of range: {null} prompts")
        return self.embeds[torch.where(cond < 0, torch.full_like(cond, null), cond)]

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, sigma, self.hidden_states(cond, x.shape[0]))

    @property
    def spec(self) -> dict:
        """The model.json spec (``type: text``) that rebuilds this denoiser (the table is in the weights)."""
        D = self.net
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(D.unet.config).items()
                  if not k.startswith("_")}
        return {"type": "text", "unet_config": config,
                "alphas_cumprod": (1 / (1 + D.sigma_table.double() ** 2)).tolist(),
                "prediction_type": D.prediction_type, "quantize": D.quantize,
                "scheduler_config": D.scheduler_config, "prompts": self.prompts,
                "embed_shape": list(self.embeds.shape[1:]), "boundary": D.boundary,
                "boundary_sigma_min": D.boundary_sigma_min}


def normalize_text_spec(spec: dict) -> dict:
    missing, unknown = sorted(TEXT_KEYS - set(spec)), sorted(set(spec) - TEXT_KEYS - set(TEXT_OPTIONAL))
    if missing or unknown:
        raise ModelError(f"text model spec: missing {missing}, unknown {unknown}")
    return {**TEXT_OPTIONAL, **spec}


def build_text_denoiser(spec: dict) -> PromptDenoiser:
    """Inverse of :attr:`PromptDenoiser.spec` (fresh UNet weights, zero embeddings until loaded)."""
    from diffusers import UNet2DConditionModel

    spec = normalize_text_spec(spec)
    try:
        unet = UNet2DConditionModel.from_config(spec["unet_config"])
        net = DiffusersDDPMDenoiser(unet, torch.tensor(spec["alphas_cumprod"], dtype=torch.float64),
                                    spec["prediction_type"], bool(spec["quantize"]),
                                    boundary=bool(spec["boundary"]),
                                    boundary_sigma_min=float(spec["boundary_sigma_min"]),
                                    scheduler_config=spec["scheduler_config"])
        embeds = torch.zeros(len(spec["prompts"]) + 1, *spec["embed_shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"cannot rebuild the text model from its spec ({e})") from None
    return PromptDenoiser(net, embeds, spec["prompts"], encoded=False)


def prompt_denoiser(teacher, prompts: list[str]) -> PromptDenoiser:
    """A loaded :class:`~fewstep.models.text.TextTeacher` with ``prompts`` encoded once (and the empty
    prompt) as a :class:`PromptDenoiser`."""
    return PromptDenoiser(teacher.denoiser, teacher.encode_prompts([*prompts, NULL_PROMPT]), prompts)


def with_prompts(D: PromptDenoiser, prompts: list[str], teacher: str | Path) -> PromptDenoiser:
    """``D`` (a text student's network) with ``prompts`` encoded by the text encoder of the pipeline
    ``teacher`` it was distilled from (the student's own UNet; new prompts need no retraining to be
    tried, though the student was trained on its own table's prompts)."""
    from fewstep.models.text import load_text_pipeline

    if not isinstance(D, PromptDenoiser):
        raise ModelError("--prompts needs a text model (a text teacher or its student); this one takes "
                         "class labels: omit --prompts")
    fresh = prompt_denoiser(load_text_pipeline(teacher), prompts)
    return PromptDenoiser(D.net, fresh.embeds, prompts).eval()


def read_prompts(path: str | Path) -> list[str]:
    """A prompt file: one prompt per line (surrounding spaces and blank lines dropped; duplicates kept,
    so a repeated line is drawn more often). One-line errors for a missing or empty file."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"prompt file {p} does not exist; give a text file with one prompt per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read prompt file {p} ({e}); give a UTF-8 text file") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ModelError(f"prompt file {p} has no prompts; write one prompt per line")
    return prompts
