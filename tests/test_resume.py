"""Exact resume: a run stopped (signal, SIGKILL) and resumed equals an uninterrupted one bit for bit.

In-process stops send a real SIGTERM to this process at a chosen iteration (the loop finishes the
iteration, checkpoints and raises ``Interrupted``; the CLI returns 143). The subprocess tests kill
``python -m fewstep distill`` with SIGKILL at three random iterations and with SIGTERM.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewstep.cli import main
from fewstep.train import checkpoint as ckpt
from fewstep.train.runlog import RunLog, read_metrics
from tests.helpers import assert_states_equal, save_tiny_teacher

DMD = ["--method", "dmd", "--batch", "16", "--no-progress", "train.eval_n=100", "train.ckpt_every=100",
       "train.log_every=3"]
CASES = {  # options first: argparse takes key=value overrides only after the last --option
    "dmd": ["--iters", "8", *DMD, "train.ema_halflife=2", "dmd.gan_gen_weight=0.1"],
    "dmd_lora": ["--iters", "8", *DMD, "train.ema_halflife=2", "student.lora_rank=2", "fake.lora_rank=2"],
    "dmd_el": ["--iters", "8", "--extra", "el=0.5", *DMD, "schedule.ratio=1", "el.K=2", "el.width=8",
               "el.calib_steps=4"],
}
TEACHER = ["teacher", "--data", "ring8", "--iters", "10", "--no-progress", "model.hidden=32",
           "model.depth=2", "model.emb_dim=16", "train.batch=64", "train.eval_n=100", "train.ckpt_every=100",
           "train.log_every=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_THREADS": "1"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def _final(run: Path, iters: int) -> dict:
    state = ckpt.load_checkpoint(run / "checkpoints" / f"ckpt_{iters:08d}.pt")
    from safetensors.torch import load_file

    state["exported"] = load_file(str(run / "model.safetensors"))
    return state


def _stop_at(monkeypatch, module: str, step: int) -> None:
    """Send SIGTERM to this process when iteration ``step`` starts."""
    import importlib

    mod = importlib.import_module(module)
    real = mod.reseed

    def reseed(seed, s):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
        real(seed, s)

    monkeypatch.setattr(mod, "reseed", reseed)


def _record_steps(monkeypatch, module: str, name: str, step_of) -> list[int]:
    """Wrap ``module.name`` to record the step of every call (the iterations this process runs)."""
    import importlib

    mod, steps = importlib.import_module(module), []
    real = getattr(mod, name)

    def spy(*args, **kwargs):
        steps.append(step_of(*args))
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, name, spy)
    return steps


def _train_lines(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run) if "fd" not in r]


@pytest.mark.parametrize("case", sorted(CASES))
def test_signal_stop_and_resume_equals_uninterrupted(tmp_path, teacher, monkeypatch, case):
    def cli(out):
        return main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / out), *CASES[case]])

    assert cli("straight") == 0
    with monkeypatch.context() as m:
        _stop_at(m, "fewstep.train.loop", 2)
        assert cli("resumed") == 128 + signal.SIGTERM
    assert [p.name for p in ckpt.checkpoint_paths(tmp_path / "resumed/checkpoints")] == ["ckpt_00000003.pt"]
    assert not (tmp_path / "resumed/model.safetensors").exists()
    stopped = ckpt.load_checkpoint(tmp_path / "resumed/checkpoints/ckpt_00000003.pt")
    if case == "dmd":  # student, fake, GAN head, EMA and three optimisers travel in the checkpoint
        assert {"student", "fake", "head", "ema"} <= set(stopped) and len(stopped["opts"]) == 3
    elif case == "dmd_lora":  # adapters in the checkpoint, and only they in the optimiser state
        assert any(".lora_A." in k for k in stopped["student"])
        assert any(".lora_B." in k for k in stopped["fake"])
        assert len(stopped["opts"]["generator"]["state"]) == sum(".lora_" in k for k in stopped["student"])
    else:  # stopped mid-calibration: the recorded ratios must carry over
        assert stopped["terms"]["el"]["frozen"] is None and stopped["terms"]["el"]["ratios"]
    # training is deterministic per (seed, step): a resume that dropped its checkpoint and trained
    # from 0 would end equal too, so check which iterations the resumed process actually ran
    with monkeypatch.context() as m:
        ran = _record_steps(m, "fewstep.train.distill", "train_iteration", lambda run, *a: run.step)
        assert cli("resumed") == 0
    assert ran == list(range(3, 8)), ran
    assert_states_equal(_final(tmp_path / "straight", 8), _final(tmp_path / "resumed", 8))
    assert _train_lines(tmp_path / "straight") == _train_lines(tmp_path / "resumed")


def test_teacher_signal_stop_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    def cli(out):
        return main([*TEACHER[:1], "--out", str(tmp_path / out), *TEACHER[1:]])

    assert cli("straight") == 0
    with monkeypatch.context() as m:
        _stop_at(m, "fewstep.train.loop", 4)
        assert cli("resumed") == 128 + signal.SIGTERM
    stopped = ckpt.load_checkpoint(ckpt.checkpoint_paths(tmp_path / "resumed/checkpoints")[-1])["step"]
    with monkeypatch.context() as m:  # the teacher loop reseeds once per iteration with its step
        ran = _record_steps(m, "fewstep.train.loop", "reseed", lambda seed, step: step)
        assert cli("resumed") == 0
    assert stopped == 5 and ran == list(range(5, 10)), (stopped, ran)
    assert_states_equal(_final(tmp_path / "straight", 10), _final(tmp_path / "resumed", 10))
    assert _train_lines(tmp_path / "straight") == _train_lines(tmp_path / "resumed")


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fewstep", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _last_iteration(run: Path) -> int:
    """The last iteration with a complete metrics line (0 if none yet)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    done = 0
    for line in path.read_text().splitlines():
        try:
            done = max(done, json.loads(line).get("iteration", 0))
        except ValueError:
            pass
    return done


def _wait_until(proc: subprocess.Popen, run: Path, iteration: int, timeout: float = 60) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        done = _last_iteration(run)
        if done >= iteration or proc.poll() is not None:
            return done
        time.sleep(0.002)
    raise AssertionError(f"no iteration {iteration} within {timeout} s")


def test_sigkill_at_three_random_iterations_then_resume_equals_uninterrupted(tmp_path, teacher):
    iters = 60
    def args(out):
        return ["distill", "--teacher", str(teacher), "--iters", str(iters), "--out", str(out), *DMD,
                "train.ckpt_every=1", "train.log_every=1"]

    run = tmp_path / "killed"
    kills = sorted(random.Random(9).sample(range(5, iters - 10), 3))
    for target in kills:
        proc = _start(args(run))
        seen = _wait_until(proc, run, target)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"finished before the kill at {target} (saw {seen})"
        print(f"SIGKILL after iteration {seen} (target {target}); checkpoints: "
              f"{[p.name for p in ckpt.checkpoint_paths(run / 'checkpoints')]}")
    proc = _start(args(run))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert main(args(tmp_path / "straight")) == 0
    assert_states_equal(_final(tmp_path / "straight", iters), _final(run, iters))
    assert _train_lines(tmp_path / "straight") == _train_lines(run)


def test_sigterm_writes_a_loadable_checkpoint_and_exits_143_within_one_iteration(tmp_path, teacher):
    run = tmp_path / "run"
    proc = _start(["distill", "--teacher", str(teacher), "--iters", "100000", "--out", str(run), *DMD,
                   "train.log_every=1"])
    seen = _wait_until(proc, run, 20)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    exit_s = time.monotonic() - t0
    assert proc.returncode == 143, err[-2000:]
    latest = ckpt.checkpoint_paths(run / "checkpoints")[-1]
    state = ckpt.load_checkpoint(latest)
    print(f"SIGTERM seen after iteration {seen}: checkpoint at {state['step']}, "
          f"exit {proc.returncode} after {exit_s:.2f} s")
    assert seen <= state["step"] <= seen + 2 and state["step"] == _last_iteration(run)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("stopped by SIGTERM after iteration") and "rerun" in lines[-1]
    assert "Traceback" not in err


def test_torn_metrics_line_and_temp_checkpoint_are_ignored_on_resume(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    ckpt.save_checkpoint(run / "checkpoints", 1, {"step": 1, "x": torch.ones(2)})
    (run / "checkpoints/ckpt_00000002.pt.tmp").write_bytes(b"half a checkpoint")
    (run / "metrics.jsonl").write_text('{"iteration": 1, "a": 1}\n{"iteration": 2, "a": 2}\n{"itera')
    assert ckpt.load_latest(run / "checkpoints")["step"] == 1
    RunLog(run).resume_from(1)
    assert read_metrics(run) == [{"iteration": 1, "a": 1}]


def test_save_keeps_the_previous_checkpoint_until_the_new_one_is_complete(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    ckpt.save_checkpoint(d, 1, {"step": 1})
    ckpt.save_checkpoint(d, 2, {"step": 2})
    ckpt.save_checkpoint(d, 3, {"step": 3})
    assert [p.name for p in ckpt.checkpoint_paths(d)] == ["ckpt_00000002.pt", "ckpt_00000003.pt"]

    def torn(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", torn)
    with pytest.raises(ckpt.FewstepError, match="No space left on device"):
        ckpt.save_checkpoint(d, 4, {"step": 4})
    assert sorted(p.name for p in d.iterdir()) == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    monkeypatch.undo()
    assert ckpt.load_latest(d)["step"] == 3
