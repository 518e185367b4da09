"""torchrun: N processes equal one process with the same global batch; rank != 0 writes nothing.

The subprocess runs use ``torchrun --standalone --nproc_per_node 2`` on CPU (gloo). A
``sitecustomize`` audit hook records every file that rank 1 opens for writing, renames, creates
or removes under the run directory: it must be none (docs/scaling.md, "rank-0 I/O").
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fewstep.cli import main
from fewstep.train import dist
from fewstep.train.checkpoint import load_checkpoint
from tests.helpers import save_tiny_teacher, tensors_max_diff, tiny_run

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
AUDIT = textwrap.dedent("""
    import os, sys
    if os.environ.get("RANK", "0") != "0" and os.environ.get("FEWSTEP_AUDIT_DIR"):
        _watch, _log = os.environ["FEWSTEP_AUDIT_DIR"], os.environ["FEWSTEP_AUDIT_LOG"]
        _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

        def _inside(p):
            try:
                return os.path.abspath(os.fsdecode(p)).startswith(_watch)
            except TypeError:
                return False

        def _hook(event, args):
            hit = False
            if event == "open" and args and _inside(args[0]):
                mode, flags = args[1], args[2] if len(args) > 2 else 0
                hit = mode is not None and any(c in str(mode) for c in "wax+")
                hit = hit or bool((flags or 0) & _WRITE)
            elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
                hit = any(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))
            if hit:
                with open(_log, "a") as f:
                    f.write(f"{event} {args[:2]}\\n")

        sys.addaudithook(_hook)
""")
RUN_ARGS = ["--method", "dmd", "--iters", "6", "--batch", "16", "--no-progress", "train.eval_n=200",
            "train.log_every=2", "train.ckpt_every=3"]
TEACHER_ARGS = ["--data", "ring8", "--iters", "8", "--no-progress", "model.hidden=32", "model.depth=2",
                "model.emb_dim=16", "train.batch=64", "train.eval_n=200", "train.log_every=4",
                "train.ckpt_every=4"]


def _torchrun(tmp_path: Path, args: list[str], nproc: int = 2,
              script: Path | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """``torchrun --nproc_per_node nproc -m fewstep args`` (or ``script args``); returns the result and
    rank 1's writes. The workers import fewstep from this test's PYTHONPATH (a worktree's src)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT)
    audit = tmp_path / "rank1_writes.txt"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_THREADS": "1", "PYTHONPATH": path,
           "FEWSTEP_AUDIT_DIR": str(tmp_path / "runs"), "FEWSTEP_AUDIT_LOG": str(audit)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    target = [str(script)] if script else ["-m", "fewstep"]
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), *target, *args],
                       capture_output=True, text=True, env=env, timeout=180)
    return r, audit.read_text() if audit.exists() else ""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def test_two_processes_equal_one_process_dmd(tmp_path, teacher):
    runs = tmp_path / "runs"
    assert main(["distill", "--teacher", str(teacher), "--out", str(runs / "one"), *RUN_ARGS]) == 0
    r, writes = _torchrun(tmp_path, ["distill", "--teacher", str(teacher), "--out", str(runs / "two"),
                                     *RUN_ARGS])
    assert r.returncode == 0, r.stderr[-3000:]
    assert writes == "", writes  # rank 1 wrote nothing under the run directory
    assert r.stdout.count("student written to") == 1  # rank 0 reports, rank 1 stays quiet
    one = load_checkpoint(runs / "one/checkpoints/ckpt_00000006.pt")
    two = load_checkpoint(runs / "two/checkpoints/ckpt_00000006.pt")
    diff = tensors_max_diff(one, two, skip=("wall_s", "rng", "log_acc"))
    print(f"2-process vs 1-process max abs diff (student, fake, optimisers): {diff:.3g}")
    assert diff <= 1e-6
    names = [sorted(p.name for p in (runs / n).iterdir()) for n in ("one", "two")]
    assert names[0] == names[1]
    _assert_same_metrics(runs / "one", runs / "two")
    assert _student_moved(teacher, runs / "two")  # the equality is not that of two untrained copies


# not compared: timings, and statistics that are not means of per-sample values, which each
# process computes on its own slice before the average over processes: gradient norms on the
# generator output (norms of the slice's mean-loss gradient: they scale with the process count)
# and DI's RMS of its gradient
def _not_comparable(key: str) -> bool:
    return key in ("wall_s", "dp_teacher_s") or key.startswith("gradnorm_") or key.endswith("_grad_rms")


def _assert_same_metrics(one: Path, two: Path, tol: float = 1e-5) -> None:
    """The same metrics lines (iterations, keys) with values equal up to float summation order."""
    from fewstep.train.runlog import read_metrics

    a, b = read_metrics(one), read_metrics(two)
    assert [sorted(r) for r in a] == [sorted(r) for r in b] and len(a) >= 2
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if _not_comparable(k) or not isinstance(v, int | float):
                continue
            assert math.isclose(v, rb[k], rel_tol=tol, abs_tol=tol), (ra["iteration"], k, v, rb[k])


def _student_moved(teacher: Path, run: Path) -> float:
    """Largest change of the exported student's weights from the teacher's."""
    from safetensors.torch import load_file

    t, s = load_file(str(teacher / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert set(t) == set(s)
    return max(float((t[k] - s[k]).abs().max()) for k in t)


# every base and extra on 2 processes vs 1 (one torchrun launch runs them all, for speed). EL's
# MMD is a set-level term computed per process: 2 processes x 8 equal 1 process with micro-batches
# of 8; its lambda calibration averages gradients over ranks but uses one micro-batch in a single
# process, so the comparison uses a fixed lambda (el.calibrate=false).
METHODS = {  # (options, key=value overrides)
    "di": (["--method", "di"], []),
    "sid": (["--method", "sid"], []),
    "cd": (["--method", "cd"], []),
    "dp_dmd": (["--method", "dmd", "--extra", "dp=0.05", "--steps", "4"],
               ["schedule.ratio=1", "dp.anchor_k=3", "dp.teacher_steps=6"]),
    "el": (["--method", "dmd", "--extra", "el=0.5"],
           ["schedule.ratio=1", "el.K=2", "el.width=8", "el.calibrate=false"]),
}
COMMON = (["--iters", "4", "--batch", "16", "--no-progress"],
          ["train.eval_n=50", "train.log_every=2", "train.ckpt_every=4"])
WORKER = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as tdist
    from fewstep.cli import _main  # several runs in one process: main() would os._exit after the first
    # join once: a training session uses a group that exists (re-joining after leaving hangs)
    tdist.init_process_group("gloo")
    codes = [_main(argv) for argv in json.loads(open(sys.argv[1]).read())]
    tdist.barrier()
    tdist.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(max(codes))
""")


def _method_argv(teacher: Path, out: Path, name: str, *overrides: str) -> list[str]:
    (opts, over), (common_opts, common_over) = METHODS[name], COMMON
    return ["distill", "--teacher", str(teacher), "--out", str(out), *common_opts, *opts, *common_over,
            *over, *overrides]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, teacher):
    """Each of METHODS run by one process (in-process) and by two (one torchrun launch)."""
    tmp = tmp_path_factory.mktemp("methods")
    runs = tmp / "runs"
    for name in METHODS:
        extra = ["train.micro_batch=8"] if name == "el" else []
        assert main(_method_argv(teacher, runs / f"{name}_one", name, *extra)) == 0, name
    (tmp / "jobs.json").write_text(json.dumps([_method_argv(teacher, runs / f"{name}_two", name)
                                               for name in METHODS]))
    (tmp / "worker.py").write_text(WORKER)
    r, writes = _torchrun(tmp, [str(tmp / "jobs.json")], script=tmp / "worker.py")
    return runs, r, writes


@pytest.mark.slow  # the shared fixture: ~13 s for all five (one torchrun launch)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_processes_equal_one_process(method_runs, teacher, name):
    runs, r, writes = method_runs
    assert r.returncode == 0, r.stderr[-3000:]
    assert writes == "", writes
    assert r.stdout.count("student written to") == len(METHODS)  # rank 0 only, once per run
    one = load_checkpoint(runs / f"{name}_one/checkpoints/ckpt_00000004.pt")
    two = load_checkpoint(runs / f"{name}_two/checkpoints/ckpt_00000004.pt")
    diff = tensors_max_diff(one, two, skip=("wall_s", "rng", "log_acc"))
    moved = _student_moved(teacher, runs / f"{name}_two")
    print(f"{name}: 2-process vs 1-process max abs diff {diff:.3g} (student moved {moved:.3g})")
    assert diff <= 1e-6 and moved > 100 * max(diff, 1e-7)
    _assert_same_metrics(runs / f"{name}_one", runs / f"{name}_two")


def test_teacher_under_torchrun_ddp_equals_one_process(tmp_path):
    """DDP (with gradient accumulation: two micro-batches per rank, ``no_sync`` on the first) equals
    one process with the whole batch."""
    runs = tmp_path / "runs"
    assert main(["teacher", "--out", str(runs / "one"), *TEACHER_ARGS]) == 0
    r, writes = _torchrun(tmp_path, ["teacher", "--out", str(runs / "two"), *TEACHER_ARGS,
                                     "train.micro_batch=16"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert writes == "", writes
    one = load_checkpoint(runs / "one/checkpoints/ckpt_00000008.pt")
    two = load_checkpoint(runs / "two/checkpoints/ckpt_00000008.pt")
    diff = tensors_max_diff(one, two, skip=("wall_s", "rng", "log_acc"))
    print(f"teacher 2-process (DDP) vs 1-process max abs diff: {diff:.3g}")
    assert diff <= 1e-6


def test_el_with_micro_batches_under_torchrun(tmp_path, teacher):
    """EL's lambda calibration (gradient all-mean across ranks) and gradient accumulation run under
    two processes without hanging and give a finite student; rank 1 writes nothing."""
    args = ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "runs/el"), "--extra", "el=0.5",
            *RUN_ARGS, "schedule.ratio=1", "train.micro_batch=4", "el.K=2", "el.width=8", "el.calib_steps=2"]
    r, writes = _torchrun(tmp_path, args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert writes == ""
    state = load_checkpoint(tmp_path / "runs/el/checkpoints/ckpt_00000006.pt")
    assert state["terms"]["el"]["frozen"] is not None and math.isfinite(state["terms"]["el"]["frozen"])
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_micro_batches_give_the_same_gradient():
    """Gradient accumulation over micro-batches equals the whole batch for per-sample terms."""
    runs = [tiny_run("dmd", {"schedule": {"ratio": 1}}),
            tiny_run("dmd", {"schedule": {"ratio": 1}, "train": {"batch": 16, "iters": 4, "micro_batch": 5}})]
    assert runs[1].slices == [(0, 5), (5, 10), (10, 15), (15, 16)]
    from fewstep.train.distill import train_iteration

    for _ in range(3):
        for r in runs:
            assert "refused_step" not in train_iteration(r)
    for name in ("student", "fake"):
        a, b = (getattr(r.nets, name).state_dict() for r in runs)
        assert tensors_max_diff(a, b) <= 1e-6


def test_shards_cover_the_global_batch():
    envs = [dist.DistEnv(r, 4, r) for r in range(4)]
    slices = [s for e in envs for s in dist.shard(e, 32, micro_batch=3)]
    covered = [i for lo, hi in slices for i in range(lo, hi)]
    assert covered == list(range(32))
    assert dist.shard(dist.DistEnv(1, 2, 1), 16) == [(8, 16)]


def test_embedding_networks_are_the_same_on_every_rank():
    """EL draws its random networks from (seed, iteration) only: every rank's shard sees the same."""
    from fewstep.losses.base import Batch
    from fewstep.losses.el import ELConfig, ELTerm
    from fewstep.train.rng import StepRandom

    term = ELTerm(ELConfig(K=2, width=8), "vector", (2,), 0.5, 1.0)

    def nets(step, lo, hi):
        b = Batch(z=torch.zeros(hi - lo, 2), cond=None, real=torch.zeros(hi - lo, 2),
                  rnd=StepRandom(0, step, 16, lo, hi), step=step, seed=0)
        return [p.detach().clone() for n in term.networks(b, "cpu") for p in n.parameters()]

    rank0, rank1, later = nets(5, 0, 8), nets(5, 8, 16), nets(6, 0, 8)
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))
    assert not all(torch.equal(a, b) for a, b in zip(rank0, later))


def test_single_process_collectives_are_identities():
    t = torch.randn(5)
    assert dist.all_mean(t) is t and dist.all_max(3) == 3
    flags = torch.tensor([0.0, 1.0])
    assert dist.sync_gradients([torch.nn.Parameter(torch.ones(2))], flags) is flags
    assert dist.on_main(lambda: "resume") == "resume"


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_iteration(tmp_path, teacher):
    """torchrun forwards SIGTERM; every rank finishes the iteration, rank 0 checkpoints, all exit 143."""
    import json
    import signal
    import time

    run = tmp_path / "runs/long"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "fewstep", "distill",
                             "--teacher", str(teacher), "--out", str(run), "--iters", "100000",
                             "--method", "dmd", "--batch", "16", "--no-progress", "train.log_every=1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def last() -> int:
        path = run / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return max([json.loads(x)["iteration"] for x in lines if x.endswith("}")] or [0])

    t0 = time.monotonic()
    while last() < 10 and time.monotonic() - t0 < 90:
        time.sleep(0.01)
    seen = last()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    stops = re.findall(r"stopped by SIGTERM after iteration (\d+);", err)  # one per rank
    assert len(stops) == 2 and len(set(stops)) == 1, err[-3000:]
    assert all(line.count("stopped by") <= 1 for line in err.splitlines()), err[-3000:]  # one write each
    step = load_checkpoint(sorted((run / "checkpoints").iterdir())[-1])["step"]
    print(f"torchrun SIGTERM after iteration {seen}: both ranks stopped and checkpointed at {step} "
          f"(torchrun itself exits {proc.returncode}: its SignalException)")
    assert seen <= step <= seen + 2 and step == last()
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err
