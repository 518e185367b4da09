"""The whole trip: a tiny diffusers UNet2DModel teacher trained on digits8 -> `fewstep distill` ->
`fewstep export --format diffusers` -> DiffusionPipeline sampling -> .npz -> `fewstep eval --samples`,
compared with `fewstep eval STUDENT`.

Tolerances (docs/bring-your-model.md, "The round trip"):
* same seed: the pipeline's images equal fewstep's samples clamped to [0, 1] (the pipeline clamps) to
  1e-4 per pixel, so their fd may differ only by float rounding. The bound is measured, not guessed:
  5x the fd change caused by perturbing fewstep's samples by the observed per-pixel difference with
  random signs. Against `fewstep eval STUDENT` (unclamped samples) the clamping effect is added.
* other seed: within the sampling noise, 4 sqrt(2) times the standard deviation of fd over four other
  seeds of fewstep's own (clamped) samples; two independent generated sets differ by sqrt(2) sigma.
"""

import json
import math

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.train.evaluate import metric_space

diffusers = pytest.importorskip("diffusers")
N = 897  # digits8's test split: fewstep eval's default n


def _train_teacher(root, steps=150):
    """An eps-prediction DDPM on the digits8 train split (Ho et al. 2020's loss), ~7 s on one core."""
    x = load_dataset("digits8").x_train
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False)
    sched = diffusers.DDPMScheduler()
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x0 = x[torch.randint(0, len(x), (32,), generator=g)]
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (32,), generator=g)
        loss = ((unet(sched.add_noise(x0, noise, t), t).sample - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.save_pretrained(root / "unet")
    sched.save_pretrained(root / "scheduler")
    return root


def _eval(tmp_path, *args) -> dict:
    js = tmp_path / "m.json"
    assert main(["eval", *args, "--json", str(js)]) == 0
    return json.loads(js.read_text())


def _fd(x: torch.Tensor) -> float:
    from fewstep import metrics as M

    space = metric_space(load_dataset("digits8"))
    real, _ = space.reference(len(x))
    return M.fd(space.features(real).double(), space.features(x).double())


@pytest.mark.slow
def test_teacher_to_pipeline_to_eval_samples(tmp_path):
    teacher = _train_teacher(tmp_path / "teacher")
    student, export = tmp_path / "student", tmp_path / "export"
    assert main(["distill", "--teacher", str(teacher), "--method", "dmd", "--steps", "4", "--iters", "10",
                 "--batch", "32", "--data", "digits8", "--out", str(student), "--no-progress",
                 "student.renoise=ddim",
                 "train.eval_every=0", "train.eval_n=64"]) == 0
    assert main(["export", str(student), "--format", "diffusers", "--out", str(export)]) == 0

    pipe = diffusers.DiffusionPipeline.from_pretrained(export, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for seed in (0, 1):
        images = pipe(batch_size=N, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                      output_type="np").images
        np.savez(tmp_path / f"pipe{seed}.npz", images=images)  # NHWC in [0, 1], as diffusers gives it
    fd_pipe = [_eval(tmp_path, "--samples", str(tmp_path / f"pipe{s}.npz"), "--data", "digits8")["fd"]
               for s in (0, 1)]

    # same seed: the same samples up to the pipeline's clamp
    assert main(["sample", str(student), "--n", str(N), "--seed", "0",
                 "--out", str(tmp_path / "f.npz")]) == 0
    ours = torch.from_numpy(np.load(tmp_path / "f.npz")["x"])
    clamped = ours.clamp(-1, 1)
    pipe0 = torch.from_numpy(np.load(tmp_path / "pipe0.npz")["images"]).permute(0, 3, 1, 2) * 2 - 1
    delta = float((pipe0 - clamped).abs().max())
    assert delta <= 2e-4  # 1e-4 in the pipeline's [0, 1] units
    fd_clamped = _fd(clamped)
    signs = torch.randint(0, 2, clamped.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    float_tol = 5 * abs(_fd(clamped + max(delta, 1e-7) * signs) - fd_clamped) + 1e-9
    assert float_tol < 1e-3 * fd_clamped  # the bound is tight enough to mean something
    assert abs(fd_pipe[0] - fd_clamped) <= float_tol

    student_eval = _eval(tmp_path, str(student), "--seed", "0")
    assert student_eval["n_samples"] == N and student_eval["fd_floor"] > 0
    clamp_effect = abs(student_eval["fd"] - fd_clamped)
    assert abs(fd_pipe[0] - student_eval["fd"]) <= clamp_effect + float_tol

    # another seed: within the sampling noise, estimated from fewstep's own samples (clamped like
    # the pipeline's) at four other seeds
    fds = []
    for seed in (10, 11, 12, 13):
        assert main(["sample", str(student), "--n", str(N), "--seed", str(seed), "--out",
                     str(tmp_path / "r.npz")]) == 0
        fds.append(_fd(torch.from_numpy(np.load(tmp_path / "r.npz")["x"]).clamp(-1, 1)))
    band = 4 * math.sqrt(2) * float(np.std(fds, ddof=1))
    assert abs(fd_pipe[1] - fd_clamped) <= band
    assert abs(fd_pipe[1] - fd_pipe[0]) > float_tol  # the seeds really differ
    print(f"fd: pipeline seed0 {fd_pipe[0]:.5f}, seed1 {fd_pipe[1]:.5f}; "
          f"fewstep eval {student_eval['fd']:.5f} "
          f"(clamped {fd_clamped:.5f}); float tol {float_tol:.2g}; noise band {band:.3g}; "
          f"max pixel diff {delta:.2g}")
