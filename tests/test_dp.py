"""DP-DMD properties (specs/dp_dmd.md section 9): target algebra in float64, the engine's ``dp``
rollout with tiny networks, the update schedule, and lambda = 0 equivalences."""

import copy

import pytest
import torch

from fewstep.config import DistillRunConfig
from fewstep.core import dp_target as T
from fewstep.core.mixture import MixtureDenoiser, ring8
from fewstep.core.sampling import sample_euler
from fewstep.core.utils import mean_flat
from fewstep.errors import ConfigError
from fewstep.losses import dmd, dp
from fewstep.losses.base import Batch, GenOut, Nets
from fewstep.losses.dp import rollout_dp
from fewstep.models.io import build_denoiser
from fewstep.models.student import Student
from fewstep.train.distill import build_run, is_critic_step, is_generator_step, train_iteration
from fewstep.train.rollout import rollout_full
from tests.helpers import FixedRandom, GaussianDenoiser

B = 16
LEVELS = [80.0, 17.50, 2.504, 0.1681]
MLP = {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "num_classes": 0, "sigma_data": 0.5}
DT = torch.float64


def _u(lo, hi, n, g):
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=DT)


def _rn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def _levels(g, n):
    """Random (alpha, sigma) ``[n]`` at T and at a less noisy k (SNR_k > SNR_T), float64."""
    return _u(0.05, 0.55, n, g), _u(0.5, 1.0, n, g), _u(0.6, 1.0, n, g), _u(0.05, 0.45, n, g)


# --- 9.1 landing, 9.2 cross-parameterisation, 9.10 VP reweighting (pure math) ---------------------
@pytest.mark.parametrize("shape", [(3,), (2, 4, 4)])
def test_landing(gen, shape):
    x_T, z_k = _rn(gen, B, *shape), _rn(gen, B, *shape)
    a_T, s_T, a_k, s_k = _levels(gen, B)
    x0 = T.x0_target(x_T, z_k, a_T, s_T, a_k, s_k)
    assert (T.ddim_step(x_T, x0, a_T, s_T, a_k, s_k) - z_k).abs().max() < 1e-10
    x0 = T.x0_target(x_T, z_k, 0.3, 0.9, 0.8, 0.2)  # scalar coefficients broadcast too
    assert (T.ddim_step(x_T, x0, 0.3, 0.9, 0.8, 0.2) - z_k).abs().max() < 1e-10
    t_T, t_k = _u(0.5, 1.0, B, gen), _u(0.0, 0.4, B, gen)
    v = T.v_target_flow(x_T, z_k, t_T, t_k)  # flow: x_T + (t_k - t_T) v* = z_k
    assert (x_T + T._b(t_k - t_T, x_T) * v - z_k).abs().max() < 1e-10


def test_cross_parameterisation(gen):
    x_T, z_k = _rn(gen, B, 3), _rn(gen, B, 3)
    t_k = _u(0.0, 0.9, B, gen)
    v = T.v_target_flow(x_T, z_k, 1.0, t_k)  # flow at t_T = 1: x0* = x_T - v*
    assert torch.allclose(T.x0_target(x_T, z_k, 0.0, 1.0, 1 - t_k, t_k), x_T - v, atol=1e-12)
    t_T = _u(0.95, 1.0, B, gen)  # general t_T: x0* = x_T - t_T v*
    v = T.v_target_flow(x_T, z_k, t_T, t_k)
    assert torch.allclose(T.x0_target(x_T, z_k, 1 - t_T, t_T, 1 - t_k, t_k), T.flow_x0_from_v(x_T, v, t_T),
                          atol=1e-12)
    a_T, s_T, a_k, s_k = _levels(gen, B)  # EDM formula on x/alpha, sigma/alpha == VP formula on x
    ap = lambda a: T._b(a, x_T)  # noqa: E731
    edm = T.x0_target_edm(x_T / ap(a_T), z_k / ap(a_k), s_T / a_T, s_k / a_k)
    assert torch.allclose(edm, T.x0_target(x_T, z_k, a_T, s_T, a_k, s_k), atol=1e-12)
    assert torch.allclose(T.x0_target(x_T, z_k, a_T, s_T, a_k, 0.0), z_k / ap(a_k), atol=1e-12)
    assert torch.allclose(T.x0_target_edm(x_T, z_k, 80.0, 0.0), z_k, atol=1e-12)


def test_vp_reweighting_identity(gen):
    x_T, x0_hat, x0_star = (_rn(gen, B, 2, 3, 3) for _ in range(3))
    a_T, s_T = 0.068, (1 - 0.068**2) ** 0.5  # SDXL-like alpha_T
    eps_hat, eps_star = T.eps_from_x0(x_T, x0_hat, a_T, s_T), T.eps_from_x0(x_T, x0_star, a_T, s_T)
    lhs = T.vp_reweighted_mse(x0_hat, x0_star, a_T, s_T)
    assert torch.allclose(lhs, mean_flat((eps_hat - eps_star) ** 2), rtol=1e-12, atol=0)
    a, s = _levels(gen, B)[:2]  # per-sample [B] levels
    lhs = T.vp_reweighted_mse(x0_hat, x0_star, a, s)[:, None]
    rhs = mean_flat((T.eps_from_x0(x_T, x0_hat, a, s) - T.eps_from_x0(x_T, x0_star, a, s)) ** 2)[:, None]
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=0)


def test_teacher_grid_and_anchor_levels():
    s = dp.teacher_grid(80.0, dp.DPConfig())  # dp_dmd.md section 5
    assert len(s) == 31 and s[0] == 80.0 and s[-1] == 0 and abs(s[-2] - 0.002) < 1e-12
    assert abs(s[3] - 44.4) < 0.05 and abs(s[5] - 29.1) < 0.05 and abs(s[10] - 8.9) < 0.05
    assert dp.DPConfig(anchor_k=-1).anchor() == 30
    for bad in (dp.DPConfig(anchor_k=31), dp.DPConfig(anchor_k=0), dp.DPConfig(teacher_sampler="dpm")):
        with pytest.raises(ConfigError):
            dp.build(bad, None, 0.05)


# --- tiny student + engine rollout (float64) --------------------------------------------------------
def _mlp(seed):
    torch.manual_seed(seed)
    return build_denoiser(MLP).double()


def _tiny(levels=LEVELS, seed=0):
    teacher = _mlp(seed).requires_grad_(False)
    fake = copy.deepcopy(teacher)
    with torch.no_grad():  # a fake score that differs from the teacher, so the DMD gradient is non-zero
        for p in fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=DT))
    student = Student(copy.deepcopy(teacher).requires_grad_(True), levels, renoise="ddim")
    z = torch.randn(B, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    batch = Batch(z=z, cond=None, real=torch.zeros(B, 2, dtype=DT), rnd=FixedRandom(B), step=3)
    return Nets(teacher=teacher, student=student, fake=fake), batch


def _record(student):
    """Wrap ``student.denoise`` to keep every step's output (with its graph)."""
    outs, orig = [], student.denoise
    student.denoise = lambda x, i, c: outs.append(orig(x, i, c)) or outs[-1]
    return outs


def _losses(nets, batch, gen, cfg=None):
    l_dmd = dmd.DistributionMatching(dmd.DMDConfig())(nets, batch, gen).loss.mean()
    l_div = dp.DPTerm(cfg or dp.DPConfig())(nets, batch, gen).loss.mean()
    return l_dmd, l_div


def test_stop_gradient_and_theta_decomposition():
    nets, batch = _tiny()
    outs = _record(nets.student)
    gen = rollout_dp(nets.student, batch, batch.z, detach=True)
    l_dmd, l_div = _losses(nets, batch, gen)
    assert gen.aux["first"] is outs[0] and len(outs) == 4
    (g,) = torch.autograd.grad(l_dmd, gen.aux["first"], retain_graph=True, allow_unused=True)
    assert g is None or not g.any()  # 9.4: DMD never reaches the first-step output
    assert all(g is None for g in torch.autograd.grad(l_div, outs[1:], retain_graph=True, allow_unused=True))
    params = list(nets.student.parameters())
    for lam in (0.05, 0.0):  # 9.4 decomposition; lam = 0 is 9.9 (multi-step DMD, detached first step)
        total = torch.autograd.grad(l_dmd + lam * l_div, params, retain_graph=True)
        ref_dmd, ref_div = _reference_grads(nets, batch, params)
        for t, a, b in zip(total, ref_dmd, ref_div):
            assert torch.allclose(t, a + lam * b, rtol=1e-10, atol=1e-14)


def _reference_grads(nets, batch, params):
    """grad_theta L_DMD with the post-first-step state as a constant, and grad_theta L_div."""
    s = nets.student
    x_T = s.sigma(0) * batch.z
    with torch.no_grad():
        x = T.ddim_step(x_T, s.denoise(x_T, 0, None), 1.0, s.sigma(0), 1.0, s.sigma(1))
    for i in range(1, s.num_steps):
        x0 = s.denoise(x, i, None)
        x = T.ddim_step(x, x0, 1.0, s.sigma(i), 1.0, s.sigma(i + 1)) if i < s.num_steps - 1 else x0
    l_dmd = dmd.DistributionMatching(dmd.DMDConfig())(nets, batch, GenOut(x=x, x_T=x_T)).loss.mean()
    pred0 = s.denoise(x_T, 0, None)
    l_div = dp.DPTerm(dp.DPConfig())(nets, batch, GenOut(x=pred0, x_T=x_T, aux={"first": pred0})).loss.mean()
    return torch.autograd.grad(l_dmd, params), torch.autograd.grad(l_div, params)


def test_ablation_without_detach_lets_dmd_reach_the_first_step():
    nets, batch = _tiny()
    gen = rollout_dp(nets.student, batch, batch.z, detach=False)
    l_dmd, _ = _losses(nets, batch, gen)
    (g,) = torch.autograd.grad(l_dmd, gen.aux["first"], allow_unused=True)
    assert g is not None and g.abs().max() > 0  # 9.5


def test_zero_at_target():
    nets, batch = _tiny()
    term = dp.DPTerm(dp.DPConfig())
    x_T = nets.student.sigma(0) * batch.z
    x0_star, _, _ = term.target(nets, batch, x_T)
    pred0 = x0_star.clone().requires_grad_()
    out = term(nets, batch, GenOut(x=pred0, x_T=x_T, aux={"first": pred0}))
    (g,) = torch.autograd.grad(out.loss.mean(), pred0)
    assert torch.equal(out.loss, torch.zeros(B, dtype=DT)) and not g.any()  # 9.3


class Spy(torch.nn.Module):
    """Records each teacher call's input and whether autograd was recording."""

    def __init__(self, D):
        super().__init__()
        self.D, self.calls = D, []
        self.num_classes, self.sigma_data = 0, 0.5

    def forward(self, x, sigma, cond=None):
        self.calls.append((x, torch.is_grad_enabled(), float(sigma[0])))
        return self.D(x, sigma, cond)


@pytest.mark.parametrize("G", ["mixture", "gaussian"])
def test_teacher_rollout_same_noise_no_graph_and_K1_inverts_teacher(G):
    D = MixtureDenoiser(ring8()) if G == "mixture" else GaussianDenoiser([0.3, -0.2], 0.5)
    D.requires_grad_(False)
    nets, batch = _tiny()
    nets.teacher, nets.student = Spy(D), Student(D, LEVELS, renoise="ddim")  # student weights = teacher's
    gen = rollout_dp(nets.student, batch, batch.z)
    term = dp.DPTerm(dp.DPConfig(anchor_k=1))
    out = term(nets, batch, gen)
    x_in, grad_on, sigma = nets.teacher.calls[0]
    assert torch.equal(x_in, gen.x_T) and torch.equal(gen.x_T, 80.0 * batch.z) and sigma == 80.0  # 9.6
    assert len(nets.teacher.calls) == 1 and not grad_on
    assert term._cache["x0"].grad_fn is None and not term._cache["x0"].requires_grad
    assert out.loss.abs().max() < 1e-20  # K = 1: x0* = D_teacher(x_T; sigma_0) = the student's pred0


def test_anchor_final_is_the_teacher_sample_and_cache_avoids_recomputing():
    nets, batch = _tiny()
    nets.teacher = Spy(nets.teacher)
    x_T = nets.student.sigma(0) * batch.z
    term = dp.DPTerm(dp.DPConfig(anchor_k=30))
    x0_star, sigma_k, _ = term.target(nets, batch, x_T)
    assert sigma_k == 0 and len(nets.teacher.calls) == 30
    final = sample_euler(nets.teacher.D, x_T, dp.teacher_grid(80.0, term.cfg))
    assert torch.allclose(x0_star, final, rtol=0, atol=1e-12)
    term.target(nets, batch, x_T)
    assert len(nets.teacher.calls) == 30  # same step, same x_T: cached
    batch.step += 1
    term.target(nets, batch, x_T)
    assert len(nets.teacher.calls) == 60


def test_one_step_student_regresses_onto_the_teacher_sample():
    nets, batch = _tiny(levels=[80.0])
    gen = rollout_dp(nets.student, batch, batch.z)
    assert gen.x is gen.aux["first"]
    out = dp.DPTerm(dp.DPConfig(anchor_k=-1))(nets, batch, gen)
    final = sample_euler(nets.teacher, gen.x_T, dp.teacher_grid(80.0, dp.DPConfig()))
    assert torch.allclose(out.loss, mean_flat((gen.x - final) ** 2), rtol=1e-12)


def test_vp_reweight_switch():
    nets, batch = _tiny()
    gen = rollout_dp(nets.student, batch, batch.z)
    plain = dp.DPTerm(dp.DPConfig())(nets, batch, gen).loss
    rew = dp.DPTerm(dp.DPConfig(vp_reweight=True))(nets, batch, gen).loss
    assert torch.allclose(rew, plain / 80.0**2, rtol=1e-12)


# --- 9.7 schedule ------------------------------------------------------------------------------------
def test_official_update_schedule():
    cfg = DistillRunConfig()
    cfg.schedule.ratio, cfg.schedule.gen_offset, cfg.schedule.critic_on_gen_steps = 6, 5, False
    gen = [i for i in range(60) if is_generator_step(cfg, i)]
    crit = [i for i in range(60) if is_critic_step(cfg, i)]
    assert gen == list(range(5, 60, 6)) and len(crit) == 50 and not set(gen) & set(crit)


# --- engine: smoke test per phase and lambda = 0 equivalence -----------------------------------------
def _cfg(extras, detach=True, rollout="full"):
    cfg = DistillRunConfig(method="dmd", extras=extras)
    cfg.student.steps, cfg.student.renoise, cfg.student.rollout = 4, "ddim", rollout
    cfg.train.batch, cfg.train.seed, cfg.schedule.ratio = 32, 0, 1  # generator and critic every step
    cfg.dp.detach = detach
    return cfg


def _run(cfg, teacher, iters):
    run = build_run(cfg, torch.device("cpu"), teacher=teacher, teacher_meta={"data": {"name": "ring8",
                                                                                      "shape": [2]}})
    logs = [train_iteration(run, log_norms=True) for _ in range(iters)]
    return run, logs


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "no_detach"])
def test_engine_first_step_gets_dmd_gradient_only_without_detach(detach):
    """Through the engine (9.4 / 9.5): the DMD term's gradient on the first-step output is 0 with
    the stop-gradient and > 0 without it. Step 1's logs: at step 0 the fake score still equals the
    teacher, so the DMD gradient is 0 everywhere."""
    torch.manual_seed(0)
    teacher = build_denoiser(MLP)
    with torch.no_grad():  # a non-trivial teacher (the output layer starts at zero)
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    run, logs = _run(_cfg({"dp": 0.05}, detach=detach), teacher, 2)
    assert isinstance(run.rollout, dp.DPRollout) and run.rollout.detach is detach
    assert logs[-1]["gradnorm_dm"] > 0 and logs[-1]["gradnorm_dp_first"] > 0
    assert (logs[-1]["gradnorm_dm_first"] > 0) is not detach, logs[-1]["gradnorm_dm_first"]


def test_engine_smoke():
    teacher = build_denoiser(MLP)
    run, logs = _run(_cfg({"dp": 0.05}), teacher, 2)
    assert isinstance(run.rollout, dp.DPRollout) and run.rollout.detach and "refused_step" not in logs[-1]
    for k in ("dp", "dp_teacher_s", "loss_dp", "dm", "fake", "gradnorm_dp"):
        assert k in logs[-1] and torch.isfinite(torch.tensor(logs[-1][k])), k
    assert all(p.grad is None for p in run.nets.teacher.parameters())
    run.methods[1].terms[0].setup(run.nets, run.ctx)  # renoise=ddim passes
    run.nets.student.renoise = "fresh"
    with pytest.raises(ConfigError):
        run.methods[1].terms[0].setup(run.nets, run.ctx)


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lambda_zero_no_detach_equals_plain_deterministic_dmd_bit_for_bit():
    teacher = build_denoiser(MLP)
    runs = {d: _run(_cfg({"dp": 0.0}, detach=d), teacher, 0)[0] for d in (False, True)}
    assert runs[False].rollout.detach is False and runs[True].rollout.detach is True
    for run in runs.values():
        for _ in range(3):
            train_iteration(run, log_norms=True)
    run_dmd, _ = _run(_cfg({}, rollout="full"), teacher, 3)
    assert isinstance(runs[False].rollout, dp.DPRollout) and run_dmd.rollout is rollout_full
    assert _same(runs[False].nets.student, run_dmd.nets.student)
    assert _same(runs[False].nets.fake, run_dmd.nets.fake)
    assert not _same(run_dmd.nets.student, teacher)  # the students moved: the comparison is not vacuous
    assert not _same(runs[True].nets.student, run_dmd.nets.student)  # and the detach does matter
