"""Mixed precision, the bf16 teacher and activation checkpointing (issue 21, train/precision.py).

bf16/fp16 autocast covers the network forwards of a training iteration only: the weights and
optimiser state stay float32, the losses and kernels see float32 tensors outside autocast, fp16
adds a GradScaler whose state resumes exactly, and fp32 installs nothing at all (its runs equal
the main branch's bit for bit; checked by hand, see docs/scaling.md).
"""

import math
import os
import signal

import pytest
import torch

from fewstep.cli import main
from fewstep.config import DistillRunConfig, TeacherRunConfig, resolve
from fewstep.core import drift, kernels
from fewstep.errors import ConfigError
from fewstep.models.io import build_denoiser
from fewstep.train import checkpoint as ckpt
from fewstep.train.precision import enable_checkpointing
from tests.helpers import MLP, assert_states_equal, save_tiny_teacher, tiny_run

UNET = {"type": "unet", "shape": [1, 8, 8], "num_classes": 0, "block_out_channels": [8, 16],
        "layers_per_block": 1, "sigma_data": 0.5}
RUNS = {  # name -> (method, overrides): both phases every iteration (schedule.ratio=1)
    "dmd": ("dmd", {"dmd": {"gan_gen_weight": 0.1}}),
    "sid": ("sid", {}),
    "di": ("di", {}),
    "cd": ("cd", {}),
    "fdistill": ("fdistill", {}),
    "tfd": ("tfd", {"train": {"batch": 64}}),
    "drift": ("drift", {"train": {"batch": 64}}),
    "dmd+el": ("dmd", {"extras": {"el": 0.5}, "el": {"width": 8, "K": 2, "calib_steps": 2}}),
    "dmd+dp": ("dmd", {"extras": {"dp": 0.05}, "student": {"steps": 4, "renoise": "ddim"}}),
}


def _run(name: str, precision: str = "bf16", **train):
    method, over = RUNS[name]
    over = {**over, "schedule": {"ratio": 1},
            "train": {"batch": 16, "iters": 4, "precision": precision, **over.get("train", {}), **train}}
    run = tiny_run(method, over)
    run.prepare(None, None)
    return run


def _finite_logs(logs: dict) -> bool:
    return all(math.isfinite(v) for v in logs.values() if isinstance(v, float))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_bf16_run_has_finite_losses_and_fp32_master_state(name):
    run = _run(name)
    s0 = [p.detach().clone() for p in run.nets.student.parameters()]
    for _ in range(2):
        logs = run.iteration(log_norms=True)
        assert "refused_step" not in logs and _finite_logs(logs), logs
    assert any(k.startswith("loss_") for k in logs) and run.bad_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(s0, run.nets.student.parameters()))
    nets = [run.nets.student, *run.nets.extra_networks().values()]
    assert all(p.dtype == torch.float32 for n in nets for p in n.parameters())
    for opt in run.opts.values():  # Adam moments are float32 (master weights and their state)
        moments = [v for st in opt.state.values() for v in st.values() if v.is_floating_point()]
        assert moments and all(v.dtype == torch.float32 for v in moments)


def _spy_forward(module, seen: list):
    def hook(m, i, out):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
    return module.register_forward_hook(hook)


def test_autocast_is_active_in_network_forwards_only():
    """A layer inside the student sees bf16 activations under autocast; the denoiser returns
    float32; the loss code (here EL's MMD kernel call) runs with autocast off on float32 tensors."""
    from fewstep.losses import el

    run = _run("dmd+el")
    inner, outer, kernel = [], [], []
    _spy_forward(run.nets.student.G.net.blocks[0], inner)
    _spy_forward(run.nets.student.G, outer)
    real = el.mmd2_unbiased_pooled

    def spy(x, y, *a):
        kernel.append((torch.is_autocast_enabled("cpu"), x.dtype, y.dtype))
        return real(x, y, *a)

    el.mmd2_unbiased_pooled = spy
    try:
        run.iteration()
    finally:
        el.mmd2_unbiased_pooled = real
    assert inner and all(s == (True, torch.bfloat16, torch.bfloat16) for s in inner), inner
    # a hook registered after the precision hook: autocast already left, the output float32
    assert outer and all(not s[0] and s[2] == torch.float32 for s in outer), outer
    assert kernel and all(s == (False, torch.float32, torch.float32) for s in kernel), kernel
    with torch.no_grad():  # outside an iteration (in-loop evaluation): float32, no autocast
        inner.clear()
        run.nets.student(torch.randn(4, 2))
    assert inner == [(False, torch.bfloat16, torch.float32)]  # get_autocast_dtype is the default


def test_fp32_installs_no_hook_and_enters_no_autocast():
    run = _run("dmd", precision="fp32")
    assert run.precision.handles == [] and run.scalers == {}
    seen = []
    for net in (run.nets.teacher, run.nets.student.G, run.nets.fake):
        _spy_forward(net.net.blocks[0], seen)
    run.iteration()
    assert seen and all(not s[0] and s[2] == torch.float32 for s in seen)


@pytest.mark.parametrize("fn", ["sq_dists", "pairwise_dist", "mmd2_linear"])
def test_kernels_run_in_full_precision_even_inside_autocast(fn):
    """Under an explicit bf16 autocast the raw distance matmul would be bf16; the kernels switch
    autocast off and upcast half inputs, so they equal the float32 result exactly."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 16, generator=g), torch.randn(30, 16, generator=g)
    f = {"sq_dists": kernels.sq_dists, "pairwise_dist": drift.pairwise_dist,
         "mmd2_linear": kernels.mmd2_linear_unbiased}[fn]
    ref = f(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ y.T).dtype == torch.bfloat16  # what autocast does to an unguarded matmul
        got, half = f(x, y), f(x.bfloat16(), y.bfloat16())
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert half.dtype == torch.float32
    assert torch.equal(half, f(x.bfloat16().float(), y.bfloat16().float()))


def test_drift_loss_inside_autocast_equals_float64_free_reference():
    g = torch.Generator().manual_seed(1)
    x, pos = torch.randn(2, 8, 4, generator=g, requires_grad=True), torch.randn(2, 8, 4, generator=g)
    ref = drift.drift_loss(x, pos).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = drift.drift_loss(x, pos).loss
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_bf16_teacher_stores_bf16_weights_and_returns_float32():
    run = _run("dmd", teacher_dtype="bf16")
    T, G = run.nets.teacher, run.nets.student.G
    assert all(p.dtype == torch.bfloat16 for p in T.parameters())
    assert T.net.embed_noise.freqs.dtype == torch.float32  # fixed buffers keep float32 phases
    assert all(p.dtype == torch.float32 for p in G.parameters())  # copied before the cast
    x, sigma = torch.randn(64, 2), torch.exp(torch.randn(64))
    with torch.no_grad():
        d_bf16, d_fp32 = T(x, sigma), G(x, sigma)  # G still equals the fp32 teacher (no step yet)
    assert d_bf16.dtype == torch.float32
    err = float((d_bf16 - d_fp32).abs().max() / d_fp32.abs().max())
    assert 0 < err < 2e-2, err  # bf16 has an 8-bit mantissa: about 0.4 % per rounding
    logs = run.iteration(log_norms=True)
    assert "refused_step" not in logs and _finite_logs(logs)


def test_fp16_scales_losses_and_skips_overflow_without_refusing():
    run = _run("dmd", precision="fp16")
    assert set(run.scalers) == {"generator", "critic"}
    logs = run.iteration()
    assert logs["amp_scale_generator"] == logs["amp_scale_critic"] == 65536.0 and _finite_logs(logs)
    scaler = run.scalers["generator"]
    scaler.update(1e30)  # a loss scale that overflows any fp16 gradient
    before = [p.detach().clone() for p in run.nets.student.parameters()]
    logs = run.iteration()
    assert "refused_step" not in logs and run.bad_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, run.nets.student.parameters()))  # skipped
    assert logs["amp_scale_generator"] == pytest.approx(0.5e30, rel=1e-6)  # halved (backoff 0.5)
    assert "scalers" in run.state_dict()


@pytest.mark.parametrize("key,value", [("train.precision", "fp8"), ("train.precision", "float16"),
                                       ("train.teacher_dtype", "fp16"), ("train.checkpointing", "maybe")])
def test_bad_values_are_one_line_config_errors(key, value):
    for cls in (DistillRunConfig, TeacherRunConfig):
        if key == "train.teacher_dtype" and cls is TeacherRunConfig:
            with pytest.raises(ConfigError, match="unknown config key"):
                resolve(cls, {}, [f"{key}={value}"])
            continue
        with pytest.raises(ConfigError) as e:
            resolve(cls, {}, [f"{key}={value}"])
        assert key in str(e.value) and "\n" not in str(e.value)


def test_checkpointing_an_mlp_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="diffusers UNet") as e:
        enable_checkpointing(build_denoiser(MLP), "student")
    assert "\n" not in str(e.value)


def _unet_grads(checkpointing: bool, saved: list | None = None):
    torch.manual_seed(0)
    D = build_denoiser(UNET)
    with torch.no_grad():
        torch.nn.init.normal_(D.net.unet.conv_out.weight, std=0.1)  # a non-zero output layer
    if checkpointing:
        assert enable_checkpointing(D, "student") == 1
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(8, 1, 8, 8, generator=g), torch.exp(torch.randn(8, generator=g))

    def pack(t):  # bytes the autograd graph keeps for backward (outside checkpointed regions)
        if saved is not None:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = (D(x, sigma) ** 2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in D.named_parameters()}


def test_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations():
    plain, ckpt_saved, plain_saved = _unet_grads(False), [], []
    _unet_grads(False, plain_saved)
    ck = _unet_grads(True, ckpt_saved)
    assert set(plain) == set(ck)
    assert max(float((plain[k] - ck[k]).abs().max()) for k in plain) <= 1e-6
    assert sum(ckpt_saved) < 0.5 * sum(plain_saved), (sum(ckpt_saved), sum(plain_saved))


def test_distill_checkpointing_switches_student_and_fake_only():
    from fewstep.config import from_dict
    from fewstep.losses import BASES
    from fewstep.train.distill import build_run

    torch.manual_seed(0)
    teacher = build_denoiser(UNET)
    d = {**BASES["dmd"].defaults, "method": "dmd",
         "train": {"batch": 8, "iters": 2, "checkpointing": True, "precision": "bf16"}}
    run = build_run(from_dict(DistillRunConfig, d), torch.device("cpu"), teacher=teacher,
                    teacher_meta={"data": {"name": "digits8", "shape": [1, 8, 8]}})
    assert run.nets.student.G.net.unet.is_gradient_checkpointing
    assert run.nets.fake.net.unet.is_gradient_checkpointing
    assert not run.nets.teacher.net.unet.is_gradient_checkpointing
    run.prepare(None, None)
    logs = run.iteration(log_norms=True)
    assert "refused_step" not in logs and _finite_logs(logs)


# ---------------------------------------------------------------------------------------------
# exact resume (as tests/test_resume.py): stopped at iteration 3 and resumed == uninterrupted
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_resume_is_bit_exact(tmp_path, monkeypatch, precision):
    import fewstep.train.loop as loop

    teacher = save_tiny_teacher(tmp_path / "t")
    args = ["--method", "dmd", "--iters", "6", "--batch", "16", "--no-progress", "train.eval_n=50",
            "train.ckpt_every=100", "schedule.ratio=2", "dmd.gan_gen_weight=0.1",
            f"train.precision={precision}"]

    def cli(out):
        return main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / out), *args])

    assert cli("straight") == 0
    real = loop.reseed
    with monkeypatch.context() as m:
        m.setattr(loop, "reseed", lambda seed, s: (s == 3 and os.kill(os.getpid(), signal.SIGTERM),
                                                   real(seed, s)))
        assert cli("resumed") == 128 + signal.SIGTERM
    stopped = ckpt.load_checkpoint(ckpt.checkpoint_paths(tmp_path / "resumed/checkpoints")[-1])
    assert stopped["step"] == 4 and (("scalers" in stopped) == (precision == "fp16"))
    assert cli("resumed") == 0
    final = [ckpt.load_checkpoint(tmp_path / r / "checkpoints/ckpt_00000006.pt")
             for r in ("straight", "resumed")]
    assert_states_equal(*final)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_teacher_training_in_half_precision(tmp_path, precision):
    """The teacher loop autocasts its network too (fp16 with a GradScaler in its checkpoint); the
    EMA it evaluates and exports keeps float32 and no hooks."""
    from fewstep.train.runlog import read_metrics

    out = tmp_path / "t"
    assert main(["teacher", "--data", "ring8", "--out", str(out), "--iters", "4", "--no-progress",
                 "model.hidden=32", "model.depth=2", "model.emb_dim=16", "train.batch=32", "train.eval_n=50",
                 "train.ckpt_every=100", "train.log_every=2", f"train.precision={precision}"]) == 0
    lines = [r for r in read_metrics(out) if "loss" in r]
    assert lines and all(math.isfinite(r["loss"]) for r in lines)
    state = ckpt.load_checkpoint(ckpt.checkpoint_paths(out / "checkpoints")[-1])
    assert ("scaler" in state) == (precision == "fp16")
    assert all(v.dtype == torch.float32 for v in state["ema"].values() if v.is_floating_point())
