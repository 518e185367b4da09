"""Mode metrics for samples from a known Gaussian mixture (BENCHMARKS.md "modes_covered";
specs/metrics.md section 6, after PacGAN's ``MetricLogger`` with ``dis_thre = 3``, arXiv 1712.04086)."""

from __future__ import annotations

import torch


def _f64(x, device: torch.device | None = None) -> torch.Tensor:
    x = x.detach() if isinstance(x, torch.Tensor) else x
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _per_axis_stds(stds, K: int, d: int, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar, ``[K]`` or ``[K, d]`` std to ``[K, d]`` float64."""
    s = _f64(stds, device)
    if s.ndim == 1 and s.shape[0] == K:
        s = s[:, None]
    s = s.expand(K, d)
    if (s <= 0).any():
        raise ValueError("mode stds must be positive")
    return s


def nearest_mode(samples: torch.Tensor, means: torch.Tensor, stds) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest mode ``k* [N]`` and its standardised distance ``delta [N]``, where
    ``delta_k = ||(y - mu_k) / s_k||`` with per-axis stds ``s_k`` (spec section 6, step 1)."""
    y = _f64(samples)
    mu = _f64(means, y.device)
    K, d = mu.shape
    if y.ndim != 2 or y.shape[1] != d:
        raise ValueError(f"samples must be [N, {d}] to match means [{K}, {d}], got {list(y.shape)}")
    s = _per_axis_stds(stds, K, d, y.device)
    delta = (((y[:, None, :] - mu[None]) / s[None]) ** 2).sum(-1).sqrt()  # [N, K]
    dmin, k_star = delta.min(1)
    return k_star, dmin


def mode_metrics(samples: torch.Tensor, means: torch.Tensor, stds, weights=None, threshold: float = 3.0,
                 min_share: float = 0.25) -> dict[str, float | int]:
    """Mode coverage and quality of ``samples [N, d]`` against a mixture with ``means [K, d]``,
    per-axis ``stds [K, d]`` (or ``[K]`` / scalar) and ``weights [K]`` (``None`` = equal).

    A sample is high-quality (HQ) when its standardised distance to the nearest mode is strictly
    ``< threshold`` (PacGAN: "within 3 std"); it then counts for that mode (``c_k``). Returns

    * ``modes_covered``: #modes with ``c_k >= min_share * weights_k * N`` (BENCHMARKS.md: 25% of the
      expected share) and ``c_k >= 1`` (only matters for zero-weight modes or ``min_share = 0``);
    * ``modes_covered_any``: #modes with ``c_k >= 1`` (PacGAN's rule);
    * ``modes_total``: K;
    * ``hq_rate``: ``sum_k c_k / N``;
    * ``mode_mass_tv``: ``1/2 sum_k |c_k / sum c - weights_k|``: the shares are taken over the HQ
      samples only (so it measures the balance between modes, not quality); 1.0 if no sample is HQ.
    """
    k_star, dmin = nearest_mode(samples, means, stds)
    N, K, dev = k_star.shape[0], len(means), k_star.device
    w = torch.full((K,), 1.0 / K, dtype=torch.float64, device=dev) if weights is None else _f64(weights, dev)
    if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
    w = w / w.sum()
    hq = dmin < threshold
    counts = torch.bincount(k_star[hq], minlength=K).to(torch.float64)
    n_hq = counts.sum()
    tv = 0.5 * (counts / n_hq - w).abs().sum().item() if n_hq > 0 else 1.0
    return {
        "modes_covered": int((counts >= (min_share * w * N).clamp_min(1)).sum()),
        "modes_covered_any": int((counts >= 1).sum()),
        "modes_total": K,
        "hq_rate": n_hq.item() / N if N else 0.0,
        "mode_mass_tv": tv,
    }
