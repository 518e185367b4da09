"""Performance measured in one process, as ratios (absolute times drift on shared machines).

* Sampling: samples/s at batch 256 after a warm-up batch for the teacher (35-NFE Heun and the
  other samplers asked for) and each student; reported over the teacher's 35-NFE Heun.
* Training: seconds per iteration of each method configuration, built from the same teacher with
  its default preset, timed over whole update-ratio cycles after warm-up; reported over dmd's.
The configurations alternate in rounds so slow drifts of machine load affect all of them alike.
"""

from __future__ import annotations

import statistics
import time

import torch

from fewstep.train.generate import load_generator


def time_sampling(path, nfe=None, sampler="heun", batch: int = 256, repeats: int = 3) -> float:
    """Samples per second of one model at ``batch``, median over ``repeats`` after a warm-up."""
    gen = load_generator(path)
    gen.sample(batch, seed=999, nfe=nfe, sampler=sampler, batch=batch)  # warm-up
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        gen.sample(batch, seed=r, nfe=nfe, sampler=sampler, batch=batch)
        rates.append(batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def time_training(configs: dict, iters: int = 20, rounds: int = 3) -> dict:
    """Median seconds per iteration for each resolved ``DistillRunConfig`` in ``configs``."""
    from fewstep.train.distill import build_run, train_iteration

    runs = {name: build_run(cfg, torch.device("cpu")) for name, cfg in configs.items()}
    for run in runs.values():
        for m in run.methods:
            for t in m.terms:
                if hasattr(t, "setup"):
                    t.setup(run.nets, run.ctx)
        for _ in range(run.cfg.schedule.ratio):  # warm-up: one full update cycle
            train_iteration(run)
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            n = max(iters // run.cfg.schedule.ratio, 1) * run.cfg.schedule.ratio
            t0 = time.perf_counter()
            for _ in range(n):
                train_iteration(run)
            times[name].append((time.perf_counter() - t0) / n)
    return {n: statistics.median(v) for n, v in times.items()}


def method_configs(teacher: str, specs: list[str], batch: int | None = None) -> dict:
    """``"dmd+el"`` / ``"dmd+dp@4"`` / ``"tfd|tfd.coverage=false"`` -> resolved configs (method
    defaults + the teacher's presets + overrides after ``|``)."""
    from fewstep.cli import _resolve_distill_config, build_parser

    out = {}
    for spec in specs:
        spec_main, *overrides = spec.split("|")
        head, _, steps = spec_main.partition("@")
        method, *extras = head.split("+")
        argv = ["distill", "--teacher", teacher, "--method", method, "--out", "unused"]
        for e in extras:
            argv += ["--extra", f"{e}={0.05 if e == 'dp' else 1.0}"]
        if steps:
            argv += ["--steps", steps, "student.renoise=ddim"]
        if batch:
            argv += ["--batch", str(batch)]
        out[spec] = _resolve_distill_config(build_parser().parse_args(argv + overrides))
    return out


def perf_report(teacher: str, students: list[str], methods: list[str], batch: int | None = None) -> dict:
    """Sampling throughput over the teacher's 35-NFE Heun and training time over dmd's."""
    base = time_sampling(teacher, nfe=35, sampler="heun")
    sampling = {"teacher-heun35": {"samples_per_sec": base, "ratio": 1.0}}
    for s in students:
        rate = time_sampling(s)
        sampling[s] = {"samples_per_sec": rate, "ratio": rate / base}
    train = time_training(method_configs(teacher, methods, batch))
    ref = train.get("dmd") or next(iter(train.values()))
    training = {m: {"s_per_iter": t, "ratio_to_dmd": t / ref} for m, t in train.items()}
    return {"sampling": sampling, "training": training}
