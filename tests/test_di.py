"""Diff-Instruct properties (specs/diff_instruct.md section 7) in float64, plus engine smoke tests.

Property 7.6 (shared dropout mask) does not apply: our networks have no dropout (see losses/di.py).
"""

import copy
import math

import pytest
import torch

from fewstep.core.mixture import MixtureDenoiser, ring8
from fewstep.core.precond import edm_loss_weight
from fewstep.core.utils import sum_flat
from fewstep.losses import di, dmd
from fewstep.losses.base import Batch, GenOut, Nets
from tests.helpers import FixedRandom, GaussianDenoiser, _changed, _params, tiny_run

B, D = 64, 2


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: threads only contend on the shared 2-core box
    yield
    torch.set_num_threads(n)


def _x(mu, s=0.5, seed=0, n=B):
    g = torch.Generator().manual_seed(seed)
    return (torch.tensor(mu) + s * torch.randn(n, D, generator=g, dtype=torch.float64)).requires_grad_()


def _batch(overrides=None, n=B):
    return Batch(z=torch.zeros(n, D), cond=None, real=torch.zeros(n, D),
                 rnd=FixedRandom(n, overrides=overrides))


def _sigma_eps(rnd):
    cfg, x = di.DIConfig(), torch.zeros(1, dtype=torch.float64)
    return di.lognormal_sigma(rnd, "ikl_sigma", cfg.p_mean, cfg.p_std, x), rnd.randn("ikl_noise", D)


def test_autograd_equals_diff_over_batch():  # 7.1
    x = _x([0.0, 0.0])
    nets = Nets(teacher=MixtureDenoiser(ring8()), student=None, fake=GaussianDenoiser([0.0, 0.0], 0.5))
    batch = _batch()
    out = di.IKL(di.DIConfig())(nets, batch, GenOut(x=x, x_T=x))
    (grad,) = torch.autograd.grad(out.loss.mean(), x)
    sigma, eps = _sigma_eps(batch.rnd)
    _, diff = di.ikl_loss(x.detach(), sigma, eps, nets.teacher, nets.fake, None)
    assert out.loss.shape == (B,)
    assert torch.allclose(grad, diff / B, rtol=0, atol=1e-15)
    # loss_scaling multiplies the gradient
    out2 = di.IKL(di.DIConfig(loss_scaling=3.0))(nets, batch, GenOut(x=x, x_T=x))
    (grad2,) = torch.autograd.grad(out2.loss.mean(), x)
    assert torch.allclose(grad2, 3 * grad, rtol=1e-14)


def test_zero_gradient_when_fake_equals_teacher():  # 7.2
    x = _x([1.0, 0.0])
    same = GaussianDenoiser([1.0, 0.0], 0.5)
    nets = Nets(teacher=same, student=None, fake=copy.deepcopy(same))
    out = di.IKL(di.DIConfig())(nets, _batch(), GenOut(x=x, x_T=x))
    (grad,) = torch.autograd.grad(out.loss.mean(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_ratio_to_dmd_gradient_is_the_dmd_normaliser():  # 7.3
    x = _x([0.3, -0.2], s=1.0)
    nets = Nets(teacher=MixtureDenoiser(ring8()), student=None, fake=GaussianDenoiser([0.3, -0.2], 1.0))
    idx = torch.randint(20, 981, (B,), generator=torch.Generator().manual_seed(1))
    eps = torch.randn(B, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cfg = di.DIConfig()
    ln_sigma = dmd.ascending_grid()[idx].log()  # the same sigma through DI's log-normal stream
    rnd = {"dm_index": idx, "dm_noise": eps, "ikl_noise": eps,
           "ikl_sigma": (ln_sigma - cfg.p_mean) / cfg.p_std}
    batch = _batch(rnd)
    out_dmd = dmd.DistributionMatching(dmd.DMDConfig())(nets, batch, GenOut(x=x, x_T=x))
    out_di = di.IKL(cfg)(nets, batch, GenOut(x=x, x_T=x))
    (g_dmd,) = torch.autograd.grad(out_dmd.loss.mean(), x)
    (g_di,) = torch.autograd.grad(out_di.loss.mean(), x)
    _, w = dmd.dm_gradient(x.detach(), dmd.ascending_grid()[idx], eps, nets.teacher, nets.fake, None)
    # DMD: d/dx = (D_f - D_r) / (w numel_total); DI: (D_f - D_r) / B, so the ratio is w * D per element
    ratio = g_di / g_dmd
    assert torch.allclose(ratio, (w * D)[:, None].expand_as(ratio), rtol=1e-9)


def test_lognormal_sigma_sampler():  # 7.4
    n = 100_000
    sigma = di.lognormal_sigma(FixedRandom(n), "s", -1.2, 1.2, torch.zeros(1, dtype=torch.float64))
    assert sigma.shape == (n,) and (sigma > 0).all()
    assert abs(sigma.log().mean() + 1.2) < 0.02 and abs(sigma.log().std() - 1.2) < 0.02


def test_gaussian_step_moves_toward_data_more_at_high_sigma():  # 7.5
    mu_r, mu_f, s = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.0, 0.0]), 0.5
    x = _x(mu_f.tolist())
    Dr, Df = GaussianDenoiser(mu_r, s), GaussianDenoiser(mu_f, s)
    eps = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sizes = []
    for sig in (0.1, 0.5, 2.0, 10.0):
        sigma = torch.full((B,), sig, dtype=torch.float64)
        loss, diff = di.ikl_loss(x, sigma, eps, Dr, Df, None)
        expected = sig**2 * (mu_f - mu_r) / (s**2 + sig**2)
        assert torch.allclose(diff, expected.expand_as(diff), atol=1e-12)
        (grad,) = torch.autograd.grad(loss.mean(), x)
        x_new = x.detach() - 10.0 * grad
        assert (x_new.mean(0) - mu_r).norm() < (x.detach().mean(0) - mu_r).norm()
        sizes.append(grad.norm())
    assert all(a < b for a, b in zip(sizes, sizes[1:]))


def test_fake_loss_is_lambda_weighted_sum_and_prefers_generator_denoiser(gen):
    mu_f, s, n = torch.tensor([0.7, -0.3]), 0.5, 20_000
    y = (mu_f + s * torch.randn(n, D, generator=gen)).double()
    sigma = di.lognormal_sigma(FixedRandom(n), "fake_sigma", -1.2, 1.2, y)
    eps = torch.randn(n, D, generator=gen, dtype=torch.float64)
    fake = GaussianDenoiser(mu_f, s)
    loss = di.edm_fake_loss(fake, y, None, sigma, eps, 0.5)
    by_hand = edm_loss_weight(sigma) * sum_flat((fake(y + sigma[:, None] * eps, sigma) - y) ** 2)
    assert torch.allclose(loss, by_hand)
    losses = {k: di.edm_fake_loss(GaussianDenoiser(m, s), y, None, sigma, eps, 0.5).mean()
              for k, m in {"exact": mu_f, "shifted": mu_f + 0.3, "data": torch.zeros(2)}.items()}
    assert losses["exact"] < losses["shifted"] and losses["exact"] < losses["data"]


# ---------------------------------------------------------------------------------------------
# engine smoke tests with a real tiny network
# ---------------------------------------------------------------------------------------------
def test_smoke_defaults_and_phases():
    from fewstep.train.distill import critic_update, generator_update, make_batch, train_iteration

    run = tiny_run("di")
    cfg = run.cfg
    assert cfg.optim.betas == [0.0, 0.999] and cfg.fake_optim.betas == [0.0, 0.999]
    assert cfg.optim.grad_clip == 0 and cfg.fake_optim.grad_clip == 0
    assert run.nets.student.sigma(0) == 1.0 and cfg.schedule.critic_first
    n = run.nets
    # critic phase: only the fake network moves
    s0, f0, t0 = _params(n.student), _params(n.fake), _params(n.teacher)
    logs = critic_update(run, make_batch(run, 0), None)
    assert math.isfinite(logs["loss_fake"])
    assert _changed(n.fake, f0) and not _changed(n.student, s0) and not _changed(n.teacher, t0)
    # generator phase (fake now differs from the teacher): only the student moves
    f1 = _params(n.fake)
    _, logs = generator_update(run, make_batch(run, 1), log_norms=True)
    assert math.isfinite(logs["loss_ikl"]) and logs["gradnorm_ikl"] > 0
    assert _changed(n.student, s0) and not _changed(n.fake, f1) and not _changed(n.teacher, t0)
    for _ in range(3):
        logs = train_iteration(run)
        assert "refused_step" not in logs and all(math.isfinite(v) for v in logs.values())
    assert not _changed(n.teacher, t0)


def test_init_sigma_is_a_one_step_setting():
    """DI's sigma_init = 1.0 sets the 1-step input level; a 4-step DI student keeps DMD2's levels
    (it used to refuse to build because 1.0 < the next default level 17.5)."""
    from fewstep.models.student import DEFAULT_LEVELS

    assert tiny_run("di").nets.student.sigmas.tolist() == [1.0]
    run4 = tiny_run("di", {"student": {"steps": 4}})
    assert run4.nets.student.sigmas.tolist() == DEFAULT_LEVELS[4]


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("preset", ["distill_ring8_dmd", "distill_ring8_sid", "distill_grid25_dmd",
                                    "distill_ring8_di"])
def test_shipped_presets_build_one_and_four_step_students(preset, steps):
    """The ring8 dmd preset sets a 1-step input level (1.0); `--steps 4` with it must still build."""
    from fewstep.config import load_preset

    method = preset.rsplit("_", 1)[1]
    student = {**load_preset(preset).get("student", {}), "steps": steps}
    levels = tiny_run(method, {"student": student}).nets.student.sigmas.tolist()
    assert len(levels) == steps and (steps == 1 or levels[0] == 80.0)
