"""Text-to-image pipelines in the Stable Diffusion layout (models/text.py, issue 19), tiny and untrained.

* the directory fewstep writes is a StableDiffusionPipeline: diffusers loads it and samples it;
* the CLIP tokenizer fewstep writes makes every prompt word one token (no unknown, round trip);
* the loaded denoiser D(x, sigma, text embeddings) sampled with fewstep's Euler equals diffusers' own
  loops on the same UNet, embeddings and noise -- DDIM in float64, and the pipeline's own call
  (Euler scheduler, classifier-free guidance with the empty prompt) in float32 -- with and without
  guidance;
* refusals are one-line ModelErrors.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from fewstep.core.sampling import sample_euler
from fewstep.core.schedules import cfg_denoised
from fewstep.errors import ModelError
from fewstep.models.adapters import load_diffusers_teacher
from fewstep.models.text import (
    DIGIT_NAMES,
    NULL_PROMPT,
    TEMPLATES,
    build_text_pipeline,
    load_text_pipeline,
    prompts_for_label,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
PROMPT = "a handwritten seven"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny untrained AutoencoderKL configured as `fewstep vae` configures it (28 px -> 4x7x7)."""
    from fewstep.train.vae import VAETrainConfig, build_vae

    torch.manual_seed(0)
    vae = build_vae(VAETrainConfig(channels=[8, 8, 8], norm_num_groups=8), channels_in=1, size=28)
    vae.register_to_config(scaling_factor=0.7)  # not 1, so that a forgotten scaling shows
    out = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def sd_dir(vae_dir, tmp_path_factory):
    return build_text_pipeline(tmp_path_factory.mktemp("sd") / "sd", vae_dir, seed=0)


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True).to(torch.float32)


@pytest.fixture(scope="module")
def teacher(sd_dir):
    return load_text_pipeline(sd_dir)


def _noise(shape, seed=1, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- the directory is a StableDiffusionPipeline -----------------------------------------------------
def test_diffusers_loads_and_samples_the_directory(sd_dir, pipe):
    for name in ("model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json", "vae/config.json",
                 "scheduler/scheduler_config.json"):
        assert (sd_dir / name).is_file(), name
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.safety_checker is None
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # SD refuses sizes that are not multiples of 8; 32 px is 8x8 latents, a 7x7 latent gives 28 px
    with pytest.raises(ValueError, match="divisible by 8"):
        pipe(PROMPT, num_inference_steps=2, output_type="np")
    g = torch.Generator().manual_seed(0)
    img = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=g, height=32, width=32).images
    with torch.no_grad():
        decoded = pipe.vae.decode(torch.zeros(1, 4, 8, 8)).sample
    assert img.shape == (1, 32, 32, 1) and img.shape[1:3] == decoded.shape[2:]
    z = _noise((2, 4, 7, 7), dtype=torch.float32)
    img = pipe([PROMPT, "the digit 3"], num_inference_steps=2, output_type="np", height=32, width=32,
               latents=z).images
    assert img.shape == (2, 28, 28, 1) and np.isfinite(img).all() and 0 <= img.min() <= img.max() <= 1


# --- the tokenizer ---------------------------------------------------------------------------------
def _expected_tokens(prompt):
    """CLIP's pre-tokenizer splits off punctuation and single numerals; each piece ends in </w>."""
    return [w + "</w>" for w in prompt.lower().replace(",", " ,").split()]


def test_every_prompt_word_is_one_token_and_round_trips(sd_dir, pipe, tmp_path):
    tok = pipe.tokenizer
    only_files = tmp_path / "tok"  # the two files real SD checkpoints ship, without tokenizer.json
    only_files.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(sd_dir / "tokenizer" / name, only_files / name)
    reloaded = transformers.CLIPTokenizer.from_pretrained(only_files, local_files_only=True)
    assert tok.model_max_length == pipe.text_encoder.config.max_position_embeddings == 16
    prompts = [p for c in range(10) for p in prompts_for_label(c)]
    assert len(prompts) == 10 * len(TEMPLATES) and "the digit 7" in prompts_for_label(7)
    assert all(DIGIT_NAMES[c] in " ".join(prompts_for_label(c)) for c in range(10))
    for p in prompts:
        ids = tok(p).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) <= 16
        assert tok.convert_ids_to_tokens(ids[1:-1]) == _expected_tokens(p), p
        assert tok.eos_token_id not in ids[1:-1]  # <|endoftext|> is also CLIP's unknown token
        assert tok.decode(ids, skip_special_tokens=True) == " ".join(_expected_tokens(p)).replace("</w>", "")
        assert reloaded(p).input_ids == ids  # the vocab.json + merges.txt alone give the same ids
    assert tok(NULL_PROMPT).input_ids == [tok.bos_token_id, tok.eos_token_id]
    assert tok("HANDWRITTEN  Seven").input_ids == tok(PROMPT.split(" ", 1)[1]).input_ids  # lower-cased
    # a word outside the vocabulary falls back to letters (byte alphabet), never to the unknown token
    assert tok.eos_token_id not in tok("zebra").input_ids[1:-1]


# --- the loader --------------------------------------------------------------------------------------
def test_encode_prompts_is_the_pipelines_encoding_and_is_cached(teacher, pipe, monkeypatch):
    prompts = [PROMPT, NULL_PROMPT, PROMPT]
    emb = teacher.encode_prompts(prompts)
    ref, ref_neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=None)
    assert emb.shape == (3, 16, 64)
    torch.testing.assert_close(emb[0], ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[1], ref_neg[0], rtol=0, atol=1e-6)  # "" = diffusers' negative
    torch.testing.assert_close(emb[2], emb[0], rtol=0, atol=0)
    assert (emb[0] - emb[1]).abs().max() > 1e-2  # the prompt matters
    monkeypatch.setattr(type(teacher), "_encode", lambda self, p: pytest.fail(f"re-encoded {p}"))
    torch.testing.assert_close(teacher.encode_prompts([NULL_PROMPT, PROMPT]), emb[[1, 0]])
    assert teacher.scaling_factor == pytest.approx(0.7)


def _guided(D, null_emb, w):
    """Classifier-free guidance in denoiser space with the empty prompt's embedding (core/guidance.py)."""
    def Dw(x, sigma, cond):
        if w == 1:
            return D(x, sigma, cond)
        return cfg_denoised(D(x, sigma, null_emb.expand_as(cond)), D(x, sigma, cond), w)
    return Dw


def _eps_cfg(unet, x, t, emb, null_emb, w):
    eps = unet(x, t, encoder_hidden_states=emb).sample
    if w == 1:
        return eps
    return eps + (w - 1) * (eps - unet(x, t, encoder_hidden_states=null_emb.expand_as(emb)).sample)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_euler_equals_diffusers_ddim_loop_float64(sd_dir, w):
    """DDIM (eta = 0) is Euler in EDM coordinates (Karras et al. 2022, section 3): diffusers'
    DDIMScheduler loop with the pipeline's UNet and text embeddings, in float64, equals fewstep's Euler
    on the loaded denoiser over the same timesteps (guidance on eps = guidance on D: it is affine)."""
    teacher = load_text_pipeline(sd_dir)  # own copy: converted to float64 here
    D = teacher.denoiser.double()
    emb = teacher.encode_prompts([PROMPT, "the digit 3", "nine, written thinly"]).double()
    null = teacher.encode_prompts([NULL_PROMPT]).double()
    sched = diffusers.DDIMScheduler.from_config(teacher.denoiser.scheduler_config, clip_sample=False,
                                                set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(4)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    abar = sched.alphas_cumprod
    a = abar[sched.timesteps]
    sigmas = torch.cat([((1 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x_vp = _noise((3, 4, 7, 7))
    with torch.no_grad():
        ours = sample_euler(_guided(D, null, w), x_vp / a[0].sqrt(), sigmas, emb)
        x = x_vp
        for t in sched.timesteps:
            x = sched.step(_eps_cfg(D.unet, x, t, emb, null, w), t, x, eta=0.0).prev_sample
        uncond = sample_euler(D, x_vp / a[0].sqrt(), sigmas, null.expand_as(emb))
    assert ours.shape == (3, 4, 7, 7)
    assert (ours - uncond).abs().max() > 1e-2  # the text reaches the UNet
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def pipe64(sd_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True).to(torch.float64)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_euler_equals_the_pipelines_own_call(sd_dir, pipe64, w):
    """StableDiffusionPipeline.__call__ itself (its EulerDiscreteScheduler, scale_model_input,
    guidance with the empty negative prompt) on 7x7 latents equals fewstep's Euler on the loaded
    denoiser from the same start ``z * init_noise_sigma`` over the scheduler's sigmas. Both in float64
    but for diffusers' Euler step, which computes in float32."""
    pipe, teacher = pipe64, load_text_pipeline(sd_dir)
    prompts = [PROMPT, "seven, written thickly"]
    z = _noise((2, 4, 7, 7), seed=3)
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=w, latents=z, height=32, width=32,
               output_type="latent").images
    sched = pipe.scheduler
    D = teacher.denoiser.double()
    emb, null = teacher.encode_prompts(prompts).double(), teacher.encode_prompts([NULL_PROMPT]).double()
    with torch.no_grad():
        ours = sample_euler(_guided(D, null, w), z.double() * float(sched.init_noise_sigma),
                            sched.sigmas.double(), emb)
    assert sched.sigmas[-1] == 0 and ref.shape == (2, 4, 7, 7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# --- refusals ----------------------------------------------------------------------------------------
def test_refusals_are_one_line(sd_dir, teacher, tmp_path):
    broken = tmp_path / "no_text_encoder"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelError, match=r"no text_encoder/ component") as e:
        load_text_pipeline(broken)
    assert "\n" not in str(e.value)
    (broken / "text_encoder").mkdir()
    config_file = broken / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "x"}))
    with pytest.raises(ModelError, match="unsupported prediction_type 'x'"):
        load_text_pipeline(broken)
    index = json.loads((sd_dir / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ModelError, match="unsupported unet class 'UNet2DModel'"):
        load_text_pipeline(broken)
    (broken / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": index["text_encoder"]}))
    with pytest.raises(ModelError, match="two-text-encoder pipeline"):
        load_text_pipeline(broken)
    with pytest.raises(ModelError, match="does not exist"):
        load_text_pipeline(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="UNet2DModel"):  # the class-label loader does not take it
        load_diffusers_teacher(sd_dir)
    with pytest.raises(ModelError, match=r"text embeddings \[B, L, d\]"):
        teacher.denoiser(torch.zeros(2, 4, 7, 7), torch.ones(2), torch.tensor([7, 3]))
    with pytest.raises(ModelError, match="no prompt"):
        prompts_for_label(10)
