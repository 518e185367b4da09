"""Pure statistics on feature matrices (specs/metrics.md sections 2-5, 7, 8).

Every function takes features ``[N, d]`` (torch tensors or arrays; cast to float64 inside unless
stated) and returns Python numbers. Feature extraction lives in ``fewstep.metrics.features``.

* :func:`fd` - Frechet distance (Heusel et al. 2017, arXiv 1706.08500), trace-sqrt by eigh.
* :func:`kid` - Kernel Inception Distance (Binkowski et al. 2018, arXiv 1801.01401).
* :func:`precision_recall` - improved P&R (Kynkaanniemi et al. 2019, arXiv 1904.06991), ``<=``.
* :func:`density_coverage` - density/coverage (Naeem et al. 2020, arXiv 2002.09797), strict ``<``.
* :func:`mmd` - unbiased multi-bandwidth Gaussian MMD^2 (Gretton et al. 2012) via ``core.kernels``.
* :func:`diversity` - DP-DMD within-condition diversity (spec section 8; dp_dmd.md section 7).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from fewstep.core import kernels

F64 = torch.float64


def _as(x, dtype: torch.dtype) -> torch.Tensor:
    """Any array-like as a ``dtype`` tensor on its own device (lists go straight to ``dtype``)."""
    return x.detach().to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)


def _f64(x) -> torch.Tensor:
    """Any array-like ``[N, d]`` as a float64 tensor."""
    return _as(x, F64)


def _check_2d(x: torch.Tensor, name: str, min_rows: int = 1) -> None:
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must be [N, d] with N >= {min_rows}, got shape {list(x.shape)}")


# ---------------------------------------------------------------------------------------------
# Frechet distance (spec section 2)
# ---------------------------------------------------------------------------------------------

def feature_stats(x: torch.Tensor | Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` (divide by N-1) in float64.

    ``x`` is a matrix ``[N, d]`` or an iterable of batches ``[B_i, d]``. As in EDM ``fid.py`` the
    sums ``sum f`` and ``sum f f^T`` are accumulated in float64 batch by batch and combined as
    ``(sum f f^T - N mu mu^T) / (N - 1)``; the features are first shifted by the first batch's
    mean (covariance is shift-invariant), which avoids cancellation when ``|mu| >> std``.
    """
    batches = [x] if isinstance(x, torch.Tensor) or hasattr(x, "shape") else x
    n, shift, s1, s2 = 0, None, None, None
    for b in batches:
        b = _f64(b)
        _check_2d(b, "features")
        if shift is None:
            shift = b.mean(0)
            s1 = torch.zeros_like(shift)
            s2 = torch.zeros(b.shape[1], b.shape[1], dtype=F64, device=b.device)
        b = b - shift
        n, s1, s2 = n + b.shape[0], s1 + b.sum(0), s2 + b.T @ b
    if n < 2:
        raise ValueError(f"feature_stats needs at least 2 samples, got {n}")
    mu_c = s1 / n
    sigma = (s2 - n * torch.outer(mu_c, mu_c)) / (n - 1)
    return mu_c + shift, (sigma + sigma.T) / 2


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix by ``eigh``, negative eigenvalues clipped to 0."""
    lam, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``Tr (Sigma_1 Sigma_2)^{1/2}`` for PSD ``[d, d]`` matrices (spec section 2, library choice).

    With ``S = Sigma_1^{1/2}``, ``Sigma_1 Sigma_2`` is similar to the symmetric PSD ``A = S Sigma_2 S``,
    so the trace is ``sum_i sqrt(max(lambda_i(A), 0))``: no complex branch, unlike ``sqrtm``.
    """
    s = _sqrt_psd(_f64(sigma1))
    a = s @ _f64(sigma2).to(s.device) @ s
    return torch.linalg.eigvalsh((a + a.T) / 2).clamp_min(0).sqrt().sum()


def fd_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between Gaussians with
    means ``[d]`` and covariances ``[d, d]`` (float64; spec section 2)."""
    mu1, mu2, sigma1, sigma2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(f"mismatched statistics: mu {list(mu1.shape)} / {list(mu2.shape)}, "
                         f"sigma {list(sigma1.shape)} / {list(sigma2.shape)}")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def fd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between the Gaussian fits of features ``x [n, d]`` and ``y [m, d]``.

    Biased upward at small n (spec section 10): compare only at equal n, next to ``fd_floor``.
    """
    return fd_from_stats(*feature_stats(x), *feature_stats(y))


# ---------------------------------------------------------------------------------------------
# KID (spec section 3)
# ---------------------------------------------------------------------------------------------

def kid_subsets(n: int, m: int, num_subsets: int = 100, subset_size: int = 1000,
                generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index pairs ``(ix [s], iy [s])`` for :func:`kid_from_subsets`, ``s = min(n, m, subset_size)``.

    Each subset draws ``s`` rows of x and then ``s`` rows of y without replacement; subsets are
    independent (spec section 3, section 10 "KID subsets"). Reproducible from ``generator``.
    """
    s = min(n, m, subset_size)
    if s < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples, got min(n, m, subset_size) = {s}")
    return [(torch.randperm(n, generator=generator)[:s], torch.randperm(m, generator=generator)[:s])
            for _ in range(num_subsets)]


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cubic polynomial kernel ``(a.b / d + 1)^3`` as ``[len(a), len(b)]`` (KID paper, eq. 4)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid_from_subsets(x: torch.Tensor, y: torch.Tensor,
                     subsets: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean over subsets of the unbiased MMD^2 with the cubic kernel (spec section 3):
    ``t = [sum_{i!=j} k(x_i,x_j) + sum_{i!=j} k(y_i,y_j)] / (s(s-1)) - 2 sum_{i,j} k(x_i,y_j) / s^2``."""
    x, y = _f64(x), _f64(y)
    total = 0.0
    for ix, iy in subsets:
        xs, ys = x[ix.to(x.device)], y[iy.to(y.device)]
        s = xs.shape[0]
        a = _poly_kernel(xs, xs) + _poly_kernel(ys, ys)
        b = _poly_kernel(xs, ys)
        total += float((a.sum() - a.diagonal().sum()) / (s * (s - 1)) - 2 * b.sum() / s**2)
    return total / len(subsets)


def kid(x: torch.Tensor, y: torch.Tensor, num_subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> float:
    """Kernel Inception Distance between ``x [n, d]`` and ``y [m, d]`` (not scaled by 10^3).

    Unbiased, so it can be negative; centred on 0 for equal distributions. When both sets have at
    most ``subset_size`` rows and the same size, every subset holds all rows (only permuted) and
    gives the same value, so one is computed.
    """
    x, y = _f64(x), _f64(y)
    _check_2d(x, "x", 2)
    _check_2d(y, "y", 2)
    if len(x) == len(y) <= subset_size:
        num_subsets = 1
    return kid_from_subsets(x, y, kid_subsets(len(x), len(y), num_subsets, subset_size, generator))


# ---------------------------------------------------------------------------------------------
# k-NN manifold metrics (spec sections 4, 5)
# ---------------------------------------------------------------------------------------------

def _sq_dist_chunks(a: torch.Tensor, b: torch.Tensor, chunk_size: int):
    """Yield ``(start, D2)`` with squared distances ``D2 [c, len(b)]`` for row chunks of ``a``."""
    for i in range(0, a.shape[0], chunk_size):
        yield i, kernels.sq_dists(a[i:i + chunk_size], b)


def knn_radii(x: torch.Tensor, k: int, chunk_size: int = 1000) -> torch.Tensor:
    """Squared distance ``[N]`` of each row of ``x [N, d]`` to its k-th nearest *other* row: the
    (k+1)-th smallest including the zero self-distance, as ``prdc``'s ``argpartition`` does."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k-NN radii need 1 <= k < N, got k={k}, N={x.shape[0]}")
    # topk(k+1, smallest)[-1] == kthvalue(k+1), several times faster on CPU
    return torch.cat([d2.topk(k + 1, dim=1, largest=False).values[:, -1]
                      for _, d2 in _sq_dist_chunks(x, x, chunk_size)])


def _prep(real, fake, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast and centre both sets on the real mean (distances are translation-invariant; centring
    reduces cancellation in ``||a||^2 + ||b||^2 - 2 a.b``)."""
    real, fake = _as(real, dtype), _as(fake, dtype)
    _check_2d(real, "real", 2)
    _check_2d(fake, "fake", 2)
    c = real.mean(0)
    return real - c, fake - c


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk_size: int = 1000,
                     dtype: torch.dtype = F64) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake [m, d]`` w.r.t. ``real [n, d]``.

    precision = (1/m) sum_j 1[exists i: ||y_j - x_i|| <= rho_i];
    recall    = (1/n) sum_i 1[exists j: ||x_i - y_j|| <= rho'_j];
    ``rho`` / ``rho'`` are k-NN radii within real / fake. Comparison ``<=`` as in the paper's code and
    the ADM evaluator (spec section 4). Squared distances are compared with squared radii, in
    ``dtype`` (float64 by default; float32 is the spec's minimum, never fp16), in row chunks of
    ``chunk_size`` (peak memory ~ ``chunk_size * max(n, m)`` entries).
    """
    x, y = _prep(real, fake, dtype)
    r_real, r_fake = knn_radii(x, k, chunk_size), knn_radii(y, k, chunk_size)
    in_real = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    in_fake = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for j, d2 in _sq_dist_chunks(y, x, chunk_size):  # d2[j, i] = ||y_j - x_i||^2
        in_real[j:j + d2.shape[0]] = (d2 <= r_real[None, :]).any(1)
        in_fake |= (d2 <= r_fake[j:j + d2.shape[0], None]).any(0)
    return in_real.double().mean().item(), in_fake.double().mean().item()


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk_size: int = 1000,
                     dtype: torch.dtype = F64) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, ``clovaai/generative-evaluation-prdc``).

    density  = (1/(k m)) sum_j sum_i 1[||y_j - x_i|| < rho_i]   (can exceed 1);
    coverage = (1/n) sum_i 1[min_j ||x_i - y_j|| < rho_i];
    ``rho_i`` = k-NN radius among the real ``[n, d]`` only; strict ``<`` as in ``prdc`` (spec section 5).
    """
    x, y = _prep(real, fake, dtype)
    r_real = knn_radii(x, k, chunk_size)
    hits = torch.zeros((), dtype=F64, device=x.device)
    nearest = torch.full((x.shape[0],), float("inf"), dtype=dtype, device=x.device)
    for _, d2 in _sq_dist_chunks(y, x, chunk_size):
        hits += (d2 < r_real[None, :]).sum()
        nearest = torch.minimum(nearest, d2.min(0).values)
    density = hits.item() / (k * y.shape[0])
    return density, (nearest < r_real).double().mean().item()


# ---------------------------------------------------------------------------------------------
# MMD (spec section 7) - the estimator itself is core.kernels.mmd2_unbiased
# ---------------------------------------------------------------------------------------------

def mmd_gammas(reference: torch.Tensor, multipliers: Sequence[float] = (0.5, 1.0, 2.0),
               max_points: int = 2000) -> torch.Tensor:
    """Frozen bandwidths ``gamma [J]`` (float64) for the kernel ``mean_j exp(-d^2 / gamma_j)``.

    ``h_j = multiplier_j * median pairwise distance`` of ``reference [N, d]``, and
    ``gamma_j = 2 h_j^2`` so that each term is the spec's ``exp(-d^2 / (2 h_j^2))``. The median uses
    at most ``max_points`` rows (a fixed seed-0 random subset when N is larger) to bound memory.
    Compute once from a fixed real set and reuse, so values are comparable across runs.
    """
    ref = _f64(reference)
    _check_2d(ref, "reference", 2)
    if ref.shape[0] > max_points:
        idx = torch.randperm(ref.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
        ref = ref[idx.to(ref.device)]
    med = kernels.median_pairwise_distance(ref)
    if not med > 0:
        raise ValueError("reference set has zero median pairwise distance; cannot set MMD bandwidths")
    h = torch.as_tensor(multipliers, dtype=F64, device=ref.device) * med
    return 2 * h**2


def mmd(x: torch.Tensor, y: torch.Tensor, gammas) -> float:
    """Unbiased MMD^2_u between ``x [n, d]`` and ``y [m, d]`` (``core.kernels.mmd2_unbiased``, float64).

    The kernel *averages* the Gaussians over the bandwidths (``kappa(u, u) = 1``) where spec section 7
    writes a sum; this only rescales the value by 1/J. Can be negative; not clamped.
    """
    x, y = _f64(x), _f64(y)
    _check_2d(x, "x", 2)
    _check_2d(y, "y", 2)
    return float(kernels.mmd2_unbiased(x, y, _f64(gammas).to(x.device)))


# ---------------------------------------------------------------------------------------------
# Diversity (spec section 8)
# ---------------------------------------------------------------------------------------------

def _mean_pairwise_cosine(e: torch.Tensor) -> torch.Tensor:
    """Mean of ``e_i . e_j`` over unordered pairs ``i < j`` of L2-normalised rows ``e [n, d]``."""
    n = e.shape[0]
    g = e @ e.T
    return (g.sum() - g.diagonal().sum()) / (n * (n - 1))


def diversity_by_condition(features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per-condition diversity ``{label: 1 - mean_{i<j} cos}`` (conditions with < 2 samples skipped);
    their mean is :func:`diversity`, their spread gives a standard error over conditions."""
    f = _f64(features)
    _check_2d(f, "features")
    lab = torch.as_tensor(labels).to(f.device)
    return {int(c): 1.0 - _mean_pairwise_cosine(torch.nn.functional.normalize(f[lab == c], dim=1)).item()
            for c in torch.unique(lab) if int((lab == c).sum()) >= 2}


def diversity(features: torch.Tensor | Mapping[object, torch.Tensor],
              labels: torch.Tensor | None = None) -> float:
    """DP-DMD diversity: ``1 - mean_{i<j} cos(e_i, e_j)`` within each condition, averaged over
    conditions (spec section 8; dp_dmd.md section 7, official ``test_diversity.py``).

    ``features [N, d]`` with ``labels [N]`` (condition of each row; ``None`` = one condition), or a
    dict ``condition -> [n, d]``. Rows are L2-normalised, so the result ignores embedding norms.
    Conditions with fewer than 2 samples are skipped.
    """
    if isinstance(features, Mapping):
        groups = [_f64(v) for v in features.values()]
    else:
        f = _f64(features)
        _check_2d(f, "features")
        if labels is None:
            groups = [f]
        else:
            lab = torch.as_tensor(labels).to(f.device)
            groups = [f[lab == c] for c in torch.unique(lab)]
    sims = [_mean_pairwise_cosine(torch.nn.functional.normalize(g, dim=1)) for g in groups if g.shape[0] >= 2]
    if not sims:
        raise ValueError("diversity needs at least one condition with 2 or more samples")
    return 1.0 - torch.stack(sims).mean().item()
