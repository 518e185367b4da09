"""The bare loops of `fewstep perf --bare` (bench/bare.py) make the same network passes per update
cycle as the engine, so their time ratio measures the engine's overhead and nothing else."""

import json
from collections import Counter

import pytest
import torch

from fewstep.bench.bare import BARE_METHODS, BareLoop, check_bare
from fewstep.cli import main
from fewstep.errors import ConfigError
from fewstep.recipe import distill_config
from fewstep.train.distill import build_run, setup_methods, train_iteration
from tests.helpers import save_tiny_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return str(save_tiny_teacher(tmp_path_factory.mktemp("bare") / "t"))


def _passes(run, step_fn, iters: int) -> Counter:
    """Forward calls (and whether each was under grad) of student, fake score and teacher."""
    calls: Counter = Counter()
    nets = {"student": run.nets.student.G, "fake": run.nets.fake, "teacher": run.nets.teacher}
    hooks = [net.register_forward_hook(lambda m, a, o, n=name: calls.update(
        [(n, torch.is_grad_enabled() and o.requires_grad)])) for name, net in nets.items()]
    for _ in range(iters):
        step_fn()
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("method", BARE_METHODS)
def test_bare_loop_makes_the_engines_network_passes(teacher, method):
    cfg = distill_config(teacher, method, overrides=["train.batch=16"])
    engine, bare = build_run(cfg, torch.device("cpu")), build_run(cfg, torch.device("cpu"))
    setup_methods(engine)
    setup_methods(bare)
    cycle = 2 * cfg.schedule.ratio
    want = _passes(engine, lambda: train_iteration(engine), cycle)
    loop = BareLoop(bare)
    before = [p.clone() for p in bare.nets.student.parameters()]
    got = _passes(bare, loop, cycle)
    assert got == want and sum(want.values()) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, bare.nets.student.parameters()))


def test_bare_refuses_what_it_does_not_time(teacher):
    for cfg in (distill_config(teacher, "dmd", {"el": 1.0}), distill_config(teacher, "cd"),
                distill_config(teacher, "dmd", overrides=["dmd.gan_gen_weight=0.1"])):
        with pytest.raises(ConfigError):
            check_bare(cfg)


def test_perf_bare_cli_writes_ratios(teacher, tmp_path, capsys):
    out = tmp_path / "bare.json"
    assert main(["perf", "--bare", "--teacher", teacher, "--methods", "dmd", "--batch", "8",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())["bare"]["dmd"]
    assert r["engine_s_per_iter"] > 0 and r["bare_s_per_iter"] > 0 and r["ratio"] > 0


def test_profile_labels_every_piece_and_change_nothing(teacher):
    from fewstep.bench.profile import labelled_run, profile_iterations

    cfg = distill_config(teacher, "dmd", {"el": 1.0}, ["train.batch=16"])
    prof = profile_iterations(cfg, iters=5)
    assert {"term:dm", "term:fake", "term:el", "rollout", "data:batch", "optim:step+clip+sync"} <= \
        set(prof["pieces"])
    assert prof["backward"] > 0 and {"student", "fake", "teacher"} <= set(prof["networks"])
    # the labels are transparent: a labelled run trains bit for bit like a plain one
    a, b = build_run(cfg, torch.device("cpu")), build_run(cfg, torch.device("cpu"))
    setup_methods(a)
    setup_methods(b)
    terms = [t for m in b.methods for t in m.terms]
    with labelled_run(b):
        for _ in range(6):
            train_iteration(b)
    for _ in range(6):
        train_iteration(a)
    assert [t for m in b.methods for t in m.terms] == terms  # restored
    for (k, x), y in zip(a.nets.student.state_dict().items(), b.nets.student.state_dict().values()):
        assert torch.equal(x, y), k


def test_timings_start_after_el_calibration(teacher):
    """`fewstep perf` times the steady state: its warm-up runs whole update cycles until EL's lambda is
    calibrated (the first calib_steps generator updates take two extra gradients each), and no longer."""
    from fewstep.bench.perf import warm_up

    cfg = distill_config(teacher, "dmd", {"el": 1.0}, ["train.batch=16", "el.calib_steps=3"])
    run = build_run(cfg, torch.device("cpu"))
    setup_methods(run)
    (term,) = [t for t in run.terms({"generator"}) if t.name == "el"]
    assert term.warming_up()
    done = warm_up(run)
    ratio = cfg.schedule.ratio
    assert not term.warming_up() and done % ratio == 0
    assert len(term.ratios) == 3 and done <= ratio * (3 + 2)  # DMD's first update has g_base = 0
    plain = build_run(distill_config(teacher, "dmd", overrides=["train.batch=16"]), torch.device("cpu"))
    setup_methods(plain)
    assert warm_up(plain) == ratio  # nothing warms up: one cycle
