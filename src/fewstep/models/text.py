"""Text-to-image teachers in the Stable Diffusion layout (issue 19): the parts, built locally, and a loader.

:func:`build_text_pipeline` writes a ``StableDiffusionPipeline`` directory (``model_index.json``,
``text_encoder/``, ``tokenizer/``, ``unet/``, ``vae/``, ``scheduler/``) made of the ecosystem's own
classes at a size two CPU cores can train: a ``transformers.CLIPTokenizer`` over a vocabulary fewstep
writes (no download), a small ``CLIPTextModel``, a small ``UNet2DConditionModel`` cross-attending to the
text encoder's hidden states, the VAE it is given (an ``AutoencoderKL`` directory such as
``fewstep vae`` writes) and an ``EulerDiscreteScheduler`` (epsilon prediction, SD's scaled-linear betas).
The weights are untrained; ``fewstep teacher --text`` (``train/text_teacher.py``) trains the UNet.

:func:`load_text_pipeline` reads such a directory -- this tiny one and, by construction, real SD 1.x/2.x
checkpoints (same layout and classes) -- into a :class:`TextTeacher`: a denoiser ``D(x, sigma, cond)``
(``models.adapters.DiffusersDDPMDenoiser``; ``cond`` = text hidden states ``[B, L, d]``), a cached
``encode_prompts`` and the VAE's scaling factor; ``models/text_cond.py`` puts it behind the engine's labels.

Latent size: the mnist28 VAE turns 28x28 images into 4x7x7 latents. The UNet has one down-sampling
(7 -> 4) and diffusers' UNet2DConditionModel up-samples to the skip connection's exact size when the
input is not a multiple of its total factor, so 7x7 goes in and comes out (checked in the tests).
Note: ``StableDiffusionPipeline.__call__`` refuses heights and widths that are not multiples of 8, so
``pipe(prompt)`` with its default 28x28 raises; ``pipe(prompt, height=32, width=32)`` samples 8x8
latents (32x32 images) and ``pipe(prompt, height=32, width=32, latents=z)`` with ``z [B, 4, 7, 7]``
samples the 7x7 latents the teacher is trained on (28x28 images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.errors import ModelError
from fewstep.models.adapters import (
    DiffusersDDPMDenoiser,
    _check_unet_dir,
    _load_unet,
    _read_json,
    alphas_cumprod_from_config,
    scheduler_kind,
)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {name}: the digit's English name, {digit}: the numeral (CLIP's pre-tokenizer splits numbers digit by digit)
TEMPLATES = (
    "a handwritten {name}",
    "the digit {digit}",
    "{name}, written thickly",
    "{name}, written thinly",
    "a neatly written {name}",
    "the number {name}",
)
NULL_PROMPT = ""  # the unconditional branch of classifier-free guidance, as diffusers' pipelines use it
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"  # CLIP's end-of-word marker
COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
CLASSES = {"text_encoder": ("CLIPTextModel",), "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
           "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL", "AutoencoderTiny")}


def prompts_for_label(label: int) -> list[str]:
    """The prompts of one digit class, one per template: for 7, ``"a handwritten seven"``, ``"the digit
    7"``, ``"seven, written thickly"``, ``"seven, written thinly"``, ``"a neatly written seven"``,
    ``"the number seven"``. The null condition is :data:`NULL_PROMPT` (``""``)."""
    label = int(label)
    if not 0 <= label < len(DIGIT_NAMES):
        raise ModelError(f"label {label} has no prompt; the digit prompts cover 0..{len(DIGIT_NAMES) - 1}")
    return [t.format(name=DIGIT_NAMES[label], digit=label) for t in TEMPLATES]


def _normal(prompt: str) -> str:
    """CLIP's tokenizer lower-cases and splits on white space: prompts equal under it are one prompt."""
    return " ".join(prompt.lower().split())


def prompt_class(prompt: str) -> int:
    """The inverse of :func:`prompts_for_label`: the digit class a template prompt names (case and
    spacing as the tokenizer sees them), or -1 for any other prompt."""
    if not _PROMPT_CLASS:
        _PROMPT_CLASS.update({_normal(p): c for c in range(len(DIGIT_NAMES)) for p in prompts_for_label(c)})
    return _PROMPT_CLASS.get(_normal(prompt), -1)


_PROMPT_CLASS: dict[str, int] = {}


def template_prompts(num_classes: int = len(DIGIT_NAMES)) -> list[str]:
    """Every template prompt of classes ``0..num_classes-1``: prompt ``c * len(TEMPLATES) + j`` is
    template ``j`` of class ``c`` (the prompt table a fewstep text teacher trains on)."""
    return [p for c in range(num_classes) for p in prompts_for_label(c)]


def prompt_words() -> list[str]:
    """Every word of every template (lower case; the comma and numerals are single characters, already
    in the byte alphabet), in first-seen order."""
    words: dict[str, None] = {}
    for label in range(len(DIGIT_NAMES)):
        for prompt in prompts_for_label(label):
            for w in prompt.replace(",", " ").split():
                if w.isalpha():
                    words.setdefault(w.lower())
    return list(words)


# --- the tokenizer ---------------------------------------------------------------------------------
def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary in which each of ``words`` is one token: (vocab, merges).

    Layout as CLIP's: the 256 byte-level characters, the same with ``</w>``, the merge results, then the
    two special tokens (so any text tokenizes without an unknown token, word by word or letter by letter).
    Merges build each word from its *end*: ``(c_k, c_{k+1}..c_n</w>)``. Every merge's right half ends in
    ``</w>``, so only the word's current suffix can ever merge, and a vocabulary word always ends as one
    token (merges built from the front would let the start of one word, "wr" of "written", fire
    inside another, "handwritten", and split it).
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + SUFFIX: len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = []
    for word in words:
        for k in range(len(word) - 2, -1, -1):
            left, right = word[k], word[k + 1:] + SUFFIX
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append(f"{left} {right}")
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return vocab, merges


def write_tokenizer(out: Path, words: list[str], max_length: int):
    """``vocab.json`` + ``merges.txt`` in ``out`` (the files real SD checkpoints ship) -> the
    ``CLIPTokenizer`` they load as (lower-casing, pad = ``<|endoftext|>`` as in SD)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(words)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return CLIPTokenizer.from_pretrained(out, model_max_length=max_length, pad_token=EOS,
                                         local_files_only=True)


# --- building the pipeline -------------------------------------------------------------------------
@dataclass
class TextPipelineConfig:
    """Sizes of the tiny pipeline (defaults: 7x7 latents, trainable on 2 CPU cores)."""

    hidden: int = 64              # text encoder width = the UNet's cross_attention_dim
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 16          # tokens per prompt incl. <|startoftext|>/<|endoftext|> (SD: 77)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # one down-sampling: 7 -> 4
    layers_per_block: int = 1
    attention_heads: int = 4      # diffusers' attention_head_dim (a head count, for legacy reasons)
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000


def latent_size(vae) -> int:
    """The latent side of the VAE's ``sample_size`` images: each encoder down-sampling (pad right and
    bottom by 1, 3x3 stride-2 conv) halves it rounding down (28 -> 14 -> 7)."""
    size = vae.config.sample_size
    size = size if isinstance(size, int) else size[0]
    for _ in range(len(vae.config.block_out_channels) - 1):
        size //= 2
    return size


def build_unet(cfg: TextPipelineConfig, in_channels: int, sample_size: int):
    """The SD UNet's block pattern, shrunk: cross-attention at the higher resolutions, a plain block at
    the lowest one, a cross-attention mid block."""
    from diffusers import UNet2DConditionModel

    n = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.hidden, attention_head_dim=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups)


def build_text_encoder(cfg: TextPipelineConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def build_scheduler(cfg: TextPipelineConfig):
    """SD 1.x's training noise (scaled-linear betas 0.00085..0.012, epsilon prediction); trailing
    spacing so that few-step sampling starts at the last training timestep (Lin et al. 2024, Table 2)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=0.00085,
                                  beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                                  timestep_spacing="trailing", steps_offset=1)  # SD's; unused by trailing


def build_text_pipeline(out: str | Path, vae_dir: str | Path, cfg: TextPipelineConfig | None = None,
                        seed: int = 0) -> Path:
    """Write an untrained tiny ``StableDiffusionPipeline`` to ``out`` around the VAE in ``vae_dir``
    (a diffusers ``AutoencoderKL``/``AutoencoderTiny`` folder, safetensors); returns ``out``."""
    from fewstep.data.latents import load_vae

    cfg = cfg or TextPipelineConfig()
    out = Path(out)
    vae = load_vae(vae_dir).module
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(out / "tokenizer", prompt_words(), cfg.max_length)
    save_text_pipeline(out, vae, build_text_encoder(cfg, tokenizer), tokenizer,
                       build_unet(cfg, vae.config.latent_channels, latent_size(vae)), build_scheduler(cfg))
    return out


def save_text_pipeline(out: str | Path, vae, text_encoder, tokenizer, unet, scheduler) -> Path:
    """fewstep's pipeline parts as a ``StableDiffusionPipeline`` directory (safetensors; no safety
    checker); the tokenizer's files are rewritten from fewstep's vocabulary."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out / "tokenizer", prompt_words(), tokenizer.model_max_length)  # vocab.json/merges.txt
    return out


# --- loading a pipeline directory ------------------------------------------------------------------
@dataclass
class TextTeacher:
    """A loaded text-to-image pipeline: ``denoiser(x, sigma, cond)`` with ``cond = encode_prompts(...)``
    (latent space, scaled by ``scaling_factor``), ``vae`` to decode, ``null_prompt`` for guidance."""

    path: Path
    denoiser: DiffusersDDPMDenoiser
    tokenizer: object = field(repr=False)
    text_encoder: torch.nn.Module = field(repr=False)
    vae: torch.nn.Module = field(repr=False)
    scaling_factor: float = 1.0
    null_prompt: str = NULL_PROMPT
    _cache: dict = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``[B, L, d]`` hidden states of the text encoder's last layer, as StableDiffusionPipeline's
        ``encode_prompt`` computes them (padded to ``model_max_length``, truncated beyond it); each
        distinct prompt is encoded once and cached (float32, CPU)."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            for p, h in zip(todo, self._encode(todo)):
                self._cache[p] = h
        return torch.stack([self._cache[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        # SD feeds the attention mask only to encoders configured with use_attention_mask
        mask = tok.attention_mask if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(tok.input_ids, attention_mask=mask)[0].float().cpu()


def _component_class(root: Path, index: dict, name: str) -> str:
    """The class model_index.json names for ``name``; refuses a missing entry or folder."""
    entry = index.get(name)
    if not (root / name).is_dir() or not isinstance(entry, list) or entry[-1] is None:
        raise ModelError(f"{root} has no {name}/ component; a Stable Diffusion pipeline directory needs "
                         f"{', '.join(c + '/' for c in COMPONENTS)} and model_index.json")
    return str(entry[-1])


def _check_components(root: Path) -> dict:
    if not (root / "model_index.json").is_file():
        raise ModelError(f"no model_index.json in {root}; give a directory written by "
                         "StableDiffusionPipeline.save_pretrained")
    index = _read_json(root / "model_index.json")
    if "text_encoder_2" in index:
        raise ModelError(f"{root} is a two-text-encoder pipeline ({index.get('_class_name')}, e.g. SDXL); "
                         "fewstep reads single-encoder SD 1.x/2.x pipelines so far")
    for name in COMPONENTS:
        cls = _component_class(root, index, name)
        if name in CLASSES and cls not in CLASSES[name]:
            raise ModelError(f"unsupported {name} class {cls!r} in {root}; fewstep reads "
                             f"{' or '.join(CLASSES[name])} (Stable Diffusion 1.x/2.x pipelines)")
    return index


def _check_unet_config(config: dict, hidden: int, latent_channels: int, root: Path) -> None:
    """What the adapter cannot feed: extra conditioning inputs (SDXL's text_time, image embeddings),
    a width mismatch with the text encoder, or extra input channels (inpainting UNets)."""
    for key in ("addition_embed_type", "encoder_hid_dim_type"):
        if config.get(key) is not None:
            raise ModelError(f"unsupported UNet in {root}: {key}={config[key]!r} needs conditioning inputs "
                             "besides the text embeddings; fewstep reads SD 1.x/2.x-style UNets")
    if config.get("cross_attention_dim") != hidden:
        raise ModelError(f"the UNet in {root} cross-attends to width {config.get('cross_attention_dim')} "
                         f"but the text encoder's hidden size is {hidden}; the components do not match")
    if config.get("in_channels") != latent_channels:
        raise ModelError(f"the UNet in {root} takes {config.get('in_channels')} input channels but the VAE "
                         f"has {latent_channels} latent channels (an inpainting or depth UNet?); give a "
                         "text-to-image pipeline")


def _from_pretrained(cls, path: Path, **kwargs):
    from transformers.utils import logging as tlog

    shown = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()  # transformers' per-load "Loading weights" bars: fewstep shows its own
    try:
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:  # transformers/diffusers raise many types for missing or corrupt files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {path}: {msg}") from None
    finally:
        if shown:
            tlog.enable_progress_bar()


def _scheduler_table(root: Path) -> tuple[torch.Tensor, str, dict]:
    """The scheduler's (alphas_cumprod, prediction_type, config); flow matching is refused here."""
    file = root / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise ModelError(f"no scheduler/scheduler_config.json in {root}")
    config = _read_json(file)
    if scheduler_kind(config) != "ddpm":
        raise ModelError(f"the scheduler in {root} is a flow-matching one; text pipelines are read with "
                         "DDPM-family schedulers (epsilon, v or sample prediction) so far")
    abar, prediction_type = alphas_cumprod_from_config(config)
    return abar, prediction_type, config


def load_text_pipeline(path: str | Path) -> TextTeacher:
    """An SD-style pipeline directory -> :class:`TextTeacher` (eval mode, no gradients). Safetensors
    weights only; refusals are one-line :class:`~fewstep.errors.ModelError` s."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"text pipeline directory {root} does not exist")
    index = _check_components(root)
    abar, prediction_type, sched_config = _scheduler_table(root)
    text_encoder = _from_pretrained(CLIPTextModel, root / "text_encoder", use_safetensors=True).eval()
    tokenizer = _from_pretrained(CLIPTokenizer, root / "tokenizer")
    vae = _from_pretrained(getattr(diffusers, index["vae"][-1]), root / "vae", use_safetensors=True,
                           low_cpu_mem_usage=False).eval()
    unet_config = _check_unet_dir(root / "unet", classes=CLASSES["unet"])
    _check_unet_config(unet_config, text_encoder.config.hidden_size, vae.config.latent_channels, root)
    unet = _load_unet(root / "unet", "UNet2DConditionModel")
    D = DiffusersDDPMDenoiser(unet, abar, prediction_type, scheduler_config=sched_config).eval()
    for m in (text_encoder, vae, D):
        m.requires_grad_(False)
    return TextTeacher(root, D, tokenizer, text_encoder, vae,
                       float(getattr(vae.config, "scaling_factor", 1.0) or 1.0))
