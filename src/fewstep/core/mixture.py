"""Analytic Gaussian mixture: sampling, log-density, exact score and denoiser at any sigma.

``p_0 = sum_k pi_k N(mu_k, Sigma_k)`` diffuses to ``p_sigma = sum_k pi_k N(mu_k, Sigma_k + sigma^2 I)``.
Tweedie: ``D(x; sigma) = x + sigma^2 grad ln p_sigma(x) = sum_k r_k(x) [mu_k + Sigma_k (Sigma_k +
sigma^2 I)^-1 (x - mu_k)]`` (spec edm_core.md section 7). Computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fewstep.core.utils import as_sigma


class GaussianMixture:
    """A mixture with means ``[K, d]``, covariances ``[K, d, d]`` and weights ``[K]`` (float64).

    Build isotropic mixtures with :meth:`isotropic`. The condition of a class-conditional teacher
    is the component index, or, for a *labelled* mixture (``labels [K]``: the class of each
    component, every class 0..C-1 owning at least one), the class: ``p(x | c)`` is the mixture of
    class c's components with their weights renormalised (grid25c: class = row, 5 modes each).
    """

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        K, d = means.shape
        if covs.shape != (K, d, d):
            raise ValueError(f"covariances must be [K, d, d] = [{K}, {d}, {d}], got {list(covs.shape)}")
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be K non-negative numbers with a positive sum")
        self.means, self.covs = means, covs
        self.weights = weights / weights.sum()
        self.chol = torch.linalg.cholesky(covs)  # raises on non-PD covariances
        iso = torch.diagonal(covs, dim1=1, dim2=2)
        self.isotropic_stds = iso[:, 0].sqrt() if torch.allclose(
            covs, torch.diag_embed(iso[:, :1].expand(K, d))) else None
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels is not None and (self.labels.shape != (K,) or self.labels.min() < 0 or
                                        len(self.labels.unique()) != int(self.labels.max()) + 1):
            raise ValueError(f"labels must be {K} class indices using every class 0..C-1")

    @classmethod
    def isotropic(cls, means, stds, weights=None, labels=None) -> GaussianMixture:
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(means.shape[0])
        eye = torch.eye(means.shape[1], dtype=torch.float64)
        return cls(means, stds[:, None, None] ** 2 * eye, weights, labels)

    @property
    def num_classes(self) -> int:
        """Classes of a conditional model of this mixture: C for labelled mixtures, else K."""
        return int(self.labels.max()) + 1 if self.labels is not None else self.num_components

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mode_stds(self) -> torch.Tensor:
        """Per-axis standard deviation of each component ``[K, d]`` (for mode metrics)."""
        return torch.diagonal(self.covs, dim1=1, dim2=2).sqrt()

    def sample(self, n: int, generator: torch.Generator | None = None,
               cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` points ``[n, d]`` and their labels ``[n]`` (the component, or its class for a
        labelled mixture); ``cond`` fixes the labels (a class: its components by their weights)."""
        if cond is None:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        elif self.labels is None:
            comp = cond
        else:
            within = self.weights[None] * (self.labels[None] == cond.long()[:, None])
            comp = torch.multinomial(within, 1, generator=generator)[:, 0]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + torch.einsum("nij,nj->ni", self.chol[comp], z)
        return x, comp if self.labels is None else self.labels[comp]

    def _component_log_probs(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``ln pi_k + ln N(x; mu_k, Sigma_k + sigma^2 I)`` as ``[B, K]``."""
        cov = self.covs[None] + (sigma**2)[:, None, None, None] * torch.eye(self.dim, dtype=x.dtype)
        L = torch.linalg.cholesky(cov)  # [B, K, d, d]
        diff = x[:, None, :] - self.means[None]  # [B, K, d]
        sol = torch.linalg.solve_triangular(L, diff[..., None], upper=False)[..., 0]
        logdet = 2 * torch.diagonal(L, dim1=-2, dim2=-1).log().sum(-1)
        log_n = -0.5 * (self.dim * math.log(2 * math.pi) + logdet + (sol**2).sum(-1))
        return self.weights.log()[None] + log_n

    def _restrict(self, logits: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Class-conditional: keep only the labelled component, or the labelled class's components
        (labels < 0 mean unconditional: the null label of guidance)."""
        if cond is None:
            return logits
        cond = cond.long()
        if self.labels is None:
            keep = torch.nn.functional.one_hot(cond.clamp(min=0), self.num_components).bool()
        else:
            keep = self.labels[None] == cond[:, None]
        keep |= (cond < 0)[:, None]
        return logits.masked_fill(~keep, -math.inf)

    def log_prob(self, x: torch.Tensor, sigma=0.0, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``ln p_sigma(x)`` ``[B]`` (``cond`` renormalises to the labelled component)."""
        x = x.double()
        logits = self._restrict(self._component_log_probs(x, as_sigma(sigma, x)), cond)
        total = logits.logsumexp(dim=1)
        if cond is not None:
            total = total - self._restrict(self.weights.log()[None].expand_as(logits), cond).logsumexp(1)
        return total

    def responsibilities(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """``r_k(x) = softmax_k[ln pi_k + ln N(x; mu_k, Sigma_k + sigma^2 I)]`` ``[B, K]``."""
        x = x.double()
        return self._restrict(self._component_log_probs(x, as_sigma(sigma, x)), cond).softmax(dim=1)

    def denoise(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``D(x; sigma) = E[x_0 | x_sigma = x]`` ``[B, d]`` in float64."""
        x = x.double()
        sigma = as_sigma(sigma, x)
        r = self.responsibilities(x, sigma, cond)
        cov = self.covs[None] + (sigma**2)[:, None, None, None] * torch.eye(self.dim, dtype=x.dtype)
        diff = x[:, None, :] - self.means[None]
        gain = self.covs[None] @ torch.linalg.solve(cov, diff[..., None])  # Sigma_k (.)^-1 (x - mu_k)
        per_k = self.means[None] + gain[..., 0]
        return (r[..., None] * per_k).sum(dim=1)

    def score(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """``grad ln p_sigma(x) = (D(x; sigma) - x) / sigma^2``."""
        x = x.double()
        sigma = as_sigma(sigma, x)
        return (self.denoise(x, sigma, cond) - x) / sigma[:, None] ** 2

    def to_dict(self) -> dict:
        d = {"means": self.means.tolist(), "covs": self.covs.tolist(), "weights": self.weights.tolist()}
        if self.labels is not None:
            d["labels"] = self.labels.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GaussianMixture:
        return cls(torch.tensor(d["means"]), torch.tensor(d["covs"]), torch.tensor(d["weights"]),
                   d.get("labels"))


class MixtureDenoiser(nn.Module):
    """The exact mixture denoiser behind the ``D(x, sigma, cond)`` contract (an analytic teacher).

    ``conditional=True`` makes the component index (labelled mixtures: the class) the condition;
    label -1 is the exact unconditional denoiser, so a conditional one is guidable
    (``null_label = -1``, ``core.guidance``): the exact guided teacher is a test oracle.
    """

    def __init__(self, mixture: GaussianMixture, conditional: bool = False, null_label: int = -1):
        super().__init__()
        self.mixture = mixture
        self.num_classes = mixture.num_classes if conditional else 0
        # another null label (a network teacher's, e.g. its last class) is read as -1, so the exact
        # denoiser can stand in for that teacher (distill teacher_score=exact)
        self.null_label = null_label if conditional else None
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, math.inf, 0.5
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        cond = cond if self.num_classes else None
        if cond is not None and self.null_label != -1:
            cond = torch.where(cond == self.null_label, torch.full_like(cond, -1), cond)
        # differentiable in x (SiD backpropagates through the teacher); mixture lives on the CPU
        D = self.mixture.denoise(x.cpu(), as_sigma(sigma, x).detach().cpu(),
                                 None if cond is None else cond.cpu())
        return D.to(device=x.device, dtype=x.dtype)


def ring8(radius: float = 2.0, std: float = 0.05) -> GaussianMixture:
    """8 equal-weight isotropic Gaussians at angles 2 pi k / 8 (BENCHMARKS.md)."""
    ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    return GaussianMixture.isotropic(torch.stack([radius * ang.cos(), radius * ang.sin()], 1), std)


def grid25(spacing: float = 2.0, std: float = 0.05, labelled: bool = False) -> GaussianMixture:
    """25 equal-weight isotropic Gaussians on {-4,-2,0,2,4}^2 (the PacGAN setting). ``labelled``:
    class = row (the index of the y coordinate), 5 classes of 5 modes each (grid25c)."""
    g = torch.arange(-2, 3, dtype=torch.float64) * spacing
    means = torch.cartesian_prod(g, g)  # means[k] = (g[k // 5], g[k % 5])
    return GaussianMixture.isotropic(means, std, labels=torch.arange(25) % 5 if labelled else None)
