"""The one training-loop skeleton shared by teacher training and distillation.

A *trainee* (``train.teacher.TeacherState``, ``train.distill.Run``) is what one run trains: it makes
an iteration, holds the counters (``step``, ``wall_s``, ``bad_steps``, ``log_acc``) and knows its
resume state, its evaluation model and its export. This module owns everything else: the run
directory (new / resume / done, nothing partial left by a refused start), the config record, the
metrics log, stop signals, per-step reseeding, the progress bar, checkpoints, in-loop evaluation and
the time budget. Under torchrun every process runs it and rank 0 writes the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from fewstep.train import checkpoint as ckpt
from fewstep.train import dist
from fewstep.train.control import Bookkeeper, LogAccumulator, StopSignals, out_of_time, reseed
from fewstep.train.rundir import discard_unstarted_run, record_config, run_dir_status
from fewstep.train.runlog import RunLog


class Trainee(Protocol):
    step: int
    wall_s: float
    bad_steps: int
    log_acc: LogAccumulator

    def prepare(self, env, device) -> None: ...      # once, before a resume state is loaded
    def start(self, env, device) -> None: ...        # after loading (e.g. wrap in DDP)
    def iteration(self, log_norms: bool) -> dict: ...  # one iteration; advances ``step``
    def state_dict(self) -> dict: ...
    def load_state_dict(self, s: dict) -> None: ...
    def eval_model(self) -> torch.nn.Module: ...
    def export(self, out: Path) -> None: ...         # model.safetensors + model.json (rank 0)
    def finish(self) -> None: ...                    # release what start() took


def make_optimizer(params, o) -> torch.optim.Optimizer:
    """AdamW from an ``OptimConfig`` (every network fewstep trains uses it). ``foreach``: PyTorch picks
    the multi-tensor step only on accelerators; on CPU it is bit-identical to the per-tensor loop and
    1.14-1.18x faster per step for the ring8 / digits8 students (docs/performance.md)."""
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             foreach=True)


def lr_at(o, step: int) -> float:
    """The learning rate of ``OptimConfig`` ``o`` at iteration ``step`` (linear warm-up)."""
    return o.lr * (min(1.0, (step + 1) / o.warmup) if o.warmup else 1.0)


def run_training(env, device, out: Path, config: dict, role: str, trainee: Trainee, train_cfg,
                 evaluate=None, progress: bool = True, desc: str = "train",
                 defaults: dict | None = None) -> Path:
    """Train ``trainee`` into run directory ``out`` (or resume it, or return at once if it is done).

    ``config`` is the resolved config as a dict (recorded, and compared on resume); ``role`` is
    "teacher" or "student"; ``evaluate(model, step) -> dict`` runs every ``train.eval_every``
    iterations and at the end; ``defaults`` (the config class's defaults as a dict) lets a run made
    before a setting existed resume or count as done while that setting keeps its default."""
    out = Path(out)
    existed = out.exists()
    status = run_dir_status(env, out, config, role, defaults)
    if status == "done":
        return out
    with discard_unstarted_run(out, existed, enabled=env.is_main and status == "new"):
        trainee.prepare(env, device)  # before loading: a term's saved state wins over its setup
        if status == "resume":  # load before writing anything: a refused checkpoint changes nothing
            trainee.load_state_dict(ckpt.load_latest(out / "checkpoints", map_location=device))
        dist.on_main(record_config, out, config)
        log = RunLog(out, enabled=env.is_main)
        dist.on_main(log.resume_from, trainee.step)
        trainee.start(env, device)
        try:
            with StopSignals() as stop:
                _loop(trainee, train_cfg, out, log, evaluate, progress and env.is_main, stop, desc)
            dist.on_main(trainee.export, out)
            log.close()
        finally:
            trainee.finish()
    return out


def _loop(trainee: Trainee, t, out: Path, log: RunLog, evaluate, progress: bool, stop: StopSignals,
          desc: str) -> None:
    books = Bookkeeper(t, out, log, stop)
    bar = tqdm(total=t.iters, initial=trainee.step, desc=desc, disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter() - trainee.wall_s
    eval_fn = (lambda: evaluate(trainee.eval_model(), trainee.step)) if evaluate else None
    done = out_of_time(t, trainee.wall_s)
    while trainee.step < t.iters and not done:
        reseed(t.seed, trainee.step)
        logs = trainee.iteration(log_norms=(trainee.step + 1) % t.log_every == 0)
        trainee.wall_s = time.perf_counter() - t0
        bar.update(1)
        done = out_of_time(t, trainee.wall_s)  # equal wall-clock budgets (train.time_budget_s)
        rec = books.after(trainee.step, trainee.wall_s, logs, trainee.log_acc, trainee.bad_steps,
                          trainee.state_dict, eval_fn, last=trainee.step == t.iters or done)
        if rec and "loss" in rec:
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
    bar.close()
    books.final(trainee.step, trainee.wall_s, eval_fn)
