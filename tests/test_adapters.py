"""Foreign teachers as D(x, sigma, cond): diffusers DDPM UNets (eps / v / x0) and rectified flow.

The adapter is checked against diffusers' own math (``DDPMScheduler.add_noise`` for the forward
process, ``DDPMScheduler.step(...).pred_original_sample`` for x0) and against oracle models that
return the true eps / v / x0 / velocity (edm_core.md section 9.7), in float64.
"""

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewstep.core.schedules import sigma_to_t, t_to_sigma, vp_sigmas_from_alphas_cumprod
from fewstep.core.utils import append_dims
from fewstep.errors import ModelError
from fewstep.models import (
    DiffusersDDPMDenoiser,
    FlowDenoiser,
    load_diffusers_teacher,
    load_teacher,
)

diffusers = pytest.importorskip("diffusers")
TIMESTEPS = [0, 1, 7, 100, 500, 998, 999]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets gain nothing from threads, and 2 threads on a shared 2-core box can make each
    small conv ~100x slower when another process holds the other core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_unet(seed=0, out_channels=1, num_class_embeds=None):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, num_class_embeds=num_class_embeds)


def _scheduler(prediction_type="epsilon", **kw):
    kw = {"beta_schedule": "linear", **kw}
    return diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type,
                                   clip_sample=False, **kw)


def _save(root, unet, scheduler, pipeline=False):
    if pipeline:
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root)
    else:
        unet.save_pretrained(root)
        scheduler.save_pretrained(root)  # writes scheduler_config.json beside config.json
    return root


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A UNet dir per prediction type and one pipeline dir (saved once for the module)."""
    root = tmp_path_factory.mktemp("teachers")
    out = {p: _save(root / p, _tiny_unet(), _scheduler(p)) for p in ("epsilon", "v_prediction")}
    out["pipeline"] = _save(root / "pipe", _tiny_unet(1), _scheduler("v_prediction"), pipeline=True)
    return out


def _compare_with_diffusers(D, unet, scheduler, dtype, atol):
    """D(x_edm, sigma_t) equals DDPMScheduler.step(...).pred_original_sample on the same net output,
    to ``atol * (1 + sigma_t)``."""
    g = torch.Generator().manual_seed(0)
    abar = scheduler.alphas_cumprod
    for t in TIMESTEPS:
        x0 = torch.randn(2, 1, 8, 8, generator=g, dtype=dtype)
        noise = torch.randn(2, 1, 8, 8, generator=g, dtype=dtype)
        x_vp = scheduler.add_noise(x0, noise, torch.tensor([t, t]))
        with torch.no_grad():
            out = unet(x_vp, torch.tensor([t, t]), class_labels=None).sample
            x0_ref = scheduler.step(out, t, x_vp).pred_original_sample
            x_edm = x_vp / abar[t].double().sqrt()
            sigma_t = ((1 - abar[t].double()) / abar[t].double()).sqrt()
            got = D(x_edm, sigma_t.expand(2))
        # x0 = (x - sigma eps) cancels terms of size sigma: rounding error scales with sigma
        tol = atol * (1 + sigma_t.item())
        torch.testing.assert_close(got, x0_ref.to(dtype), atol=tol, rtol=0, msg=f"t={t}")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_x0(saved, prediction_type):
    D = load_diffusers_teacher(saved[prediction_type])
    assert isinstance(D, DiffusersDDPMDenoiser) and D.prediction_type == prediction_type
    assert D.num_classes == 0 and D.sigma_data == 0.5 and D.shape == (1, 8, 8)
    sched = diffusers.DDPMScheduler.from_pretrained(saved[prediction_type])
    table = vp_sigmas_from_alphas_cumprod(sched.alphas_cumprod)
    assert D.sigma_min == float(table[0]) and D.sigma_max == float(table[-1])
    _compare_with_diffusers(D, D.unet, sched, torch.float32, atol=2e-5)
    D.unet.double()
    _compare_with_diffusers(D, D.unet, sched, torch.float64, atol=1e-6)
    D.unet.float()


def test_pipeline_dir_and_load_teacher(saved):
    D, meta = load_teacher(saved["pipeline"])
    assert meta["source"] == "diffusers" and meta["prediction_type"] == "v_prediction"
    sched = diffusers.DDPMScheduler.from_pretrained(saved["pipeline"] / "scheduler")
    _compare_with_diffusers(D, D.unet, sched, torch.float32, atol=2e-5)
    D2 = load_diffusers_teacher(saved["pipeline"] / "unet")  # scheduler found in ../scheduler
    assert D2.prediction_type == "v_prediction"


def test_learned_variance_uses_first_channels():
    unet, sched = _tiny_unet(out_channels=2), _scheduler(variance_type="learned_range")
    D = DiffusersDDPMDenoiser(unet, sched.alphas_cumprod, "epsilon")
    _compare_with_diffusers(D, unet, sched, torch.float32, atol=2e-5)


# --- oracle models: true eps / v / x0 give x0 exactly (edm_core.md 9.7) ------------------------
class _Oracle(nn.Module):
    """Returns the true eps, v or x0 for fixed clean data ``x0`` at (possibly fractional) t."""

    def __init__(self, x0, table, kind):
        super().__init__()
        self.x0, self.table, self.kind = x0, table, kind
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_vp, t, class_labels=None):
        s = append_dims(t_to_sigma(t, self.table), x_vp.ndim)
        alpha, sigma_vp = 1 / (s**2 + 1).sqrt(), s / (s**2 + 1).sqrt()
        eps = (x_vp - alpha * self.x0) / sigma_vp
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma_vp * self.x0, "sample": self.x0}
        return SimpleNamespace(sample=out[self.kind])


def test_discrete_table_round_trips():
    table = vp_sigmas_from_alphas_cumprod(_scheduler().alphas_cumprod)
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(sigma_to_t(table, table), t)
    assert torch.equal(sigma_to_t(table, table, quantize=True), t)
    torch.testing.assert_close(t_to_sigma(t, table), table, rtol=1e-14, atol=0)
    sig = torch.exp(torch.linspace(table[0].log().item(), table[-1].log().item(), 777, dtype=torch.float64))
    torch.testing.assert_close(t_to_sigma(sigma_to_t(sig, table), table), sig, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_true_prediction_gives_x0(kind, gen):
    abar = _scheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    table = vp_sigmas_from_alphas_cumprod(abar)
    x0 = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    D = DiffusersDDPMDenoiser(_Oracle(x0, table, kind), abar, kind)
    for sigma in [table[[0, 499, 999]], torch.tensor([0.05, 1.3, 40.0], dtype=torch.float64)]:
        x = x0 + append_dims(sigma, 4) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(D(x, sigma), x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_true_velocity_gives_x0(shift, gen):
    x0 = torch.randn(5, 2, generator=gen, dtype=torch.float64)

    def velocity(x_s, t, cond):  # trained with the shifted time: undo it to get the physical s
        u = append_dims(t / 1000, x_s.ndim)
        s = u / (shift - (shift - 1) * u)
        eps = (x_s - (1 - s) * x0) / s
        return eps - x0

    D = FlowDenoiser(velocity, shift=shift)
    assert D.num_classes == 0
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    x = x0 + append_dims(sigma, 2) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(D(x, sigma), x0, rtol=0, atol=1e-10)


# --- conditioning and quantisation -------------------------------------------------------------
def test_class_conditional_unet(gen):
    unet, sched = _tiny_unet(num_class_embeds=3), _scheduler()
    x, sigma, cond = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([0.5, 2.0]), torch.tensor([2, 0])
    D = DiffusersDDPMDenoiser(unet, sched.alphas_cumprod)
    assert D.num_classes == 3
    with torch.no_grad():
        t = sigma_to_t(sigma.double(), D.sigma_table).float()
        eps = unet(x / append_dims((sigma**2 + 1).sqrt(), 4), t, class_labels=cond).sample
        torch.testing.assert_close(D(x, sigma, cond), x - append_dims(sigma, 4) * eps)
        with pytest.raises(ModelError, match="class labels"):
            D(x, sigma, None)
        D.null_class = 1  # index 1 is unconditional: fewstep's labels 0, 1 feed indices 0, 2
        assert D.num_classes == 2
        null = x - append_dims(sigma, 4) * unet(x / append_dims((sigma**2 + 1).sqrt(), 4), t,
                                                 class_labels=torch.tensor([1, 1])).sample
        torch.testing.assert_close(D(x, sigma, torch.tensor([-1, -1])), null)
        ref = x - append_dims(sigma, 4) * unet(x / append_dims((sigma**2 + 1).sqrt(), 4), t,
                                                class_labels=torch.tensor([2, 0])).sample
        torch.testing.assert_close(D(x, sigma, torch.tensor([1, 0])), ref)


def test_quantize_feeds_integer_timesteps(gen):
    sched = _scheduler()
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, class_labels=None):
            seen.append(t)
            return SimpleNamespace(sample=torch.zeros_like(x))

    D = DiffusersDDPMDenoiser(Spy(), sched.alphas_cumprod, quantize=True)
    table = D.sigma_table
    sigma = torch.stack([table[10], (table[10] * table[11]).sqrt() * 0.999, table[500]])
    D(torch.randn(3, 1, 2, 2, generator=gen), sigma)
    assert seen[0].dtype == torch.long and seen[0].tolist() == [10, 10, 500]


# --- errors ------------------------------------------------------------------------------------
def test_load_errors(tmp_path, saved):
    with pytest.raises(ModelError, match="does not exist"):
        load_diffusers_teacher(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        load_diffusers_teacher(tmp_path)
    bad = tmp_path / "cond"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelError, match="unsupported model class"):
        load_diffusers_teacher(bad)
    nosched = _save(tmp_path / "nosched", _tiny_unet(), _scheduler())
    (nosched / "scheduler_config.json").unlink()
    with pytest.raises(ModelError, match="no scheduler config"):
        load_diffusers_teacher(nosched)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "X", "transformer": ["a", "b"]}))
    with pytest.raises(ModelError, match="no 'unet'"):
        load_diffusers_teacher(pipe)


@pytest.mark.parametrize("edit,match", [
    ({"prediction_type": "flow"}, "unsupported prediction_type"),
    ({"beta_schedule": "cubic"}, "unsupported scheduler config"),
    ({"_class_name": "ScoreSdeVeScheduler"}, "unsupported scheduler 'ScoreSdeVeScheduler'"),
])
def test_scheduler_errors(tmp_path, saved, edit, match):
    d = _save(tmp_path / "m", _tiny_unet(), _scheduler())
    cfg = json.loads((d / "scheduler_config.json").read_text())
    (d / "scheduler_config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ModelError, match=match):
        load_diffusers_teacher(d)


def test_ddim_config_gives_same_table(tmp_path):
    d = _save(tmp_path / "m", _tiny_unet(), diffusers.DDIMScheduler(beta_schedule="scaled_linear"))
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(load_diffusers_teacher(d).sigma_table, vp_sigmas_from_alphas_cumprod(ref))


def test_bin_only_and_corrupt_weights(tmp_path):
    marker = tmp_path / "PWNED"
    d = _save(tmp_path / "m", _tiny_unet(), _scheduler())
    weights = d / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ModelError, match="cannot load the UNet"):
        load_diffusers_teacher(d)
    weights.unlink()

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelError, match="safetensors"):
        load_diffusers_teacher(d)
    with pytest.raises(ModelError, match="safetensors"):
        load_teacher(d)
    assert not marker.exists()
