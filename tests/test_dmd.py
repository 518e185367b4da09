"""DMD / DMD2 properties (specs/dmd.md section 9) with exact Gaussian denoisers, float64."""

import math

import torch

from fewstep.losses import dmd
from fewstep.losses.base import Batch, GenOut, Nets
from tests.helpers import FixedRandom, GaussianDenoiser

B, D = 64, 3


def _setup(mu_r, mu_f, s=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.tensor(mu_f) + s * torch.randn(B, D, generator=g, dtype=torch.float64)).requires_grad_()
    nets = Nets(teacher=GaussianDenoiser(mu_r, s), student=None, fake=GaussianDenoiser(mu_f, s))
    batch = Batch(z=torch.zeros(B, D), cond=None, real=torch.zeros(B, D), rnd=FixedRandom(B))
    return x, nets, batch


def test_grid_and_index_range():
    K = dmd.ascending_grid()
    assert abs(K[0] - 0.002) < 1e-12 and abs(K[999] - 80) < 1e-9 and (K[1:] > K[:-1]).all()
    rnd = FixedRandom(10_000)
    idx = rnd.randint("dm_index", 20, 981)
    assert idx.min() >= 20 and idx.max() <= 980 and idx.max() == 980


def test_zero_gradient_when_fake_equals_teacher():
    x, nets, batch = _setup([1.0, 0, 0], [1.0, 0, 0])
    nets.fake = GaussianDenoiser([1.0, 0, 0], 0.5)
    out = dmd.DistributionMatching(dmd.DMDConfig())(nets, batch, GenOut(x=x, x_T=x))
    (g,) = torch.autograd.grad(out.loss.mean(), x)
    assert torch.equal(g, torch.zeros_like(g))


def test_autograd_equals_g_over_numel_and_points_to_data():
    x, nets, batch = _setup([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])
    out = dmd.DistributionMatching(dmd.DMDConfig())(nets, batch, GenOut(x=x, x_T=x))
    (grad,) = torch.autograd.grad(out.loss.mean(), x)
    idx = batch.rnd.randint("dm_index", 20, 981)
    sigma = dmd.ascending_grid()[idx]
    eps = batch.rnd.randn("dm_noise", D)
    g, _ = dmd.dm_gradient(x.detach(), sigma, eps, nets.teacher, nets.fake, None)
    assert torch.allclose(grad, g / (B * D), atol=1e-15)
    # Gaussian check (dmd.md 9.4): D_real - D_fake = sigma^2 (mu_r - mu_f)/(s^2 + sigma^2) for all x,
    # so -g points from mu_f to mu_r in every sample, and a gradient step moves the mean toward mu_r
    direction = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(-g, direction.expand_as(g), dim=1)
    assert torch.allclose(cos, torch.ones(B, dtype=torch.float64))
    x_new = x.detach() - 100.0 * grad
    assert (x_new.mean(0) - direction).norm() < (x.detach().mean(0) - direction).norm()


def test_scale_invariance_of_g():
    x = torch.randn(8, D, dtype=torch.float64)
    sigma, eps = torch.full((8,), 2.0, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    Dr, Df = (lambda y, s, c: 0.3 * y + 1.0), (lambda y, s, c: 0.2 * y - 0.5)
    g1, _ = dmd.dm_gradient(x, sigma, eps, Dr, Df, None)
    c = 3.7  # scaling (x - D_real) and (D_fake - D_real) by c leaves g unchanged
    Dr_c = lambda y, s, cond: x - c * (x - Dr(y, s, cond))  # noqa: E731
    Df_c = lambda y, s, cond: Dr_c(y, s, cond) + c * (Df(y, s, cond) - Dr(y, s, cond))  # noqa: E731
    g2, _ = dmd.dm_gradient(x, sigma, eps, Dr_c, Df_c, None)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_gan_losses_at_zero_logits():
    class ZeroHead(torch.nn.Module):
        def forward(self, h):
            return torch.zeros(h.shape[0], dtype=h.dtype)
    l0 = torch.zeros(5)
    assert torch.allclose(torch.nn.functional.softplus(l0) + torch.nn.functional.softplus(-l0),
                          torch.full((5,), 2 * math.log(2)))
    assert torch.allclose(torch.nn.functional.softplus(-l0), torch.full((5,), math.log(2)))
    assert torch.allclose(torch.nn.functional.softplus(-l0), -torch.nn.functional.logsigmoid(l0))


def test_fake_loss_prefers_the_generator_posterior_mean(gen):
    # generator N(mu_f, s^2): the exact denoiser of *that* distribution minimises L_fake
    mu_f, s, n = torch.tensor([0.7, -0.3, 0.0]), 0.5, 20_000
    x = (mu_f + s * torch.randn(n, D, generator=gen)).double()
    sigma = dmd.ascending_grid()[torch.randint(0, 1000, (n,), generator=gen)]
    eps = torch.randn(n, D, generator=gen, dtype=torch.float64)
    losses = {}
    for name, mu in {"exact": mu_f, "shifted": mu_f + 0.3, "data": torch.zeros(3)}.items():
        losses[name] = dmd.fake_score_loss(GaussianDenoiser(mu, s), x, None, sigma, eps, 0.5).mean()
    assert losses["exact"] < losses["shifted"] and losses["exact"] < losses["data"]


def test_generator_step_leaves_critic_without_grad():
    x, nets, batch = _setup([1.0, 0, 0], [0.0, 0, 0])
    nets.fake.requires_grad_(False)
    nets.teacher.requires_grad_(False)
    out = dmd.DistributionMatching(dmd.DMDConfig())(nets, batch, GenOut(x=x, x_T=x))
    out.loss.mean().backward()
    assert nets.fake.mu.grad is None and nets.teacher.mu.grad is None and x.grad is not None


def test_student_ema_clock_is_the_generator_update(monkeypatch):
    """The student EMA's half-life ramp counts generator updates, not iterations (issue 20.1): with
    dmd's ratio 5 the EMA sees update indices 0, 1, 2, ... at iterations 0, 5, 10, ..."""
    from fewstep.train import phases
    from fewstep.train.distill import train_iteration
    from tests.helpers import tiny_run

    seen = []
    real = phases.ema_beta
    monkeypatch.setattr(phases, "ema_beta", lambda k, h, r: seen.append(k) or real(k, h, r))
    run = tiny_run("dmd", {"train": {"batch": 8, "iters": 20, "ema_halflife": 10.0}})
    assert run.cfg.schedule.ratio == 5 and run.ema is not None
    for _ in range(16):
        train_iteration(run)
    assert seen == [0, 1, 2, 3]  # iterations 0, 5, 10, 15
    assert phases.generator_update_index(run.cfg.schedule, 15) == 3
