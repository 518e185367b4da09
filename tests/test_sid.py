"""SiD / SiDA properties (specs/sid.md section 8) in float64, plus engine smoke tests."""

import copy
import math

import pytest
import torch

from fewstep.core.mixture import GaussianMixture, MixtureDenoiser, ring8
from fewstep.core.precond import edm_loss_weight
from fewstep.losses import sid
from fewstep.losses.base import Batch, GenOut, Nets
from fewstep.models.io import build_denoiser
from fewstep.models.student import Student
from fewstep.models.taps import capture
from tests.helpers import MLP, FixedRandom, GaussianDenoiser, _changed, _params, tiny_run

B, D = 32, 2
UNET = {"type": "unet", "shape": [1, 8, 8], "block_out_channels": [8, 16], "norm_num_groups": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(spec=MLP, seed=0):
    torch.manual_seed(seed)
    net = build_denoiser(spec).double()
    with torch.no_grad():  # random weights everywhere, including the zero-initialised output layer
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.requires_grad_(False)


def _batch(n=B, step=0, real=None, overrides=None):
    real = torch.zeros(n, D, dtype=torch.float64) if real is None else real
    rnd = FixedRandom(n, overrides=overrides)
    return Batch(z=torch.zeros(n, D), cond=None, real=real, rnd=rnd, step=step)


def _x(seed=0, n=B):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(n, D, generator=g, dtype=torch.float64)).requires_grad_()


def test_algebraic_identity(gen):  # 8.1
    f_phi, f_psi, x_g = (torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    a = f_phi - f_psi
    for alpha in (0.5, 1.0, 1.2):
        other = (1 - alpha) * a**2 + a * (f_psi - x_g)
        assert torch.allclose(sid.sid_elements(f_phi, f_psi, x_g, alpha), other, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_zero_loss_and_gradient_when_fake_is_teacher(alpha):  # 8.2
    teacher = _net()
    student = Student(_net(seed=1).requires_grad_(True), [2.5])
    nets = Nets(teacher=teacher, student=student, fake=copy.deepcopy(teacher))
    x_g = student(torch.randn(B, D, dtype=torch.float64))
    out = sid.SiDGenerator(sid.SiDConfig(alpha=alpha))(nets, _batch(), GenOut(x=x_g, x_T=x_g))
    assert torch.equal(out.loss, torch.zeros(B, dtype=torch.float64))
    out.loss.mean().backward()
    # the two backward paths cancel (teacher +v, fake -v) but autograd may sum their pieces in a
    # different order, so "exactly zero" holds to float64 rounding
    assert max(p.grad.abs().max() for p in student.parameters()) < 1e-13


def test_sigma_mapping():  # 8.3
    u = torch.tensor([0.0, 0.8, 1.0], dtype=torch.float64)
    s = sid.sid_sigma(u)
    assert abs(s[0] - 0.002) < 1e-12 and abs(s[1] - 24.408) < 1e-3 and abs(s[2] - 80) < 1e-9
    grid = sid.sid_sigma(torch.linspace(0, 1, 1001, dtype=torch.float64))
    assert (grid[1:] > grid[:-1]).all()
    # the generator term draws u in [0, tmax/1000]: sigma never exceeds sid_sigma(0.8)
    assert (sid.sid_sigma(FixedRandom(10_000).rand("sid_u") * 0.8) <= s[1]).all()


def test_omega_is_clipped_and_has_no_gradient():  # 8.4
    x = _x()
    f_phi = x * 1.0  # f_phi == x_g: the raw mean is 0
    omega = sid.sid_omega(x, f_phi, 1e-5)
    assert torch.equal(omega, torch.full((B,), 1e-5, dtype=torch.float64)) and not omega.requires_grad
    omega = sid.sid_omega(x, 2 * x, 1e-5)
    assert (omega >= 1e-5).all() and not omega.requires_grad
    assert torch.allclose(omega, x.detach().abs().mean(1))


def test_gradient_flows_through_x_t_into_both_networks():  # 8.5
    x = _x()
    teacher, fake = MixtureDenoiser(ring8()), GaussianDenoiser([0.2, -0.1], 0.8).requires_grad_(False)
    term, batch = sid.SiDGenerator(sid.SiDConfig()), _batch()
    (g_full,) = torch.autograd.grad(term(Nets(teacher, None, fake), batch, GenOut(x=x, x_T=x)).loss.mean(), x)

    def detached(net):
        return lambda y, s, c: net(y.detach(), s, c)

    out = term(Nets(detached(teacher), None, detached(fake)), batch, GenOut(x=x, x_T=x))
    (g_sg,) = torch.autograd.grad(out.loss.mean(), x)
    assert torch.isfinite(g_full).all() and not torch.allclose(g_full, g_sg, rtol=1e-3)
    # the loss itself is the same: only the gradient paths differ
    full = term(Nets(teacher, None, fake), batch, GenOut(x=x, x_T=x)).loss
    assert torch.allclose(out.loss, full)


def _gauss(mu, s):
    return MixtureDenoiser(GaussianMixture.isotropic(torch.as_tensor(mu, dtype=torch.float64)[None], s))


def test_generator_gradient_against_exact_gaussian_denoisers():
    """Teacher: exact denoiser of N(mu_r, s^2 I); fake: exact denoiser of the generator's
    N(mu_g, s^2 I). Then a = f_phi - f_psi = k (mu_r - mu_g) with k = sigma^2 / (s^2 + sigma^2) for
    every x_t, and (through x_g and, via x_t, through f_phi) d/dx_g (f_phi - x_g) = -k, so
    d loss_i / d x_g = -loss_scaling_g k^2 (mu_r - mu_g) / omega: descent moves samples to mu_r."""
    mu_r = torch.tensor([1.0, -0.5], dtype=torch.float64)
    mu_g = torch.tensor([-0.4, 0.3], dtype=torch.float64)
    s, n = 0.5, 256
    g = torch.Generator().manual_seed(4)
    x = (mu_g + s * torch.randn(n, D, generator=g, dtype=torch.float64)).requires_grad_()
    nets, batch = Nets(_gauss(mu_r, s), None, _gauss(mu_g, s)), _batch(n)
    out = sid.SiDGenerator(sid.SiDConfig())(nets, batch, GenOut(x=x, x_T=x))
    (grad,) = torch.autograd.grad(out.loss.mean(), x)
    sigma = sid.sid_sigma(batch.rnd.rand("sid_u") * 0.8)
    x_t = x.detach() + sigma[:, None] * batch.rnd.randn("sid_noise", D)
    omega = (x.detach() - nets.teacher(x_t, sigma)).abs().mean(1).clamp(min=1e-5)
    k = (sigma**2 / (s**2 + sigma**2))[:, None]
    expected = -100.0 * k**2 * (mu_r - mu_g) / omega[:, None] / n
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-15)
    cos = torch.nn.functional.cosine_similarity(-grad, (mu_r - mu_g).expand_as(grad), dim=1)
    assert (cos > 1 - 1e-9).all()


def test_generator_gradient_moves_an_outside_blob_into_the_ring():
    """The exact ring8 teacher and a generator blob outside the ring on the x axis (its fake score
    exact too): the mode at (2, 0) and the data mean both lie in -x, and the mixture is symmetric
    about the axis, so the batch-mean descent direction is -x."""
    mu_g, s, n = torch.tensor([3.0, 0.0], dtype=torch.float64), 0.05, 512
    g = torch.Generator().manual_seed(5)
    x = (mu_g + s * torch.randn(n, D, generator=g, dtype=torch.float64)).requires_grad_()
    nets = Nets(MixtureDenoiser(ring8()), None, _gauss(mu_g, s))
    out = sid.SiDGenerator(sid.SiDConfig())(nets, _batch(n), GenOut(x=x, x_T=x))
    (grad,) = torch.autograd.grad(out.loss.mean(), x)
    inward = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(-grad.sum(0), inward, dim=0)
    assert cos > 0.99, float(cos)


def test_loss_scaling_and_nan_samples_are_dropped():
    x = _x().detach().clone()
    x[3] = float("nan")
    x.requires_grad_()
    nets = Nets(GaussianDenoiser([1.0, 0.0], 0.5), None, GaussianDenoiser([0.0, 0.0], 0.5))
    out = sid.SiDGenerator(sid.SiDConfig())(nets, _batch(), GenOut(x=x, x_T=x))
    assert out.loss[3] == 0 and torch.isfinite(out.loss).all() and float(out.terms["sid_dropped"]) == 1
    keep = torch.arange(B) != 3
    assert torch.allclose(out.loss[keep], 100 * sid_by_hand(nets, x.detach(), _batch())[keep])


def sid_by_hand(nets, x, batch, alpha=1.2):
    sigma = sid.sid_sigma(batch.rnd.rand("sid_u") * 0.8)
    x_t = x + sigma[:, None] * batch.rnd.randn("sid_noise", D)
    f_phi, f_psi = nets.teacher(x_t, sigma), nets.fake(x_t, sigma)
    omega = (x - f_phi).abs().mean(1).clamp(min=1e-5)
    return ((f_phi - f_psi) * ((f_phi - x) - alpha * (f_phi - f_psi))).sum(1) / omega


@pytest.mark.parametrize("spec,shape", [(MLP, (B, 1)), (UNET, (4, 1, 4, 4))], ids=["mlp", "unet"])
def test_sida_logits_are_encoder_channel_mean(spec, shape):  # 8.6
    fake = _net(spec)
    path = sid.bottleneck_path(fake)
    x = torch.randn(shape[0], *((D,) if spec is MLP else (1, 8, 8)), dtype=torch.float64)
    sigma = torch.full((shape[0],), 0.7, dtype=torch.float64)
    with capture(fake, [path]) as store:
        D_ref = fake(x, sigma, None)
    D_x, logits = sid.fake_with_logits(fake, x, sigma, None, path)
    assert logits.shape == shape and torch.equal(D_x, D_ref)
    assert torch.allclose(logits, store[path].mean(dim=1, keepdim=True))
    ctx = type("Ctx", (), {"sigma_data": 0.5})()
    method = sid.build(sid.SiDConfig(adversarial=True), ctx)
    assert method.head is None and method.needs_fake  # zero extra parameters


def test_zero_logits_give_ln2():  # 8.7
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    zeros = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(sid.d_loss(zeros, zeros, sigma, 0.5), edm_loss_weight(sigma) * math.log(2))
    omega = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(sid.gan_loss(zeros, omega, 10.0), math.log(2) / omega)


def test_nonzero_logits_push_real_up_and_fake_down():  # 8.7 beyond ln 2: which label is which
    sp = torch.nn.functional.softplus
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    l_real = (1.0 + 0.3 * torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    l_fake = (-2.0 + 0.3 * torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    loss = sid.d_loss(l_real, l_fake, sigma, 0.5)
    # BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l), each a mean over every logit of the batch
    ref = edm_loss_weight(sigma) * 0.5 * (sp(-l_real).mean() + sp(l_fake).mean())
    assert torch.allclose(loss, ref.detach())
    gr, gf = torch.autograd.grad(loss.sum(), (l_real, l_fake))
    assert (gr < 0).all() and (gf > 0).all()  # descent raises real logits and lowers fake ones
    # the generator's loss raises the fake logits, and stops pushing beyond the clamp
    l_gen = torch.tensor([[-2.0], [0.5], [12.0]], dtype=torch.float64).requires_grad_()
    omega = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    gan = sid.gan_loss(l_gen, omega, 10.0)
    assert torch.allclose(gan, (sp(-l_gen.detach().clamp(max=10.0)).mean() / omega))
    (gg,) = torch.autograd.grad(gan.sum(), l_gen)
    assert (gg[:2] < 0).all() and gg[2] == 0


def test_fake_score_optimum_is_generator_denoiser(gen):  # 8.8
    m, s, n = torch.tensor([0.7, -0.3], dtype=torch.float64), 0.5, 20_000
    x = (m + s * torch.randn(n, D, generator=gen, dtype=torch.float64))
    fake = GaussianDenoiser(torch.zeros(2), s)
    nets, term = Nets(None, None, fake), sid.FakeScore(sid.SiDConfig())
    # the loss is quadratic in mu with a diagonal Hessian: the minimiser from the gradients at 0 and 1
    grads = []
    for mu in (0.0, 1.0):
        fake.mu.data.fill_(mu)
        fake.mu.grad = None
        term(nets, _batch(n), GenOut(x=x, x_T=x)).loss.mean().backward()
        grads.append(fake.mu.grad.clone())
    mu_star = -grads[0] / (grads[1] - grads[0])
    assert torch.allclose(mu_star, m, atol=0.03)


def test_sida_warmup_then_mixing():
    teacher, fake = _net(), _net(seed=1)
    nets, x = Nets(teacher, None, fake), _x()
    cfg = sid.SiDConfig(adversarial=True, gan_start_images=10 * B)
    assert cfg.alpha_value == 1.0 and sid.SiDConfig().alpha_value == 1.2
    term = sid.SiDGenerator(cfg)
    before = term(nets, _batch(step=9), GenOut(x=x, x_T=x))
    after = term(nets, _batch(step=10), GenOut(x=x, x_T=x))
    assert "sid_gan" not in before.terms and "sid_gan" in after.terms
    rnd = _batch().rnd
    sigma = sid.sid_sigma(rnd.rand("sid_u") * 0.8)
    x_t = x.detach() + sigma[:, None] * rnd.randn("sid_noise", D)
    _, logits = sid.fake_with_logits(fake, x_t, sigma, None, sid.bottleneck_path(fake))
    omega = (x.detach() - teacher(x_t, sigma)).abs().mean(1).clamp(min=1e-5)
    gan = 0.01 * D * sid.gan_loss(logits, omega, 10.0)
    assert torch.allclose(before.loss, 100 * sid_by_hand(nets, x.detach(), _batch(), alpha=1.0))
    assert torch.allclose(after.loss, 0.5 * before.loss + 0.5 * gan)


def test_sida_critic_adds_lambda_weighted_bce_on_real_vs_generated():
    fake = _net().requires_grad_(True)
    x, real = _x().detach(), torch.ones(B, D, dtype=torch.float64)
    nets, batch = Nets(None, None, fake), _batch(real=real)
    plain = sid.FakeScore(sid.SiDConfig())(nets, batch, GenOut(x=x, x_T=x))
    adv = sid.FakeScore(sid.SiDConfig(adversarial=True))(nets, batch, GenOut(x=x, x_T=x))
    other = sid.FakeScore(sid.SiDConfig(adversarial=True))(nets, _batch(), GenOut(x=x, x_T=x))
    assert not torch.allclose(adv.loss, other.loss)  # real samples enter through L_D only
    # same sigma and noise for the denoising loss and both discriminator branches
    sigma = sid.lognormal_sigma(batch.rnd, "fake_sigma", -1.2, 1.2, x)
    n = sigma[:, None] * batch.rnd.randn("fake_noise", D)
    path = sid.bottleneck_path(fake)
    _, l_fake = sid.fake_with_logits(fake, x + n, sigma, None, path)
    _, l_real = sid.fake_with_logits(fake, real + n, sigma, None, path)
    assert torch.allclose(adv.loss - plain.loss, sid.d_loss(l_real, l_fake, sigma, 0.5))


# ---------------------------------------------------------------------------------------------
# engine smoke tests with a real tiny network
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adversarial", [False, True], ids=["sid", "sida"])
def test_smoke_phases(adversarial):
    from fewstep.train.distill import critic_update, generator_update, make_batch, train_iteration

    run = tiny_run("sid", {"sid": {"adversarial": adversarial, "gan_start_images": 16}})
    assert run.nets.student.sigma(0) == 2.5 and run.cfg.optim.betas == [0.0, 0.999]
    n = run.nets
    s0, f0, t0 = _params(n.student), _params(n.fake), _params(n.teacher)
    logs = critic_update(run, make_batch(run, 0), None)
    assert math.isfinite(logs["loss_fake"]) and (not adversarial or math.isfinite(logs["sida_d"]))
    assert _changed(n.fake, f0) and not _changed(n.student, s0) and not _changed(n.teacher, t0)
    f1 = _params(n.fake)
    _, logs = generator_update(run, make_batch(run, 1), log_norms=True)
    assert math.isfinite(logs["loss_sid"]) and logs["gradnorm_sid"] > 0
    assert ("sid_gan" in logs) == adversarial  # step 1 * batch 16 >= gan_start_images
    assert _changed(n.student, s0) and not _changed(n.fake, f1) and not _changed(n.teacher, t0)
    for _ in range(2):
        logs = train_iteration(run)
        assert "refused_step" not in logs and all(math.isfinite(v) for v in logs.values())
    assert not _changed(n.teacher, t0)
