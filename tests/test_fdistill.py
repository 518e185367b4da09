"""f-distill (specs/f_distill.md section 4): h(r) per divergence, rkl == DMD2 with its GAN head,
weights that average to 1 over the global batch (1 and 2 processes), bins that survive a resume,
and the mode-covering mechanism on an exact mixture."""

import math

import pytest
import torch

from fewstep.cli import main
from fewstep.config import DistillRunConfig, from_dict
from fewstep.core.mixture import GaussianMixture, ring8
from fewstep.errors import ConfigError
from fewstep.losses import BASES, fdistill
from fewstep.train.checkpoint import load_checkpoint
from fewstep.train.distill import build_run, train_iteration
from tests.helpers import MLP, save_tiny_teacher, tensors_max_diff

R = torch.tensor([0.1, 0.5, 1.0, 2.0, 20.0], dtype=torch.float64)
TABLE = {"rkl": torch.ones_like(R), "kl": R, "js": R / (1 + R), "sh": R.sqrt(), "jf": 1 + R,
         "neyman": 1 / R, "sf": 1 / (1 + R)}


def _term(**kw) -> fdistill.FDistillMatching:
    return fdistill.FDistillMatching(fdistill.FDistillConfig(**kw))


@pytest.mark.parametrize("f", sorted(TABLE))
def test_h_matches_the_table(f):
    """Without normalisations, h(r) is the spec's table (logit = log r, inside the clip range)."""
    term = _term(f_div=f, ratio_normalization=False, weight_normalization=False)
    h, r = term.weights(R.log(), torch.zeros(len(R), dtype=torch.long), lambda t: t)
    assert torch.allclose(r, R) and torch.allclose(h, TABLE[f])


def test_ratio_clipping_and_weight_normalisation():
    term = _term(f_div="kl", ratio_normalization=False)
    h, r = term.weights(torch.tensor([-50.0, 0.0, 50.0]), torch.zeros(3, dtype=torch.long), lambda t: t)
    assert r.tolist() == pytest.approx([0.1, 1.0, 20.0])  # logit clamp 10, then clip to [0.1, 20]
    assert float(h.mean()) == pytest.approx(1.0, abs=1e-5)  # weights average to 1


def test_bins_normalise_the_ratio_per_noise_level():
    """With ratio normalisation each bin's mean ratio is 1, whatever the noise level's scale."""
    term = _term(f_div="kl", weight_normalization=False, bin_num=2, min_step=0, max_step=9)
    idx = torch.tensor([0, 1, 2, 8, 9, 9])  # bins: 0..4 -> 0, 5..9 -> 1
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 15.0], dtype=torch.float64)
    h, _ = term.weights(r.log(), idx, lambda t: t)
    assert h[:3].mean() == pytest.approx(1.0, rel=1e-5) and h[3:].mean() == pytest.approx(1.0, rel=1e-5)
    assert term.bins.tolist() == pytest.approx([2.0, 15.0])


def test_weights_use_the_global_batch_mean():
    """The weight normaliser is the all-process mean: a rank whose batch has larger ratios keeps
    weights above 1 (faked here with an all_mean that reports another rank's mean)."""
    term = _term(f_div="kl", ratio_normalization=False)
    h, _ = term.weights(torch.tensor([0.0, 0.0]), torch.zeros(2, dtype=torch.long), lambda t: t * 0.5)
    assert h.tolist() == pytest.approx([2.0, 2.0], rel=1e-5)


def test_mode_covering_weights_on_an_exact_mixture():
    """The student covers 4 of ring8's 8 modes; with the exact ratio p_sigma/q_sigma as the logit,
    kl and js weight samples near the uncovered modes more than the covered ones; rkl does not."""
    p = ring8()
    q = GaussianMixture.isotropic(p.means[::2], 0.05)  # modes 0, 2, 4, 6 only
    sigma = 0.5
    g = torch.Generator().manual_seed(0)
    x = p.sample(4000, g)[0] + sigma * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    logit = p.log_prob(x, sigma) - q.log_prob(x, sigma)
    near = (x[:, None] - p.means[None]).norm(dim=-1).argmin(1)
    covered = near % 2 == 0
    for f, more in (("kl", True), ("js", True), ("rkl", False)):
        h, _ = _term(f_div=f, ratio_normalization=False).weights(logit, torch.zeros(4000, dtype=torch.long),
                                                                 lambda t: t)
        gap = float(h[~covered].mean() - h[covered].mean())
        assert (gap > 0.5) if more else abs(gap) < 1e-9, (f, gap)


def test_gan_head_is_required():
    from fewstep.config import resolve

    with pytest.raises(ConfigError, match="fdistill.gan_gen_weight > 0"):
        resolve(DistillRunConfig, {}, ["method=fdistill", "fdistill.gan_gen_weight=0"])
    with pytest.raises(ConfigError, match="fdistill.f_div"):
        resolve(DistillRunConfig, {}, ["method=fdistill", "fdistill.f_div=tv"])


def _runs(norm: bool):
    """dmd with its GAN head and fdistill rkl, same teacher, seed and schedule (ratio 1)."""
    torch.manual_seed(0)
    from fewstep.models.io import build_denoiser

    teacher = build_denoiser(MLP)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    runs = []
    rkl = {"gan_gen_weight": 0.05, "f_div": "rkl", "weight_normalization": norm}
    for method, section in (("dmd", {"gan_gen_weight": 0.05}), ("fdistill", rkl)):
        d = {**BASES[method].defaults, "method": method, method: section, "schedule": {"ratio": 1},
             "train": {"batch": 16, "iters": 4}}
        torch.manual_seed(1)  # the same GAN-head initialisation
        runs.append(build_run(from_dict(DistillRunConfig, d), torch.device("cpu"), teacher=teacher,
                              teacher_meta={"data": {"name": "ring8", "shape": [2]}}))
    for _ in range(4):
        for r in runs:
            assert "refused_step" not in train_iteration(r)
    return runs


def test_rkl_equals_dmd_with_gan_head_bit_for_bit_without_the_normaliser():
    a, b = _runs(norm=False)
    assert tensors_max_diff(a.nets.student.state_dict(), b.nets.student.state_dict()) == 0
    assert tensors_max_diff(a.nets.fake.state_dict(), b.nets.fake.state_dict()) == 0
    moved = tensors_max_diff(a.nets.student.G.state_dict(), a.nets.teacher.state_dict())
    assert moved > 1e-4  # the students trained: the equality is not vacuous


def test_rkl_equals_dmd_with_gan_head_up_to_the_normaliser_epsilon():
    """h = 1 / (1 + 1e-6): the gradient scale moves by 1e-6; Adam's step barely sees it."""
    a, b = _runs(norm=True)
    diff = tensors_max_diff(a.nets.student.state_dict(), b.nets.student.state_dict())
    assert 0 < diff < 1e-5


ARGS = ["--method", "fdistill", "--iters", "6", "--batch", "16", "--no-progress", "train.eval_n=100",
        "train.log_every=2", "train.ckpt_every=3", "schedule.ratio=1", "fdistill.f_div=kl",
        "fdistill.ratio_ema_rate=0.5"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def test_bins_survive_resume(tmp_path, teacher):
    """A run resumed from iteration 3 ends with the same bins (and student) as an uninterrupted one."""
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--out", str(out), *ARGS]) == 0
    full = load_checkpoint(out / "checkpoints/ckpt_00000006.pt")
    (out / "checkpoints/ckpt_00000006.pt").unlink()
    (out / "model.safetensors").unlink()
    mid = load_checkpoint(out / "checkpoints/ckpt_00000003.pt")
    assert mid["terms"]["fdistill"]["bins"] != [1.0] * 10  # the bins moved before the stop
    assert main(["distill", "--teacher", str(teacher), "--out", str(out), *ARGS]) == 0
    again = load_checkpoint(out / "checkpoints/ckpt_00000006.pt")
    assert again["terms"]["fdistill"]["bins"] == full["terms"]["fdistill"]["bins"]
    assert tensors_max_diff(again["student"], full["student"]) == 0


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, teacher):
    """The weights' global normalisation and the bins' all-process statistics: 2 processes with the
    same global batch give the same student, fake score and bins as 1 process."""
    from tests.test_distributed import _torchrun

    runs = tmp_path / "runs"
    assert main(["distill", "--teacher", str(teacher), "--out", str(runs / "one"), *ARGS]) == 0
    r, writes = _torchrun(tmp_path, ["distill", "--teacher", str(teacher), "--out", str(runs / "two"), *ARGS])
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (load_checkpoint(runs / n / "checkpoints/ckpt_00000006.pt") for n in ("one", "two"))
    assert tensors_max_diff(one, two, skip=("wall_s", "rng", "log_acc", "terms")) <= 1e-6
    b1, b2 = one["terms"]["fdistill"]["bins"], two["terms"]["fdistill"]["bins"]
    assert max(abs(a - b) for a, b in zip(b1, b2)) <= 1e-6 and not all(math.isclose(v, 1.0) for v in b1)
