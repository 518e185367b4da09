"""The optimisation rules of the engine: the EMA half-life rule (``train/ema.py``, EDM's), the linear
LR warm-up (``phases.lr_at``) and gradient clipping by value (``phases.clip_and_check`` with
``grad_clip_value``, SiDA's critic clipping), each as a pure function and as the engine applies it."""

import math

import pytest
import torch

from fewstep.config import OptimConfig
from fewstep.train.control import BadStep
from fewstep.train.ema import ema_beta, ema_update
from fewstep.train.phases import clip_and_check, lr_at
from tests.helpers import _params, tiny_run


def _halflife(beta: float) -> float:
    """The number of updates after which ``beta ** n = 1/2``."""
    return math.log(0.5) / math.log(beta)


# ---------------------------------------------------------------------------------------------
# EMA: beta = 0.5 ** (1 / halflife), with EDM's ramp-up halflife <= rampup * (updates so far)
# ---------------------------------------------------------------------------------------------
def test_ema_beta_halves_in_one_halflife_once_ramped_up():
    H, r = 10.0, 0.05
    for step in (int(H / r), 1000, 10**6):  # the ramp no longer limits the half-life
        assert ema_beta(step, H, r) ** H == pytest.approx(0.5, rel=1e-12)
    for rampup in (None, 0.0):  # no ramp-up: the full half-life from the first update
        assert ema_beta(0, H, rampup) == pytest.approx(0.5 ** (1 / H), rel=1e-12)
    assert ema_beta(50, 0.0, r) == 0.0 and ema_beta(50, -1.0, r) == 0.0  # no averaging: the EMA copies
    assert ema_beta(10**6, 500.0, r) == pytest.approx(0.5 ** (1 / 500), rel=1e-12)


def test_ema_ramp_grows_the_halflife_linearly_until_it_reaches_the_target():
    H, r = 4.0, 0.05  # the ramp ends near step H / r = 80
    h = [_halflife(ema_beta(s, H, r)) for s in range(200)]
    assert h[0] <= r + 1e-12 and ema_beta(0, H, r) < 1e-5  # the first update all but copies the model
    ramp = [s for s in range(199) if h[s + 1] < H - 1e-9]
    assert len(ramp) > 50
    for s in ramp:  # slope `rampup` per update (EDM: halflife_nimg <= ema_rampup_ratio * cur_nimg)
        assert h[s + 1] - h[s] == pytest.approx(r, rel=1e-6)
    assert all(x == pytest.approx(H, rel=1e-12) for x in h[ramp[-1] + 2:]) and len(h[ramp[-1] + 2:]) > 100
    assert all(b >= a for a, b in zip(h, h[1:]))


def test_ema_update_moves_halfway_in_one_halflife():
    H = 8
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema.register_buffer("count", torch.zeros(1))
    model.register_buffer("count", torch.full((1,), 7.0))
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        for p in model.parameters():
            p.fill_(1.0)
    for _ in range(H):
        ema_update(ema, model, ema_beta(10**6, H, 0.05))
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.5), atol=1e-6)
    assert ema.count.item() == 7.0  # buffers are copied, not averaged
    assert all(torch.equal(p, torch.ones_like(p)) for p in model.parameters())  # the model is untouched


# ---------------------------------------------------------------------------------------------
# warm-up
# ---------------------------------------------------------------------------------------------
def test_lr_warmup_is_linear_then_constant():
    o = OptimConfig(lr=0.1, warmup=4)
    assert [lr_at(o, s) for s in range(7)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1])
    assert [lr_at(OptimConfig(lr=0.1, warmup=0), s) for s in range(3)] == [0.1, 0.1, 0.1]


def test_engine_first_update_is_scaled_by_the_warmup():
    """Adam's first step is ``lr * g / (|g| + eps)``, linear in lr: with optim.warmup=4 the student's
    first update (CD: one per iteration, non-zero from step 0) is a quarter of the plain one."""
    from fewstep.train.distill import train_iteration

    deltas = {}
    for warmup in (0, 4):
        run = tiny_run("cd", {"optim": {"warmup": warmup}})
        before = _params(run.nets.student)
        assert "refused_step" not in train_iteration(run)
        deltas[warmup] = torch.cat([(p.detach() - q).flatten() for p, q in zip(run.nets.student.parameters(),
                                                                              before)])
    assert deltas[0].norm() > 0
    assert float(deltas[4].norm() / deltas[0].norm()) == pytest.approx(0.25, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# clipping by value
# ---------------------------------------------------------------------------------------------
def _with_grads(*grads):
    params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    return params


def test_clip_by_value_then_by_norm():
    params = _with_grads([3.0, -0.5], [0.2, -7.0])
    clip_and_check(params, 0.0, "x", max_value=1.0)
    assert params[0].grad.tolist() == [1.0, -0.5] and params[1].grad.tolist() == pytest.approx([0.2, -1.0])
    params = _with_grads([3.0, -0.5], [0.2, -7.0])
    clip_and_check(params, 0.0, "x", max_value=0.0)  # 0 = off
    assert params[0].grad.tolist() == [3.0, -0.5] and params[1].grad.tolist() == pytest.approx([0.2, -7.0])
    params = _with_grads([3.0, -0.5], [0.2, -7.0])
    clip_and_check(params, 1.0, "x", max_value=1.0)  # value first, then the global norm
    clipped = torch.tensor([1.0, -0.5, 0.2, -1.0])
    got = torch.cat([p.grad for p in params])
    assert torch.allclose(got, clipped / clipped.norm(), atol=1e-6)
    with pytest.raises(BadStep, match="x gradient is not finite"):
        clip_and_check(_with_grads([float("nan"), 1.0]), 0.0, "x", max_value=1.0)


def test_engine_clips_the_critic_gradient_by_value():
    """SiD's critic with fake_optim.grad_clip_value: every gradient element the optimiser sees is
    within +-c (and c is small enough here that some are clipped: without it, some exceed c)."""
    from fewstep.train.distill import critic_update, make_batch

    c, grads = 1e-4, {}
    for value in (0.0, c):
        run = tiny_run("sid", {"fake_optim": {"grad_clip_value": value}})
        critic_update(run, make_batch(run, 0), None)
        grads[value] = torch.cat([p.grad.flatten() for p in run.nets.fake.parameters() if p.grad is not None])
    assert grads[0.0].abs().max() > c and (grads[0.0].abs() > c).sum() > 10
    assert grads[c].abs().max() <= c
    inside = grads[0.0].abs() < c  # elements already within the bound are left alone
    assert torch.equal(grads[c][inside], grads[0.0][inside])
    assert torch.equal(grads[c][~inside], c * grads[0.0][~inside].sign())


def test_eval_raw_logs_the_raw_student_beside_its_ema_and_changes_no_weight(tmp_path):
    """train.eval_raw (issue 20.1): every evaluation of a run with an EMA also scores the raw student as
    raw_<metric>; the two differ, and the exported weights are the run's without the option."""
    import json

    from safetensors.torch import load_file

    from fewstep.cli import main
    from tests.helpers import save_tiny_teacher

    t = save_tiny_teacher(tmp_path / "t")
    common = ["distill", "--teacher", str(t), "--method", "dmd", "--iters", "20", "--batch", "16",
              "--no-progress"]
    over = ["train.ema_halflife=5", "train.eval_every=10", "train.eval_n=64"]
    assert main([*common, "--out", str(tmp_path / "a"), *over, "train.eval_raw=true"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), *over]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fd" in r]
    assert evals and all("raw_fd" in r and "raw_modes_covered" in r for r in evals)
    assert any(r["fd"] != r["raw_fd"] for r in evals)
    plain = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert not any("raw_fd" in r for r in plain)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
