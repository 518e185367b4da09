"""Performance measured in one process, as ratios (absolute times drift on shared machines).

* Sampling: samples/s at batch 256 after a warm-up batch, for the teacher's 35-NFE Heun and each
  student, timed in alternating rounds (each model samples batches for at least ``min_s`` seconds
  per round); each student's ratio is the median over rounds of its rate over the teacher's rate in
  the same round.
* Training: seconds per iteration of each method configuration, built from the same teacher with
  its default preset, timed over whole update-ratio cycles after warm-up (at least one cycle, and
  until every term's warm-up, e.g. EL's lambda calibration, is over); reported over dmd's.
The configurations alternate in rounds so slow drifts of machine load affect all of them alike.
"""

from __future__ import annotations

import statistics
import time

import torch

from fewstep.train.generate import load_generator


def _rate(gen, batch: int, seed: int, min_s: float, **kw) -> float:
    """Samples per second of one generator, sampling whole batches for at least ``min_s`` seconds."""
    n, t0 = 0, time.perf_counter()
    while True:
        gen.sample(batch, seed=seed + n, batch=batch, **kw)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return n * batch / elapsed


def time_sampling(paths: list, batch: int = 256, rounds: int = 5, min_s: float = 1.0) -> dict:
    """Median samples/s and median ratio over the teacher (``paths[0]``, 35-NFE Heun) for each model,
    timed in alternating rounds so load changes on a shared machine hit every model alike."""
    gens = [load_generator(p) for p in paths]
    kws = [{"nfe": 35, "sampler": "heun"}] + [{}] * (len(paths) - 1)
    for gen, kw in zip(gens, kws):
        gen.sample(batch, seed=999, batch=batch, **kw)  # warm-up
    rates: list[list[float]] = [[] for _ in paths]
    for r in range(rounds):
        for i, (gen, kw) in enumerate(zip(gens, kws)):
            rates[i].append(_rate(gen, batch, 1000 * r, min_s, **kw))
    return {str(p): {"samples_per_sec": statistics.median(v),
                     "ratio": statistics.median(a / b for a, b in zip(v, rates[0]))}
            for p, v in zip(paths, rates)}


WARMUP_MAX_ITERS = 5000


def warm_up(run) -> int:
    """Whole update cycles until no term is warming up (``Term.warming_up``: EL's calibration), at least
    one: timings are of the steady state a long run spends its time in. Returns the iterations run."""
    from fewstep.losses.base import PHASES
    from fewstep.train.distill import train_iteration

    done = 0
    while done == 0 or (any(t.warming_up() for t in run.terms(set(PHASES))) and done < WARMUP_MAX_ITERS):
        for _ in range(run.cfg.schedule.ratio):
            train_iteration(run)
        done += run.cfg.schedule.ratio
    return done


def time_training(configs: dict, iters: int = 20, rounds: int = 3) -> dict:
    """Median seconds per iteration for each resolved ``DistillRunConfig`` in ``configs``."""
    from fewstep.train.distill import build_run, setup_methods, train_iteration

    runs = {name: build_run(cfg, torch.device("cpu")) for name, cfg in configs.items()}
    for run in runs.values():
        setup_methods(run)
        warm_up(run)
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            n = max(iters // run.cfg.schedule.ratio, 1) * run.cfg.schedule.ratio
            t0 = time.perf_counter()
            for _ in range(n):
                train_iteration(run)
            times[name].append((time.perf_counter() - t0) / n)
    return {n: statistics.median(v) for n, v in times.items()}


def time_bare(configs: dict, iters: int = 20, rounds: int = 3) -> dict:
    """Engine vs bare loop (``bench/bare.py``) for each resolved config: median seconds per
    iteration of each, timed in alternating rounds on two runs built alike, and their ratio."""
    from fewstep.bench.bare import BareLoop, check_bare
    from fewstep.train.distill import build_run, setup_methods, train_iteration

    pairs = {}
    for name, cfg in configs.items():
        check_bare(cfg)
        engine, bare_run = build_run(cfg, torch.device("cpu")), build_run(cfg, torch.device("cpu"))
        setup_methods(engine)
        setup_methods(bare_run)
        pairs[name] = (lambda r=engine: train_iteration(r), BareLoop(bare_run))
    times = {n: ([], []) for n in pairs}
    for name, fns in pairs.items():  # warm-up: one full update cycle each
        for fn in fns:
            for _ in range(configs[name].schedule.ratio):
                fn()
    for _ in range(rounds):
        for name, fns in pairs.items():
            n = max(iters // configs[name].schedule.ratio, 1) * configs[name].schedule.ratio
            for fn, out in zip(fns, times[name]):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                out.append((time.perf_counter() - t0) / n)
    result = {}
    for name, (te, tb) in times.items():
        e, b = statistics.median(te), statistics.median(tb)
        result[name] = {"engine_s_per_iter": e, "bare_s_per_iter": b,
                        "ratio": statistics.median(x / y for x, y in zip(te, tb))}
    return result


def method_configs(teacher: str, specs: list[str], batch: int | None = None) -> dict:
    """``"dmd+el"`` / ``"dmd+dp@4"`` / ``"tfd|tfd.coverage=false"`` -> resolved configs (method
    defaults + the teacher's presets + overrides after ``|``)."""
    from fewstep.recipe import distill_config

    out = {}
    for spec in specs:
        spec_main, *overrides = spec.split("|")
        head, _, steps = spec_main.partition("@")
        method, *extras = head.split("+")
        flags = [f"student.steps={steps}", "student.renoise=ddim"] if steps else []
        flags += [f"train.batch={batch}"] if batch else []
        out[spec] = distill_config(teacher, method, {e: 0.05 if e == "dp" else 1.0 for e in extras},
                                   flags + overrides)
    return out


def perf_report(teacher: str, students: list[str], methods: list[str], batch: int | None = None) -> dict:
    """Sampling throughput over the teacher's 35-NFE Heun and training time over dmd's."""
    timed = time_sampling([teacher, *students])
    sampling = {"teacher-heun35": timed.pop(str(teacher)), **timed}
    train = time_training(method_configs(teacher, methods, batch))
    ref = train.get("dmd") or next(iter(train.values()))
    training = {m: {"s_per_iter": t, "ratio_to_dmd": t / ref} for m, t in train.items()}
    return {"sampling": sampling, "training": training}
