"""f-distill: one-step distillation by f-divergence distribution matching (Xu, Nie, Vahdat 2025,
arXiv 2502.15681; specs/f_distill.md).

DMD's generator gradient ``(D_fake - D_real)`` at a noised student sample is the reverse-KL
gradient; weighting it per sample by ``h(r)``, with ``r ~ p_teacher(x_t) / q_student(x_t)`` the
density ratio the DMD2 GAN head estimates, gives the gradient of another f-divergence (paper
eq. 9-10): forward KL and Jensen-Shannon are mode-covering where reverse KL is mode-seeking.

``r = clip(exp(clamp(logit, -10, 10)), 0.1, 20)`` (detached), the logit being the head's on the fake
network's bottleneck at the *same* noised sample the DMD term uses (section 1). Two normalisations
(section 2): ``r`` is divided by its mean in ``bin_num`` equal-width bins of the noise index (kept as
an EMA of rate ``ratio_ema_rate``; the bins are term state, so they survive a resume), and ``h`` is
divided by its mean over the processes' batches. Everything else is DMD2 (``losses/dmd.py``): the
fake score, the GAN head and its losses, the update ratio; ``f_div = rkl`` is DMD2 with the head.
Guidance (``--guidance``) enters the real score only, as in DMD (the ratio r then compares the
student with the *guided* teacher's distribution, through the head trained on real data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.core.guidance import guided
from fewstep.core.utils import append_dims, mean_flat
from fewstep.errors import ConfigError
from fewstep.losses import dmd
from fewstep.losses.base import Batch, GenOut, LossOutput, Method, MethodEntry, Nets, Term, check_non_negative
from fewstep.models.taps import bottleneck_path, capture

# h(r) for each f-divergence (spec section 1, paper Table 1)
H = {
    "rkl": lambda r: torch.ones_like(r),        # reverse KL: DMD
    "kl": lambda r: r,                          # forward KL
    "js": lambda r: 1 - 1 / (1 + r),            # Jensen-Shannon
    "sh": lambda r: r.sqrt(),                   # squared Hellinger
    "jf": lambda r: 1 + r,                      # Jeffreys
    "neyman": lambda r: 1 / r.clamp_min(1e-8),  # Neyman chi^2
    "sf": lambda r: 1 / (1 + r),
}


@dataclass
class FDistillConfig(dmd.DMDConfig):
    gan_gen_weight: float = 1e-2   # DMD2's GAN generator weight; must be > 0: the head gives r (choice:
    #                                the value fewstep's DMD GAN-head runs use)
    f_div: str = "js"              # rkl | kl | js | sh | jf | neyman | sf (spec section 1)
    logit_clamp: float = 10.0      # |logit| <= this before exp
    ratio_lower: float = 0.1       # r clipped to [ratio_lower, ratio_upper]
    ratio_upper: float = 20.0
    ratio_normalization: bool = True  # divide r by its per-noise-bin mean (section 2)
    bin_num: int = 10              # equal-width bins of the DM noise index min_step..max_step
    ratio_ema_rate: float = 0.0    # EMA of the bin means (0 = this batch's means)
    weight_normalization: bool = True  # divide h by its mean over the processes' batches
    norm_eps: float = 1e-6         # epsilon of both normalisers (FastGen's)

    def check(self) -> None:
        check_non_negative(self, "fdistill", dmd.NON_NEGATIVE)
        dmd.check_normalizer(self, "fdistill")
        if self.f_div not in H:
            raise ConfigError(f"fdistill.f_div='{self.f_div}'; choose one of {', '.join(H)}")
        if self.gan_gen_weight <= 0:
            raise ConfigError("fdistill needs DMD2's GAN head to estimate the density ratio: set "
                              "fdistill.gan_gen_weight > 0 (default 0.01)")
        if not 0 < self.ratio_lower <= self.ratio_upper or self.bin_num < 1 or \
                not 0 <= self.ratio_ema_rate < 1:
            raise ConfigError("fdistill needs 0 < ratio_lower <= ratio_upper, bin_num >= 1 and "
                              "0 <= ratio_ema_rate < 1")


class FDistillMatching(Term):
    """DMD's generator term with each sample's gradient multiplied by the normalised ``h(r)``."""

    name, phase, uses_sample = "fdistill", "generator", True

    def __init__(self, cfg: FDistillConfig, guidance: float = 1.0, null: int | None = None):
        self.cfg, self.K = cfg, dmd.ascending_grid()
        self.guidance, self.null = guidance, null
        self.bins = torch.ones(cfg.bin_num, dtype=torch.float64)  # per-bin mean ratio (EMA)

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut) -> LossOutput:
        x, cfg = gen.x, self.cfg
        idx = batch.rnd.randint("dm_index", cfg.min_step, cfg.max_step + 1)  # DMD's streams: rkl == dmd
        sigma = self.K[idx.cpu()].to(x)
        eps = batch.rnd.randn("dm_noise", *x.shape[1:]).to(x)
        path = bottleneck_path(nets.fake)
        with capture(nets.fake, [path]) as feats:  # the head sees D_fake's own forward pass
            real = guided(nets.teacher, self.guidance, self.null)
            g, w = dmd.dm_gradient(x, sigma, eps, real, nets.fake, batch.cond, cfg.normalizer, batch.all_mean)
        with torch.no_grad():
            logit = nets.head(feats[path]).float()
        h, r = self.weights(logit, idx.cpu(), batch.all_mean)
        loss = 0.5 * mean_flat((x - (x - append_dims(h.to(x), x.ndim) * g).detach()) ** 2)
        logs = {"fdistill": loss.mean().detach(), "dm_norm_w": w.mean(), "fdistill_r": r.mean(),
                "fdistill_h_min": h.min(), "fdistill_h_max": h.max()}
        return LossOutput(loss, logs)

    def weights(self, logit: torch.Tensor, idx: torch.Tensor, all_mean) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h [B], r [B])`` from the head's logits and the DM noise indices (sections 1-2); ``r`` is
        the clipped ratio before the bin normalisation."""
        cfg = self.cfg
        r = logit.clamp(-cfg.logit_clamp, cfg.logit_clamp).exp().clamp(cfg.ratio_lower, cfg.ratio_upper)
        r = r.detach().double().cpu()
        r_n = r / (self._update_bins(r, idx, all_mean) + cfg.norm_eps) if cfg.ratio_normalization else r
        h = H[cfg.f_div](r_n)
        if cfg.weight_normalization:
            h = h / (all_mean(h.mean()) + cfg.norm_eps)
        return h, r

    def _update_bins(self, r: torch.Tensor, idx: torch.Tensor, all_mean) -> torch.Tensor:
        """EMA update of the per-bin mean ratio over the processes' batches; ``[B]`` bin value per
        sample. Bins are equal-width in the noise index (FastGen bins the time t the same way)."""
        cfg = self.cfg
        width = (cfg.max_step + 1 - cfg.min_step) / cfg.bin_num
        b = ((idx - cfg.min_step).double() / width).floor().long().clamp(0, cfg.bin_num - 1)
        stats = all_mean(torch.stack([torch.bincount(b, minlength=cfg.bin_num).double(),
                                      torch.bincount(b, weights=r, minlength=cfg.bin_num).double()]))
        seen = stats[0] > 0
        mean = stats[1][seen] / stats[0][seen]
        self.bins[seen] = cfg.ratio_ema_rate * self.bins[seen] + (1 - cfg.ratio_ema_rate) * mean
        return self.bins[b]

    def state_dict(self) -> dict:
        return {"bins": self.bins.tolist()}

    def load_state_dict(self, d: dict) -> None:
        if "bins" in d:
            self.bins = torch.tensor(d["bins"], dtype=torch.float64)


def build(cfg: FDistillConfig, ctx) -> Method:
    """DMD2 with its GAN head, the distribution-matching term replaced by the f-weighted one."""
    method = dmd.build(cfg, ctx)
    method.terms[0] = FDistillMatching(cfg, method.terms[0].guidance, method.terms[0].null)
    return method


METHOD = MethodEntry(FDistillConfig, build, dmd.DEFAULTS)
