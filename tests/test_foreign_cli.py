"""A diffusers teacher (UNet2DModel + DDPM scheduler saved with save_pretrained) through the CLI:
sample, eval, and distillation with each base, with the student exported in fewstep's format."""

import json

import pytest
import torch

from fewstep.cli import main


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    from diffusers import DDPMScheduler, UNet2DModel

    d = tmp_path_factory.mktemp("diffusers_teacher")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(d)
    DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon").save_config(d)
    return d


def test_sample_and_eval(diffusers_dir, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(diffusers_dir), "--n", "6", "--nfe", "3", "--out", str(out)]) == 0
    import numpy as np

    assert np.load(out)["x"].shape == (6, 1, 8, 8)
    js = tmp_path / "e.json"
    assert main(["eval", str(diffusers_dir), "--nfe", "3", "--data", "digits8", "--n", "40",
                 "--json", str(js)]) == 0
    assert json.loads(js.read_text())["nfe"] == 3


@pytest.mark.parametrize("method", ["dmd", "di", "sid", "tfd"])
def test_distill_and_export(diffusers_dir, tmp_path, method):
    out = tmp_path / method
    code = main(["distill", "--teacher", str(diffusers_dir), "--method", method, "--out", str(out),
                 "--iters", "2", "--batch", "8", "data.name=digits8", "train.eval_n=16",
                 "train.eval_every=0", "--no-progress"])
    assert code == 0
    spec = json.loads((out / "model.json").read_text())["spec"]
    assert spec["type"] == "diffusers"
    assert main(["sample", str(out), "--n", "4", "--out", str(tmp_path / f"{method}.npz")]) == 0


def test_cd_student_of_a_diffusers_teacher_keeps_the_boundary(diffusers_dir, tmp_path):
    """CD on a diffusers teacher: the student re-expresses the UNet's output with the consistency
    scalings, so f(x, sigma_min) = x exactly; the exported student reloads with the same property."""
    from fewstep.models.io import load_model

    out = tmp_path / "cd"
    code = main(["distill", "--teacher", str(diffusers_dir), "--method", "cd", "--out", str(out),
                 "--iters", "2", "--batch", "8", "data.name=digits8", "train.eval_n=16",
                 "train.eval_every=0", "--no-progress"])
    assert code == 0
    spec = json.loads((out / "model.json").read_text())["spec"]
    assert spec["type"] == "diffusers" and spec["boundary"] is True
    G = load_model(out)[0]
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    G = G.double()
    assert torch.equal(G(x, torch.full((3,), spec["boundary_sigma_min"], dtype=torch.float64)), x)
    from fewstep.models.adapters import load_diffusers_teacher

    teacher = load_diffusers_teacher(diffusers_dir).double()
    assert not torch.equal(teacher(x, torch.full((3,), 0.002, dtype=torch.float64)), x)  # not vacuous


def test_boundary_form_equals_the_plain_denoiser_far_from_sigma_min(diffusers_dir):
    """Away from sigma_min the boundary scalings converge to EDM's, so the re-expressed output
    approaches the teacher's D (float64)."""
    from fewstep.models.adapters import load_diffusers_teacher

    D = load_diffusers_teacher(diffusers_dir).double()
    x, sigma = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.full((2,), 40.0, dtype=torch.float64)
    plain = D(x, sigma)
    D.boundary = True
    assert torch.allclose(D(x, sigma), plain, rtol=0, atol=1e-3 * plain.abs().max().item())


def test_v_prediction_teacher_through_distill(tmp_path):
    """A v-prediction DDPM teacher distilled and exported: the student's D is diffusers' own
    ``pred_original_sample`` for v-prediction (float64). Two DMD iterations with the fake score
    still equal to the teacher at the only generator update (step 0): the DMD gradient is exactly
    0, so the student's weights are the teacher's and its D must be the teacher's v-prediction D."""
    from diffusers import DDPMScheduler, UNet2DModel

    from fewstep.models.io import load_model

    d = tmp_path / "v_teacher"
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       norm_num_groups=4, layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2)
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False)
    unet.save_pretrained(d)
    sched.save_config(d)
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(d), "--method", "dmd", "--out", str(out), "--iters", "2",
                 "--batch", "8", "data.name=digits8", "train.eval_n=16", "train.eval_every=0",
                 "--no-progress"]) == 0
    spec = json.loads((out / "model.json").read_text())["spec"]
    assert spec["type"] == "diffusers" and spec["prediction_type"] == "v_prediction"
    G = load_model(out)[0]
    G, unet = G.double(), unet.double().eval()
    g = torch.Generator().manual_seed(0)
    abar = sched.alphas_cumprod.double()
    for t in (10, 300, 700, 990):
        x0 = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
        noise = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
        x_vp = sched.add_noise(x0, noise, torch.tensor([t, t]))
        with torch.no_grad():
            v = unet(x_vp, torch.tensor([t, t])).sample
            ref = sched.step(v, t, x_vp).pred_original_sample
            eps_reading = (x_vp - (1 - abar[t]).sqrt() * v) / abar[t].sqrt()  # v misread as eps
            sigma = ((1 - abar[t]) / abar[t]).sqrt()
            got = G(x_vp / abar[t].sqrt(), sigma.expand(2))
        torch.testing.assert_close(got, ref, atol=1e-6 * (1 + sigma.item()), rtol=0, msg=f"t={t}")
        assert not torch.allclose(eps_reading, ref, atol=1e-3)  # the two readings differ: not vacuous
