"""Pairwise distances and the unbiased MMD^2 estimator shared by the ``mmd`` metric and the
Embedding Loss (Gretton et al. 2012, eq. 3; specs/embedding_loss.md section 2.3, metrics.md section 7).

The Gaussian kernel here is a *mixture over bandwidths*:
``kappa(u, v) = mean_j exp(-||u - v||^2 / gamma_j)``, so ``kappa(u, u) = 1`` however many
bandwidths are used. Callers choose the ``gamma_j`` (the metric freezes them from a reference set;
the Embedding Loss derives them from the pooled batch).
"""

from __future__ import annotations

import torch

from fewstep.core.utils import full_precision


@full_precision
def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[n, m]`` between rows of ``a [n, d]`` and ``b [m, d]``,
    as ``||a||^2 + ||b||^2 - 2 a.b`` clamped at 0 (float rounding can make it slightly negative)."""
    # one GEMM with the norms folded in (addmm's beta term) instead of three passes over [n, m]:
    # 2-7x faster for the small feature dims of the Embedding Loss and the metrics
    d2 = torch.addmm((a * a).sum(1)[:, None], a, b.T, alpha=-2).add_((b * b).sum(1)[None, :])
    return d2.clamp_min_(0)


def gaussian_kernel(d2: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """``mean_j exp(-d2 / gamma_j)`` for squared distances ``d2 [n, m]`` and ``gammas [J]``.

    A loop over bandwidths keeps memory at O(n m), not O(n m J)."""
    return sum(torch.exp(-d2 / g) for g in gammas) / len(gammas)


def _offdiag_mean(K: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of a square matrix (the diagonal's gradient cancels to 0)."""
    n = K.shape[0]  # total minus trace: one pass, no masked [n, n] copy
    return (K.sum() - K.diagonal().sum()) / (n * (n - 1))


def mmd2_unbiased_from_kernels(Kxx: torch.Tensor, Kyy: torch.Tensor, Kxy: torch.Tensor):
    """U-statistic MMD^2_u from kernel matrices (diagonals of Kxx, Kyy excluded)."""
    return _offdiag_mean(Kxx) + _offdiag_mean(Kyy) - 2 * Kxy.mean()


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Unbiased multi-bandwidth Gaussian MMD^2 between ``x [n, d]`` and ``y [m, d]`` (scalar).

    Centred on 0 when x and y come from one distribution; can be negative; not clamped.
    """
    gammas = torch.as_tensor(gammas, dtype=x.dtype, device=x.device)
    Kxx = gaussian_kernel(sq_dists(x, x), gammas)
    Kyy = gaussian_kernel(sq_dists(y, y), gammas)
    Kxy = gaussian_kernel(sq_dists(x, y), gammas)
    return mmd2_unbiased_from_kernels(Kxx, Kyy, Kxy)


def mmd2_biased(x: torch.Tensor, y: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """V-statistic MMD^2 (diagonals included); 0 only when the two multisets coincide."""
    gammas = torch.as_tensor(gammas, dtype=x.dtype, device=x.device)
    return (gaussian_kernel(sq_dists(x, x), gammas).mean() + gaussian_kernel(sq_dists(y, y), gammas)
            .mean() - 2 * gaussian_kernel(sq_dists(x, y), gammas).mean())


@full_precision
def mmd2_linear_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with the linear kernel ``u.v`` in O(n d) (embedding_loss.md section 6):
    ``(||sum x||^2 - sum ||x_i||^2)/(n(n-1)) + (same for y) - 2 (sum x).(sum y)/(n m)``."""
    n, m = x.shape[0], y.shape[0]
    sx, sy = x.sum(0), y.sum(0)
    xx = (sx @ sx - (x * x).sum()) / (n * (n - 1))
    yy = (sy @ sy - (y * y).sum()) / (m * (m - 1))
    return xx + yy - 2 * (sx @ sy) / (n * m)


def median_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Median of the off-diagonal Euclidean distances within ``x [n, d]``."""
    n = x.shape[0]
    d = sq_dists(x, x).sqrt()
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    return d[iu[0], iu[1]].median()


def pooled_bandwidth(d2: torch.Tensor) -> torch.Tensor:
    """``h``: the mean off-diagonal entry of the pooled squared-distance matrix ``d2 [n, n]``,
    detached and floored at the dtype's tiny so identical points give kappa = 1, not NaN
    (embedding_loss.md section 2.2)."""
    return _offdiag_mean(d2.detach()).clamp_min(torch.finfo(d2.dtype).tiny)


_WEIGHTS: dict = {}  # (n, m, dtype, device) -> W; a training run uses one or two batch shapes


def _ustat_weights(n: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`_ustat_weights_new`, cached (read-only; filled once per batch shape)."""
    key = (n, m, like.dtype, like.device)
    if key not in _WEIGHTS:
        if len(_WEIGHTS) >= 8:
            _WEIGHTS.clear()
        _WEIGHTS[key] = _ustat_weights_new(n, m, like)
    return _WEIGHTS[key]


def _ustat_weights_new(n: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """``W [(n+m), (n+m)]`` with ``MMD^2_u = sum_ab W_ab kappa_ab`` over the pooled kernel matrix:
    1/(n(n-1)) and 1/(m(m-1)) off the diagonal of the xx and yy blocks, -1/(nm) in both cross blocks,
    0 on the diagonal (never differentiated)."""
    W = torch.full((n + m, n + m), -1.0 / (n * m), dtype=like.dtype, device=like.device)
    W[:n, :n], W[n:, n:] = 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1))
    return W.fill_diagonal_(0)


def _bandwidth_exps(d2: torch.Tensor, h: torch.Tensor, multipliers):
    """``(s, exp(-d2 / (s h)))`` for each multiplier, largest first. When each multiplier is half the
    previous one (the default 4, 2, 1, 0.5, 0.25), ``exp(-d2 / (s h / 2)) = exp(-d2 / (s h))^2``: one exp
    and squarings (a multiply costs a fraction of an exp; relative error grows to ~2^J ulp). Each yielded
    tensor is squared in place for the next: use it before asking for the next one."""
    ms = sorted(multipliers, reverse=True)
    ladder = all(b * 2 == a for a, b in zip(ms, ms[1:]))
    e = None
    for s in ms:
        e = e.square_() if ladder and e is not None else (d2 * (-1.0 / (s * h))).exp_()
        yield s, e


class _PooledGaussMMD2(torch.autograd.Function):
    """MMD^2_u with the pooled-bandwidth Gaussian mixture and an analytic gradient.

    With ``G = W * (-d kappa / d d2)`` (symmetric), ``dMMD^2/dz_a = -4 (sum_b G_ab z_a - (G z)_a)``;
    one distance matmul forward and one backward instead of autograd's long elementwise chain."""

    @staticmethod
    def forward(ctx, x, y, multipliers):
        n = x.shape[0]
        z = torch.cat([x, y])
        d2 = sq_dists(z, z)
        h = pooled_bandwidth(d2)
        K, G = torch.zeros_like(d2), torch.zeros_like(d2)
        for s, e in _bandwidth_exps(d2, h, multipliers):
            K += e
            G.add_(e, alpha=1.0 / s)
        W = _ustat_weights(n, y.shape[0], d2)
        mmd2 = K.mul_(W).sum() / len(multipliers)
        G.mul_(W).div_(h * len(multipliers))  # sum_s e_s / (s h), times W
        ctx.save_for_backward(G, z)
        ctx.n = n
        ctx.mark_non_differentiable(h)
        return mmd2, h

    @staticmethod
    def backward(ctx, grad_mmd2, grad_h):
        G, z = ctx.saved_tensors
        n, grads = ctx.n, []
        for i, rows in enumerate((slice(0, n), slice(n, None))):  # only the rows that need a gradient
            Gr = G[rows]
            grads.append(-4 * grad_mmd2 * (Gr.sum(1, keepdim=True) * z[rows] - Gr @ z)
                         if ctx.needs_input_grad[i] else None)
        return grads[0], grads[1], None


@full_precision
def mmd2_unbiased_pooled(x: torch.Tensor, y: torch.Tensor, multipliers) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased MMD^2 between ``x [n, d]`` and ``y [m, d]`` with ``kappa = mean_s exp(-d^2/(s h))``,
    ``h`` = :func:`pooled_bandwidth` of the pooled ``[x; y]`` (embedding_loss.md sections 2.2-2.3).

    Equal to ``mmd2_unbiased(x, y, h * multipliers)`` with gradients through ``x`` and ``y`` only
    (``h`` is detached). ``h`` is a symmetric function of the pooled set, so the mean over splits of
    one pooled set is exactly 0, and scaling all points by ``a`` leaves the value unchanged.
    Returns ``(mmd2, h)``."""
    return _PooledGaussMMD2.apply(x, y, tuple(float(s) for s in multipliers))
