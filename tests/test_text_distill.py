"""Distilling a text teacher (issue 19): `fewstep distill --teacher SD_DIR --prompts FILE --method ...`.

* dmd end to end through the CLI: finite losses, a checkpoint, a student whose model.json holds the
  file's prompts and whose prompt table is the teacher pipeline's own encoding (the null row: "");
* the conditions of a step are prompts drawn from the file by the step's "prompt" stream
  (deterministic per step), and the real batch holds images of each prompt's class;
* every base and extra runs an iteration on the text teacher with finite values;
* prompts that name no class: the methods that need class-paired real images refuse in one line;
* user mistakes are one-line exit-2 errors.
"""

import json
import math
import shutil

import pytest
import torch

from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.errors import FewstepError
from fewstep.models.io import load_teacher
from fewstep.models.text import NULL_PROMPT, load_text_pipeline, prompt_class
from fewstep.recipe import distill_config, teacher_config
from fewstep.train.distill import build_run, make_batch, setup_methods, train_iteration
from fewstep.train.teacher import train_teacher

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PROMPTS = ["a handwritten seven", "the digit 3", "nine, written thinly"]
SMALL = ["train.batch=8", "student.steps=2", "train.iters=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from fewstep.train.vae import VAETrainConfig, build_vae

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("text")
    build_vae(VAETrainConfig(channels=[8, 8, 8], norm_num_groups=8), 1, 28).save_pretrained(
        root / "vae", safe_serialization=True)
    cfg = teacher_config("mnist28", ["train.batch=8", "model.channels=[16,32]", "train.iters=2"],
                         vae=str(root / "vae"), text=True)
    return train_teacher(cfg, root / "teacher", progress=False)


def _prompt_file(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return _prompt_file(tmp_path_factory.mktemp("p") / "prompts.txt", [PROMPTS[0], "", f"  {PROMPTS[1]} ",
                                                                      PROMPTS[2]])


def _run(teacher, prompts, method="dmd", extras=None, overrides=()):
    cfg = distill_config(str(teacher), method, extras, [*SMALL, f"prompts={prompts}", *overrides])
    run = build_run(cfg, torch.device("cpu"))
    setup_methods(run)
    return run


def test_dmd_distils_the_text_teacher_end_to_end(teacher, prompts, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--method", "dmd",
                 "--guidance", "2", "--steps", "2", "--iters", "3", "--batch", "8", "--out", str(out),
                 "--no-progress", "train.eval_n=32", "train.log_every=1", "train.ckpt_every=2"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [v for rec in lines for k, v in rec.items() if k.startswith("loss_")]
    assert any(k == "loss_dm" for rec in lines for k in rec) and all(math.isfinite(v) for v in losses)
    assert list((out / "checkpoints").iterdir())
    student, meta = load_teacher(out)
    assert meta["role"] == "student" and meta["guidance"] == 2 and student.prompts == PROMPTS
    pipe = load_text_pipeline(teacher)  # the student's table = the teacher's encoder on the file's lines
    torch.testing.assert_close(student.embeds, pipe.encode_prompts([*PROMPTS, NULL_PROMPT]), rtol=0, atol=0)
    from fewstep.train.generate import load_generator

    x, y = load_generator(out).sample(6, seed=0)
    assert x.shape == (6, 4, 7, 7) and torch.isfinite(x).all() and y.tolist() == [0, 1, 2, 0, 1, 2]


def test_conditions_are_file_prompts_drawn_per_step_with_real_images_of_their_class(teacher, prompts):
    run = _run(teacher, prompts, overrides=["train.batch=64"])
    a, b, c = make_batch(run, 5), make_batch(run, 5), make_batch(run, 6)
    assert torch.equal(a.cond, b.cond) and torch.equal(a.real, b.real) and not torch.equal(a.cond, c.cond)
    assert set(a.cond.tolist()) == {0, 1, 2}  # indices into the file's three prompts
    data = load_dataset("mnist28", conditional=True, vae=json.loads((teacher / "model.json").read_text())
                        ["meta"]["data"]["vae"]["path"])
    for x, k in zip(a.real, a.cond.tolist()):  # every real latent is a training image of its prompt's class
        rows = (data.x_train == x).flatten(1).all(1).nonzero().flatten()
        assert len(rows) and (data.y_train[rows] == prompt_class(PROMPTS[k])).all()
    lo, hi = make_batch(run, 5, 0, 32), make_batch(run, 5, 32, 64)  # a process's slice of the global draw
    assert torch.equal(torch.cat([lo.cond, hi.cond]), a.cond)


ARMS = [("dmd", {}), ("di", {}), ("sid", {}), ("cd", {}), ("fdistill", {}), ("tfd", {}), ("drift", {}),
        ("dmd", {"el": 0.5}), ("dmd", {"dp": 0.05})]


@pytest.mark.parametrize("method, extras", ARMS, ids=[m + "".join("+" + e for e in x) for m, x in ARMS])
def test_every_base_and_extra_runs_an_iteration(teacher, prompts, method, extras):
    run = _run(teacher, prompts, method, extras, ["guidance=2"] if method in ("dmd", "di") else [])
    logs = train_iteration(run, log_norms=True)
    assert "refused_step" not in logs and logs
    assert all(math.isfinite(v) for v in logs.values() if isinstance(v, float))
    name = extras and next(iter(extras))
    assert not name or any(k.startswith(name) for k in logs)  # the extra term ran


@pytest.mark.parametrize("method, extras, who", [("dmd", {"el": 0.5}, "el needs"), ("cd", {}, "cd needs")])
def test_prompts_without_a_class_refuse_real_batches_in_one_line(teacher, tmp_path, method, extras, who):
    run = _run(teacher, _prompt_file(tmp_path / "z.txt", ["a zebra", PROMPTS[1]]), method, extras)
    with pytest.raises(FewstepError, match=who) as e:
        train_iteration(run)
    assert "'a zebra'" in str(e.value) and "\n" not in str(e.value)
    logs = train_iteration(_run(teacher, tmp_path / "z.txt"))  # dmd alone needs no real images: it runs
    assert "loss_dm" in logs and all(math.isfinite(v) for v in logs.values() if isinstance(v, float))


def test_a_pipeline_from_elsewhere_distils_in_its_own_vae_latents(teacher, prompts, tmp_path):
    """No model.json: a Stable Diffusion directory as another tool wrote it; the user names the data."""
    from fewstep.train.evaluate import _run_dataset

    bare = tmp_path / "sd"
    fewstep_files = {"model.json", "model.safetensors", "checkpoints", "config.yaml", "metrics.jsonl", "tb"}
    shutil.copytree(teacher, bare, ignore=lambda d, names: fewstep_files & set(names) if d == str(teacher)
                    else [])
    run = _run(bare, prompts, overrides=["data.name=mnist28"])
    assert run.data.is_latent and tuple(run.data.shape) == (4, 7, 7)
    assert tuple(_run_dataset(run.cfg, True).shape) == (4, 7, 7)  # the in-loop evaluation's data too
    logs = train_iteration(run)
    assert "loss_dm" in logs and all(math.isfinite(v) for v in logs.values() if isinstance(v, float))


def _fewstep_class_teacher(path):
    from fewstep.models.io import build_denoiser, save_model

    spec = {"type": "mlp", "dim": 2, "hidden": 8, "depth": 1, "emb_dim": 8}
    save_model(path, build_denoiser(spec), spec, {"role": "teacher", "data": {"name": "ring8"}})
    return path


def test_mistakes_are_one_line_exit_2(teacher, prompts, tmp_path, capsys):
    empty = _prompt_file(tmp_path / "empty.txt", ["", "  "])
    bare = tmp_path / "bare_sd"  # a pipeline without fewstep's model.json: prompts are required
    shutil.copytree(teacher, bare, ignore=shutil.ignore_patterns("model.json", "model.safetensors"))
    cases = [(["--teacher", str(teacher), "--prompts", str(empty)], "has no prompts"),
             (["--teacher", str(teacher), "--prompts", str(tmp_path / "nope.txt")], "does not exist"),
             (["--teacher", str(_fewstep_class_teacher(tmp_path / "mlp")), "--prompts", str(prompts)],
              "needs a text-to-image teacher"),
             (["--teacher", str(bare), "data.name=mnist28"], "--prompts FILE")]
    for args, why in cases:
        capsys.readouterr()
        out = tmp_path / "out"
        assert main(["distill", "--method", "dmd", "--iters", "1", "--out", str(out), "--no-progress",
                     *args]) == 2, why
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
        assert not out.exists()


# --- sample / eval on text models -------------------------------------------------------------------
def test_prompt_adherence_is_the_feature_networks_accuracy_on_the_prompts_class():
    from fewstep.train.evaluate import metric_space, prompt_adherence

    space = metric_space(load_dataset("mnist28", conditional=True))
    x, y = space.data.test_samples(300, torch.Generator().manual_seed(0))
    right = prompt_adherence(space, x, y)
    wrong = prompt_adherence(space, x, (y + 1) % 10)
    assert right["prompt_adherence"] > 0.9 and wrong["prompt_adherence"] < 0.1  # real digits: its accuracy
    assert right["prompt_classified"] == 1
    half = torch.where(torch.arange(300) % 2 == 0, y, torch.full_like(y, -1))  # prompts naming no class
    assert prompt_adherence(space, x, half)["prompt_classified"] == 0.5


@pytest.fixture(scope="module")
def student(teacher, prompts, tmp_path_factory):
    from fewstep.train.distill import train_distill

    cfg = distill_config(str(teacher), "dmd", None, [*SMALL, f"prompts={prompts}", "student.renoise=ddim"])
    return train_distill(cfg, tmp_path_factory.mktemp("s") / "student", progress=False)  # deterministic chain


def test_eval_and_sample_take_prompts(teacher, student, tmp_path, capsys):
    from fewstep.train.generate import load_generator

    mixed = _prompt_file(tmp_path / "mixed.txt", ["a zebra", "the digit 5", "a neatly written two"])
    gen = load_generator(student, prompts=["a zebra", "the digit 5", "a neatly written two"])
    assert gen.model.G.prompts == ["a zebra", "the digit 5", "a neatly written two"]
    pipe = load_text_pipeline(teacher)  # a student's new prompts are encoded by its teacher's encoder
    torch.testing.assert_close(gen.model.G.embeds[:3], pipe.encode_prompts(gen.model.G.prompts), rtol=0,
                               atol=0)
    assert gen.cond_classes.tolist() == [-1, 5, 2]
    for model, nfe in ((student, "2"), (teacher, "3")):
        out = tmp_path / f"{model.name}.json"
        assert main(["eval", str(model), "--n", "30", "--nfe", nfe, "--prompts", str(mixed),
                     "--json", str(out)]) == 0
        metrics = json.loads(out.read_text())
        assert 0 <= metrics["prompt_adherence"] <= 1 and metrics["prompt_classified"] == pytest.approx(2 / 3)
        assert metrics["n_samples"] == 30 and math.isfinite(metrics["fd"])
    assert main(["sample", str(student), "--n", "6", "--prompts", str(mixed),
                 "--out", str(tmp_path / "s.npz")]) == 0
    mlp = _fewstep_class_teacher(tmp_path / "mlp")
    capsys.readouterr()
    assert main(["sample", str(mlp), "--n", "4", "--prompts", str(mixed),
                 "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "needs a text-to-image teacher" in err and err.count("\n") == 1


# --- export -----------------------------------------------------------------------------------------
def test_the_exported_student_is_a_stable_diffusion_pipeline_that_samples_it(student, tmp_path, capsys):
    """A ddim student exports with an EulerDiscreteScheduler: pipe(...) is the student (the fresh
    students' LCMScheduler plan is the one of UNet2DModel students, tests/test_export_diffusers.py)."""
    from diffusers import StableDiffusionPipeline

    from fewstep.train.generate import load_generator

    out = tmp_path / "sd"
    assert main(["export", str(student), "--format", "diffusers", "--out", str(out)]) == 0
    record = json.loads((out / "fewstep_export.json").read_text())
    assert record["scheduler"] == "EulerDiscreteScheduler" and record["pipeline_is_exact"]
    assert record["pipeline"] == "StableDiffusionPipeline" and record["prompts"] == PROMPTS
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    z = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, latents=z, height=32, width=32,
                  output_type="latent").images
    with torch.no_grad():
        ours = load_generator(student).model(z, torch.arange(3))  # deterministic given z
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    img = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=1.0, latents=z[:2], height=32, width=32,
               output_type="np").images
    assert img.shape == (2, 28, 28, 1) and (img >= 0).all() and (img <= 1).all()
    capsys.readouterr()
    assert main(["export", str(student), "--format", "diffusers", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_prompt_file_edited_under_a_run_is_refused_on_resume(teacher, tmp_path, capsys):
    """Resuming re-reads --prompts; a changed file must not silently pair the checkpoint's prompt table
    with other prompts (one-line error, exit 2, the checkpoint kept)."""
    file = _prompt_file(tmp_path / "p.txt", PROMPTS)
    def args(iters):
        return ["distill", "--teacher", str(teacher), "--prompts", str(file), "--method", "dmd", "--steps",
                "2", "--batch", "8", "--iters", str(iters), "--out", str(tmp_path / "s"), "--no-progress",
                "train.eval_n=16", "train.ckpt_every=1"]

    assert main(args(2)) == 0
    ckpts = sorted((tmp_path / "s" / "checkpoints").iterdir())
    _prompt_file(file, [PROMPTS[1], PROMPTS[0], PROMPTS[2]])  # same prompts, other order
    capsys.readouterr()
    assert main(args(4)) == 2
    err = capsys.readouterr().err.strip()
    assert "prompt file edited" in err and len(err.splitlines()) == 1
    assert sorted((tmp_path / "s" / "checkpoints").iterdir()) == ckpts
    _prompt_file(file, PROMPTS)  # restored: the run resumes and finishes
    assert main(args(4)) == 0
