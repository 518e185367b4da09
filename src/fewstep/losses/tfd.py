"""Teacher-Feature Drifting (arXiv 2605.07327; specs/drifting.md part B).

A one-step student trained only by drifting (core/drift.py, spec A2) in the frozen teacher's own
hidden states plus the anchor-margin coverage loss (spec B7); no fake score, no discriminator.
Per tap ``l`` (spec B6): ``L = sum_l [mean_g L_drift(phi_l(x_g), phi_l(Y+_g)) + w_cov mean_g
L_cov(phi_l(x_g), phi_l(A_g))]`` with ``phi_l(x) = flatten(AvgPool4x4(h_l(x + sigma_f xi; sigma_f, c)))``
(spec B3). Vector data additionally drift the raw coordinates (spec B11). Gradients reach the
student through the frozen teacher on the generated branch only; positives and anchors (real
samples of the group's label, or teacher samples) run under ``no_grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fewstep.core.drift import TEMPERATURES, anchor_margin_loss, drift_loss
from fewstep.core.utils import append_dims
from fewstep.errors import ConfigError
from fewstep.losses.base import Batch, GenOut, LossOutput, Method, MethodEntry, Nets, Term, refuse_guidance
from fewstep.losses.drift import (
    Groups,
    TeacherPool,
    check_common,
    draw_reference,
    make_groups,
    stream_generator,
)
from fewstep.models.taps import capture, edm_taps, mlp_blocks, raw_unet, resolve_module

__all__ = ["DEFAULTS", "TFDConfig", "build", "default_taps", "pool_feature", "tap_features"]

# no critic (spec B1): ratio 1 and the engine's critic_update returns at once; one-step student (B2);
# AdamW lr 1e-4 (B11, vectors), weight decay 0.01 and clip 10 (B9)
DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": False, "critic_first": False},
            "student": {"steps": 1},
            "optim": {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "grad_clip": 10.0}}

RAW = "raw"              # the name of the raw-coordinate "tap" (spec B11 (i))
SIGMA_F_REF_STD = 0.5    # std of [-1, 1] image data, the scale sigma_f = 0.1 refers to (spec B11)


@dataclass
class TFDConfig:
    taps: list[str] = field(default_factory=list)  # module paths to tap ([] = tap_set defaults, spec B3/B11)
    tap_set: str = "mixed"        # defaults: mixed (spec B3: enc/bottleneck/dec; MLP: every hidden
    #                               block) | deep (UNet mid_block; MLP last hidden block)
    raw_coords: bool = True       # vector data: also drift the raw coordinates (spec B11; images: ignored)
    sigma_f: float = 0.1          # feature noise level in [-1, 1]-data units (spec B4)
    sigma_f_mode: str = "auto"    # auto (images: sigma_f; vectors: sigma_f * std/0.5, spec B11) |
    #                               absolute (sigma_f as given) | relative (sigma_f * std/0.5 always)
    sigma_f_dist: str = "fixed"   # fixed | lognormal (port: exp(N(-1.2, 1.2^2)) truncated to [0.02, 0.1],
    #                               one draw per group, scaled as sigma_f_mode says; sigma_f unused)
    temperatures: list[float] = field(default_factory=lambda: list(TEMPERATURES))  # spec B6 / Table 4
    affinity_floor: float = 0.0   # A = sqrt(max(row * col, floor)): spec A2 has 1e-6, which collapses
    #                               a concentrated start when P is large (docs/drifting.md); 0 = no floor
    w_cov: float = 1.0            # coverage-loss weight (spec B6)
    alpha: float = 0.5            # anchor-margin factor (spec B7)
    cov_h: float = 0.0            # coverage bandwidth h (0 = median anchor-generated distance, spec B7)
    coverage: bool = True         # false = the "tfd without coverage" arm
    n_per_group: int = 0          # generated samples per group (0 = whole batch / smallest label count)
    n_pos: int = 0                # positives per group (0 = n_per_group)
    n_anchor: int = 0             # anchors per group (0 = n_per_group)
    positives: str = "real"       # real (data of the group's label) | teacher (teacher-sample pool, B8)
    teacher_pool: int = 2048      # positives: teacher -> pool size, sampled once with Heun
    teacher_nfe: int = 35         # ... at this NFE


# ---------------------------------------------------------------------------------------------
# features (spec B3, B11)
# ---------------------------------------------------------------------------------------------
def _path_of(D, module) -> str:
    return next(name for name, m in D.named_modules() if m is module)


def default_taps(D, tap_set: str = "mixed") -> list[str]:
    """Tap paths for a teacher: UNet2DModel (spec B3 choice), the MLP (every hidden block, B11) or an
    EDM / EDM2 network (last encoder block per resolution); [] if none of these (analytic teachers:
    raw coordinates only)."""
    unet = raw_unet(D)
    if unet is not None:
        pre, L = _path_of(D, unet), len(unet.down_blocks)
        if tap_set == "deep":
            return [f"{pre}.mid_block"]
        taps = []
        if 1 < L - 1:  # down_blocks[1] (R/2) unless it is the bottleneck level
            taps.append(f"{pre}.down_blocks.1.resnets.0")
        if 2 < L - 1:  # last resnet of down_blocks[2] (R/4) unless it is the bottleneck level
            taps.append(f"{pre}.down_blocks.2.resnets.{len(unet.down_blocks[2].resnets) - 1}")
        taps.append(f"{pre}.mid_block")
        taps += [f"{pre}.up_blocks.{i}.resnets.0" for i in (L - 3, L - 2) if i >= 0]
        return taps
    blocks = mlp_blocks(D)
    if blocks is not None:
        pre = _path_of(D, blocks)
        last = len(blocks) - 1
        return [f"{pre}.{last}"] if tap_set == "deep" else [f"{pre}.{i}" for i in range(last + 1)]
    return edm_taps(D, tap_set)


def pool_feature(h: torch.Tensor) -> torch.Tensor:
    """``[n, C, H, W]`` -> 4x4 average pooling with stride 4 (global if the map is smaller), flattened
    ``[n, F]`` (spec B3); other shapes are flattened."""
    if h.ndim == 4:
        h = F.adaptive_avg_pool2d(h, 1) if min(h.shape[-2:]) < 4 else F.avg_pool2d(h, 4, 4)
    return h.flatten(1)


def truncated_lognormal(n: int, generator: torch.Generator, mean: float = -1.2, std: float = 1.2,
                        lo: float = 0.02, hi: float = 0.1) -> torch.Tensor:
    """``n`` draws of ``exp(N(mean, std^2))`` truncated to ``[lo, hi]`` (inverse CDF) ``[n]`` float64."""
    a, b = (torch.tensor([lo, hi], dtype=torch.float64).log() - mean) / std
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    p = torch.special.ndtr(a) + u * (torch.special.ndtr(b) - torch.special.ndtr(a))
    return (mean + std * torch.special.ndtri(p)).exp().clamp(lo, hi)


def tap_features(D, x, sigma, cond, paths: list[str]) -> dict[str, torch.Tensor]:
    """Pooled hidden states ``{path: [n, F]}`` of ``D(x, sigma, cond)``; the forward pass stops once
    every tap has fired (the layers after the last tap are never run)."""
    with capture(D, paths, stop_when_done=True) as store:
        D(x, sigma, cond)
    missing = [p for p in paths if p not in store]
    if missing:
        raise ConfigError(f"tap module(s) {missing} never ran in the teacher's forward pass; choose "
                          "modules on the forward path (tfd.taps=[...])")
    return {p: pool_feature(store[p]) for p in paths}


# ---------------------------------------------------------------------------------------------
# the term
# ---------------------------------------------------------------------------------------------
class TeacherFeatureDrift(Term):
    """Generator term: drift + coverage summed over taps (spec B6, B10); returns a 0-dim loss."""

    name, phase, uses_sample = "tfd", "generator", True

    def __init__(self, cfg: TFDConfig, paths: list[str], raw: bool, relative: bool,
                 pool: TeacherPool | None = None):
        self.cfg, self.paths, self.raw, self.relative, self.pool = cfg, paths, raw, relative, pool
        self.data_std: float | None = None  # for relative sigma_f; kept across a resume

    def setup(self, nets: Nets, ctx) -> None:
        if self.pool is not None and self.pool.x is None:
            self.pool.build(nets.teacher)

    def state_dict(self) -> dict:
        return {"data_std": self.data_std}

    def load_state_dict(self, d: dict) -> None:
        self.data_std = d.get("data_std")

    def sigma_f(self, batch: Batch, G: int) -> torch.Tensor:
        """One feature noise level per group ``[G]`` (spec B4: shared by generated, positive, anchor)."""
        if self.cfg.sigma_f_dist == "lognormal":  # the port's alternative, one draw per group (B4)
            sig = truncated_lognormal(G, stream_generator(batch.rnd, "tfd_sigma_f"))
        else:
            sig = torch.full((G,), self.cfg.sigma_f, dtype=torch.float64)
        if self.relative:
            if self.data_std is None:  # scalar std of the reference data, estimated once
                ref = (self.pool.draw(4096, stream_generator(batch.rnd, "tfd_std")) if self.pool is not None
                       else batch.draw_real(4096, "tfd_std"))
                self.data_std = float(ref.flatten(1).double().var(0).mean().sqrt())
            sig = sig * (self.data_std / SIGMA_F_REF_STD)
        return sig

    def features(self, teacher, x, sigma, cond, xi) -> dict[str, torch.Tensor]:
        """``{tap: [n, F]}``: raw coordinates (noise-free, B11 (i)) and teacher taps at ``x + sigma xi``."""
        out = {RAW: x.flatten(1)} if self.raw else {}
        if self.paths:
            x_n = x + append_dims(sigma, x.ndim) * xi
            out.update(tap_features(teacher, x_n, sigma, cond, self.paths))
        return out

    def _branch(self, nets, x, groups: Groups, k: int, sig, xi):
        """Features of ``G * k`` samples ``x`` (group-major) at the groups' sigma_f."""
        sigma = sig.repeat_interleave(k).to(x)
        return self.features(nets.teacher, x, sigma, groups.cond(k, x.device), xi)

    def _reference(self, nets, batch, groups, k, stream, sig, like):
        with torch.no_grad():
            y = draw_reference(batch, groups, k, stream, self.pool, like)
            xi = torch.randn(y.shape, generator=stream_generator(batch.rnd, stream + "_xi"), dtype=y.dtype)
            return self._branch(nets, y, groups, k, sig, xi.to(y.device))

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        self.setup(nets, None)
        cfg, x = self.cfg, gen.x
        groups = make_groups(batch.cond, x.shape[0], cfg.n_per_group, x.device)
        G, N = groups.G, groups.N
        P, M = cfg.n_pos or N, cfg.n_anchor or N
        sig = self.sigma_f(batch, G)
        flat = groups.idx.flatten()
        xi = batch.rnd.randn("tfd_xi_gen", *x.shape[1:]).to(x)[flat]  # fresh per sample (B3)
        fx = self._branch(nets, x[flat], groups, N, sig, xi)
        fp = self._reference(nets, batch, groups, P, "tfd_pos", sig, x)
        fa = self._reference(nets, batch, groups, M, "tfd_anchor", sig, x) if cfg.coverage else None
        out = self._combine(fx, fp, fa, G, N, P, M, sig, x.dtype)
        out.terms["tfd_used"] = torch.tensor(G * N / x.shape[0])  # fraction of the batch in a group
        return out

    def _combine(self, fx, fp, fa, G, N, P, M, sig, dtype) -> LossOutput:
        """Spec B6: ``sum_taps [mean_g drift + w_cov mean_g coverage]`` (taps summed, not averaged)."""
        cfg = self.cfg
        logs = {"tfd_sigma_f": sig.mean().float(), "tfd_groups": torch.tensor(float(G))}
        drift_sum, cov_sum, covered = 0.0, 0.0, []
        for tap, f in fx.items():
            key = _short(tap)
            r = drift_loss(f.view(G, N, -1), fp[tap].view(G, P, -1), temperatures=cfg.temperatures,
                           floor=cfg.affinity_floor)
            drift_sum = drift_sum + r.loss.mean()
            logs[f"tfd_{key}_s"] = r.s.float()
            logs.update({f"tfd_{key}_v2_t{t:g}": v.float() for t, v in zip(cfg.temperatures, r.raw)})
            if fa is not None:
                lc, cov, h = anchor_margin_loss(f.view(G, N, -1), fa[tap].view(G, M, -1), cfg.alpha,
                                                cfg.cov_h if cfg.cov_h > 0 else None)
                cov_sum = cov_sum + lc.mean()
                covered.append(cov)
                logs[f"tfd_{key}_cov"], logs[f"tfd_{key}_covered"] = lc.mean().detach(), cov.float()
                logs[f"tfd_{key}_h"] = h.float()
        total = drift_sum + cfg.w_cov * cov_sum
        logs["tfd_drift"] = torch.as_tensor(drift_sum).detach().float()
        if covered:
            logs["tfd_cov"] = torch.as_tensor(cov_sum).detach().float()
            logs["tfd_covered"] = torch.stack(covered).mean().float()
        return LossOutput(torch.as_tensor(total).to(dtype), logs)


def _short(path: str) -> str:
    for pre in ("net.unet.", "unet.", "net."):
        if path.startswith(pre):
            return path[len(pre):]
    return path


def _check(cfg: TFDConfig) -> None:
    check_common(cfg)
    choices = {"tap_set": ("mixed", "deep"), "sigma_f_mode": ("auto", "absolute", "relative"),
               "sigma_f_dist": ("fixed", "lognormal")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"tfd.{key} must be one of {'|'.join(allowed)}, got '{getattr(cfg, key)}'")
    if cfg.sigma_f <= 0 or not math.isfinite(cfg.sigma_f):
        raise ConfigError(f"tfd.sigma_f must be > 0, got {cfg.sigma_f}")
    if cfg.n_anchor < 0 or cfg.w_cov < 0 or cfg.alpha < 0 or cfg.cov_h < 0:
        raise ConfigError("tfd.n_anchor, tfd.w_cov, tfd.alpha and tfd.cov_h must be >= 0")


def build(cfg: TFDConfig, ctx) -> Method:
    """TFD's single generator term; taps resolved on ``ctx.teacher`` (spec B3 / B11 defaults)."""
    _check(cfg)
    refuse_guidance(ctx, "tfd", "uses the teacher's features, not its score (it drifts toward real data)")
    teacher, vector = ctx.teacher, ctx.kind == "vector"
    paths = list(dict.fromkeys(cfg.taps)) if cfg.taps else default_taps(teacher, cfg.tap_set)
    for p in paths:
        resolve_module(teacher, p)  # a clear error for a wrong path, before training starts
    raw = cfg.raw_coords and vector
    if not paths and not raw:
        raise ConfigError("tfd has no features: this teacher has no known taps; name modules with "
                          "tfd.taps=[...] (or tfd.raw_coords=true for vector data)")
    relative = cfg.sigma_f_mode == "relative" or (cfg.sigma_f_mode == "auto" and vector)
    pool = (TeacherPool(cfg.teacher_pool, cfg.teacher_nfe, ctx.shape, ctx.num_classes, ctx.seed)
            if cfg.positives == "teacher" else None)
    return Method(terms=[TeacherFeatureDrift(cfg, paths, raw, relative, pool)], needs_fake=False)


METHOD = MethodEntry(TFDConfig, build, DEFAULTS)
