"""DP-DMD's first-step target in its native velocity form (specs/dp_dmd.md section 3, the official flow
loss) against the x0 form, on an exact Gaussian-mixture teacher written as a rectified flow
(flow_and_latent.md section 1), in float64; and ``dp.target`` reaching the loss of a distill run."""

import copy
import json

import pytest
import torch
import yaml

from fewstep.cli import main
from fewstep.core import dp_target as T
from fewstep.core.mixture import MixtureDenoiser, ring8
from fewstep.core.sampling import sample_flow_euler
from fewstep.core.utils import append_dims
from fewstep.errors import ConfigError
from fewstep.losses import dp
from fewstep.losses.base import Batch, Nets
from fewstep.losses.dp import rollout_dp
from fewstep.models.adapters import FlowDenoiser
from fewstep.models.io import build_denoiser
from fewstep.models.student import Student
from tests.helpers import MLP, FixedRandom, save_tiny_teacher

B, DT = 16, torch.float64
LEVELS = [80.0, 17.50, 2.504, 0.1681]


def mixture_velocity(mix: MixtureDenoiser):
    """The exact ring8 velocity ``v(x_s, 1000 s) = (x_s - E[x0 | x_s]) / s`` (diffusers' timestep units):
    the mixture written as a flow net, ``x_s = (1 - s) x0 + s eps``."""

    def velocity(x_s, t, cond=None):
        s = t / 1000
        sd = append_dims(s, x_s.ndim)
        return (x_s - mix(x_s / (1 - sd), s / (1 - s))) / sd

    return velocity


@pytest.fixture(scope="module")
def flow_mixture():
    mix = MixtureDenoiser(ring8())
    return mix, FlowDenoiser(mixture_velocity(mix)).requires_grad_(False)


def _nets(teacher, levels=LEVELS, seed=2):
    torch.manual_seed(0)
    net = build_denoiser({**MLP, "objective": "flow"}).double()
    with torch.no_grad():  # the output layer starts at zero: make the student's first step non-trivial
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    student = Student(net.requires_grad_(True), levels, renoise="ddim")
    z = torch.randn(B, 2, generator=torch.Generator().manual_seed(seed), dtype=DT)
    batch = Batch(z=z, cond=None, real=torch.zeros(B, 2, dtype=DT), rnd=FixedRandom(B), step=0)
    return Nets(teacher=teacher, student=student, fake=copy.deepcopy(net)), batch


def test_flow_form_mixture_is_the_edm_mixture(flow_mixture):
    """The teacher of the tests below: D through the flow conversion equals the exact EDM denoiser."""
    mix, flow = flow_mixture
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=DT) * 3
    for sigma in (0.01, 0.5, 29.1, 80.0):
        s = torch.full((64,), sigma, dtype=DT)
        assert (flow(x, s) - mix(x, s)).abs().max() < 1e-10


@pytest.mark.parametrize("K", [1, 5, 30])
def test_native_velocity_target_converted_to_x0_is_the_x0_target(flow_mixture, K):
    """Test (1): v* from the teacher's own flow Euler loop in t (the official rollout) and the official
    formula, converted to x0 at the student's first level, equals the x0 target the dp term computes
    through the EDM contract (EDM Euler in sigma on the same grid); the term's v* equals v* too."""
    _, flow = flow_mixture
    nets, batch = _nets(flow)
    cfg = dp.DPConfig(anchor_k=K)
    sigmas = dp.teacher_grid(LEVELS[0], cfg)
    times = T.flow_time(sigmas)  # the same grid in flow time (t = 0 at sigma = 0)
    x_T = LEVELS[0] * batch.z
    xf_T, t_T, t_k = x_T / (1 + LEVELS[0]), float(times[0]), float(times[K])
    velocity = lambda x, t, cond: flow.model(x, 1000 * t, cond)  # noqa: E731  (flow time in [0, 1])
    zf_k = sample_flow_euler(velocity, xf_T, times[:K + 1])
    v_native = T.v_target_flow(xf_T, zf_k, t_T, t_k)  # (x_T - z_k) / (t_T - t_k), flow units
    term = dp.DPTerm(cfg)
    x0_star, sigma_k, _ = term.target(nets, batch, x_T)
    v_term, _, _ = term.velocity_target(nets, batch, x_T)
    assert sigma_k == float(sigmas[K])
    assert (T.flow_x0_from_v(xf_T, v_native, t_T) - x0_star).abs().max() < 1e-10
    assert (v_term - v_native).abs().max() < 1e-10
    # both land on the anchor: one flow Euler step from (x_T, t_T) with v*, one EDM DDIM step with x0*
    assert (xf_T + (t_k - t_T) * v_native - zf_k).abs().max() < 1e-10
    z_k = T.ddim_step(x_T, x0_star, 1.0, LEVELS[0], 1.0, sigma_k)
    assert (z_k / (1 + sigma_k) - zf_k).abs().max() < 1e-10


def test_velocity_helpers_are_the_flow_formulas(gen):
    x_T, z_k, D = (torch.randn(B, 3, generator=gen, dtype=DT) for _ in range(3))
    for s_T, s_k in ((80.0, 29.1), (1e6, 0.0), (3.0, 2.999)):  # near-noise and near-equal levels
        t_T, t_k = s_T / (1 + s_T), s_k / (1 + s_k)
        want = T.v_target_flow(x_T / (1 + s_T), z_k / (1 + s_k), t_T, t_k)
        assert torch.allclose(T.v_target_edm(x_T, z_k, s_T, s_k), want, rtol=1e-6, atol=1e-9)
        v = T.flow_v_from_edm(x_T, D, s_T)  # v = (x_t - D) / t, and D = x_t - t v back
        assert torch.allclose(x_T / (1 + s_T) - t_T * v, D, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sigma_0", [80.0, 1.0])
def test_velocity_loss_is_the_x0_loss_times_one_over_t0_squared(flow_mixture, sigma_0):
    """Test (2): per sample, L_v = L_x0 / t_0^2 with 1/t_0^2 = ((1 + sigma_0)/sigma_0)^2, so the theta
    gradients are parallel with exactly that ratio (float64)."""
    _, flow = flow_mixture
    levels = [sigma_0, 0.5 * sigma_0, 0.1]
    w = T.velocity_loss_weight(sigma_0)
    losses, grads = {}, {}
    for form in ("x0", "velocity"):
        nets, batch = _nets(flow, levels)
        gen = rollout_dp(nets.student, batch, batch.z)
        out = dp.DPTerm(dp.DPConfig(target=form))(nets, batch, gen)
        params = list(nets.student.parameters())
        losses[form] = out.loss.detach()
        grads[form] = torch.cat([g.flatten() for g in torch.autograd.grad(out.loss.mean(), params)])
    assert losses["x0"].min() > 0
    assert torch.allclose(losses["velocity"], w * losses["x0"], rtol=1e-10, atol=0)
    assert torch.allclose(grads["velocity"], w * grads["x0"], rtol=1e-8, atol=1e-14)
    cos = torch.nn.functional.cosine_similarity(grads["velocity"], grads["x0"], dim=0)
    assert abs(float(cos) - 1) < 1e-12 and abs(w - (1 + sigma_0) ** 2 / sigma_0**2) < 1e-15


def test_velocity_target_refusals():
    for bad in (dp.DPConfig(target="eps"), dp.DPConfig(target="velocity", vp_reweight=True)):
        with pytest.raises(ConfigError, match="dp."):
            dp.build(bad, None, 0.05)


def _dp_log(run) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r["dp"] for r in rows if "dp" in r)


def test_switch_reaches_the_loss_in_a_distill_run(tmp_path):
    """Test (3): a 1-iteration `fewstep distill` on a tiny flow teacher with dp.target=x0 and =velocity
    (same seed, so the same student, noise and anchor): the logged L_div differs by exactly 1/t_0^2."""
    teacher = save_tiny_teacher(tmp_path / "t", {**MLP, "objective": "flow"})
    logged = {}
    for form in ("x0", "velocity"):
        out = tmp_path / form
        assert main(["distill", "--teacher", str(teacher), "--method", "dmd", "--steps", "2", "--extra",
                     "dp=0.05", "--iters", "1", "--batch", "16", "--out", str(out), "--no-progress",
                     "train.eval_n=100", "schedule.ratio=1", "train.log_every=1", f"dp.target={form}"]) == 0
        assert yaml.safe_load((out / "config.yaml").read_text())["dp"]["target"] == form
        logged[form] = _dp_log(out)
    assert logged["x0"] > 0
    assert logged["velocity"] == pytest.approx(T.velocity_loss_weight(80.0) * logged["x0"], rel=1e-5)
