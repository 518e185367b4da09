"""Plain Drifting (Deng et al., arXiv 2602.04770; specs/drifting.md part A) as a no-teacher baseline.

The student's samples drift in raw data space (vectors: coordinates; images: flattened pixels)
toward real samples of the same label, with the generated samples as self-negatives and the
temperatures of spec A5. No teacher features, no critic: the arm that isolates what the teacher's
features add in TFD (losses/tfd.py). The digits feature network is deliberately not offered as a
feature space: it is the network the benchmark's metrics are computed in.

Also home of the helpers TFD shares: grouping by label (spec A3), reference draws (real samples of
the group's label, or samples of the teacher, spec B8) and the teacher-sample pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fewstep.core.drift import TEMPERATURES, drift_loss, group_indices
from fewstep.core.sampling import karras_sigmas, sample_heun
from fewstep.errors import ConfigError
from fewstep.losses.base import Batch, GenOut, LossOutput, Method, MethodEntry, Nets, Term, refuse_guidance

# no critic: the generator updates every iteration (the engine's critic_update returns at once)
DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": False, "critic_first": False},
            "student": {"steps": 1},
            "optim": {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "grad_clip": 10.0}}


@dataclass
class DriftConfig:
    features: str = "raw"         # feature space: raw (coordinates / flattened pixels); nothing else yet
    temperatures: list[float] = field(default_factory=lambda: list(TEMPERATURES))  # spec A5
    n_per_group: int = 0          # generated samples per group (0 = the whole batch / smallest label count)
    n_pos: int = 0                # positives per group (0 = n_per_group)
    self_neg: bool = True         # generated samples are each other's negatives (spec A2)
    affinity_floor: float = 0.0   # A = sqrt(max(row * col, floor)): spec A2 has 1e-6, which collapses
    #                               a concentrated start when P is large (docs/drifting.md); 0 = no floor
    positives: str = "real"       # real (data of the group's label) | teacher (pool of teacher samples)
    teacher_pool: int = 2048      # positives: teacher -> pool size, sampled once with Heun
    teacher_nfe: int = 35         # ... at this NFE (deterministic, spec B8)


# ---------------------------------------------------------------------------------------------
# shared helpers (also used by losses/tfd.py)
# ---------------------------------------------------------------------------------------------
@dataclass
class Groups:
    """Groups of one condition (spec A3): sample indices ``idx [G, N]``, labels ``[G]`` or None."""

    idx: torch.Tensor
    labels: torch.Tensor | None

    @property
    def G(self) -> int:
        return self.idx.shape[0]

    @property
    def N(self) -> int:
        return self.idx.shape[1]

    def cond(self, k: int, device) -> torch.Tensor | None:
        """Labels ``[G * k]`` for ``k`` samples per group (group-major), or None."""
        return None if self.labels is None else self.labels.repeat_interleave(k).to(device)


def make_groups(cond: torch.Tensor | None, n: int, per_group: int, device) -> Groups:
    """Groups of the batch's ``n`` samples by label (``core.drift.group_indices``), indices on ``device``."""
    idx, labels = group_indices(cond, n, per_group)
    return Groups(idx.to(device), labels)


def stream_generator(rnd, stream: str) -> torch.Generator:
    """A CPU generator for draws whose size is not the batch (``StepRandom.generator``)."""
    return rnd.generator(stream)


class TeacherPool:
    """Samples of the teacher (deterministic Heun, spec B8), balanced over labels; the reference set
    when the user has no data (``positives: teacher``)."""

    def __init__(self, n: int, nfe: int, shape, num_classes: int, seed: int):
        self.n, self.nfe, self.shape, self.num_classes, self.seed = n, nfe, tuple(shape), num_classes, seed
        self.x = self.y = None

    @torch.no_grad()
    def build(self, teacher) -> None:
        device = next(teacher.parameters(), torch.zeros(())).device
        g = torch.Generator().manual_seed(self.seed + 104729)
        z = torch.randn(self.n, *self.shape, generator=g, dtype=torch.float64)
        y = torch.arange(self.n) % self.num_classes if self.num_classes else None
        sigma_max = min(float(getattr(teacher, "sigma_max", 80.0)), 80.0)
        sigmas = karras_sigmas((self.nfe + 1) // 2, sigma_max=sigma_max).to(device)
        xs = []
        for lo in range(0, self.n, 512):
            c = None if y is None else y[lo:lo + 512].to(device)
            xs.append(sample_heun(teacher, z[lo:lo + 512].to(device) * sigmas[0], sigmas, c).float())
        self.x, self.y = torch.cat(xs), y

    def draw(self, labels_or_n, generator: torch.Generator) -> torch.Tensor:
        """``n`` pool samples, or one per label in ``labels`` with that label."""
        if isinstance(labels_or_n, int):
            return self.x[torch.randint(self.n, (labels_or_n,), generator=generator)]
        labels = labels_or_n.cpu()
        out = torch.empty(len(labels), *self.x.shape[1:], device=self.x.device)
        for c in labels.unique().tolist():
            pool = (self.y == c).nonzero().flatten()
            sel = labels == c
            pick = pool[torch.randint(len(pool), (int(sel.sum()),), generator=generator)]
            out[sel.to(out.device)] = self.x[pick]
        return out


def draw_reference(batch: Batch, groups: Groups, k: int, stream: str, pool: TeacherPool | None,
                   like: torch.Tensor) -> torch.Tensor:
    """``k`` reference samples per group with the group's label, group-major ``[G * k, *shape]``:
    real data (``batch.draw_real``) or, with a teacher pool, teacher samples."""
    what = groups.G * k if groups.labels is None else groups.labels.repeat_interleave(k)
    if pool is not None:
        return pool.draw(what, stream_generator(batch.rnd, stream)).to(like)
    return batch.draw_real(what, stream).to(like)


def check_common(cfg) -> None:
    if cfg.positives not in ("real", "teacher"):
        raise ConfigError(f"positives must be real or teacher, got '{cfg.positives}'")
    if not cfg.temperatures or min(cfg.temperatures) <= 0:
        raise ConfigError(f"temperatures must be a non-empty list of positive numbers, "
                          f"got {cfg.temperatures}")
    if cfg.affinity_floor < 0:
        raise ConfigError(f"affinity_floor must be >= 0, got {cfg.affinity_floor}")
    if cfg.n_per_group < 0 or cfg.n_pos < 0:
        raise ConfigError("n_per_group and n_pos must be >= 0 (0 = automatic)")


# ---------------------------------------------------------------------------------------------
# the term
# ---------------------------------------------------------------------------------------------
class Drift(Term):
    """Drifting loss on the student's raw samples (spec A2): one call, groups = labels."""

    name, phase, uses_sample = "drift", "generator", True

    def __init__(self, cfg: DriftConfig, pool: TeacherPool | None = None):
        self.cfg, self.pool = cfg, pool

    def setup(self, nets: Nets, ctx) -> None:
        if self.pool is not None and self.pool.x is None:
            self.pool.build(nets.teacher)

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        self.setup(nets, None)
        x = gen.x
        groups = make_groups(batch.cond, x.shape[0], self.cfg.n_per_group, x.device)
        P = self.cfg.n_pos or groups.N
        pos = draw_reference(batch, groups, P, "drift_pos", self.pool, x)
        xg = x[groups.idx.flatten()].flatten(1).view(groups.G, groups.N, -1)
        r = drift_loss(xg, pos.flatten(1).view(groups.G, P, -1), self_neg=self.cfg.self_neg,
                       temperatures=self.cfg.temperatures, floor=self.cfg.affinity_floor)
        loss = r.loss.mean()
        logs = {"drift": loss.detach(), "drift_s": r.s, "drift_groups": torch.tensor(float(groups.G)),
                "drift_used": torch.tensor(groups.G * groups.N / x.shape[0])}
        logs.update({f"drift_v2_t{t:g}": v for t, v in zip(self.cfg.temperatures, r.raw)})
        return LossOutput(loss.to(x.dtype), logs)


def build(cfg: DriftConfig, ctx) -> Method:
    check_common(cfg)
    refuse_guidance(ctx, "drift", "uses no teacher score (it drifts toward real data or teacher samples)")
    if cfg.features != "raw":
        raise ConfigError(f"drift.features must be 'raw' (got '{cfg.features}'); the digits feature "
                          "network is the metric network and is not offered as a training feature space")
    pool = (TeacherPool(cfg.teacher_pool, cfg.teacher_nfe, ctx.shape, ctx.num_classes, ctx.seed)
            if cfg.positives == "teacher" else None)
    return Method(terms=[Drift(cfg, pool)], needs_fake=False)


METHOD = MethodEntry(DriftConfig, build, DEFAULTS)
