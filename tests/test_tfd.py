"""Teacher-Feature Drifting (specs/drifting.md part B, properties 11-16) and smoke runs of tfd/drift."""

import copy
import zlib
from types import SimpleNamespace

import pytest
import torch

from fewstep.config import DistillRunConfig, DistillTrainConfig, ScheduleConfig
from fewstep.core.drift import anchor_margin_loss, drift_loss, pairwise_dist
from fewstep.losses import tfd
from fewstep.losses.base import Batch, GenOut, Nets
from fewstep.models.io import build_denoiser
from fewstep.models.student import Student
from fewstep.train.distill import build_run, train_iteration
from tests.helpers import FixedRandom, GaussianDenoiser

DT = torch.float64
MLP = {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "num_classes": 0, "sigma_data": 0.5}
UNET = {"type": "unet", "shape": [1, 8, 8], "num_classes": 10, "block_out_channels": [8, 16, 16]}


def _ctx(teacher, shape=(2,), kind="vector", num_classes=0):
    return SimpleNamespace(teacher=teacher, shape=shape, kind=kind, num_classes=num_classes, seed=0)


class FakeReal:
    """``draw_real`` stand-in: deterministic per stream, shifted by the label."""

    def __init__(self, shape, dtype=DT):
        self.shape, self.dtype = shape, dtype

    def __call__(self, labels_or_n, stream):
        n = labels_or_n if isinstance(labels_or_n, int) else len(labels_or_n)
        g = torch.Generator().manual_seed(zlib.crc32(stream.encode()))
        y = torch.randn(n, *self.shape, generator=g, dtype=self.dtype) + 2.0
        return y if isinstance(labels_or_n, int) else y + labels_or_n.to(self.dtype).view(-1, 1)


def _batch(B, shape, cond=None, dtype=DT):
    return Batch(z=torch.zeros(B, *shape), cond=cond, real=torch.zeros(B, *shape),
                 rnd=FixedRandom(B, dtype=dtype), draw_real=FakeReal(shape, dtype))


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arm", [{"w_cov": 0.0}, {"coverage": False}, {"w_cov": 0.0, "affinity_floor": 1e-6}])
def test_identity_features_reduce_to_part_a(gen, arm):  # property 11
    B = 24
    cfg = tfd.TFDConfig(sigma_f_mode="absolute", **arm)
    term = tfd.build(cfg, _ctx(GaussianDenoiser([0.0, 0.0], 0.5))).terms[0]
    assert term.paths == [] and term.raw  # analytic teacher: raw coordinates only (spec B11)
    x = torch.randn(B, 2, generator=gen, dtype=DT)
    out = term(Nets(teacher=None, student=None), _batch(B, (2,)), GenOut(x=x, x_T=x))
    ref = drift_loss(x[None], FakeReal((2,))(B, "tfd_pos")[None], floor=cfg.affinity_floor).loss.mean()
    assert torch.equal(out.loss, ref)


@pytest.mark.parametrize("M", range(2, 15))
def test_anchor_margin_zero_at_equality(gen, M):  # property 12
    for G, D, scale in ((1, 2, 1.0), (3, 5, 0.01), (2, 16, 100.0)):
        a = scale * torch.randn(G, M, D, generator=gen, dtype=DT)
        for h in (None, 1e-3, 1.0, 1e3):
            loss, covered, _ = anchor_margin_loss(a.clone(), a, 0.5, h)
            assert torch.equal(loss, torch.zeros(G, dtype=DT)) and float(covered) == 1.0


def test_anchor_margin_collapse_pulls_toward_anchors(gen):  # property 13
    a = torch.randn(2, 8, 3, generator=gen, dtype=DT)
    p = torch.tensor([6.0, -4.0, 5.0], dtype=DT)
    x = p.expand(2, 6, 3).clone().requires_grad_()
    loss, covered, _ = anchor_margin_loss(x, a)
    assert (loss > 0).all() and float(covered) < 1
    loss.mean().backward()
    direction = a.mean(dim=1, keepdim=True) - p  # toward the anchors' mean
    assert float((x.grad * direction).sum()) < 0


def test_bandwidth_is_detached_median(gen):  # property 14
    a = torch.randn(2, 5, 3, generator=gen, dtype=DT)
    x = torch.randn(2, 7, 3, generator=gen, dtype=DT).requires_grad_()
    loss, _, h = anchor_margin_loss(x, a)
    assert not h.requires_grad
    assert float(h) == float(pairwise_dist(a, x.detach()).flatten().median())
    (g1,) = torch.autograd.grad(loss.mean(), x)
    (g2,) = torch.autograd.grad(anchor_margin_loss(x, a, h=float(h))[0].mean(), x)
    assert torch.allclose(g1, g2, atol=1e-15)


def test_gradient_routing_through_frozen_teacher(gen):  # property 15
    teacher = build_denoiser(MLP).requires_grad_(False)
    student = Student(copy.deepcopy(teacher).requires_grad_(True), [80.0])
    with torch.no_grad():  # a non-trivial student (the raw net's output layer is zero at init)
        for p in student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    term = tfd.build(tfd.TFDConfig(), _ctx(teacher)).terms[0]
    B = 32
    batch = _batch(B, (2,), dtype=torch.float32)
    x = student(torch.randn(B, 2, generator=gen))
    sig = term.sigma_f(batch, 1)
    groups = tfd.make_groups(None, B, 0, x.device)
    fx = term._branch(Nets(teacher, student), x, groups, B, sig, torch.randn(B, 2, generator=gen))
    fp = term._reference(Nets(teacher, student), batch, groups, B, "tfd_pos", sig, x)
    assert all(f.requires_grad for f in fx.values()) and not any(f.requires_grad for f in fp.values())
    out = term(Nets(teacher, student), batch, GenOut(x=x, x_T=x))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_tap_shapes_mlp_and_unet():  # property 16
    mlp = build_denoiser(MLP)
    assert tfd.default_taps(mlp) == ["net.blocks.0", "net.blocks.1"]
    assert tfd.default_taps(mlp, "deep") == ["net.blocks.1"]
    f = tfd.tap_features(mlp, torch.randn(3, 2), torch.full((3,), 0.1), None, tfd.default_taps(mlp))
    assert all(v.shape == (3, 32) for v in f.values())
    unet = build_denoiser(UNET)  # 3 levels at 8x8: levels 8/4/2, the R/4 encoder tap is the bottleneck
    taps = tfd.default_taps(unet)
    assert taps == ["net.unet.down_blocks.1.resnets.0", "net.unet.mid_block",
                    "net.unet.up_blocks.0.resnets.0", "net.unet.up_blocks.1.resnets.0"]
    assert tfd.default_taps(unet, "deep") == ["net.unet.mid_block"]
    f = tfd.tap_features(unet, torch.randn(3, 1, 8, 8), torch.full((3,), 0.1), torch.tensor([0, 1, 2]), taps)
    assert [tuple(v.shape) for v in f.values()] == [(3, 16)] * 4  # 4x4 -> 1x1, 2x2 -> global
    unet4 = build_denoiser({"type": "unet", "shape": [1, 16, 16], "block_out_channels": [8, 8, 16, 16]})
    taps4 = tfd.default_taps(unet4)
    assert taps4 == ["net.unet.down_blocks.1.resnets.0", "net.unet.down_blocks.2.resnets.0",
                     "net.unet.mid_block", "net.unet.up_blocks.1.resnets.0", "net.unet.up_blocks.2.resnets.0"]
    f = tfd.tap_features(unet4, torch.randn(2, 1, 16, 16), torch.full((2,), 0.1), None, taps4)
    assert [v.shape[1] for v in f.values()] == [8 * 4, 16, 16, 16, 8 * 4]  # 8x8 maps -> 2x2 pooled


def test_pooling_dims():  # property 16: the ADM dims of spec B3; global pooling below 4x4
    for (C, R), F in {(384, 32): 24576, (576, 16): 9216, (768, 8): 3072}.items():
        assert tfd.pool_feature(torch.zeros(1, C, R, R)).shape == (1, F)
    h = torch.randn(2, 3, 2, 2)
    assert torch.allclose(tfd.pool_feature(h), h.mean(dim=(2, 3)))


def test_sigma_f_shared_per_group_independent_noise(gen):  # property 16
    teacher = build_denoiser({**MLP, "num_classes": 2}).double().requires_grad_(False)
    cfg = tfd.TFDConfig(sigma_f_dist="lognormal", sigma_f_mode="absolute", raw_coords=False)
    term = tfd.build(cfg, _ctx(teacher, num_classes=2)).terms[0]
    calls = []
    teacher.register_forward_pre_hook(lambda m, args: calls.append(args))
    B, cond = 8, torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    batch = _batch(B, (2,), cond)
    x = torch.randn(B, 2, generator=gen, dtype=DT)
    term(Nets(teacher, None), batch, GenOut(x=x, x_T=x))
    assert len(calls) == 3  # generated, positives, anchors
    (xg, sg, cg), (xp, sp, cp), (xa, sa, ca) = calls
    assert torch.equal(sg, sp) and torch.equal(sg, sa) and torch.equal(cg, cp) and torch.equal(cg, ca)
    assert cg.tolist() == [0] * 4 + [1] * 4 and len(set(sg.tolist())) == 2  # one sigma_f per group
    flat = torch.tensor([0, 2, 5, 6, 1, 3, 4, 7])
    ref = FakeReal((2,))
    xi_g = (xg - x[flat]) / sg[:, None]
    xi_p = (xp - ref(cg, "tfd_pos")) / sg[:, None]
    xi_a = (xa - ref(cg, "tfd_anchor")) / sg[:, None]
    assert torch.allclose(xi_g, batch.rnd.randn("tfd_xi_gen", 2)[flat], atol=1e-12)
    assert torch.allclose(xi_p, torch.randn(8, 2, generator=batch.rnd.generator("tfd_pos_xi"), dtype=DT),
                          atol=1e-12)
    assert not torch.allclose(xi_p, xi_a, atol=0.1) and not torch.allclose(xi_g, xi_p, atol=0.1)


def test_relative_sigma_f_for_vector_data():
    term = tfd.build(tfd.TFDConfig(), _ctx(build_denoiser(MLP))).terms[0]
    assert term.relative  # auto: vectors -> 0.1 * std / 0.5 (spec B11)
    sig = term.sigma_f(_batch(4, (2,)), 1)
    assert abs(float(sig) - 0.2 * term.data_std) < 1e-12 and abs(term.data_std - 1.0) < 0.05
    assert term.state_dict() == {"data_std": term.data_std}


# ---------------------------------------------------------------------------------------------
# smoke runs through the engine
# ---------------------------------------------------------------------------------------------
def _run(method, teacher, data, shape, batch, **section):
    cfg = DistillRunConfig(method=method, schedule=ScheduleConfig(ratio=1, critic_on_gen_steps=False),
                           train=DistillTrainConfig(batch=batch, iters=3))
    for k, v in section.items():
        setattr(getattr(cfg, method), k, v)
    return build_run(cfg, torch.device("cpu"), teacher=teacher,
                     teacher_meta={"data": {"name": data, "shape": shape}})


def _check_steps(run, n):
    before = {k: v.clone() for k, v in run.nets.teacher.state_dict().items()}
    s0 = [p.detach().clone() for p in run.nets.student.parameters()]
    for _ in range(n):
        logs = train_iteration(run, log_norms=True)
        assert "refused_step" not in logs
        assert all(v == v and abs(v) < float("inf") for v in logs.values() if isinstance(v, float))
    after = run.nets.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(s0, run.nets.student.parameters()))
    return logs


@pytest.mark.parametrize("method,section", [("tfd", {}), ("tfd", {"coverage": False}), ("drift", {}),
                                            ("tfd", {"positives": "teacher", "teacher_pool": 64,
                                                     "teacher_nfe": 3})])
def test_smoke_mlp_ring8(method, section):
    torch.manual_seed(0)
    run = _run(method, build_denoiser(MLP), "ring8", [2], 64, **section)
    logs = _check_steps(run, 2)
    key = "loss_tfd" if method == "tfd" else "loss_drift"
    assert key in logs and ("tfd_cov" in logs) == (method == "tfd" and section.get("coverage", True))


def test_smoke_unet_digits8_conditional():
    torch.manual_seed(0)
    run = _run("tfd", build_denoiser(UNET), "digits8", [1, 8, 8], 30)
    logs = _check_steps(run, 1)
    assert logs["tfd_groups"] >= 1 and "tfd_mid_block_s" in logs and "tfd_raw_s" not in logs
