"""Metric properties (specs/metrics.md section 11: items 1-9 and 11; IS is not implemented here)
and parity with the reference implementations (pytorch-fid FD, StyleGAN2-ADA-style KID, prdc)."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import linalg

from fewstep.core import kernels
from fewstep.core.mixture import grid25
from fewstep.metrics import (
    density_coverage,
    diversity,
    fd,
    fd_from_stats,
    feature_stats,
    floor,
    kid,
    kid_from_subsets,
    kid_subsets,
    mmd,
    mmd_floor,
    mmd_gammas,
    mode_metrics,
    precision_recall,
    trace_sqrt_product,
)

F64 = torch.float64


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def _random_spd(gen, d):
    a = _randn(gen, d, 2 * d)
    return a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=F64)


def pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """``calculate_frechet_distance`` from mseitzer/pytorch-fid ``fid_score.py`` (numpy/scipy).

    ``disp=False`` is dropped (deprecated in scipy >= 1.16); the finiteness check, eps-retry and
    real-part logic are as in pytorch-fid.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


# ----------------------------------------------------------------------------------- FD


def test_fd_identical_stats_zero_and_symmetric(gen):  # section 11.1
    x, y = _randn(gen, 300, 16), 1.5 * _randn(gen, 300, 16) + 0.3
    mu, s = feature_stats(x)
    assert abs(fd_from_stats(mu, s, mu, s)) < 1e-8
    assert abs(fd(x, x)) < 1e-8
    assert fd(x, y) == pytest.approx(fd(y, x), rel=1e-9)


def test_fd_diagonal_covariances_closed_form(gen):  # section 11.2
    d = 10
    a, b = torch.rand(d, generator=gen, dtype=F64) + 0.1, torch.rand(d, generator=gen, dtype=F64) + 0.1
    mu1, mu2 = _randn(gen, d), _randn(gen, d)
    expect = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert fd_from_stats(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expect.item(), rel=1e-12)
    eye = torch.eye(d, dtype=F64)
    iso = fd_from_stats(torch.zeros(d), 2.0 * eye, torch.zeros(d), 0.5 * eye)
    assert iso == pytest.approx(d * (math.sqrt(2.0) - math.sqrt(0.5)) ** 2, rel=1e-12)
    one_d = fd_from_stats([1.0], [[0.3**2]], [-0.5], [[1.2**2]])
    assert one_d == pytest.approx(1.5**2 + 0.9**2, rel=1e-12)


def test_trace_sqrt_matches_scipy_sqrtm(gen):  # section 11.3
    for _ in range(3):
        s1, s2 = _random_spd(gen, 64), _random_spd(gen, 64)
        ref = np.trace(linalg.sqrtm(s1.numpy() @ s2.numpy())).real
        assert trace_sqrt_product(s1, s2).item() == pytest.approx(ref, rel=1e-6)


def test_fd_equals_pytorch_fid_formula(gen):
    x = _randn(gen, 500, 64) @ (0.2 * _randn(gen, 64, 64))
    y = 1.1 * _randn(gen, 500, 64) + 0.05
    mu1, s1 = np.mean(x.numpy(), 0), np.cov(x.numpy(), rowvar=False)
    mu2, s2 = np.mean(y.numpy(), 0), np.cov(y.numpy(), rowvar=False)
    assert fd(x, y) == pytest.approx(pytorch_fid_reference(mu1, s1, mu2, s2), rel=1e-6)


def test_fd_rank_deficient_is_finite(gen):
    x, y = _randn(gen, 20, 64), _randn(gen, 20, 64)  # n < d: singular covariances
    v = fd(x, y)
    assert math.isfinite(v) and v > 0


def test_feature_stats_batched_float64_equals_numpy(gen):  # section 11.11
    x = (100 + _randn(gen, 777, 12)).float()  # |mu| >> std, float32 input
    batches = torch.split(x, 100)
    mu, sigma = feature_stats(iter(batches))
    xn = x.numpy().astype(np.float64)
    np.testing.assert_allclose(mu.numpy(), xn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(xn, rowvar=False), rtol=1e-9, atol=1e-12)
    mu_full, sigma_full = feature_stats(x)
    assert torch.allclose(sigma_full, sigma, rtol=1e-10, atol=1e-13) and sigma.dtype == F64


# ----------------------------------------------------------------------------------- KID


def _kid_double_loop(x, y, subsets):
    """Explicit per-subset unbiased MMD^2 with the cubic kernel (spec section 3)."""
    d = x.shape[1]

    def kern(a, b):
        return (float(a @ b) / d + 1) ** 3

    ts = []
    for ix, iy in subsets:
        xs, ys = x[ix], y[iy]
        s = len(ix)
        kxx = sum(kern(xs[i], xs[j]) for i in range(s) for j in range(s) if i != j)
        kyy = sum(kern(ys[i], ys[j]) for i in range(s) for j in range(s) if i != j)
        kxy = sum(kern(xs[i], ys[j]) for i in range(s) for j in range(s))
        ts.append((kxx + kyy) / (s * (s - 1)) - 2 * kxy / s**2)
    return sum(ts) / len(ts)


def test_kid_equals_double_loop(gen):  # section 11.5
    x, y = _randn(gen, 9, 3), _randn(gen, 7, 3) + 0.5
    subsets = kid_subsets(9, 7, num_subsets=4, subset_size=5, generator=torch.Generator().manual_seed(3))
    assert all(len(ix) == len(iy) == 5 and len(set(ix.tolist())) == 5 for ix, iy in subsets)
    ref = _kid_double_loop(x, y, subsets)
    assert kid_from_subsets(x, y, subsets) == pytest.approx(ref, rel=1e-10)
    got = kid(x, y, num_subsets=4, subset_size=5, generator=torch.Generator().manual_seed(3))
    assert got == pytest.approx(ref, rel=1e-10)
    # subset size min(n, m, subset_size): all 7 rows of y, 7 of the 9 rows of x
    full = kid_subsets(9, 7, num_subsets=2, subset_size=1000)
    assert all(len(ix) == 7 and sorted(iy.tolist()) == list(range(7)) for ix, iy in full)


def test_kid_centred_on_zero_for_equal_distributions(gen):  # section 11.4
    vals = [kid(_randn(gen, 60, 8), _randn(gen, 60, 8), num_subsets=3, subset_size=40, generator=gen)
            for _ in range(150)]
    v = np.asarray(vals)
    assert abs(v.mean()) < 3 * v.std(ddof=1) / math.sqrt(len(v))
    assert kid(_randn(gen, 60, 8), _randn(gen, 60, 8) + 1.0, 3, 40, gen) > 10 * v.std()


# ----------------------------------------------------------------------------------- MMD


def test_mmd_is_core_kernel_and_centred(gen):  # section 11.4
    ref = _randn(gen, 300, 2)
    gammas = mmd_gammas(ref)
    med = kernels.median_pairwise_distance(ref)
    assert torch.allclose(gammas, 2 * (torch.tensor([0.5, 1.0, 2.0], dtype=F64) * med) ** 2)
    x, y = _randn(gen, 40, 2), _randn(gen, 50, 2)
    assert mmd(x, y, gammas) == kernels.mmd2_unbiased(x, y, gammas).item()
    v = np.asarray([mmd(_randn(gen, 40, 2), _randn(gen, 40, 2), gammas) for _ in range(200)])
    assert abs(v.mean()) < 3 * v.std(ddof=1) / math.sqrt(len(v))
    assert kernels.mmd2_biased(x, x, gammas).abs().item() < 1e-12
    assert mmd(x, y + 2.0, gammas) > 10 * v.std()


def test_mmd_gammas_subsamples_large_reference(gen):
    ref = _randn(gen, 3000, 2)
    g = mmd_gammas(ref, multipliers=(1.0,), max_points=500)
    assert g.shape == (1,) and torch.equal(g, mmd_gammas(ref, multipliers=(1.0,), max_points=500))
    assert g.item() == pytest.approx(2 * 2.0 * 2 * math.log(2), rel=0.15)  # 2 * median(|N(0,2I)|)^2


# ----------------------------------------------------------------------------------- P/R, D/C


def prdc_reference(real, fake, nearest_k):
    """``clovaai/generative-evaluation-prdc`` ``compute_prdc`` (strict ``<``), in numpy."""
    def pdist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(x):
        d = pdist(x, x)
        idx = np.argpartition(d, nearest_k + 1, axis=-1)[..., : nearest_k + 1]
        return np.take_along_axis(d, idx, axis=-1).max(-1)

    r_real, r_fake, d_rf = radii(real), radii(fake), pdist(real, fake)
    precision = (d_rf < r_real[:, None]).any(0).mean()
    recall = (d_rf < r_fake[None, :]).any(1).mean()
    density = (1.0 / nearest_k) * (d_rf < r_real[:, None]).sum(0).mean()
    coverage = (d_rf.min(1) < r_real).mean()
    return precision, recall, density, coverage


def test_prdc_match_reference_and_chunking(gen):
    real, fake = _randn(gen, 150, 5), 1.3 * _randn(gen, 120, 5) + 0.4
    ref3, ref5 = prdc_reference(real.numpy(), fake.numpy(), 3), prdc_reference(real.numpy(), fake.numpy(), 5)
    for chunk in (1000, 37):
        p, r = precision_recall(real, fake, k=3, chunk_size=chunk)
        dens, cov = density_coverage(real, fake, k=5, chunk_size=chunk)
        assert (p, r) == pytest.approx(ref3[:2], abs=1e-12)  # continuous data: no ties, <= == <
        assert (dens, cov) == pytest.approx(ref5[2:], abs=1e-12)
    p32, r32 = precision_recall(real.float(), fake.float(), dtype=torch.float32)
    assert (p32, r32) == pytest.approx(ref3[:2], abs=0.02)


def test_precision_recall_identical_and_far(gen):  # section 11.6
    x = _randn(gen, 200, 8)
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    assert density_coverage(x, x + 100.0, k=5) == (0.0, 0.0)


def test_comparison_conventions_on_ties():
    # real at 0, 1, 2, 3 on a line: k=1 radii are all exactly 1; a fake point at distance exactly 1
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=F64)
    fake = torch.tensor([[4.0], [10.0]], dtype=F64)
    p, _ = precision_recall(real, fake, k=1)
    assert p == 0.5  # <= : the point at 4 is on the ball of 3
    dens, cov = density_coverage(real, fake, k=1)
    assert dens == 0.0 and cov == 0.0  # strict < : on the boundary does not count


def test_density_coverage_monte_carlo(gen):  # section 11.7 (paper)
    n = m = 100
    k = 5
    runs = [density_coverage(_randn(gen, n, 2), _randn(gen, m, 2), k=k) for _ in range(150)]
    dens, cov = np.asarray(runs).T
    e_cov = 1 - math.prod((n - l) / (n + m - l) for l in range(1, k + 1))
    for v, e in ((dens, 1.0), (cov, e_cov)):
        assert abs(v.mean() - e) < 4 * v.std(ddof=1) / math.sqrt(len(v))


# ----------------------------------------------------------------------------------- modes


def _grid25():
    means = torch.tensor(list(itertools.product([-4.0, -2.0, 0.0, 2.0, 4.0], repeat=2)), dtype=F64)
    return means, torch.full((25, 2), 0.05, dtype=F64)


def test_modes_at_centres_and_single_mode():  # section 11.8
    means, stds = _grid25()
    m = mode_metrics(means.clone(), means, stds, torch.full((25,), 1 / 25))
    assert m == {"modes_covered": 25, "modes_covered_any": 25, "modes_total": 25, "hq_rate": 1.0,
                 "mode_mass_tv": 0.0}
    one = mode_metrics(means[7].repeat(100, 1), means, stds)
    assert one["modes_covered"] == one["modes_covered_any"] == 1 and one["hq_rate"] == 1.0
    assert one["mode_mass_tv"] == pytest.approx(1 - 1 / 25)


def test_modes_just_outside_threshold_not_hq():  # section 11.8
    means, stds = _grid25()
    off = torch.tensor([3.01 * 0.05, 0.0], dtype=F64)
    m = mode_metrics(means + off, means, stds)
    assert m["hq_rate"] == 0.0 and m["modes_covered"] == m["modes_covered_any"] == 0
    assert m["mode_mass_tv"] == 1.0
    inside = mode_metrics(means + 0.99 * off, means, stds)
    assert inside["hq_rate"] == 1.0


def test_modes_min_share_and_tv(gen):
    means, stds = _grid25()
    # 4 per mode for 24 modes, 1 for the last: N = 97, bar = 0.25 * 97 / 25 = 0.97 -> 1 sample suffices
    idx = torch.cat([torch.arange(24).repeat_interleave(4), torch.tensor([24])])
    m = mode_metrics(means[idx] + 0.05 * _randn(gen, len(idx), 2).clamp(-1, 1), means, stds)
    assert m["modes_covered"] == 25 and m["hq_rate"] == 1.0
    # balanced: 4 per mode -> tv exactly 0; skewed weights change only modes_covered and tv
    bal = means.repeat_interleave(4, 0)
    assert mode_metrics(bal, means, stds)["mode_mass_tv"] == pytest.approx(0.0, abs=1e-15)
    w = torch.ones(25, dtype=F64)
    w[0] = 20.0  # expected share of mode 0 is 20/44 * 100 = 45.5 -> bar 11.4 > 4
    skew = mode_metrics(bal, means, stds, w)
    assert skew["modes_covered"] == 24 and skew["modes_covered_any"] == 25
    assert skew["mode_mass_tv"] == pytest.approx(0.5 * (abs(1 / 25 - 20 / 44) + 24 * abs(1 / 25 - 1 / 44)))


def test_modes_on_true_mixture_samples(gen):
    mix = grid25()
    x, _ = mix.sample(2500, generator=gen)
    m = mode_metrics(x, mix.means, mix.mode_stds, mix.weights)
    assert m["modes_covered"] == m["modes_covered_any"] == m["modes_total"] == 25
    # P(chi2_2 < 9) = 1 - exp(-4.5) for an exact sample; TV of 2,500 multinomial draws is small
    p_hq = 1 - math.exp(-4.5)
    assert abs(m["hq_rate"] - p_hq) < 4 * math.sqrt(p_hq * (1 - p_hq) / 2500)
    assert m["mode_mass_tv"] < 0.1


# ----------------------------------------------------------------------------------- diversity


def test_diversity_properties(gen):  # section 11.9
    e = _randn(gen, 1, 16)
    assert diversity(e.repeat(6, 1)) == pytest.approx(0.0, abs=1e-12)
    assert diversity(torch.eye(5, dtype=F64)) == pytest.approx(1.0, abs=1e-12)
    f = _randn(gen, 12, 16)
    scales = torch.rand(12, 1, generator=gen, dtype=F64) * 10 + 0.1
    assert diversity(f * scales) == pytest.approx(diversity(f), rel=1e-12)


def test_diversity_per_condition_average(gen):
    same = _randn(gen, 1, 4).repeat(3, 1)  # condition 0: diversity 0
    orth = torch.eye(4, dtype=F64)  # condition 1: diversity 1
    lone = _randn(gen, 1, 4)  # condition 2: one sample, skipped
    feats = torch.cat([same, orth, lone])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    assert diversity(feats, labels) == pytest.approx(0.5, abs=1e-12)
    assert diversity({"a": same, "b": orth, "c": lone}) == pytest.approx(0.5, abs=1e-12)
    # unordered pairs i < j: mean cosine of [u, u, -u] is (1 - 1 - 1) / 3
    u = _randn(gen, 1, 4)
    assert diversity(torch.cat([u, u, -u])) == pytest.approx(1 + 1 / 3, abs=1e-12)
    with pytest.raises(ValueError):
        diversity(lone)


# ----------------------------------------------------------------------------------- floors


def test_floor_mean_std_and_structures():
    def draw(i):
        return torch.full((3, 1), float(i)), torch.zeros(3, 1)

    mean, std = floor(lambda a, b: a[0, 0].item(), draw, draws=4)
    assert mean == 1.5 and std == pytest.approx(np.std([0, 1, 2, 3], ddof=1))
    (m1, m2), (s1, s2) = floor(lambda a, b: (a[0, 0].item(), 2.0), draw, draws=3)
    assert (m1, m2, s1, s2) == (1.0, 2.0, 1.0, 0.0)
    md, sd = floor(lambda a, b: {"x": a[0, 0].item()}, draw, draws=1)
    assert md == {"x": 0.0} and sd == {"x": 0.0}


def test_mmd_floor_is_mean_plus_two_std():
    gammas = torch.tensor([0.5, 2.0], dtype=F64)

    def draw(i):
        g = torch.Generator().manual_seed(100 + i)
        return _randn(g, 50, 2), _randn(g, 50, 2)

    vals = [mmd(*draw(i), gammas) for i in range(10)]
    thr = mmd_floor(draw, gammas)
    assert thr == pytest.approx(np.mean(vals) + 2 * np.std(vals, ddof=1), rel=1e-12)
    assert thr > 0


def test_diversity_by_condition_averages_to_diversity(gen):
    from fewstep.metrics import diversity, diversity_by_condition

    f = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    labels = torch.arange(40) % 4
    per = diversity_by_condition(f, labels)
    assert sorted(per) == [0, 1, 2, 3]
    assert abs(sum(per.values()) / 4 - diversity(f, labels)) < 1e-12


def test_kid_with_all_rows_in_every_subset_needs_one_subset(gen):
    from fewstep.metrics.stats import kid, kid_from_subsets, kid_subsets

    x, y = torch.randn(50, 6, generator=gen), torch.randn(50, 6, generator=gen) + 0.2
    many = kid_from_subsets(x, y, kid_subsets(50, 50, 20, 1000, gen))
    assert abs(kid(x, y) - many) < 1e-9 * max(1.0, abs(many))
