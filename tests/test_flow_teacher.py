"""Own rectified-flow teachers (flow_and_latent.md): the flow scalings are the SD3 convention, the
training loss is the velocity MSE, flow Euler equals diffusers' FlowMatchEulerDiscreteScheduler loop,
and every base runs on a flow teacher."""

import pytest
import torch

from fewstep.cli import main
from fewstep.core.precond import EDMPrecond, flow_matching_loss, flow_scalings
from fewstep.core.sampling import flow_times, sample_flow_euler
from fewstep.models.io import build_denoiser, load_model
from tests.helpers import MLP


class VelocityNet(torch.nn.Module):
    """A fixed velocity field v(x_t, t) = a(t) x_t + b (float64)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x, t, labels):
        return self.w * x * (1 + t[:, None]) - 0.2


@pytest.mark.parametrize("t", [1e-4, 0.5, 1 - 1e-4])
def test_flow_precond_is_the_sd3_convention(t):
    """D(x, sigma) = x_t - t v(x_t, t) with sigma = t / (1 - t), x = x_t / (1 - t) (float64)."""
    D = EDMPrecond(VelocityNet(), objective="flow")
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(2))
    tt = torch.full((4,), t, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * eps
    sigma = tt / (1 - tt)
    v = D.net(x_t, tt, None)
    assert torch.allclose(D(x_t / (1 - t), sigma), x_t - t * v, rtol=1e-10, atol=1e-10)
    assert torch.allclose(D.velocity(x_t, tt), v)
    c_skip, c_out, c_in, c_noise = flow_scalings(sigma)
    assert torch.allclose(c_noise, tt) and torch.allclose(c_skip * (1 + sigma), torch.ones_like(tt))


def test_flow_loss_is_the_velocity_mse():
    D = EDMPrecond(VelocityNet(), objective="flow")
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    want = ((D.net(x_t, t, None) - (eps - x0)) ** 2).mean(1)
    assert torch.allclose(flow_matching_loss(D, x0, t, eps, None), want, rtol=1e-9)


def test_flow_euler_equals_diffusers_flow_match_euler_loop():
    from diffusers import FlowMatchEulerDiscreteScheduler

    D = EDMPrecond(VelocityNet(), objective="flow")
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sample_flow_euler(D.velocity, z, D.flow_times(8))
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(8)
    x = z.clone()
    for ts in sched.timesteps:
        v = D.velocity(x, torch.full((5,), float(ts) / 1000, dtype=torch.float64))
        x = sched.step(v, ts, x).prev_sample
    assert torch.allclose(ours, x.double(), atol=1e-5)
    assert torch.allclose(D.flow_times(8)[:-1], sched.sigmas[:-1].double(), atol=1e-6)
    assert torch.allclose(flow_times(8), sched.sigmas.double(), atol=1e-6)


def test_spec_round_trip_keeps_the_objective(tmp_path):
    from fewstep.models.io import save_model

    D = build_denoiser({**MLP, "objective": "flow"})
    assert D.objective == "flow" and D.spec["objective"] == "flow"
    save_model(tmp_path / "m", D, D.spec, {"role": "teacher", "data": {"name": "ring8", "shape": [2]}})
    E, _ = load_model(tmp_path / "m")
    x, s = torch.randn(3, 2), torch.tensor([0.1, 1.0, 10.0])
    assert E.objective == "flow" and torch.equal(D(x, s), E(x, s))
    assert build_denoiser(MLP).objective == "edm"  # specs without the key stay EDM


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "t"
    assert main(["teacher", "--data", "ring8", "--objective", "flow", "--out", str(out), "--iters", "30",
                 "--no-progress", "model.hidden=32", "model.depth=2", "model.emb_dim=16", "train.batch=64",
                 "train.eval_n=100"]) == 0
    return out


@pytest.mark.parametrize("method", ["dmd", "di", "sid", "cd", "tfd", "fdistill"])
def test_every_base_runs_on_a_flow_teacher(tmp_path, flow_teacher, method):
    args = ["distill", "--teacher", str(flow_teacher), "--method", method, "--out", str(tmp_path / method),
            "--iters", "3", "--batch", "16", "--no-progress", "train.eval_n=100", "schedule.ratio=1"]
    if method == "dmd":
        i = args.index("--iters")
        args[i:i] = ["--extra", "el=1", "--extra", "dp=0.05", "--steps", "2"]
    assert main(args) == 0


def test_flow_euler_sampler_and_its_refusal(tmp_path, flow_teacher, capsys):
    assert main(["sample", str(flow_teacher), "--sampler", "flow_euler", "--nfe", "4", "--n", "8",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert "(4 NFE)" in capsys.readouterr().out
    from tests.helpers import save_tiny_teacher

    edm = save_tiny_teacher(tmp_path / "edm")
    assert main(["sample", str(edm), "--sampler", "flow_euler", "--n", "8",
                 "--out", str(tmp_path / "e.npz")]) == 2
    assert "needs a flow teacher" in capsys.readouterr().err
