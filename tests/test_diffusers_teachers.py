"""diffusers teachers in every layout and scheduler family, checked against diffusers' own loops.

* layouts: pipeline directories with or without model_index.json, a bare UNet directory with
  ``--scheduler``, class-conditional UNets and their null class;
* DDPM-family tables against the beta formulas (independent float64 math) for each scheduler class,
  zero terminal SNR against Lin et al. 2024's Algorithm 1;
* samplers: diffusers' DDIM loop (eta = 0) equals fewstep's Euler on the adapter for eps / v / x0
  prediction, and diffusers' FlowMatchEulerDiscreteScheduler loop equals fewstep's Euler on the flow
  adapter (same grid, shift honoured).
"""

import json
import math

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.core.sampling import sample_euler
from fewstep.errors import ModelError
from fewstep.models import DiffusersDDPMDenoiser, DiffusersFlowDenoiser, load_diffusers_teacher, load_teacher
from fewstep.models.adapters import alphas_cumprod_from_config, teacher_options

diffusers = pytest.importorskip("diffusers")
T = 1000


def _tiny_unet(seed=0, num_class_embeds=None, out_channels=1):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, num_class_embeds=num_class_embeds)
    with torch.no_grad():  # a non-trivial output layer: outputs of order 1
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.3)
    return unet


def _save_split(root, unet, scheduler):
    """What ``unet.save_pretrained(d/'unet')`` + ``scheduler.save_pretrained(d/'scheduler')`` writes:
    a pipeline layout without model_index.json."""
    unet.save_pretrained(root / "unet")
    scheduler.save_pretrained(root / "scheduler")
    return root


# --- layouts ---------------------------------------------------------------------------------------
def test_pipeline_dir_without_model_index_loads(tmp_path):
    unet, sched = _tiny_unet(), diffusers.DDPMScheduler(prediction_type="v_prediction")
    split = _save_split(tmp_path / "split", unet, sched)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "indexed")
    D, meta = load_teacher(split)
    D2, _ = load_teacher(tmp_path / "indexed")
    assert meta["source"] == "diffusers" and D.prediction_type == "v_prediction"
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 7.0])
    with torch.no_grad():
        torch.testing.assert_close(D(x, sigma), D2(x, sigma), rtol=0, atol=0)


def test_bare_unet_with_scheduler_option(tmp_path):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="sample")
    sched.save_pretrained(tmp_path / "sched")  # writes sched/scheduler_config.json
    with pytest.raises(ModelError, match="--scheduler"):
        load_diffusers_teacher(tmp_path / "unet")
    for given in (tmp_path / "sched", tmp_path / "sched" / "scheduler_config.json"):
        D = load_diffusers_teacher(tmp_path / "unet", scheduler=given)
        assert D.prediction_type == "sample"
        torch.testing.assert_close(D.sigma_table, ((1 - sched.alphas_cumprod.double()) /
                                                   sched.alphas_cumprod.double()).sqrt())
    out = tmp_path / "s.npz"
    assert main(["sample", str(tmp_path / "unet"), "--scheduler", str(tmp_path / "sched"), "--n", "3",
                 "--nfe", "2", "--sampler", "euler", "--out", str(out)]) == 0
    assert np.load(out)["x"].shape == (3, 1, 8, 8)
    assert main(["sample", str(tmp_path / "unet"), "--n", "3", "--out", str(out)]) == 2  # no scheduler


def test_class_conditional_null_class(tmp_path, capsys):
    """num_class_embeds = 4: by default index 3 is the unconditional class and 3 classes are real;
    --null-class none makes all 4 real and unlabelled calls an error."""
    unet = _tiny_unet(num_class_embeds=4)
    root = _save_split(tmp_path / "p", unet, diffusers.DDPMScheduler())
    D = load_diffusers_teacher(root)
    assert D.null_class == 3 and D.num_classes == 3
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        t = torch.from_numpy(np.interp(np.log(sigma.double().numpy()), np.log(D.sigma_table.numpy()),
                                       np.arange(T))).float()
        eps = D.unet(x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1), t, class_labels=torch.tensor([3, 3])).sample
        torch.testing.assert_close(D(x, sigma, None), x - sigma.view(-1, 1, 1, 1) * eps, rtol=1e-5, atol=1e-5)
        with pytest.raises(ModelError, match="out of range"):
            D(x, sigma, torch.tensor([3, 0]))
    D0 = load_diffusers_teacher(root, null_class=None)
    assert D0.num_classes == 4
    with pytest.raises(ModelError, match="--null-class"):
        D0(x, sigma, None)
    with teacher_options(null_class=0):  # how the CLI's --null-class reaches the loader
        assert load_teacher(root)[0].null_class == 0
    out = tmp_path / "s.npz"
    assert main(["sample", str(root), "--n", "4", "--nfe", "3", "--out", str(out)]) == 0
    assert np.load(out)["y"].tolist() == [0, 1, 2, 0]
    assert main(["sample", str(root), "--null-class", "none", "--n", "4", "--nfe", "3",
                 "--out", str(out)]) == 0
    assert np.load(out)["y"].tolist() == [0, 1, 2, 3]
    assert main(["sample", str(root), "--null-class", "9", "--n", "4", "--out", str(out)]) == 2
    assert "outside the UNet's 4 class embeddings" in capsys.readouterr().err


# --- DDPM-family tables against the math -----------------------------------------------------------
def _betas(schedule: str, b0=1e-4, b1=0.02) -> np.ndarray:
    """Ho et al. 2020 (linear), LDM (scaled_linear), Nichol & Dhariwal 2021 eq. 17 (cosine, capped)."""
    if schedule == "linear":
        return np.linspace(b0, b1, T)
    if schedule == "scaled_linear":
        return np.linspace(b0**0.5, b1**0.5, T) ** 2
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    return np.array([min(1 - f[t + 1] / f[t], 0.999) for t in range(T)])


SCHEDULER_CLASSES = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                     "EulerAncestralDiscreteScheduler",
                     "HeunDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
                     "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "UniPCMultistepScheduler",
                     "DEISMultistepScheduler", "PNDMScheduler", "LCMScheduler", "TCDScheduler",
                     "DPMSolverSDEScheduler"]


@pytest.mark.parametrize("cls", SCHEDULER_CLASSES)
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_every_ddpm_family_table(cls, schedule):
    b0, b1 = (0.00085, 0.012) if schedule == "scaled_linear" else (1e-4, 0.02)
    config = {"_class_name": cls, "num_train_timesteps": T, "beta_start": b0, "beta_end": b1,
              "beta_schedule": schedule, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing", "use_karras_sigmas": False}  # sampling-only keys: ignored
    abar, pred = alphas_cumprod_from_config(config)
    ref = np.cumprod(1 - _betas(schedule, b0, b1))
    assert pred == "v_prediction" and abar.dtype == torch.float64 and abar.shape == (T,)
    np.testing.assert_allclose(abar.numpy(), ref, rtol=2e-5)  # diffusers builds it in float32


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_zero_terminal_snr_is_handled(cls):
    """rescale_betas_zero_snr (Lin et al. 2024, Algorithm 1): sqrt(abar) shifted to 0 at T and scaled
    to keep t = 0; the infinite sigma_T is clamped like diffusers' Euler does (abar_T = 2^-24)."""
    abar, _ = alphas_cumprod_from_config({"_class_name": cls, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012,
                                          "rescale_betas_zero_snr": True})
    s = np.sqrt(np.cumprod(1 - _betas("scaled_linear", 0.00085, 0.012)))
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    ref = s**2
    ref[-1] = 2.0**-24
    np.testing.assert_allclose(abar.numpy()[:-1], ref[:-1], rtol=1e-4, atol=1e-7)
    assert abar[-1].item() == 2.0**-24


# --- diffusers' own loops ----------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_loop_equals_adapter_euler(prediction_type):
    """DDIM (eta = 0) is Euler on the PF-ODE in EDM coordinates (Karras et al. 2022, section 3):
    diffusers' DDIMScheduler loop on the UNet, in float64, equals fewstep's Euler on the adapter over
    the same timesteps (sigma_t of the table, then 0 because set_alpha_to_one)."""
    unet = _tiny_unet().double()
    sched = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                                    clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(5)  # 800, 600, 400, 200, 0: DDIM steps to t - 200, the last one to abar = 1
    assert sched.timesteps.tolist() == [800, 600, 400, 200, 0]
    D = DiffusersDDPMDenoiser(unet, sched.alphas_cumprod, prediction_type).eval()
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # so DDIM's own arithmetic is float64 too
    abar = sched.alphas_cumprod
    x_vp = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t0 = int(sched.timesteps[0])
    a = abar[sched.timesteps]
    sigmas = torch.cat([((1 - a) / a).sqrt(), torch.zeros(1).double()])
    with torch.no_grad():
        ours = sample_euler(D, x_vp / abar[t0].sqrt(), sigmas)
        x = x_vp
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


def _flow_teacher(root, shift=3.0, cls="FlowMatchEulerDiscreteScheduler"):
    unet = _tiny_unet(seed=2)
    sched = getattr(diffusers, cls)(num_train_timesteps=T, shift=shift)
    return _save_split(root, unet, sched), sched


@pytest.mark.parametrize("cls", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                                 "FlowMatchLCMScheduler"])
def test_flow_grid_honours_shift(tmp_path, cls):
    """The flow teacher samples on its scheduler's grid, as EDM sigmas s/(1-s) with the s = 1 point
    clamped to 80: s = shift u / (1 + (shift - 1) u) (SD3 eq. 23) of u spaced linearly from 1 down to the
    training table's smallest (already shifted) time shift(1/T), as diffusers' set_timesteps does."""
    root, _ = _flow_teacher(tmp_path / "f", shift=3.0, cls=cls)
    D = load_diffusers_teacher(root)
    assert isinstance(D, DiffusersFlowDenoiser) and D.prediction_type == "flow_prediction"

    def shift(u):
        return 3 * u / (1 + 2 * u)

    s = shift(np.linspace(1, shift(1 / T), 5))
    ref = np.append(np.minimum(s / np.maximum(1 - s, 1e-300), 80.0), 0.0)
    ref[0] = 80.0
    np.testing.assert_allclose(D.sampling_sigmas(5).numpy(), ref, rtol=1e-6)


def test_flow_match_euler_loop_equals_fewstep_sample(tmp_path):
    """`fewstep sample --sampler euler` on a FlowMatchEulerDiscreteScheduler teacher (shift 3) equals
    diffusers' own scheduler loop on the same timesteps: x_{s'} = x_s + (s' - s) v (flow Euler) is
    Euler in EDM coordinates with sigma = s/(1-s), x = x_s/(1-s). The loop starts where fewstep does,
    x_s = (1 - s_0) 80 z at s_0 = 80/81."""
    root, sched = _flow_teacher(tmp_path / "f", shift=3.0)
    out = tmp_path / "s.npz"
    assert main(["sample", str(root), "--sampler", "euler", "--nfe", "6", "--n", "4", "--seed", "5",
                 "--out", str(out)]) == 0
    ours = torch.from_numpy(np.load(out)["x"])
    D = load_diffusers_teacher(root)
    grid = D.sampling_sigmas(6)
    s = (grid / (1 + grid))[:-1].float()
    u = s / (3.0 - 2.0 * s)  # set_timesteps(sigmas=u) applies the shift itself
    sched.set_timesteps(sigmas=u.tolist())
    torch.testing.assert_close(sched.timesteps, s * T)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    x = (1 - s[0]) * 80.0 * z
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(D.unet(x, t.expand(4)).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)


def test_dpmsolver_flow_prediction_is_a_flow_teacher(tmp_path):
    """DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction): D equals the scheduler's own
    x0 (convert_model_output) at its grid points, the net seeing t = 1000 s (this scheduler hands
    pipelines int64 timesteps, i.e. 1000 s truncated; fewstep feeds the exact time)."""
    unet = _tiny_unet(seed=3)
    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                  flow_shift=2.0)
    root = _save_split(tmp_path / "d", unet, sched)
    D = load_diffusers_teacher(root)
    assert isinstance(D, DiffusersFlowDenoiser)
    sched.set_timesteps(5)
    x_s = torch.randn(2, 1, 8, 8)
    for i in range(3):
        sched._step_index = i
        s = float(sched.sigmas[i])
        with torch.no_grad():
            ref = sched.convert_model_output(unet(x_s, torch.full((2,), T * s)).sample, sample=x_s)
            got = D(x_s / (1 - s), torch.full((2,), s / (1 - s)))
        torch.testing.assert_close(got, ref, rtol=0, atol=5e-5)


# --- refusals ---------------------------------------------------------------------------------------
REFUSALS = [
    ({"_class_name": "EDMEulerScheduler"}, "unsupported scheduler 'EDMEulerScheduler'"),
    ({"timestep_type": "continuous", "_class_name": "EulerDiscreteScheduler"}, "timestep_type='continuous'"),
    ({"prediction_type": "flow_prediction"}, "needs both use_flow_sigmas=True"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas=True"),
    ({"prediction_type": "x0"}, "unsupported prediction_type 'x0'"),
    ({"beta_schedule": "cubic"}, "unsupported scheduler config"),
]


@pytest.mark.parametrize("edit,match", REFUSALS, ids=[m for _, m in REFUSALS])
def test_scheduler_refusals(tmp_path, edit, match):
    root = _save_split(tmp_path / "r", _tiny_unet(), diffusers.DDPMScheduler())
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ModelError, match=match.replace("(", r"\(").replace("=", "=")):
        load_teacher(root)


def test_flow_teacher_distils_and_the_student_reloads(tmp_path):
    """A flow teacher goes through distillation; the student's spec rebuilds the flow adapter."""
    from fewstep.models.io import load_model

    root, _ = _flow_teacher(tmp_path / "f")
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(root), "--method", "dmd", "--out", str(out), "--iters", "2",
                 "--batch", "8", "data.name=digits8", "train.eval_n=16", "train.eval_every=0",
                 "--no-progress"]) == 0
    G, meta = load_model(out)
    assert isinstance(G, DiffusersFlowDenoiser) and G.scheduler_config["shift"] == 3.0
    assert main(["sample", str(out), "--n", "3", "--out", str(tmp_path / "x.npz")]) == 0
