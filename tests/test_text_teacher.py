"""Text teachers trained by fewstep (issue 19, train/text_teacher.py, models/text_cond.py).

* `fewstep teacher --data mnist28 --text --vae DIR` writes a StableDiffusionPipeline directory whose UNet
  is the trained EMA (diffusers loads and samples it) and a model.json that load_teacher reads;
* the frozen random text encoder gives every prompt (and the empty one) its own embedding;
* the training conditions are templates of each image's class, dropped to the empty prompt at p_uncond;
* the loss is diffusers' epsilon MSE on its own noised latents, written through D;
* a resumed run equals an uninterrupted one;
* user mistakes are one-line exit-2 errors.
"""

import pytest
import torch

from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.models.io import load_teacher
from fewstep.models.text import TEMPLATES, prompt_class, prompts_for_label, template_prompts
from fewstep.recipe import teacher_config
from fewstep.train.rng import StepRandom
from fewstep.train.teacher import build_teacher_net, train_teacher
from fewstep.train.text_teacher import ddpm_eps_loss, template_conditions

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
TINY = ["train.batch=8", "model.channels=[16,32]", "train.log_every=1", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from fewstep.train.vae import VAETrainConfig, build_vae

    torch.manual_seed(0)
    vae = build_vae(VAETrainConfig(channels=[8, 8, 8], norm_num_groups=8), channels_in=1, size=28)
    out = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(out, safe_serialization=True)
    # encode and cache the latents now: a run that encodes them was seen to differ from one that reads
    # the cache by float32 rounding (~3e-8 after 4 steps), which the resume test would take for a bug
    load_dataset("mnist28", conditional=True, vae=out)
    return out


def _train(vae_dir, out, iters, *extra):
    cfg = teacher_config("mnist28", [*TINY, f"train.iters={iters}", *extra], vae=str(vae_dir), text=True)
    return train_teacher(cfg, out, progress=False)


@pytest.fixture(scope="module")
def run(vae_dir, tmp_path_factory):
    return _train(vae_dir, tmp_path_factory.mktemp("t") / "text", 4)


def test_the_run_is_a_stable_diffusion_pipeline_with_the_trained_ema_unet(run, vae_dir):
    from safetensors.torch import load_file

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(run, local_files_only=True)
    D, meta = load_teacher(run)
    assert meta["role"] == "teacher" and meta["iterations"] == 4 and meta["null_label"] == -1
    assert meta["data"]["shape"] == [4, 7, 7] and D.prompts == template_prompts()
    weights = load_file(str(run / "model.safetensors"))
    for k, v in pipe.unet.state_dict().items():  # the pipeline's UNet is the exported EMA
        torch.testing.assert_close(v, weights[f"net.unet.{k}"], rtol=0, atol=0)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 7, 7)
    img = pipe(["a handwritten seven", "the digit 3"], num_inference_steps=3, height=32, width=32, latents=z,
               output_type="np").images
    assert img.shape == (2, 28, 28, 1) and (img >= 0).all() and (img <= 1).all()
    # the table the engine feeds is the pipeline's own encoding of each prompt
    emb, neg = pipe.encode_prompt("the digit 3", "cpu", 1, True, negative_prompt=None)
    torch.testing.assert_close(D.embeds[template_prompts().index("the digit 3")], emb[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(D.embeds[-1], neg[0], rtol=0, atol=1e-6)
    cfg = teacher_config("mnist28", TINY, vae=str(vae_dir), text=True)
    _, init = build_teacher_net(cfg, load_dataset("mnist28", conditional=True, vae=vae_dir))
    trained = pipe.unet.state_dict()
    moved = [k for k, v in init.net.unet.state_dict().items() if not torch.equal(v, trained[k])]
    assert len(moved) == len(trained)  # 4 Adam steps moved every UNet tensor from its init



def test_every_prompt_has_its_own_embedding(run):
    D, _ = load_teacher(run)
    E = D.embeds.flatten(1)  # 60 prompts + the empty one, from the frozen random encoder
    dist = torch.cdist(E, E)
    off = dist[~torch.eye(len(E), dtype=torch.bool)]
    assert len(E) == 10 * len(TEMPLATES) + 1
    # the closest two prompts are far apart compared with float32 rounding of their norm
    assert off.min() > 1e-3 * E.norm(dim=1).max()
    x, sigma = torch.randn(2, 4, 7, 7), torch.ones(2)
    with torch.no_grad():  # and the UNet's output depends on which one it gets
        assert (D(x, sigma, torch.tensor([0, 1])) - D(x, sigma, torch.tensor([-1, -1]))).abs().max() > 0


def test_training_conditions_are_templates_of_the_class_with_dropout():
    y = torch.arange(4000) % 10
    rnd = StepRandom(0, 3, len(y))
    c = template_conditions(y, rnd)
    prompts = template_prompts()
    assert all(prompt_class(prompts[i]) == int(k) for i, k in zip(c.tolist(), y.tolist()))
    assert set((c % len(TEMPLATES)).tolist()) == set(range(len(TEMPLATES)))  # every template is drawn
    assert torch.equal(c, template_conditions(y, StepRandom(0, 3, len(y))))  # deterministic per step
    assert not torch.equal(c, template_conditions(y, StepRandom(0, 4, len(y))))
    assert prompt_class("The  Digit 7") == 7 and prompt_class("a zebra") == -1
    assert all(prompt_class(p) == k for k in range(10) for p in prompts_for_label(k))


class _Fixed:
    """A random source with pinned timesteps and noise."""

    def __init__(self, t, noise):
        self.t, self.noise = t, noise

    def randint(self, stream, low, high):
        return self.t

    def randn(self, stream, *shape):
        return self.noise


def test_the_loss_is_diffusers_epsilon_mse_on_its_own_noised_latents(run):
    D, _ = load_teacher(run)
    sched = diffusers.DDPMScheduler.from_config(D.net.scheduler_config)
    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(3, 4, 7, 7, generator=g), torch.randn(3, 4, 7, 7, generator=g)
    t, cond = torch.tensor([0, 500, 999]), torch.tensor([3, -1, 42])
    with torch.no_grad():
        ours = ddpm_eps_loss(D, y, cond, _Fixed(t, n), D.net.sigma_table.float())
        x_t = sched.add_noise(y, n, t)
        eps = D.net.unet(x_t, t, encoder_hidden_states=D.hidden_states(cond, 3)).sample
    torch.testing.assert_close(ours, (eps - n).square().flatten(1).mean(1), rtol=1e-4, atol=1e-5)


def test_resume_equals_an_uninterrupted_run(vae_dir, run, tmp_path):
    from safetensors.torch import load_file

    part = _train(vae_dir, tmp_path / "r", 2)
    _train(vae_dir, part, 4)  # the same run directory, continued to 4
    a, b = load_file(str(part / "model.safetensors")), load_file(str(run / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("args, why", [
    (["--text"], "needs a VAE: pass --vae DIR"),
    (["--text", "--objective", "flow", "--vae", "VAE"], "epsilon objective"),
    (["data.text=true"], "needs a VAE"),
])
def test_mistakes_are_one_line_exit_2(vae_dir, tmp_path, capsys, args, why):
    args = [str(vae_dir) if a == "VAE" else a for a in args]
    capsys.readouterr()
    assert main(["teacher", "--data", "mnist28", "--out", str(tmp_path / "t"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "t").exists()


def test_text_flag_is_the_data_text_key(vae_dir):
    assert teacher_config("mnist28", vae=str(vae_dir), text=True) == \
        teacher_config("mnist28", ["data.text=true"], vae=str(vae_dir))
    assert teacher_config("mnist28", vae=str(vae_dir), text=True).data.text
