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


def class_mode_metrics(samples: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, stds,
                       mode_labels: torch.Tensor, weights=None, threshold: float = 3.0,
                       min_share: float = 0.25) -> dict[str, float | int]:
    """Within-class coverage of class-conditional samples ``[N, d]`` with their labels ``[N]``
    against a labelled mixture (``mode_labels [K]``: the class of each mode; specs/guidance.md 4).

    A sample counts for mode k when k is its nearest mode over *all* modes, within ``threshold``
    (as :func:`mode_metrics`) and of the sample's own class. For each class c with samples, the
    :func:`mode_metrics` rules are applied to its samples and its own modes with the within-class
    weights ``w_k / sum_{class c} w``. Returns the mean over those classes of modes covered
    (``class_modes_covered``), its minimum (``class_modes_covered_min``), of modes per class
    (``class_modes_total``) and of the HQ in-class shares' total variation from the within-class
    weights (``class_mode_tv``: within-class collapse), and ``class_hit_rate``: the fraction of
    samples that are HQ at a mode of their own class."""
    k_star, dmin = nearest_mode(samples, means, stds)
    dev, K = k_star.device, len(means)
    modes = _f64(mode_labels, dev).long()
    y = _f64(labels, dev).long()
    w = torch.ones(K, dtype=torch.float64, device=dev) if weights is None else _f64(weights, dev)
    hit = (dmin < threshold) & (modes[k_star] == y)
    covered, totals, tvs = [], [], []
    for c in y.unique().tolist():
        own, sel = (modes == c).nonzero().flatten(), y == c
        if len(own) == 0:
            raise ValueError(f"label {c} names no mode of the mixture")
        counts = torch.bincount(k_star[sel & hit], minlength=K)[own].to(torch.float64)
        wc = w[own] / w[own].sum()
        n_c, n_hq = int(sel.sum()), counts.sum()
        covered.append(int((counts >= (min_share * wc * n_c).clamp_min(1)).sum()))
        totals.append(len(own))
        tvs.append(0.5 * (counts / n_hq - wc).abs().sum().item() if n_hq > 0 else 1.0)
    n = len(y)
    return {"class_modes_covered": sum(covered) / len(covered), "class_modes_covered_min": min(covered),
            "class_modes_total": sum(totals) / len(totals), "class_mode_tv": sum(tvs) / len(tvs),
            "class_hit_rate": hit.double().sum().item() / n if n else 0.0}
