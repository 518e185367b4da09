"""DMD / DMD2 properties (specs/dmd.md section 9) with exact Gaussian denoisers, float64."""

import pytest
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


class TapNet(torch.nn.Module):
    """A "fake network" whose bottleneck (``net.blocks.0``, found by ``bottleneck_path``) is its
    input: the GAN head then sees the noised samples themselves."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Module()
        self.net.blocks = torch.nn.ModuleList([torch.nn.Identity()])

    def forward(self, x, sigma, cond=None):
        return self.net.blocks[0](x)


class LinearHead(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, h):
        return h @ self.w


def _gan_setup():
    """Real samples at +3 e1, generated at -3 e1, head logit 0.5 x_1: l_real = 1.5, l_fake = -1.5
    (non-zero, so a swapped real/fake label changes the value). The diffusion-GAN noise is pinned
    to zero so the logits are known exactly."""
    n, cfg = 8, dmd.DMDConfig(gan_max_index=1)
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    real, fake_x = 3.0 * e1.expand(n, D).clone(), (-3.0 * e1.expand(n, D)).clone().requires_grad_()
    zeros = {}
    for stream in ("gan_g", "gan_df", "gan_dr"):
        zeros[stream + "_noise"] = torch.zeros(n, D, dtype=torch.float64)
        zeros[stream + "_index"] = torch.zeros(n, dtype=torch.long)
    nets = Nets(teacher=None, student=None, fake=TapNet(), head=LinearHead([0.5, 0.0, 0.0]))
    batch = Batch(z=torch.zeros(n, D), cond=None, real=real, rnd=FixedRandom(n, overrides=zeros))
    return cfg, nets, batch, fake_x


def test_gan_discriminator_raises_real_and_lowers_fake_logits():
    sp = torch.nn.functional.softplus
    cfg, nets, batch, x = _gan_setup()
    out = dmd.GANDiscriminator(cfg)(nets, batch, GenOut(x=x, x_T=x))
    l_real, l_fake = torch.tensor(1.5, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)
    assert torch.allclose(out.loss, (sp(l_fake) + sp(-l_real)).expand(len(x)))  # dmd.md 2.3
    out.loss.mean().backward()
    assert x.grad is None  # the critic sees sg(x)
    # a descent step on the head must separate the two: l_real - l_fake = 6 w_1 has to grow
    assert nets.head.w.grad[0] < 0 and torch.equal(nets.head.w.grad[1:], torch.zeros(2, dtype=torch.float64))
    assert out.terms["d_real_acc"] == 1 and out.terms["d_fake_acc"] == 1


def test_gan_generator_pushes_its_samples_toward_real():
    sp = torch.nn.functional.softplus
    cfg, nets, batch, x = _gan_setup()
    out = dmd.GANGenerator(cfg)(nets, batch, GenOut(x=x, x_T=x))
    l_fake = torch.tensor(-1.5, dtype=torch.float64)
    assert torch.allclose(out.loss, sp(-l_fake).expand(len(x)))
    (g,) = torch.autograd.grad(out.loss.mean(), x)
    # d/dx softplus(-w.x) = -sigmoid(-w.x) w: descent moves each sample along +w, raising its logit
    expected = -torch.sigmoid(torch.tensor(1.5, dtype=torch.float64)) * nets.head.w.detach() / len(x)
    assert torch.allclose(g, expected.expand_as(g))


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


def test_generator_term_sends_no_gradient_to_the_critic_or_teacher():
    # both networks *could* receive gradients (requires_grad stays on): the term's stop-gradient
    # (dm_gradient under no_grad, sg(x - g) in the surrogate) must keep them out
    x, nets, batch = _setup([1.0, 0, 0], [0.0, 0, 0])
    assert nets.fake.mu.requires_grad and nets.teacher.mu.requires_grad
    out = dmd.DistributionMatching(dmd.DMDConfig())(nets, batch, GenOut(x=x, x_T=x))
    out.loss.mean().backward()
    assert nets.fake.mu.grad is None and nets.teacher.mu.grad is None and x.grad.abs().sum() > 0


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



def test_generator_phase_leaves_fake_head_and_teacher_without_grad():
    """The GAN generator term differentiates *through* the fake network and the head: the engine
    must freeze them in the generator phase (and the student in the critic phase)."""
    from fewstep.train.distill import critic_update, generator_update, make_batch
    from tests.helpers import _changed, _params, tiny_run

    run = tiny_run("dmd", {"dmd": {"gan_gen_weight": 0.1}})
    n = run.nets
    _, logs = generator_update(run, make_batch(run, 0), log_norms=False)
    assert logs["gan_g"] > 0
    assert all(p.grad is not None for p in n.student.parameters())
    for name, net in (("fake", n.fake), ("head", n.head), ("teacher", n.teacher)):
        assert all(p.grad is None for p in net.parameters()), name
    s0 = _params(n.student)
    critic_update(run, make_batch(run, 1), None)
    assert not _changed(n.student, s0) and all(p.grad is not None for p in n.head.parameters())


def test_normalizer_switch_formulas_and_its_effect_on_grid25():
    """dmd.normalizer (issue 20.2): per-sample (DMD2), batch mean, or none, checked as formulas on
    the exact grid25 denoisers with a student that covers 9 of 25 modes; the batch mean rescales the
    raw difference, so its energy profile is the raw one (the per-sample weights change it; the
    measured shares are printed — here 0.21 of the energy in the top 1% per sample vs 0.18)."""
    from fewstep.core.mixture import GaussianMixture, MixtureDenoiser, grid25

    p = grid25()
    q = GaussianMixture.isotropic(p.means[[0, 2, 4, 10, 12, 14, 20, 22, 24]], 0.05)
    D_real, D_fake = MixtureDenoiser(p), MixtureDenoiser(q)
    g = torch.Generator().manual_seed(0)
    x = q.sample(4000, g)[0]
    K = dmd.ascending_grid()
    sigma = K[torch.randint(20, 981, (4000,), generator=g)].double()
    eps = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    out = {n: dmd.dm_gradient(x, sigma, eps, D_real, D_fake, None, n) for n in dmd.NORMALIZERS}
    w = out["sample"][1]
    raw = out["none"][0]
    assert torch.allclose(out["sample"][0], raw / w[:, None])
    assert torch.equal(out["none"][1], torch.ones_like(w))
    assert torch.allclose(out["batch"][0], raw / w.mean())
    assert torch.allclose(out["batch"][1], w.mean().expand(4000))

    def top1_share(gr):
        e = gr.pow(2).sum(1).sort(descending=True).values
        return float(e[:40].sum() / e.sum())

    shares = {n: top1_share(out[n][0]) for n in dmd.NORMALIZERS}
    print("share of gradient energy in the top 1% of samples:", shares)
    assert shares["batch"] == pytest.approx(shares["none"])
    assert shares["sample"] != pytest.approx(shares["none"])


def test_normalizer_is_validated():
    from fewstep.config import DistillRunConfig, resolve
    from fewstep.errors import ConfigError

    with pytest.raises(ConfigError, match="dmd.normalizer"):
        resolve(DistillRunConfig, {}, ["dmd.normalizer=global"])
