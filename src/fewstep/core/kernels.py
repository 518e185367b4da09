"""Pairwise distances and the unbiased MMD^2 estimator shared by the ``mmd`` metric and the
Embedding Loss (Gretton et al. 2012, eq. 3; specs/embedding_loss.md section 2.3, metrics.md section 7).

The Gaussian kernel here is a *mixture over bandwidths*:
``kappa(u, v) = mean_j exp(-||u - v||^2 / gamma_j)``, so ``kappa(u, u) = 1`` however many
bandwidths are used. Callers choose the ``gamma_j`` (the metric freezes them from a reference set;
the Embedding Loss derives them from the pooled batch).
"""

from __future__ import annotations

import torch


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[n, m]`` between rows of ``a [n, d]`` and ``b [m, d]``,
    as ``||a||^2 + ||b||^2 - 2 a.b`` clamped at 0."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return d2.clamp_min(0)


def gaussian_kernel(d2: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """``mean_j exp(-d2 / gamma_j)`` for squared distances ``d2 [n, m]`` and ``gammas [J]``.

    A loop over bandwidths keeps memory at O(n m), not O(n m J)."""
    return sum(torch.exp(-d2 / g) for g in gammas) / len(gammas)


def _offdiag_mean(K: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of a square matrix; the diagonal is masked, never
    differentiated."""
    n = K.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    return K.masked_fill(eye, 0).sum() / (n * (n - 1))


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
