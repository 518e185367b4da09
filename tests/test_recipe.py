"""One recipe (fewstep.recipe): the CLI and a library user resolve the same config for every method,
with the method's defaults, the data set's presets and the overrides, in that order."""

import pytest

from fewstep.cli import main
from fewstep.config import dump_yaml
from fewstep.losses import BASES, EXTRAS
from fewstep.recipe import distill_config, teacher_config
from tests.helpers import save_tiny_teacher

EXTRA_CASES = [("dmd", {"el": 1.0}, []), ("dmd", {"dp": 0.05}, ["student.steps=4"]),
               ("sid", {"el": 0.5, "dp": 0.1}, ["student.steps=2"])]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return str(save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t"))


def _cli(capsys, argv) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("method", sorted(BASES))
def test_library_and_cli_resolve_the_same_config(teacher, capsys, method):
    out = _cli(capsys, ["distill", "--teacher", teacher, "--method", method, "--out", "unused", "--dry-run"])
    assert out == dump_yaml(distill_config(teacher, method))


@pytest.mark.parametrize("method,extras,overrides", EXTRA_CASES)
def test_library_and_cli_agree_with_extras_and_overrides(teacher, capsys, method, extras, overrides):
    argv = ["distill", "--teacher", teacher, "--method", method, "--out", "unused", "--dry-run"]
    for k, w in extras.items():
        argv += ["--extra", f"{k}={w}"]
    out = _cli(capsys, [*argv, "train.iters=7", *overrides])
    assert out == dump_yaml(distill_config(teacher, method, extras, ["train.iters=7", *overrides]))


def test_order_is_method_defaults_then_presets_then_overrides(teacher):
    """sid's own default (init_sigma 2.5) survives the ring8 presets, which set the learning rate;
    an override wins over both; dp's default makes the chain deterministic."""
    cfg = distill_config(teacher, "sid")
    assert cfg.student.init_sigma == 2.5 and cfg.optim.betas == [0.0, 0.999]  # sid's DEFAULTS
    assert cfg.optim.lr == 3e-4 and cfg.sid.alpha == 0.5 and cfg.train.iters == 6000  # distill_ring8_sid.yaml
    assert cfg.train.batch == 256 and cfg.train.ema_halflife == 500  # distill_ring8.yaml
    assert distill_config(teacher, "sid", overrides=["optim.lr=5e-5"]).optim.lr == 5e-5
    assert distill_config(teacher, "dmd", {"dp": 0.05}).student.renoise == "ddim"
    assert distill_config(teacher, "dmd").student.renoise == "fresh"


def test_every_registered_method_has_a_section_and_a_kind():
    from fewstep.config import DistillRunConfig

    cfg = DistillRunConfig()
    for name, entry in {**BASES, **EXTRAS}.items():
        assert isinstance(getattr(cfg, name), entry.config) and entry.kind in ("base", "extra")


def test_teacher_recipe_equals_the_cli(capsys):
    out = _cli(capsys, ["teacher", "--data", "digits8", "--out", "unused", "--iters", "5", "--dry-run",
                        "model.channels=[8,16]"])
    assert out == dump_yaml(teacher_config("digits8", ["model.channels=[8,16]", "train.iters=5"]))


def test_a_setting_added_later_does_not_orphan_older_runs():
    """A run directory written before a setting existed resumes (or counts as done) while the new
    setting keeps its default, and is refused once the user asks for another value."""
    from fewstep.config import DistillRunConfig, to_dict
    from fewstep.train.rundir import config_differences

    defaults = to_dict(DistillRunConfig())
    new = to_dict(DistillRunConfig())
    old = to_dict(DistillRunConfig())
    del old["dmd"]["normalizer"], old["fdistill"]  # as written by an older fewstep
    assert config_differences(old, new, defaults) == []
    assert config_differences(old, new) == sorted(["dmd.normalizer", *(f"fdistill.{k}" for k in
                                                                      defaults["fdistill"])])
    new["dmd"]["normalizer"] = "batch"
    assert config_differences(old, new, defaults) == ["dmd.normalizer"]


def test_teacher_given_by_relative_path_is_recorded_absolute(teacher, monkeypatch):
    # A run started with `--teacher rel/dir` must resume with `--teacher /abs/dir` (and the other
    # way round) and be evaluated from another working directory.
    from pathlib import Path
    monkeypatch.chdir(Path(teacher).parent.parent)
    rel = str(Path(Path(teacher).parent.name) / Path(teacher).name)
    assert distill_config(rel, "dmd").teacher == str(Path(teacher).resolve())
    assert distill_config(rel, "dmd") == distill_config(teacher, "dmd")
