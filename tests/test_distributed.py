"""torchrun: N processes equal one process with the same global batch; rank != 0 writes nothing.

The subprocess runs use ``torchrun --standalone --nproc_per_node 2`` on CPU (gloo). A
``sitecustomize`` audit hook records every file that rank 1 opens for writing, renames, creates
or removes under the run directory: it must be none (docs/scaling.md, "rank-0 I/O").
"""

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
from tests.helpers import MLP, save_tiny_teacher, tensors_max_diff, tiny_run

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


def _torchrun(tmp_path: Path, args: list[str], nproc: int = 2) -> tuple[subprocess.CompletedProcess, str]:
    """``torchrun --nproc_per_node nproc -m fewstep args``; returns the result and rank 1's writes."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT)
    audit = tmp_path / "rank1_writes.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_THREADS": "1", "PYTHONPATH": str(site),
           "FEWSTEP_AUDIT_DIR": str(tmp_path / "runs"), "FEWSTEP_AUDIT_LOG": str(audit)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "fewstep", *args],
                       capture_output=True, text=True, env=env, timeout=120)
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
    lines = [(runs / n / "metrics.jsonl").read_text().splitlines() for n in ("one", "two")]
    assert len(lines[0]) == len(lines[1])


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
    assert MLP["dim"] == 2


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
