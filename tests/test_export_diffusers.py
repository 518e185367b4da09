"""`fewstep export RUN --format diffusers`: the directory loads with `DiffusionPipeline.from_pretrained`
into diffusers' own classes and samples the student in its k steps; same noise -> same images as
fewstep's own Student sampler (<= 1e-4)."""

import json

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.models import export_diffusers as ed
from fewstep.models.export_diffusers import sample_exported, student_on_diffusers_noise, unet_class_labels
from fewstep.models.io import load_model
from fewstep.models.student import Student

diffusers = pytest.importorskip("diffusers")
DISTILL = ["--iters", "2", "--batch", "8", "--no-progress"]


def _v_teacher(root, num_class_embeds=None, prediction_type="v_prediction"):
    """A random diffusers teacher whose x0 stays O(1): v-prediction with a small output layer."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, num_class_embeds=num_class_embeds)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
    unet.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(prediction_type=prediction_type).save_pretrained(root / "scheduler")
    return root


def _distill(teacher, out, steps, *overrides, method="dmd"):
    assert main(["distill", "--teacher", str(teacher), "--method", method, "--out", str(out), *DISTILL,
                 "--steps", steps, "data.name=digits8", "train.eval_n=16", "train.eval_every=0",
                 *overrides]) == 0
    return out


def _student(run):
    G, meta = load_model(run)
    return G.float().eval(), Student(G.float(), meta["sigmas"], renoise=meta["renoise"]).eval(), meta


def _pipe(path):
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(x: torch.Tensor) -> np.ndarray:
    """fewstep samples -> what the pipeline's output_type='np' returns (NHWC in [0, 1])."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def v_teacher(tmp_path_factory):
    return _v_teacher(tmp_path_factory.mktemp("vt"))


@pytest.mark.parametrize("steps", ["1", "4"])
def test_ddim_student_pipeline_equals_fewstep(v_teacher, tmp_path, steps):
    run = _distill(v_teacher, tmp_path / "s", steps, "student.renoise=ddim")
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "e")]) == 0
    rec = json.loads((tmp_path / "e" / "fewstep_export.json").read_text())
    assert rec["scheduler"] == "EulerDiscreteScheduler" and rec["pipeline_is_exact"]
    pipe = _pipe(tmp_path / "e")
    assert type(pipe).__name__ == "ConsistencyModelPipeline"
    assert type(pipe.unet).__name__ == "UNet2DModel"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    G, student, meta = _student(run)
    k = int(steps)
    z, ours = student_on_diffusers_noise(student, (6, 1, 8, 8), None, seed=3)
    assert 0.05 < ours.abs().max() < 5  # a non-degenerate student in the image range
    theirs = pipe(batch_size=6, num_inference_steps=k, generator=torch.Generator().manual_seed(3),
                  output_type="np").images
    np.testing.assert_allclose(theirs, _images(ours), rtol=0, atol=1e-4)
    # `fewstep sample` draws z from the same seeded generator: a deterministic student matches it too
    assert main(["sample", str(run), "--n", "6", "--seed", "3", "--out", str(tmp_path / "f.npz")]) == 0
    np.testing.assert_allclose(theirs, _images(torch.from_numpy(np.load(tmp_path / "f.npz")["x"])),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_other_prediction_types(tmp_path, prediction_type):
    teacher = _v_teacher(tmp_path / "t", prediction_type=prediction_type)
    run = _distill(teacher, tmp_path / "s", "2", "student.renoise=ddim")
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "e")]) == 0
    G, student, _ = _student(run)
    pipe = _pipe(tmp_path / "e")
    assert pipe.scheduler.config.prediction_type == prediction_type
    z, ours = student_on_diffusers_noise(student, (3, 1, 8, 8), None, seed=0)
    pipe.scheduler.set_timesteps(2)
    theirs = sample_exported(pipe.unet, pipe.scheduler, z)
    scale = max(1.0, float(ours.abs().max()))  # a random eps/x0 teacher's samples are not O(1)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * scale)


def test_fresh_student_lcm(v_teacher, tmp_path, capsys):
    """LCMScheduler re-noises freshly; pipe() starts from unit-variance noise (x_T = sqrt(1 + sigma_0^2) z
    in EDM units), sample_exported from sigma_0 z: each equals fewstep's chain from that start."""
    run = _distill(v_teacher, tmp_path / "s", "3")
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "e")]) == 0
    assert "starts from unit-variance noise" in capsys.readouterr().out
    G, student, meta = _student(run)
    pipe = _pipe(tmp_path / "e")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    shape, s0 = (5, 1, 8, 8), meta["sigmas"][0]
    z, ours = student_on_diffusers_noise(student, shape, None, seed=7)
    g = torch.Generator().manual_seed(7)
    torch.randn(shape, generator=g)  # z
    pipe.scheduler.set_timesteps(3)
    torch.testing.assert_close(sample_exported(pipe.unet, pipe.scheduler, z, generator=g), ours,
                               rtol=0, atol=1e-4)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(shape, generator=g)
    noises = [torch.randn(shape, generator=g) for _ in range(2)]
    with torch.no_grad():
        ddpm_start = student((1 + s0**-2) ** 0.5 * z, None, noises=noises)
    theirs = pipe(batch_size=5, num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                  output_type="np").images
    np.testing.assert_allclose(theirs, _images(ddpm_start), rtol=0, atol=1e-4)
    assert pipe.scheduler.init_noise_sigma == 1.0  # the DDPM convention: unit-variance x_T


def test_class_conditional_student(tmp_path):
    """num_class_embeds = 11 (digits 0..9 and the null class last): the pipeline takes the UNet's
    indices (unet_class_labels maps fewstep's labels; identical here because the null slot is last)."""
    teacher = _v_teacher(tmp_path / "t", num_class_embeds=11)
    run = _distill(teacher, tmp_path / "s", "2", "student.renoise=ddim", "data.conditional=true")
    G, student, _ = _student(run)
    assert student.num_classes == 10
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "e")]) == 0
    pipe = _pipe(tmp_path / "e")
    labels = torch.tensor([0, 1, 9, 5])
    z, ours = student_on_diffusers_noise(student, (4, 1, 8, 8), labels, seed=1)
    theirs = pipe(batch_size=4, class_labels=unet_class_labels(G, labels), num_inference_steps=2,
                  generator=torch.Generator().manual_seed(1), output_type="np").images
    np.testing.assert_allclose(theirs, _images(ours), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def own_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "t"
    assert main(["teacher", "--data", "digits8", "--out", str(out), "--iters", "3", "--no-progress",
                 "train.batch=8", "model.channels=[8,16]", "train.eval_n=16", "data.conditional=true"]) == 0
    return out


@pytest.mark.parametrize("method,steps", [("dmd", "1"), ("dmd", "2"), ("cd", "1")])
def test_own_unet_students_via_consistency_pipeline(own_teacher, tmp_path, method, steps):
    """fewstep's UNet teachers are EDM-preconditioned UNet2DModels fed 250 ln sigma, which is
    CMStochasticIterativeScheduler's convention; class labels map to num_class_embeds."""
    run = _distill(own_teacher, tmp_path / "s", steps, method=method)
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "e")]) == 0
    G, student, _ = _student(run)
    pipe = _pipe(tmp_path / "e")
    assert type(pipe.scheduler).__name__ == "CMStochasticIterativeScheduler"
    assert pipe.unet.config.num_class_embeds == 10
    labels = torch.tensor([3, 1, 4, 1, 5])
    z, ours = student_on_diffusers_noise(student, (5, 1, 8, 8), labels, seed=2)
    theirs = pipe(batch_size=5, class_labels=labels.tolist(), num_inference_steps=int(steps),
                  generator=torch.Generator().manual_seed(2), output_type="np").images
    np.testing.assert_allclose(theirs, _images(ours), rtol=0, atol=1e-4)


def test_refusals(own_teacher, v_teacher, tmp_path, capsys):
    cases = [
        (own_teacher, "is a teacher"),
        (_distill(own_teacher, tmp_path / "c4", "4", method="cd"),
         "re-noises to sqrt(sigma^2 - sigma_min^2)"),
        (_distill(own_teacher, tmp_path / "c2", "2", "student.renoise=ddim", method="cd"),
         "has EDM scalings, not the boundary ones"),
        (_distill(v_teacher, tmp_path / "cd", "2", method="cd"), "no EDM boundary"),
    ]
    for run, match in cases:
        assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
        assert match in capsys.readouterr().err
    from tests.helpers import save_tiny_teacher

    mlp = tmp_path / "mlp"
    assert main(["distill", "--teacher", str(save_tiny_teacher(tmp_path / "mt")), "--method", "dmd",
                 "--out", str(mlp), *DISTILL, "train.eval_n=16", "train.eval_every=0"]) == 0
    assert main(["export", str(mlp), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
    assert "network (SigmaMLP) has no diffusers UNet2DModel form" in capsys.readouterr().err
    good = _distill(v_teacher, tmp_path / "ok", "1")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["export", str(good), "--format", "diffusers", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def _sharpen(run):
    """A 2-iteration student of a 3-iteration teacher is nearly D = c_skip x (zero-initialised conv_out):
    give its UNet a random O(1) output layer so the samples depend on the time embedding and the labels."""
    from safetensors.torch import load_file, save_file

    path = run / "model.safetensors"
    state, g = load_file(path), torch.Generator().manual_seed(0)
    for key in [k for k in state if k.endswith("conv_out.weight") or k.endswith("embed_label.weight")]:
        state[key] = torch.randn(state[key].shape, generator=g) * 0.5
    save_file(state, path)
    return run


def _export(run, out):
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out)]) == 0
    return json.loads((out / "fewstep_export.json").read_text()), _pipe(out)


@pytest.mark.parametrize("steps", ["2", "3", "4"])
def test_own_unet_ddim_students_edm_euler(own_teacher, tmp_path, steps):
    """ddim students of fewstep UNets: EDMEulerScheduler; the recorded set_timesteps (a Karras ramp position
    per level) + sample_exported equal `fewstep sample` (same seed, its labels) to 1e-4. pipe() starts at
    init_noise_sigma z = sqrt(sigma_0^2 + 1) z: where its Karras ramp holds the levels (k = 2, 3) it is the
    student's chain from that start."""
    run = _sharpen(_distill(own_teacher, tmp_path / "s", steps, "student.renoise=ddim"))
    rec, pipe = _export(run, tmp_path / "e")
    assert rec["scheduler"] == type(pipe.scheduler).__name__ == "EDMEulerScheduler"
    assert not rec["pipeline_is_exact"] and "sigmas" in rec["set_timesteps"]
    assert main(["sample", str(run), "--n", "5", "--seed", "4", "--out", str(tmp_path / "f.npz")]) == 0
    f = np.load(tmp_path / "f.npz")
    fewstep_x, labels = torch.from_numpy(f["x"]), torch.from_numpy(f["y"]).long()
    z = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    theirs = sample_exported(pipe.unet, pipe.scheduler, z, labels, set_timesteps=rec["set_timesteps"])
    torch.testing.assert_close(theirs, fewstep_x, rtol=0, atol=1e-4)
    G, student, meta = _student(run)
    images = pipe(batch_size=5, class_labels=labels, num_inference_steps=int(steps),
                  generator=torch.Generator().manual_seed(4), output_type="np").images
    if steps in ("2", "3"):  # Karras with the fitted rho holds 2 and 3 levels: only the start differs
        assert rec["pipe_sigmas"] == pytest.approx(meta["sigmas"], rel=2e-6)
        with torch.no_grad():
            start = student((1 + meta["sigmas"][0] ** -2) ** 0.5 * z, labels)
        np.testing.assert_allclose(images, _images(start), rtol=0, atol=1e-4)


def test_refit_is_exact_and_needed(own_teacher, tmp_path, monkeypatch, capsys):
    """The exported UNet's time embedding at EDMEulerScheduler's timesteps (0.25 ln sigma) is the student's at
    250 ln sigma; without the re-fit the export's self-check refuses it."""
    run = _sharpen(_distill(own_teacher, tmp_path / "s", "4", "student.renoise=ddim"))
    rec, pipe = _export(run, tmp_path / "e")
    G, student, meta = _student(run)
    ed.set_student_timesteps(pipe.scheduler, rec["set_timesteps"])
    want_t = 0.25 * torch.tensor(meta["sigmas"]).double().log()
    assert torch.allclose(pipe.scheduler.timesteps.double(), want_t, rtol=0, atol=1e-6)
    raw = G.net.unet
    with torch.no_grad():
        want = raw.time_embedding(raw.time_proj(ed.own_unet_timesteps(meta["sigmas"])))
        got = pipe.unet.time_embedding(pipe.unet.time_proj(pipe.scheduler.timesteps.float()))
        unfitted = raw.time_embedding(raw.time_proj(pipe.scheduler.timesteps.float()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert (unfitted - want).abs().max() > 0.1 * want.abs().max()  # the timesteps do differ
    monkeypatch.setattr(ed, "refit_time_embedding", lambda unet, t_new, t_old: 0.0)
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "e2")]) == 2
    assert "differs from the student" in capsys.readouterr().err
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e2.partial").exists()  # nothing partial left


@pytest.mark.parametrize("steps", ["3", "4"])
def test_own_unet_fresh_students_custom_timesteps(own_teacher, tmp_path, steps):
    """fresh students of fewstep UNets: CMStochasticIterativeScheduler with the recorded integer timesteps;
    pipe(timesteps=...) is the student on diffusers' noise stream, and pipe(num_inference_steps=k) is the
    same network at the recorded pipe_sigmas (fewstep's Student with those levels)."""
    run = _sharpen(_distill(own_teacher, tmp_path / "s", steps))
    rec, pipe = _export(run, tmp_path / "e")
    assert rec["scheduler"] == "CMStochasticIterativeScheduler"
    timesteps, k = rec["set_timesteps"]["timesteps"], int(steps)
    G, student, meta = _student(run)
    labels = torch.tensor([2, 7, 1, 8])
    z, ours = student_on_diffusers_noise(student, (4, 1, 8, 8), labels, seed=5)
    images = pipe(batch_size=4, class_labels=labels, timesteps=timesteps,
                  generator=torch.Generator().manual_seed(5), output_type="np").images
    np.testing.assert_allclose(images, _images(ours), rtol=0, atol=1e-4)
    other = Student(G, rec["pipe_sigmas"], renoise="fresh").eval()
    assert rec["pipe_sigmas"] != pytest.approx(meta["sigmas"], rel=1e-3)  # what the notes warn about
    _, at_pipe_levels = student_on_diffusers_noise(other, (4, 1, 8, 8), labels, seed=5)
    images = pipe(batch_size=4, class_labels=labels, num_inference_steps=k,
                  generator=torch.Generator().manual_seed(5), output_type="np").images
    np.testing.assert_allclose(images, _images(at_pipe_levels), rtol=0, atol=1e-4)


def test_level_fits_against_diffusers():
    """Math vs diffusers' own schedulers (float64 levels): the integer CM ramp and the EDMEuler ramp hold the
    levels; fit_rho recovers a Karras grid's rho; the 4-step defaults are Karras only to ~1e-4."""
    from diffusers import CMStochasticIterativeScheduler, EDMEulerScheduler

    from fewstep.core.sampling import karras_sigmas
    from fewstep.models.student import DEFAULT_LEVELS

    karras = karras_sigmas(6, 0.1681, 80.0, 7.0, append_zero=False).tolist()
    assert ed.fit_rho(karras) == pytest.approx(7.0, rel=1e-6)
    for levels in (DEFAULT_LEVELS[3], DEFAULT_LEVELS[4], karras):
        n, rho, ramp = ed.cm_integer_ramp(levels, 0.0)
        cm = CMStochasticIterativeScheduler(num_train_timesteps=n, sigma_min=0.0, sigma_max=levels[0],
                                            rho=rho)
        cm.set_timesteps(timesteps=ramp[::-1])
        np.testing.assert_allclose(cm._convert_to_karras(np.array(ramp) / (n - 1)), levels,
                                   rtol=ed.RAMP_SEARCH_TOL)
        rho = ed.fit_rho(levels)
        eu = EDMEulerScheduler(sigma_min=levels[-1], sigma_max=levels[0], rho=rho)
        got = eu._compute_karras_sigmas(torch.tensor(ed.karras_ramp(levels, levels[0], levels[-1], rho),
                                                     dtype=torch.float64))
        np.testing.assert_allclose(got.numpy(), levels, rtol=1e-12)
    eu = EDMEulerScheduler(sigma_min=0.1681, sigma_max=80.0, rho=ed.fit_rho(DEFAULT_LEVELS[4]))
    eu.set_timesteps(4)
    gap = float((eu.sigmas[:-1].double() / torch.tensor(DEFAULT_LEVELS[4]) - 1).abs().max())
    assert 1e-5 < gap < 1e-3  # 4-significant-digit roundings of a rho = 7 grid: why set_timesteps(sigmas=)
