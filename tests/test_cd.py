"""Consistency-distillation properties (specs/consistency.md section 8: 1, 2, 3, 7) in float64, plus
engine smoke tests. ECT (properties 4-5) is not implemented; 6 (multi-step CM sampler) is the
student's, not this loss's."""

import math

import pytest
import torch
from torch import nn

from fewstep.core.precond import SIGMA_MIN, boundary_scalings
from fewstep.errors import ConfigError
from fewstep.losses import cd
from fewstep.losses.base import Batch, Nets
from fewstep.models.io import build_denoiser
from tests.helpers import MLP, FixedRandom, GaussianDenoiser, _changed, _params, tiny_run

B, D = 64, 2


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Holder(nn.Module):
    """Stands in for a Student / target: only ``.G`` is used by the CD term."""

    def __init__(self, G):
        super().__init__()
        self.G = G


class ExactCM(nn.Module):
    """Exact consistency function of N(mu, s^2 I):
    ``f*(x, sigma) = mu + (x - mu) sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2)``."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = torch.as_tensor(mu, dtype=torch.float64), s

    def forward(self, x, sigma, cond=None):
        ratio = math.sqrt(self.s**2 + SIGMA_MIN**2) / (self.s**2 + sigma[:, None] ** 2).sqrt()
        return self.mu + (x - self.mu) * ratio


class Recorder(nn.Module):
    def __init__(self, G):
        super().__init__()
        self.G, self.sigmas = G, []

    def forward(self, x, sigma, cond=None):
        self.sigmas.append(sigma.detach().clone())
        return self.G(x, sigma, cond)


def _batch(real, overrides=None):
    n = real.shape[0]
    return Batch(z=torch.zeros_like(real), cond=None, real=real, rnd=FixedRandom(n, overrides=overrides))


def test_boundary_condition():  # 8.1
    c_skip, c_out, _, _ = boundary_scalings(torch.tensor([SIGMA_MIN], dtype=torch.float64))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    torch.manual_seed(0)
    f = build_denoiser({**MLP, "boundary": True}).double()
    with torch.no_grad():
        for p in f.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(8, D, dtype=torch.float64)
    assert torch.equal(f(x, torch.full((8,), SIGMA_MIN, dtype=torch.float64)), x)
    assert not torch.allclose(f(x, torch.full((8,), 1.0, dtype=torch.float64)), x)


def test_grid_and_index_range():  # 8.2
    cfg = cd.CDConfig()
    t = cd.cd_grid(cfg)
    assert len(t) == 18 and abs(t[0] - 80) < 1e-9 and abs(t[-1] - 0.002) < 1e-12 and (t[1:] < t[:-1]).all()
    # the online network never sees t_{N-1} = sigma_min; the target sees every t_{n+1}, n = 0..N-2
    mu, s, n = torch.zeros(2, dtype=torch.float64), 0.5, 4000
    online, target = Recorder(ExactCM(mu, s)), Recorder(ExactCM(mu, s))
    nets = Nets(GaussianDenoiser(mu, s), Holder(online), target=Holder(target))
    cd.ConsistencyDistillation(cfg)(nets, _batch(torch.zeros(n, D, dtype=torch.float64)))
    seen_t, seen_next = online.sigmas[0], target.sigmas[0]
    assert set(seen_t.tolist()) == set(t[:-1].tolist())
    assert set(seen_next.tolist()) == set(t[1:].tolist())
    assert torch.equal(seen_next, t[torch.searchsorted(-t, -seen_t) + 1])


def test_heun_step_is_third_order_on_gaussian():  # 8.3 (solver)
    mu, s = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.5
    teacher = GaussianDenoiser(mu, s)
    x = mu + torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2.0

    def exact(x, t0, t1):
        return mu + (x - mu) * math.sqrt(s**2 + t1**2) / math.sqrt(s**2 + t0**2)

    errs = []
    for h in (0.2, 0.1):
        t, t1 = torch.full((16,), 1.0, dtype=torch.float64), torch.full((16,), 1.0 - h, dtype=torch.float64)
        errs.append((cd.teacher_step(teacher, x, t, t1, None) - exact(x, 1.0, 1.0 - h)).abs().max())
        euler = cd.teacher_step(teacher, x, t, t1, None, "euler")
        assert torch.allclose(euler, x - h * (x - teacher(x, t)) / 1.0)
    assert 6 < errs[0] / errs[1] < 10  # local error O(h^3)


def test_cd_loss_vanishes_for_the_exact_consistency_function(gen):  # 8.3 (loss)
    mu, s, n = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.5, 2000
    real = mu + s * torch.randn(n, D, dtype=torch.float64, generator=gen)
    f_star, teacher = Holder(ExactCM(mu, s)), GaussianDenoiser(mu, s)
    losses = {}
    for N in (18, 36):  # f_theta = f_theta- = f*: only the Heun step's error remains
        term = cd.ConsistencyDistillation(cd.CDConfig(num_points=N))
        losses[N] = term(Nets(teacher, f_star, target=f_star), _batch(real)).loss
    wrong = Holder(ExactCM(mu + 0.1, s))
    off = cd.ConsistencyDistillation(cd.CDConfig())(Nets(teacher, wrong, target=f_star), _batch(real)).loss
    assert losses[18].shape == (n,) and off.mean() > 100 * losses[18].mean()
    # error O(h^3) per step -> squared distance O(h^6): halving h divides it by about 64
    assert losses[18].mean() > 30 * losses[36].mean()


class GaussCM(nn.Module):
    """The consistency function of N(theta, s^2 I) with a trainable mean theta:
    ``f(x, sigma) = theta + (x - theta) r(sigma)``, ``r = sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2)``."""

    def __init__(self, theta, s):
        super().__init__()
        self.theta, self.s = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone()), s

    def r(self, sigma):
        return math.sqrt(self.s**2 + SIGMA_MIN**2) / (self.s**2 + sigma**2).sqrt()

    def forward(self, x, sigma, cond=None):
        return self.theta + (x - self.theta) * self.r(sigma)[:, None]


def test_gradient_pulls_the_student_toward_the_exact_teacher(gen):
    """Exact teacher N(mu, s^2 I) (a one-component mixture), student and target f_theta = f_theta-
    of the family above. Along the exact PF-ODE x_t' - mu = (x_t - mu) sqrt(s^2 + t'^2)/sqrt(s^2 + t^2),
    so f_theta(x_t, t) - f_theta(x_t', t') = (theta - mu)(r(t') - r(t)) and, l2 distance over D
    dims, d loss.mean() / d theta = 2 / (B D) sum_i (theta - mu)(r(t'_i) - r(t_i))(1 - r(t_i)), with
    r(t') > r(t): descent moves theta to mu. The Heun step is close to the exact ODE step."""
    from fewstep.core.mixture import GaussianMixture, MixtureDenoiser

    mu, s, n = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.5, 512
    theta = torch.tensor([-0.3, 0.4], dtype=torch.float64)
    teacher = MixtureDenoiser(GaussianMixture.isotropic(mu[None], s))
    student, target = GaussCM(theta, s), GaussCM(theta, s)  # the term itself must stop the target's gradient
    real = mu + s * torch.randn(n, D, dtype=torch.float64, generator=gen)
    batch = _batch(real)
    cfg = cd.CDConfig(num_points=40)
    out = cd.ConsistencyDistillation(cfg)(Nets(teacher, Holder(student), target=Holder(target)), batch)
    out.loss.mean().backward()
    t_grid = cd.cd_grid(cfg)
    idx = batch.rnd.randint("cd_index", 0, cfg.num_points - 1)
    r_t, r_next = student.r(t_grid[idx]), student.r(t_grid[idx + 1])
    expected = 2 / (n * D) * (theta - mu) * ((r_next - r_t) * (1 - r_t)).sum()
    assert target.theta.grad is None  # sg(f_theta-)
    assert torch.allclose(student.theta.grad, expected, rtol=1e-3), (student.theta.grad, expected)
    cos = torch.nn.functional.cosine_similarity(-student.theta.grad, mu - theta, dim=0)
    assert cos > 1 - 1e-6


def test_distances():
    a, b = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(cd.distance(a, b, "l2"), ((a - b) ** 2).mean((1, 2, 3)))
    assert torch.allclose(cd.distance(a, b, "l1"), (a - b).abs().mean((1, 2, 3)))
    c = 0.00054 * math.sqrt(3 * 64)
    ph = cd.distance(a, b, "pseudo_huber")
    assert torch.allclose(ph, (((a - b) ** 2).sum((1, 2, 3)) + c**2).sqrt() - c)
    assert torch.equal(cd.distance(a, a, "pseudo_huber"), torch.zeros(4, dtype=torch.float64))


def test_build_checks_choices():
    with pytest.raises(ConfigError):
        cd.build(cd.CDConfig(distance="lpips"), None)
    m = cd.build(cd.CDConfig(target_mu=0.5), None)
    assert m.boundary and m.target_rate == 0.5 and not m.needs_fake


# ---------------------------------------------------------------------------------------------
# engine smoke tests with a real tiny network
# ---------------------------------------------------------------------------------------------
def test_smoke_generator_phase_and_target_ema():  # also 8.7 with mu = 0
    from fewstep.train.distill import train_iteration

    run = tiny_run("cd")
    n = run.nets
    assert n.student.G.boundary and n.target.G.boundary and n.fake is None
    s0, t0, g0 = _params(n.student), _params(n.teacher), _params(n.target)
    logs = train_iteration(run)
    assert "refused_step" not in logs and math.isfinite(logs["loss_cd"])
    assert _changed(n.student, s0) and not _changed(n.teacher, t0)
    for p_old, p_new, p_tgt in zip(g0, n.student.parameters(), n.target.parameters()):
        assert torch.allclose(p_tgt, 0.95 * p_old + 0.05 * p_new.detach(), atol=1e-7)  # mu = 0.95
    run = tiny_run("cd", {"cd": {"target_mu": 0.0, "distance": "pseudo_huber", "solver": "euler"}})
    for _ in range(2):
        logs = train_iteration(run)
        assert "refused_step" not in logs and math.isfinite(logs["loss_cd"])
        assert all(torch.equal(p, q) for p, q in zip(run.nets.student.parameters(),
                                                    run.nets.target.parameters()))
