"""Numerical faults (NaN/Inf refuses the step, is logged, stops after train.max_bad_steps with the last
good checkpoint intact) and safe loading (a planted pickle never runs, as teacher or checkpoint)."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from fewstep.cli import main
from fewstep.losses import dmd
from fewstep.losses.base import LossOutput
from fewstep.train import checkpoint as ckpt
from fewstep.train.distill import train_iteration
from fewstep.train.runlog import read_metrics
from tests.helpers import _params, assert_states_equal, save_tiny_teacher, tiny_run

NAN = float("nan")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _poison_dm(monkeypatch, steps, where="loss"):
    """Make DMD's generator term non-finite (its loss, or only its gradient) at ``steps``."""
    real = dmd.DistributionMatching.__call__

    def call(self, nets, batch, gen):
        out = real(self, nets, batch, gen)
        if batch.step not in steps:
            return out
        if where == "loss":
            return LossOutput(out.loss * NAN, out.terms)
        gen.x.register_hook(lambda g: g * NAN)  # finite loss, NaN gradient
        return out

    monkeypatch.setattr(dmd.DistributionMatching, "__call__", call)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_non_finite_term_or_gradient_refuses_the_whole_step(monkeypatch, where):
    run = tiny_run("dmd", {"schedule": {"ratio": 1}})
    _poison_dm(monkeypatch, {1}, where)
    assert "refused_step" not in train_iteration(run)
    before = {n: _params(getattr(run.nets, n)) for n in ("student", "fake")}
    opt_before = [s["step"].clone() for s in run.opts["generator"].state.values()]
    logs = train_iteration(run)
    reason = "term 'dm' is nan" if where == "loss" else "generator gradient is not finite"
    assert logs == {"refused_step": reason} and run.bad_steps == 1 and run.step == 2
    for n, params in before.items():
        assert all(torch.equal(a, b) for a, b in zip(params, getattr(run.nets, n).parameters())), n
    assert [s["step"] for s in run.opts["generator"].state.values()] == opt_before
    assert "refused_step" not in train_iteration(run)  # the next step trains normally


def test_distill_stops_after_max_bad_steps_with_last_good_checkpoint(tmp_path, teacher, monkeypatch, capsys):
    _poison_dm(monkeypatch, {3, 5, 6})
    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(teacher), "--method", "dmd", "--iters", "10", "--batch", "16",
                 "--out", str(out), "--no-progress", "schedule.ratio=1", "train.ckpt_every=1",
                 "train.max_bad_steps=3", "train.eval_n=100"])
    assert code == 2
    _one_error_line(capsys, "stopped after 3 refused steps", "iteration 7", "term 'dm' is nan",
                    "last good checkpoint is intact")
    refusals = [r for r in read_metrics(out) if "refused_step" in r]
    assert [(r["iteration"], r["refused_step"], r["bad_steps"]) for r in refusals] == [
        (4, "term 'dm' is nan", 1), (6, "term 'dm' is nan", 2), (7, "term 'dm' is nan", 3)]
    assert [p.name for p in ckpt.checkpoint_paths(out / "checkpoints")] == ["ckpt_00000005.pt",
                                                                            "ckpt_00000006.pt"]
    five, six = (ckpt.load_checkpoint(out / f"checkpoints/ckpt_0000000{i}.pt") for i in (5, 6))
    assert all(torch.isfinite(v).all() for v in six["student"].values())
    # iteration 6 was refused: its checkpoint holds exactly iteration 5's networks and optimisers
    assert_states_equal({k: five[k] for k in ("student", "fake", "opts")},
                        {k: six[k] for k in ("student", "fake", "opts")})
    assert not (out / "model.safetensors").exists()


def test_teacher_loop_refuses_and_stops(tmp_path, monkeypatch, capsys):
    import fewstep.train.teacher as teacher_mod

    real = teacher_mod.edm_loss

    def edm_loss(D, x, cond, rnd, sigma_data):
        loss = real(D, x, cond, rnd, sigma_data)
        return loss * NAN if rnd.step in (2, 5) else loss

    monkeypatch.setattr(teacher_mod, "edm_loss", edm_loss)
    out = tmp_path / "t"
    code = main(["teacher", "--data", "ring8", "--iters", "10", "--out", str(out), "--no-progress",
                 "model.hidden=16", "model.depth=1", "model.emb_dim=8", "train.batch=32",
                 "train.ckpt_every=1", "train.max_bad_steps=2", "train.eval_n=100"])
    assert code == 2
    _one_error_line(capsys, "stopped after 2 refused steps", "term 'edm' is nan")
    assert [r["iteration"] for r in read_metrics(out) if "refused_step" in r] == [3, 6]
    five = ckpt.load_checkpoint(out / "checkpoints/ckpt_00000005.pt")
    assert five["bad_steps"] == 1 and not (out / "checkpoints/ckpt_00000006.pt").exists()
    assert not (out / "model.safetensors").exists()


def test_refused_teacher_step_changes_nothing(tmp_path, monkeypatch):
    import fewstep.train.teacher as teacher_mod

    real = teacher_mod.edm_loss
    monkeypatch.setattr(teacher_mod, "edm_loss", lambda D, x, c, rnd, sd:
                        real(D, x, c, rnd, sd) * (NAN if rnd.step == 2 else 1.0))
    out = tmp_path / "t"
    assert main(["teacher", "--data", "ring8", "--iters", "3", "--out", str(out), "--no-progress",
                 "model.hidden=16", "model.depth=1", "model.emb_dim=8", "train.batch=32",
                 "train.ckpt_every=1", "train.eval_n=100"]) == 0
    two, three = (ckpt.load_checkpoint(out / f"checkpoints/ckpt_0000000{i}.pt") for i in (2, 3))
    keys = ("net", "ema", "opt")
    assert_states_equal({k: two[k] for k in keys}, {k: three[k] for k in keys})


# ---------------------------------------------------------------------------------------------
# safe loading: a pickle that would run a command
# ---------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, marker, protocol=pickle.HIGHEST_PROTOCOL):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"step": 99, "student": _Payload(marker)}, protocol=protocol))
    return path


def test_the_planted_pickle_really_runs_a_command_when_unpickled(tmp_path):
    """Control: the payload is live (a plain ``pickle.load`` runs it), so the refusals below matter."""
    marker = tmp_path / "MARKER"
    bad = _plant(tmp_path / "x.pt", marker)
    code = f"import pickle; pickle.load(open({str(bad)!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert marker.exists()


@pytest.mark.parametrize("layout", ["file", "dir_bin", "diffusers_bin", "safetensors_name"])
def test_pickle_teacher_is_refused_and_never_runs(tmp_path, capsys, layout):
    marker = tmp_path / "MARKER"
    if layout == "file":
        teacher = _plant(tmp_path / "teacher.pt", marker)
    elif layout == "dir_bin":
        teacher = _plant(tmp_path / "t/model.bin", marker).parent
    elif layout == "diffusers_bin":
        _plant(tmp_path / "t/diffusion_pytorch_model.bin", marker)
        (tmp_path / "t/config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')
        teacher = tmp_path / "t"
    else:  # a pickle renamed to model.safetensors beside a valid model.json
        teacher = save_tiny_teacher(tmp_path / "t")
        _plant(teacher / "model.safetensors", marker)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--method", "dmd", "--out", str(out)]) == 2
    _one_error_line(capsys, "safetensors" if layout != "safetensors_name" else "corrupt")
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("older", [True, False])
def test_pickle_checkpoint_is_refused_and_never_runs(tmp_path, teacher, capsys, older):
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), "--method", "dmd", "--batch", "16", "--out", str(out),
            "--no-progress", "train.ckpt_every=1", "train.eval_n=100"]
    assert main([*args, "--iters", "2"]) == 0
    capsys.readouterr()
    if not older:
        for p in ckpt.checkpoint_paths(out / "checkpoints"):
            p.unlink()
    marker = tmp_path / "MARKER"
    _plant(out / "checkpoints/ckpt_00000003.pt", marker, protocol=2)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".yaml"}
    assert main([*args, "--iters", "5"]) == 2
    line = _one_error_line(capsys, "ckpt_00000003.pt", "pickle", "never runs code")
    assert ("resume from ckpt_00000002.pt" in line) == older and ("start over" in line) != older
    assert not marker.exists()
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".yaml"}
    assert after == before  # nothing overwritten, no new checkpoint, the old model intact
