"""Real-vs-real noise floors (specs/metrics.md section 7; BENCHMARKS.md "Metrics").

A metric's floor is its value between two independent real sets of the evaluated size, over
``draws`` fixed draws (R = 10 by default). ``fd_floor`` and the floors of the other biased metrics
are the plain mean; ``mmd_floor`` is a *threshold*, mean + 2 std of the unbiased MMD^2, since that
estimator is centred on 0 for equal distributions. Pure: callables in, numbers out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from fewstep.metrics.stats import mmd

DrawPair = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; 0 for a single draw)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def floor(metric_fn: Callable, draw_real_pair: DrawPair, draws: int = 10):
    """Mean and std of ``metric_fn(a, b)`` over ``(a, b) = draw_real_pair(i)``, ``i = 0..draws-1``.

    ``draw_real_pair(i)`` must return two independent real feature sets ``[n, d]`` for draw i (seed
    it by i so the floor is reproducible). ``metric_fn`` returns a number, a tuple of numbers (e.g.
    :func:`precision_recall`) or a dict of numbers; the result is ``(mean, std)`` with the same
    structure in each slot. The std is the sample std over draws (ddof = 1).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    values = [metric_fn(*draw_real_pair(i)) for i in range(draws)]
    first = values[0]
    if isinstance(first, Mapping):
        stats = {key: _mean_std([float(v[key]) for v in values]) for key in first}
        return {k: s[0] for k, s in stats.items()}, {k: s[1] for k, s in stats.items()}
    if isinstance(first, (tuple, list)):
        stats = [_mean_std([float(v[i]) for v in values]) for i in range(len(first))]
        return tuple(s[0] for s in stats), tuple(s[1] for s in stats)
    return _mean_std([float(v) for v in values])


def mmd_floor(draw_real_pair: DrawPair, gammas, draws: int = 10) -> float:
    """``mmd_floor`` = mean + 2 std of the unbiased MMD^2 (:func:`fewstep.metrics.mmd`, frozen
    ``gammas``) between two independent real sets, over ``draws`` draws (BENCHMARKS.md). A model
    at or below it is indistinguishable from real data at that sample size."""
    mean, std = floor(lambda a, b: mmd(a, b, gammas), draw_real_pair, draws)
    return mean + 2 * std
