"""Where one distillation iteration spends its time (``fewstep perf --profile``; issue 22).

The engine is profiled from the outside: for the duration of the profile, labelled
``torch.profiler.record_function`` ranges are put around the pieces of an iteration — the real-data
batch, the student rollout, each loss term (inclusive of the network passes it makes), the
optimiser steps, gradient clipping and checks, process synchronisation and the EMA — and around each
network's forward. Backward time is the sum of autograd's ``evaluate_function`` events (all backward
passes, including Embedding Loss's calibration gradients). What is left of the wall time is the
engine's own Python bookkeeping (schedules, logs, term states). Shares are more stable than absolute
times on a shared machine: every piece slows down alike.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class _LabelledTerm:
    """A loss term whose call runs inside ``record_function("term:<name>")``; everything else is
    the term's own (attributes, state, calibration)."""

    def __init__(self, term):
        object.__setattr__(self, "_term", term)

    def __getattr__(self, name):
        return getattr(self._term, name)

    def __setattr__(self, name, value):
        setattr(self._term, name, value)

    def __call__(self, *args, **kw):
        with record_function(f"term:{self._term.name}"):
            return self._term(*args, **kw)


def _labelled(fn, label: str):
    def wrapper(*args, **kw):
        with record_function(label):
            return fn(*args, **kw)
    return wrapper


def _forward_ranges(modules: dict) -> list:
    """Forward hooks that open ``net:<name>`` before each forward and close it after."""
    handles = []
    for name, m in modules.items():
        stack: list = []

        def pre(mod, args, name=name, stack=stack):
            stack.append(record_function(f"net:{name}"))
            stack[-1].__enter__()

        def post(mod, args, out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


@contextmanager
def labelled_run(run):
    """Label the pieces of ``run``'s iterations (restored on exit)."""
    from fewstep.train import distill, phases

    patches = [(distill, "make_batch", "data:batch"), (phases, "apply_updates", "optim:step+clip+sync"),
               (phases, "ema_update", "ema")]
    saved_terms = [list(m.terms) for m in run.methods]
    saved_rollout = run.rollout
    n = run.nets
    nets = {"student": n.student, "fake": n.fake, "teacher": n.teacher, "head": n.head}
    with ExitStack() as stack:
        for mod, attr, label in patches:
            orig = getattr(mod, attr)
            setattr(mod, attr, _labelled(orig, label))
            stack.callback(setattr, mod, attr, orig)
        for m in run.methods:
            m.terms[:] = [_LabelledTerm(t) for t in m.terms]
        run.rollout = _labelled(saved_rollout, "rollout")
        handles = _forward_ranges({k: v for k, v in nets.items() if v is not None})
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            run.rollout = saved_rollout
            for m, terms in zip(run.methods, saved_terms):
                m.terms[:] = terms


def profile_iterations(cfg, iters: int = 20) -> dict:
    """Milliseconds per iteration of each piece of ``iters`` iterations (rounded up to whole
    update cycles) of the run ``cfg`` builds, after :func:`fewstep.bench.perf.warm_up`."""
    from fewstep.bench.perf import warm_up
    from fewstep.train.distill import build_run, setup_methods, train_iteration

    run = build_run(cfg, torch.device("cpu"))
    setup_methods(run)
    ratio = cfg.schedule.ratio
    warm_up(run)
    n = max(iters // ratio, 1) * ratio
    with labelled_run(run), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            train_iteration(run)
        wall = time.perf_counter() - t0
    return summarize(prof.key_averages(), wall, n)


def summarize(events, wall_s: float, n: int) -> dict:
    """``{"total": ms, "pieces": {label: ms}, "networks": {net: ms}, "backward": ms, "other": ms}``
    per iteration. Pieces are top-level ranges (they do not overlap); networks are forward times
    inside them."""
    per = {e.key: e.cpu_time_total / 1e3 / n for e in events}  # us -> ms per iteration
    pieces = {k: v for k, v in per.items()
              if k.startswith(("term:", "data:", "optim:", "rollout", "ema")) and v > 0}
    networks = {k[4:]: v for k, v in per.items() if k.startswith("net:")}
    backward = sum(v for k, v in per.items() if k.startswith("autograd::engine::evaluate_function"))
    total = 1e3 * wall_s / n
    return {"total": total, "pieces": dict(sorted(pieces.items(), key=lambda kv: -kv[1])),
            "networks": networks, "backward": backward,
            "other": total - sum(pieces.values()) - backward, "iterations": n}
