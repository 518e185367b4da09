"""The drifting field (Deng et al., "Generative Modeling via Drifting", arXiv 2602.04770) and the
anchor-margin coverage loss of Teacher-Feature Drifting (arXiv 2605.07327); specs/drifting.md A2, B7.

``drift_loss`` is the batched algorithm of the official ``drift_loss`` (spec A2) step by step:
groups ``G`` are independent kernel problems (one per condition) that share only the scale ``s`` and
the per-temperature normalisers ``lambda_tau``. The field never carries gradient; the loss
``mean_{i,d}(x/c - sg(x~0 + V))^2`` has ``d(mean_g loss_g)/dx = -2 V / (G N D c)`` (spec A2 "Facts").
Pure torch: no I/O, no training imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fewstep.core.utils import full_precision

TEMPERATURES = (0.02, 0.05, 0.2)  # spec A5 (paper Table 8)
SELF_MASK = 100.0                 # spec A2 step 4: official code; never -inf (N = 1 would give NaN)
AFFINITY_FLOOR = 1e-6             # spec A2 step 5: A = sqrt(max(row * col, floor)); 0 = the 2-D toy notebook


@dataclass
class DriftResult:
    """Output of :func:`drift_loss` (all but ``loss`` detached)."""

    loss: torch.Tensor     # [G] per-group loss mean_{i,d}(x/c - sg(x~0 + V))^2 (normalised: ~1 per tau)
    V: torch.Tensor        # [G, N, D] the field in scaled units, sum_tau V_tau / lambda_tau
    s: torch.Tensor        # [] mean weighted distance (one scalar per call, self-distances included)
    c: torch.Tensor        # [] coordinate scale max(s / sqrt(D), 1e-3)
    raw: torch.Tensor      # [T] raw mean(V_tau^2) per temperature (the convergence signal to log)


@full_precision
def pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[..., n, m]`` between ``a [..., n, D]`` and ``b [..., m, D]``.

    ``torch.cdist`` as the official code and the port use it: exact differences up to 25 rows, the
    matrix-product form ``|a|^2 + |b|^2 - 2ab`` above (30x faster on CPU at D = 256; coincident points
    then sit at rounding level instead of exactly 0, which only moves the self-distances of step 2)."""
    return torch.cdist(a, b)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _targets(x0, pos, neg, w: float, self_neg: bool):
    """Step 1: targets ``T = [x0 (self_neg), Y^u, Y^+]`` ``[G, K, D]``, column weights ``omega [K]``,
    and the number of negative columns."""
    parts, weights = [], []
    if self_neg:
        parts.append(x0)
        weights.append(x0.new_ones(x0.shape[1]))
    if neg is not None:
        parts.append(neg.to(x0))
        weights.append(x0.new_full((neg.shape[1],), float(w)))
    n_neg = sum(p.shape[1] for p in parts)
    parts.append(pos.to(x0))
    weights.append(x0.new_ones(pos.shape[1]))
    return torch.cat(parts, dim=1), torch.cat(weights), n_neg


def _scale(d: torch.Tensor, omega: torch.Tensor, D: int):
    """Step 3: ``s = mean_{g,i,j}(omega_j d_ij) / mean(omega)`` (one scalar for the call) and
    ``c = max(s/sqrt(D), 1e-3)``."""
    s = (d * omega).mean() / omega.mean()
    c = torch.clamp(s / D**0.5, min=1e-3)
    return s, c


def scaled_distances(x0, T, omega, self_neg: bool, mask: float = SELF_MASK):
    """Steps 2-4: ``d_hat [G, N, K]`` (distances / max(s, 1e-3), self-pairs + ``mask``), ``s``, ``c``
    for queries ``x0 [G, N, D]`` and targets ``T [G, K, D]`` (the first N of them ``x0`` if self_neg)."""
    G, N, D = x0.shape
    d = torch.sqrt(torch.clamp(pairwise_dist(x0, T) ** 2, min=1e-8))       # step 2
    s, c = _scale(d, omega, D)                                               # step 3
    d_hat = d / torch.clamp(s, min=1e-3)
    if self_neg:                                                             # step 4
        idx = torch.arange(N, device=x0.device)
        d_hat[:, idx, idx] += mask
    return d_hat, s, c


def affinity(d_hat, omega, tau: float, floor: float = AFFINITY_FLOOR) -> torch.Tensor:
    """Step 5: ``A = sqrt(max(softmax_row(l) * softmax_col(l), floor)) * omega`` with ``l = -d_hat/tau``;
    rows: a query's targets, columns: the group's N queries. ``[G, N, K]``.

    The floor (1e-6 in the official ImageNet code) gives every pair an affinity of at least 1e-3, so
    ``P`` far-away positives still pull each query toward their plain mean with total weight
    ``1e-3 P``; with many positives in low dimension (2-D toys, P = 256) that pull can dominate the
    kernel (docs/drifting.md); ``floor=0`` is the Drifting paper's 2-D toy notebook (no floor)."""
    logits = -d_hat / tau
    return torch.sqrt(torch.clamp(logits.softmax(dim=-1) * logits.softmax(dim=-2), min=floor)) * omega


def _field_tau(d_hat, omega, T_neg, T_pos, n_neg: int, tau: float, floor: float) -> torch.Tensor:
    """Step 5 for one temperature: ``V_tau [G, N, D]`` in the scaled coordinates of ``T_neg``, ``T_pos``."""
    A = affinity(d_hat, omega, tau, floor)
    A_neg, A_pos = A[..., :n_neg], A[..., n_neg:]
    S_pos, S_neg = A_pos.sum(-1, keepdim=True), A_neg.sum(-1, keepdim=True)
    # two separate matmuls (choice, spec A2): V is bitwise 0 when positives and negatives coincide
    return S_neg * (A_pos @ T_pos) - S_pos * (A_neg @ T_neg)


@full_precision
def drift_field(x, pos, neg=None, w: float = 1.0, self_neg: bool = True,
                temperatures: Sequence[float] = TEMPERATURES, mask: float = SELF_MASK,
                floor: float = AFFINITY_FLOOR):
    """Steps 1-6 of spec A2 under ``no_grad`` -> ``(V [G, N, D] scaled units, s, c, raw [T])``.

    ``x [G, N, D]`` generated, ``pos [G, P, D]`` positives, ``neg [G, U, D]`` extra negatives with
    column weight ``w``; ``self_neg``: the generated samples are each other's negatives.
    """
    if not self_neg and neg is None:
        raise ValueError("drift_field needs negatives: self_neg=True or explicit neg")
    with torch.no_grad():
        x0 = x.detach().to(_compute_dtype(x))
        T, omega, n_neg = _targets(x0, pos, neg, w, self_neg)                # step 1
        d_hat, s, c = scaled_distances(x0, T, omega, self_neg, mask)         # steps 2-4
        T_s = T / c
        V, raw = torch.zeros_like(x0), []
        for tau in temperatures:                                             # step 5
            V_tau = _field_tau(d_hat, omega, T_s[:, :n_neg], T_s[:, n_neg:], n_neg, tau, floor)
            ms = V_tau.pow(2).mean()
            raw.append(ms)
            V = V + V_tau / torch.sqrt(torch.clamp(ms, min=1e-8))            # step 6
    return V, s, c, torch.stack(raw)


@full_precision
def drift_loss(x, pos, neg=None, w: float = 1.0, self_neg: bool = True,
               temperatures: Sequence[float] = TEMPERATURES, mask: float = SELF_MASK,
               floor: float = AFFINITY_FLOOR) -> DriftResult:
    """The drifting loss of spec A2 (step 7): ``loss_g = mean_{i,d}(x/sg(c) - sg(x~0 + V))^2``.

    ``x [G, N, D]`` (with gradient; computed in float64 if ``x`` is float64, else float32),
    ``pos [G, P, D]``, optional ``neg [G, U, D]`` weighted ``w``. Returns per-group losses ``[G]``;
    the caller averages over groups. No gradient reaches ``pos``/``neg``.
    """
    if x.ndim != 3 or pos.ndim != 3 or pos.shape[0] != x.shape[0] or pos.shape[2] != x.shape[2]:
        raise ValueError(f"drift_loss needs x [G, N, D] and pos [G, P, D], got {list(x.shape)}, "
                         f"{list(pos.shape)}")
    V, s, c, raw = drift_field(x, pos, neg, w, self_neg, temperatures, mask, floor)
    xc = x.to(V.dtype)
    target = xc.detach() / c + V
    loss = (xc / c - target).pow(2).mean(dim=(1, 2))
    return DriftResult(loss=loss, V=V, s=s, c=c, raw=raw)


@full_precision
def anchor_margin_loss(gen: torch.Tensor, anchors: torch.Tensor, alpha: float = 0.5,
                       h: float | torch.Tensor | None = None):
    """Anchor-margin coverage loss (spec B7, the port's ``anchor_margin_loss``) on raw features.

    ``gen [G, N, D]`` (differentiable), ``anchors [G, M, D]``. Bandwidth ``h``: given, or the median of
    every anchor-generated distance over all groups (detached, >= 1e-6; ``torch.median``, i.e. the
    lower median for an even count). With ``s_gen(m) = mean_i exp(-|a_m - x_i| / h)`` and
    ``s_anc(m) = mean_{m' != m} exp(-|a_m - a_m'| / (2h))`` (0 if M = 1):
    ``L_g = mean_m relu(alpha s_anc(m) - s_gen(m))``.

    Returns ``(loss [G], covered_fraction [], h [])``; an anchor is covered when its margin is <= 0.
    """
    G, M, _ = anchors.shape
    anchors = anchors.detach().to(gen.dtype)
    d_ag = pairwise_dist(anchors, gen)                                 # [G, M, N], grad via gen
    if h is None:
        h = d_ag.detach().flatten().median()
    h = torch.clamp(torch.as_tensor(h, dtype=gen.dtype, device=gen.device).detach(), min=1e-6)
    s_gen = torch.exp(-d_ag / h).mean(dim=-1)                          # [G, M]
    with torch.no_grad():
        if M > 1:
            K_aa = torch.exp(-pairwise_dist(anchors, anchors) / (2 * h))
            eye = torch.eye(M, dtype=torch.bool, device=gen.device)
            s_anc = K_aa.masked_fill(eye, 0).sum(-1) / (M - 1)
        else:
            s_anc = torch.zeros(G, M, dtype=gen.dtype, device=gen.device)
    margin = alpha * s_anc - s_gen
    covered = (margin.detach() <= 0).to(gen.dtype).mean()
    return torch.relu(margin).mean(dim=-1), covered, h


def group_indices(labels: torch.Tensor | None, n: int, per_group: int = 0):
    """Split ``n`` samples into equal-size groups of one condition (spec A3).

    ``labels [n]`` (None = unconditional: one label). Each label's samples (in batch order) are cut
    into ``floor(count / N)`` groups of ``N`` samples; leftovers get no loss. ``N = per_group`` if some
    label has that many samples, else (automatic) the smallest count among the labels present, but at
    least 2 (a group of one has no self-negative); unconditional: ``N = per_group`` or all ``n``.
    Returns ``(idx [G, N] long, group_labels [G] | None)``.
    """
    if labels is None:
        N = per_group if 0 < per_group <= n else n
        return torch.arange(n // N * N).view(n // N, N), None
    labels = labels.flatten().cpu()
    values, counts = labels.unique(return_counts=True)
    most = int(counts.max())
    N = per_group if 0 < per_group <= most else max(int(counts.min()), min(2, most))
    groups, glabels = [], []
    for v, cnt in zip(values.tolist(), counts.tolist()):
        members = (labels == v).nonzero().flatten()
        for k in range(cnt // N):
            groups.append(members[k * N:(k + 1) * N])
            glabels.append(v)
    return torch.stack(groups), torch.tensor(glabels, dtype=torch.long)
