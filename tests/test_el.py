"""Embedding Loss properties (specs/embedding_loss.md section 9, numbered as there) plus the
embedding-network pool, lambda calibration and one engine smoke test per base method."""

import itertools
import math
import statistics

import pytest
import torch
from torch import nn

from fewstep.core.kernels import (
    mmd2_biased,
    mmd2_linear_unbiased,
    mmd2_unbiased_pooled,
    pooled_bandwidth,
    sq_dists,
)
from fewstep.errors import ConfigError, FewstepError
from fewstep.losses import el
from fewstep.losses.base import Batch, GenOut, Nets
from fewstep.models import embed
from tests.helpers import FixedRandom, GaussianDenoiser

MULT = [0.25, 0.5, 1.0, 2.0, 4.0]
IMG = (1, 8, 8)


def _term(kind="vector", shape=(2,), weight=1.0, **kw):
    cfg = el.ELConfig(**{"width": 16, **kw})
    return el.ELTerm(cfg, kind, shape, 0.5, weight)


def _batch(real, step=0, seed=0):
    return Batch(z=torch.zeros_like(real), cond=None, real=real, rnd=FixedRandom(len(real)), step=step,
                 seed=seed)


def _el(term, x_fake, x_real, step=0, seed=0):
    return term(None, _batch(x_real, step, seed), GenOut(x=x_fake, x_T=x_fake))


def _identity_el(x, y):
    return el.embedding_loss(x, y, [nn.Identity()], "gauss", MULT)[0]


# ---------------------------------------------------------------------------------------------
# 1-4, 8, 9: the estimator
# ---------------------------------------------------------------------------------------------
def test_1_unbiased_at_p_equals_q_and_v_statistic_is_biased():
    g = torch.Generator().manual_seed(1)
    u, v = [], []
    for _ in range(4000):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
        u.append(float(_identity_el(x, y)))
        z = torch.cat([x, y])
        v.append(float(mmd2_biased(x, y, pooled_bandwidth(sq_dists(z, z)) * torch.tensor(MULT))))
    se = statistics.stdev(u) / math.sqrt(len(u))
    assert abs(statistics.mean(u)) < 4 * se
    assert statistics.mean(v) > 0.04 and statistics.mean(v) > 20 * statistics.stdev(v) / math.sqrt(len(v))


def test_2_exact_mean_zero_over_all_splits():
    z = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    vals = []
    for idx in itertools.combinations(range(8), 4):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[list(idx)] = True
        vals.append(mmd2_unbiased_pooled(z[mask], z[~mask], MULT)[0])
    assert abs(float(torch.stack(vals).mean())) < 1e-14 and float(torch.stack(vals).abs().max()) > 1e-3


def test_2_mean_zero_over_splits_through_the_term():
    """Through the whole term: pooled standardisation, random MLPs, fp32 features (K = 2)."""
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(3)) * 3 + 1
    term = _term(K=2, width=0)
    vals = []
    for idx in itertools.combinations(range(8), 4):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[list(idx)] = True
        vals.append(float(_el(term, z[mask], z[~mask]).loss))
    assert abs(statistics.mean(vals)) < 1e-5 * max(abs(v) for v in vals)


def test_3_separation():
    g = torch.Generator().manual_seed(4)
    vals = [float(_identity_el(torch.randn(16, 8, generator=g) + 3.0, torch.randn(16, 8, generator=g)))
            for _ in range(50)]
    assert statistics.mean(vals) > 0.3
    term = _term(K=4, width=0)  # through random MLPs too
    vals = [float(_el(term, torch.randn(16, 2, generator=g) + 3.0, torch.randn(16, 2, generator=g), s).loss)
            for s in range(20)]
    assert statistics.mean(vals) > 10 * statistics.stdev(vals) / math.sqrt(len(vals))


def test_4_scale_invariance_of_the_gaussian_arm():
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(n, 5, dtype=torch.float64, generator=g) for n in (12, 10))
    a, ha = mmd2_unbiased_pooled(x, y, MULT)
    b, hb = mmd2_unbiased_pooled(37.0 * x, 37.0 * y, MULT)
    assert torch.allclose(a, b, rtol=1e-12) and torch.allclose(hb, 37.0**2 * ha)
    assert torch.allclose(el.mmd2_linear_rho(x, y)[0], el.mmd2_linear_rho(37.0 * x, 37.0 * y)[0])


@pytest.mark.parametrize("mult", [MULT, [0.3, 1.0, 3.0]])  # the squaring ladder, and plain exps
def test_pooled_kernel_equals_shared_estimator_and_autograd(mult):
    """The analytic-gradient kernel equals core.kernels.mmd2_unbiased at the pooled h, in value and
    gradient (the code shared with the ``mmd`` metric), with h from explicit differences."""
    from fewstep.core.kernels import mmd2_unbiased

    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 4, dtype=torch.float64, generator=g).requires_grad_()
    y = (torch.randn(9, 4, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    val, h = mmd2_unbiased_pooled(x, y, mult)
    z = torch.cat([x, y]).detach()
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    assert torch.allclose(sq_dists(z, z), d2, rtol=0, atol=1e-13)
    assert torch.allclose(h, d2.sum() / (16 * 15), rtol=1e-14)
    ref = mmd2_unbiased(x, y, h * torch.tensor(mult, dtype=torch.float64))
    assert torch.allclose(val, ref, atol=1e-15) and not h.requires_grad
    for a, b in zip(torch.autograd.grad(val, (x, y)), torch.autograd.grad(ref, (x, y))):
        assert torch.allclose(a, b, atol=1e-14)


def test_8_averaging_over_K():
    net = embed.draw_network("image", IMG, 7, "convnet", width=8)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, *IMG, generator=g), torch.randn(16, *IMG, generator=g)
    one = el.embedding_loss(x, y, [net])[0]
    assert torch.allclose(el.embedding_loss(x, y, [net] * 4)[0], one, rtol=1e-6)


def test_9_linear_arm():
    g = torch.Generator().manual_seed(8)
    x, y = (torch.randn(n, 6, dtype=torch.float64, generator=g) for n in (9, 11))
    Kxx, Kyy, Kxy = x @ x.T, y @ y.T, x @ y.T
    explicit = ((Kxx.sum() - Kxx.trace()) / (9 * 8) + (Kyy.sum() - Kyy.trace()) / (11 * 10) - 2 * Kxy.mean())
    assert torch.allclose(mmd2_linear_unbiased(x, y), explicit, rtol=1e-10)
    delta = torch.tensor([0.3, -0.2, 0, 0, 0, 0.1, 0, 0])
    null, shifted, target = [], [], []
    for _ in range(2000):
        r1, r2 = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
        null.append(float(el.mmd2_linear_rho(r1, r2)[0]))
        v, rho2 = el.mmd2_linear_rho(r1 + delta, r2)
        shifted.append(float(v))
        target.append(float(delta @ delta / rho2))
    assert abs(statistics.mean(null)) < 4 * statistics.stdev(null) / math.sqrt(len(null))
    diff = [s - t for s, t in zip(shifted, target)]
    assert abs(statistics.mean(diff)) < 4 * statistics.stdev(diff) / math.sqrt(len(diff))
    assert statistics.mean(shifted) > 0.5 * statistics.mean(target) > 0
    term = _term("image", IMG, kernel="linear", K=2, width=8)  # and through the term
    out = _el(term, torch.randn(8, *IMG, generator=g), torch.randn(8, *IMG, generator=g))
    assert out.loss.ndim == 0 and "el_rho2" in out.terms


# ---------------------------------------------------------------------------------------------
# 5-7: gradient path, redraw, no BatchNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,shape", [("vector", (2,)), ("image", IMG)])
def test_5_gradients_reach_only_the_generator(kind, shape, monkeypatch):
    used = []

    def spy(*a, **k):
        used.extend(nets := embed.draw_networks(*a, **k))
        return nets

    monkeypatch.setattr(el, "draw_networks", spy)
    G = nn.Linear(3, math.prod(shape))
    teacher, fake = GaussianDenoiser([0.0, 0.0], 0.5), GaussianDenoiser([1.0, 0.0], 0.5)
    real = torch.randn(16, *shape).requires_grad_()
    x = G(torch.randn(16, 3)).view(16, *shape)
    term = _term(kind, shape, K=4, width=8)
    out = term(Nets(teacher=teacher, student=G, fake=fake), _batch(real), GenOut(x=x, x_T=x))
    out.loss.backward()
    assert out.loss.ndim == 0 and len(used) == 4
    assert all(p.grad is None and not p.requires_grad for n in used for p in n.parameters())
    assert real.grad is None and teacher.mu.grad is None and fake.mu.grad is None
    grads = torch.cat([p.grad.flatten() for p in G.parameters()])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0


@pytest.mark.parametrize("kind,shape,pool", [("image", IMG, "mixed"), ("image", (3, 16, 16), "resnet"),
                                             ("vector", (2,), "mixed"), ("vector", (5,), "mlp_fixed")])
def test_6_redraw_is_seeded(kind, shape, pool):
    def draw(it, run_seed=0):
        return embed.draw_networks(kind, shape, 3, run_seed, it, pool, width=8)

    def flat(net):
        return torch.cat([p.flatten() for p in net.parameters()])

    def arch(net):  # what the weights' shapes are (networks of one architecture can be compared)
        return tuple(tuple(p.shape) for p in net.parameters())

    a, b = draw(5), draw(5)
    assert [arch(n) for n in a] == [arch(n) for n in b]
    assert all(torch.equal(flat(u), flat(v)) for u, v in zip(a, b))
    # every (run seed, iteration, k) draws other weights: compare all pairs of equal architecture
    # (in a mixed pool most pairs differ in architecture, so draw enough to find many equal ones)
    drawn = [n for seed in (0, 1) for it in range(8) for n in draw(it, seed)]
    pairs = [(u, v) for i, u in enumerate(drawn) for v in drawn[i + 1:] if arch(u) == arch(v)]
    assert len(pairs) >= 20, len(pairs)
    assert not any(torch.equal(flat(u), flat(v)) for u, v in pairs)
    if pool == "mixed":  # the architecture is redrawn too
        assert len({arch(n) for n in drawn}) > 1
    state = torch.random.get_rng_state()
    embed.draw_networks(kind, shape, 2, 0, 0, pool, width=8)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_6_same_el_value_and_fixed_networks():
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(16, *IMG, generator=g), torch.randn(16, *IMG, generator=g)
    v1 = _el(_term("image", IMG, K=2, width=8), x, y, step=3).loss
    v2 = _el(_term("image", IMG, K=2, width=8), x, y, step=3).loss
    v3 = _el(_term("image", IMG, K=2, width=8), x, y, step=4).loss
    assert torch.equal(v1, v2) and not torch.equal(v1, v3)
    fixed = _term("image", IMG, K=2, width=8, redraw=False)
    f3, f4 = _el(fixed, x, y, step=3).loss, _el(fixed, x, y, step=4).loss
    assert torch.equal(f3, f4) and torch.equal(f3, _el(_term("image", IMG, K=2, width=8), x, y, step=0).loss)


def _all_pool_nets():
    for pool in embed.IMAGE_POOLS:
        for s in range(12 if pool == "mixed" else 3):
            yield embed.draw_network("image", (3, 16, 16), s, pool, width=8), (3, 16, 16)
    for pool in embed.VECTOR_POOLS:
        for s in range(16 if pool == "mixed" else 3):
            yield embed.draw_network("vector", (4,), s, pool), (4,)


def test_7_no_batchnorm_and_batch_independent_features():
    kinds = set()
    for net, shape in _all_pool_nets():
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        assert embed.check_no_batchnorm(net) is net and not net.training
        kinds |= {type(m).__name__ for m in net.modules()}
        x = torch.randn(6, *shape)
        y = torch.cat([x[:1], 5 * torch.randn(5, *shape) + 2])
        assert torch.allclose(net(x)[0], net(y)[0], atol=1e-5)
    assert {"GroupNorm", "BasicBlock", "MaxPool2d", "AvgPool2d", "Tanh", "SiLU", "LeakyReLU"} <= kinds
    with pytest.raises(FewstepError, match="BatchNorm"):
        embed.check_no_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))


def test_pool_shapes_and_config_errors():
    net = embed.draw_network("image", (3, 32, 32), 0, "dm_convnet")
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 128, 4, 4)
    assert embed.pool_widths(8) == (16, 32, 64) and embed.pool_widths(8, res_scale=False) == (64, 128, 256)
    assert embed.pool_widths(64) == (64, 128, 256)
    with pytest.raises(ConfigError, match="pool"):
        embed.check_pool("vector", "resnet")
    ctx = type("Ctx", (), {"kind": "image", "shape": IMG, "sigma_data": 0.5})()
    for bad in ({"kernel": "rbf"}, {"pool": "mlp"}, {"K": 0}, {"standardize": "zscore"}):
        with pytest.raises(ConfigError):
            el.build(el.ELConfig(**bad), ctx, 1.0)
    (term,) = el.build(el.ELConfig(), ctx, 0.5).terms
    assert (term.name, term.phase, term.uses_sample, term.weight) == ("el", "generator", True, 0.5)


def test_standardize_is_one_map_for_both_sides():
    g = torch.Generator().manual_seed(10)
    xf, xr = torch.randn(8, 2, generator=g) * 4 + 3, torch.randn(8, 2, generator=g) * 4 + 3
    for mode in el.STANDARDIZE:
        a, b = el.standardize(xf, xr, mode, 0.5)
        # the same affine map: differences between any fake and real point scale by one factor
        ratio = (a[0] - b[0]).norm() / (xf[0] - xr[0]).norm()
        assert torch.allclose((a[1] - b[2]).norm() / (xf[1] - xr[2]).norm(), ratio, rtol=1e-5)
    a, b = el.standardize(xf, xr, "pooled")
    z = torch.cat([a, b])
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5) and abs(float(z.pow(2).mean()) - 1) < 1e-5


# ---------------------------------------------------------------------------------------------
# 12: lambda calibration
# ---------------------------------------------------------------------------------------------
def _calibration_run(term, base_scale=1.0, steps=25):
    """Feed ``steps`` generator updates of a tiny linear generator; return the lambdas."""
    torch.manual_seed(0)
    G = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(11)
    lams = []
    for step in range(steps):
        x = G(torch.randn(16, 3, generator=g))
        base = base_scale * (x - 1.0).pow(2).mean()
        out = _el(term, x, torch.randn(16, 2, generator=g), step)
        lams.append(term.calibrated_weight(list(G.parameters()), base, out.loss.mean(), step))
    return lams


def test_12_calibration_freezes_and_scales_with_the_base_loss():
    t1, t10 = _term(weight=2.0), _term(weight=2.0)
    l1, l10 = _calibration_run(t1), _calibration_run(t10, base_scale=10.0)
    assert len(t1.ratios) == 20 and t1.frozen == pytest.approx(0.3 * statistics.median(t1.ratios.values()))
    assert all(v == l1[20] for v in l1[20:]) and l1[20] == pytest.approx(2.0 * t1.frozen)
    assert l1[0] == pytest.approx(2.0 * 0.3 * t1.ratios[0]) and len(set(l1[:20])) > 1
    assert all(b == pytest.approx(10 * a, rel=1e-5) for a, b in zip(l1, l10))


def test_calibration_logs_resume_and_fixed_mode():
    term = _term(calib_steps=3)
    G = nn.Linear(3, 2)
    x = G(torch.randn(16, 3))
    out = _el(term, x, torch.randn(16, 2))
    lam = term.calibrated_weight(list(G.parameters()), (x - 1).pow(2).mean(), out.loss.mean(), 0)
    assert {"el_g_base", "el_g_el", "el_cos", "el_ratio"} <= set(out.terms)  # logged by the engine
    assert lam == pytest.approx(0.3 * out.terms["el_g_base"] / out.terms["el_g_el"])
    assert -1 <= out.terms["el_cos"] <= 1
    # a zero norm (g_EL = 0, or g_base = 0 as on DMD's first step) is not counted; lambda falls back
    # to the running median
    zero = torch.zeros((), requires_grad=True) * 0
    assert term.calibrated_weight(list(G.parameters()), (x - 1).pow(2).mean(), zero, 1) == pytest.approx(lam)
    assert term.calibrated_weight(list(G.parameters()), 0.0, out.loss.mean(), 2) == pytest.approx(lam)
    assert len(term.ratios) == 1
    assert _term().calibrated_weight(list(G.parameters()), 0.0, out.loss.mean(), 0) == 0  # none recorded
    fresh = _term(calib_steps=3)
    fresh.load_state_dict(term.state_dict())
    assert fresh.ratios == term.ratios and fresh.frozen is None
    _calibration_run(term, steps=3)
    resumed = _term(calib_steps=3)
    resumed.load_state_dict(term.state_dict())
    assert resumed.frozen == term.frozen is not None
    assert resumed.calibrated_weight([], 0.0, out.loss.mean(), 99) == pytest.approx(term.frozen)
    fixed = _term(calibrate=False, weight=0.7)
    assert fixed.calibrated_weight(list(G.parameters()), 0.0, out.loss.mean(), 0) == 0.7


# ---------------------------------------------------------------------------------------------
# engine level: 10, 11 and one smoke test per base
# ---------------------------------------------------------------------------------------------
def _run(method="dmd", extras=None, num_classes=0, batch=16, **el_kw):
    from fewstep.config import DistillRunConfig
    from fewstep.models.io import build_denoiser
    from fewstep.train.distill import build_run

    torch.manual_seed(0)
    teacher = build_denoiser({"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16,
                              "num_classes": num_classes, "sigma_data": 0.5})
    cfg = DistillRunConfig(method=method, extras=dict(extras or {}))
    cfg.train.batch, cfg.train.iters, cfg.schedule.ratio = batch, 4, 1
    cfg.el = el.ELConfig(**{"width": 16, "calib_steps": 2, **el_kw})
    return build_run(cfg, torch.device("cpu"), teacher=teacher,
                     teacher_meta={"data": {"name": "ring8", "shape": [2]}})


def test_10_real_batch_has_the_generators_labels():
    from fewstep.train.distill import make_batch

    run = _run(extras={"el": 1.0}, num_classes=8, batch=32)
    means = run.data.mixture.means.float()
    for step in range(5):
        b = make_batch(run, step)
        nearest = torch.cdist(b.real, means).argmin(1)
        assert torch.equal(nearest, b.cond)  # so the label multisets are equal at every step


def test_11_fake_score_loss_and_grads_are_unchanged_by_el():
    from fewstep.train.distill import train_iteration

    runs = [_run(), _run(extras={"el": 1.0}, calibrate=False)]  # fixed lambda: EL moves the student
    assert all(t.phase == "generator" for t in runs[1].methods[1].terms)
    logs = [train_iteration(r) for r in runs]
    assert "el" in logs[1] and "el" not in logs[0] and logs[0]["fake"] == logs[1]["fake"]
    for a, b in zip(runs[0].nets.fake.parameters(), runs[1].nets.fake.parameters()):
        assert torch.equal(a.grad, b.grad) and torch.equal(a, b)
    s0 = [p.detach().clone() for p in runs[0].nets.student.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(s0, runs[1].nets.student.parameters()))


@pytest.mark.parametrize("method", ["dmd", "di", "sid", "cd"])
def test_smoke_el_on_each_base(method):
    from fewstep.train.distill import load_run_state, run_state, train_iteration

    run = _run(method, extras={"el": 1.0})
    logs = [train_iteration(run) for _ in range(3)]
    assert not any("refused_step" in entry for entry in logs)
    gen_logs = [entry for entry in logs if "el" in entry]
    assert gen_logs and all(math.isfinite(e["el"]) and math.isfinite(e["el_lambda"]) for e in gen_logs)
    term = run.methods[1].terms[0]
    state = run_state(run)["terms"]["el"]
    if len(gen_logs) >= 2:
        assert term.frozen is not None and state["frozen"] == term.frozen
    other = _run(method, extras={"el": 1.0})
    load_run_state(other, run_state(run))
    assert other.methods[1].terms[0].state_dict() == state


def test_smoke_el_on_images():
    """digits8 with a tiny UNet teacher: EL's image pool in the engine, finite values, resumable."""
    from fewstep.config import DistillRunConfig
    from fewstep.models.io import build_denoiser
    from fewstep.train.distill import build_run, train_iteration

    torch.manual_seed(0)
    teacher = build_denoiser({"type": "unet", "shape": list(IMG), "num_classes": 0, "sigma_data": 0.5,
                              "block_out_channels": [8, 16], "norm_num_groups": 4})
    cfg = DistillRunConfig(method="dmd", extras={"el": 1.0})
    cfg.train.batch, cfg.schedule.ratio = 8, 1
    cfg.el = el.ELConfig(K=2, width=8, calib_steps=1)
    run = build_run(cfg, torch.device("cpu"), teacher=teacher,
                    teacher_meta={"data": {"name": "digits8", "shape": list(IMG)}})
    logs = [train_iteration(run) for _ in range(2)]
    assert all(math.isfinite(e["el"]) and e["el_h"] > 0 for e in logs)
    term = run.methods[1].terms[0]  # step 0 has g_base = 0 (fake == teacher): calibrated on step 1
    assert logs[0]["el_lambda"] == 0 and term.frozen > 0
    assert logs[1]["el_lambda"] == pytest.approx(term.frozen)
