"""EDM core identities (specs/edm_core.md section 9), float64."""

import math

import pytest
import torch

from fewstep.core import schedules as S
from fewstep.core.mixture import GaussianMixture, MixtureDenoiser, ring8
from fewstep.core.precond import (
    EDMPrecond,
    boundary_scalings,
    edm_loss_weight,
    edm_scalings,
    sample_lognormal_sigma,
)
from fewstep.core.sampling import karras_sigmas, sample_euler, sample_heun
from fewstep.core.utils import append_dims

SIG = torch.logspace(-3, 2, 50, dtype=torch.float64)


def test_append_dims_broadcasts_points_and_images():
    s = torch.arange(3.0)
    assert append_dims(s, 2).shape == (3, 1)
    assert append_dims(s, 4).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        append_dims(torch.zeros(2, 2), 1)


def test_precond_identities():
    c_skip, c_out, c_in, _ = edm_scalings(SIG)
    assert torch.allclose(c_in**2 * (SIG**2 + 0.25), torch.ones_like(SIG))
    assert torch.allclose(edm_loss_weight(SIG) * c_out**2, torch.ones_like(SIG))
    tiny = torch.tensor([1e-9], dtype=torch.float64)
    cs, co, _, _ = edm_scalings(tiny)
    assert abs(cs.item() - 1) < 1e-12 and co.item() < 1e-8


def test_f_target_has_unit_variance(gen):
    sigma = torch.tensor(1.7, dtype=torch.float64)
    c_skip, c_out, _, _ = edm_scalings(sigma)
    # Var[(y - c_skip (y + n)) / c_out] with y ~ N(0, 0.25), n ~ N(0, sigma^2), analytically
    var = ((1 - c_skip) ** 2 * 0.25 + c_skip**2 * sigma**2) / c_out**2
    assert abs(var.item() - 1) < 1e-12
    y = 0.5 * torch.randn(400_000, generator=gen, dtype=torch.float64)
    n = sigma * torch.randn(400_000, generator=gen, dtype=torch.float64)
    assert abs(((y - c_skip * (y + n)) / c_out).var().item() - 1) < 0.01


def test_exact_denoiser_of_sigma_data_gaussian_is_c_skip_x():
    gmm = GaussianMixture.isotropic(torch.zeros(1, 3), 0.5)
    x = torch.randn(7, 3, dtype=torch.float64)
    for s in [0.01, 0.5, 3.0, 80.0]:
        c_skip = edm_scalings(torch.tensor(s, dtype=torch.float64))[0]
        assert torch.allclose(gmm.denoise(x, s), c_skip * x, atol=1e-12)


def test_boundary_scalings_are_identity_at_sigma_min():
    c_skip, c_out, _, _ = boundary_scalings(torch.tensor([0.002], dtype=torch.float64))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_edm_precond_zero_net_and_dtype():
    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x, c_noise, labels):
            return x * self.w

    D = EDMPrecond(Zero())
    x = torch.randn(4, 2, dtype=torch.float64)
    sigma = torch.full((4,), 2.0, dtype=torch.float64)
    assert torch.allclose(D(x, sigma), edm_scalings(sigma)[0][:, None] * x)
    Db = EDMPrecond(Zero(), boundary=True)
    assert torch.allclose(Db(x, torch.full((4,), 0.002, dtype=torch.float64)), x)


def test_karras_grid_matches_edm_values():
    s = karras_sigmas(18)
    ref = [80, 57.586, 40.786, 28.375, 19.352, 12.910, 8.4009, 5.3152, 3.2568, 1.9233, 1.0882,
           0.58535, 0.29644, 0.13952, 0.059947, 0.022935, 0.0075280, 0.002]
    assert torch.allclose(s[:-1], torch.tensor(ref, dtype=torch.float64), rtol=1e-4)
    assert s[-1] == 0 and (s[1:-1] < s[:-2]).all()


class Counter(torch.nn.Module):
    def __init__(self, D):
        super().__init__()
        self.D, self.calls = D, 0

    def forward(self, x, sigma, cond=None):
        self.calls += 1
        return self.D(x, sigma, cond)


def test_heun_35_nfe_deterministic():
    D = Counter(MixtureDenoiser(ring8()))
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = sample_heun(D, 80 * z, karras_sigmas(18))
    assert D.calls == 35
    b = sample_heun(D, 80 * z, karras_sigmas(18))
    assert torch.equal(a, b)


def test_heun_matches_analytic_single_gaussian_ode_with_second_order_error():
    mu, s = torch.tensor([[0.3, -0.2]], dtype=torch.float64), 0.4
    D = MixtureDenoiser(GaussianMixture.isotropic(mu, s))
    x0 = 5.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s0, s1 = 5.0, 0.05
    exact = mu + (x0 - mu) * math.sqrt(s**2 + s1**2) / math.sqrt(s**2 + s0**2)
    errs = []
    for n in [8, 16, 32]:
        sig = karras_sigmas(n, sigma_min=s1, sigma_max=s0, append_zero=False)
        errs.append((sample_heun(D, x0, sig) - exact).abs().max().item())
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3  # ~N^-2
    assert errs[2] < 5e-3


def test_euler_is_first_order():
    mu, s = torch.zeros(1, 2, dtype=torch.float64), 0.4
    D = MixtureDenoiser(GaussianMixture.isotropic(mu, s))
    x0 = torch.ones(1, 2, dtype=torch.float64) * 3
    exact = x0 * math.sqrt(s**2 + 0.1**2) / math.sqrt(s**2 + 9)
    e = [(sample_euler(D, x0, karras_sigmas(n, 0.1, 3.0, append_zero=False)) - exact).abs().max()
         for n in (16, 32)]
    assert 1.6 < e[0] / e[1] < 2.5


def test_gmm_score_equals_autograd_logprob():
    gmm = GaussianMixture(torch.randn(3, 2, dtype=torch.float64),
                          torch.stack([torch.eye(2, dtype=torch.float64) * v for v in (0.1, .2, .3)])
                          + 0.05, torch.tensor([0.2, 0.3, 0.5]))
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    for sigma in [0.05, 1.0, 10.0]:
        (g,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
        assert torch.allclose(gmm.score(x, sigma), g, atol=1e-8)


def test_gmm_denoiser_limits_and_monte_carlo(gen):
    gmm = ring8()
    x = torch.randn(4, 2, dtype=torch.float64)
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    assert torch.allclose(gmm.denoise(x, 1e6), mean.expand(4, 2), atol=1e-6)
    one = GaussianMixture.isotropic(torch.tensor([[1.0, 2.0]]), 0.3)
    assert torch.allclose(one.denoise(x, 0.7), (0.09 * x + 0.49 * one.means) / (0.09 + 0.49))
    # Monte Carlo posterior mean at one point via importance weights over prior samples
    x0, _ = gmm.sample(200_000, gen)
    point, sigma = torch.tensor([[1.2, 0.9]], dtype=torch.float64), 0.8
    w = torch.softmax(-((point - x0) ** 2).sum(1) / (2 * sigma**2), 0)
    assert torch.allclose((w[:, None] * x0).sum(0), gmm.denoise(point, sigma)[0], atol=0.02)


def test_conditional_mixture_restricts_to_component():
    gmm = ring8()
    x = torch.zeros(2, 2, dtype=torch.float64)
    D = gmm.denoise(x, 100.0, cond=torch.tensor([3, 5]))
    assert torch.allclose(D, gmm.means[[3, 5]], atol=1e-3)


def test_lognormal_sigma_median(gen):
    s = sample_lognormal_sigma(200_000, gen, dtype=torch.float64)
    assert abs(s.median().item() - math.exp(-1.2)) < 0.005


def test_conversions_round_trip_float64():
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    x = x0 + append_dims(sigma, 4) * eps
    assert torch.allclose(S.eps_to_denoised(x, sigma, eps), x0, atol=1e-10)
    assert torch.allclose(S.denoised_to_eps(x, sigma, x0), eps, atol=1e-10)
    # v-prediction: v = alpha eps - sigma_vp x0 in VP units
    a = append_dims(1 / (sigma**2 + 1).sqrt(), 4)
    v = a * eps - append_dims(sigma, 4) * a * x0
    assert torch.allclose(S.v_to_denoised(x, sigma, v), x0, atol=1e-10)
    assert torch.allclose(S.denoised_to_v(x, sigma, x0), v, atol=1e-10)
    # flow: x_s = (1-s) x0 + s eps = x / (1 + sigma), v = eps - x0
    s = S.sigma_to_flow_s(sigma)
    assert torch.allclose(S.flow_s_to_sigma(s), sigma)
    assert torch.allclose(x / append_dims(1 + sigma, 4), append_dims(1 - s, 4) * x0
                          + append_dims(s, 4) * eps)
    assert torch.allclose(S.flow_to_denoised(x, sigma, eps - x0), x0, atol=1e-10)
    assert torch.allclose(S.denoised_to_flow(x, sigma, x0), eps - x0, atol=1e-10)


def test_discrete_timestep_maps_invert():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    sig = S.vp_sigmas_from_alphas_cumprod(torch.cumprod(1 - betas, 0))
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(S.sigma_to_t(sig, sig), t, atol=1e-9)
    mid = torch.tensor([0.05, 3.3, 100.0], dtype=torch.float64)
    assert torch.allclose(S.t_to_sigma(S.sigma_to_t(mid, sig), sig), mid, rtol=1e-10)
    assert torch.equal(S.sigma_to_t(sig[[3, 500]], sig, quantize=True), torch.tensor([3.0, 500.0],
                       dtype=torch.float64))


def test_cfg_endpoints():
    u, c = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.allclose(S.cfg_denoised(u, c, 1.0), c) and torch.equal(S.cfg_denoised(u, c, 0.0), u)
