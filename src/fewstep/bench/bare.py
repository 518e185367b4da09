"""Bare training loops: the network passes of one dmd, sid or di iteration written as plain PyTorch,
so the engine's overhead is a ratio anyone can re-measure (``fewstep perf --bare``; issue 22).

Each loop runs on the networks, optimisers and settings of a run built by the engine (same student,
fake score, teacher, batch, update schedule, Adam settings, gradient clipping, student EMA), and does
the same forward and backward passes per iteration as the engine's method: nothing else. It leaves
out what the engine adds around them: the per-(seed, step, stream) random draws, the real-data batch
drawn every iteration, micro-batch and process bookkeeping, the non-finite checks before each step,
the per-term logs, learning-rate warm-up. The math follows the method files (losses/dmd.py, sid.py,
di.py), written out again on purpose: a bare loop must not call the engine it is timing.
These loops are timing references, not trainers: their random draws differ from the engine's.
"""

from __future__ import annotations

import math

import torch

BARE_METHODS = ("dmd", "sid", "di")


def _edm_weight(sigma, sigma_data):
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _col(t, x):
    return t.view(-1, *([1] * (x.ndim - 1)))


class BareLoop:
    """One method's iteration on the networks of ``run`` (a ``train.distill.Run``)."""

    def __init__(self, run):
        cfg, n = run.cfg, run.nets
        self.cfg, self.student, self.fake, self.teacher = cfg, n.student, n.fake, n.teacher
        self.opt_g, self.opt_f = run.opts["generator"], run.opts["fake_score"]
        self.ema, self.shape, self.B = run.ema, run.data.shape, cfg.train.batch
        self.classes, self.sd, self.step = run.data.num_classes, float(run.ctx.sigma_data), 0
        self.g_params, self.f_params = list(self.student.parameters()), list(self.fake.parameters())
        self.ema_params = list(self.ema.parameters()) if self.ema is not None else []
        self.method = cfg.method
        # DMD's sigma grid: the ascending 1000-point Karras grid (dmd.md 2)
        i = torch.arange(1000, dtype=torch.float64) / 999
        self.K = ((0.002 ** (1 / 7) + i * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7).float()

    # --- pieces ---------------------------------------------------------------------------------
    def _cond(self):
        return torch.randint(0, self.classes, (self.B,)) if self.classes else None

    def _sigma(self, kind: str):
        if kind == "dmd_gen":
            return self.K[torch.randint(self.cfg.dmd.min_step, self.cfg.dmd.max_step + 1, (self.B,))]
        if kind == "dmd_fake":
            return self.K[torch.randint(0, 1000, (self.B,))]
        if kind == "sid_gen":  # SiD's Karras map of u ~ U[0, tmax/1000]
            u = torch.rand(self.B) * (self.cfg.sid.tmax / 1000)
            a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
            return (a + (1 - u) * (b - a)) ** 7
        c = getattr(self.cfg, self.method)  # di / sid fake score: EDM's log-normal law
        return (c.p_mean + c.p_std * torch.randn(self.B)).exp()

    def _step(self, opt, params, loss, clip: float) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    def _fake_update(self, x, c) -> None:
        self.student.requires_grad_(False)
        self.fake.requires_grad_(True)
        sigma = self._sigma("dmd_fake" if self.method == "dmd" else "fake")
        xs = x + _col(sigma, x) * torch.randn_like(x)
        err = (self.fake(xs, sigma, c) - x) ** 2
        per = err.flatten(1).mean(1) if self.method == "dmd" else err.flatten(1).sum(1)
        self._step(self.opt_f, self.f_params, (_edm_weight(sigma, self.sd) * per).mean(),
                   self.cfg.fake_optim.grad_clip)

    def _generator_loss(self, x, c):
        if self.method == "dmd":  # DMD2: g = (D_fake - D_real) / mean|x - D_real|, surrogate loss
            sigma = self._sigma("dmd_gen")
            with torch.no_grad():
                xs = x + _col(sigma, x) * torch.randn_like(x)
                d_real, d_fake = self.teacher(xs, sigma, c), self.fake(xs, sigma, c)
                g = (d_fake - d_real) / _col((x - d_real).abs().flatten(1).mean(1), x)
            return (0.5 * ((x - (x - g).detach()) ** 2).flatten(1).mean(1)).mean()
        if self.method == "di":  # IKL: sum (D_fake - D_real) * x, networks under no_grad
            sigma = self._sigma("fake")
            with torch.no_grad():
                xs = x + _col(sigma, x) * torch.randn_like(x)
                diff = self.fake(xs, sigma, c) - self.teacher(xs, sigma, c)
            return (diff * x).flatten(1).sum(1).mean()
        s = self.cfg.sid  # SiD: gradient through x and x_t into both frozen networks
        sigma = self._sigma("sid_gen")
        x_t = x + _col(sigma, x) * torch.randn_like(x)
        f_phi, f_psi = self.teacher(x_t, sigma, c), self.fake(x_t, sigma, c)
        omega = (x - f_phi).detach().abs().flatten(1).mean(1).clamp(min=s.omega_min)
        a = f_phi - f_psi
        return (s.loss_scaling_g * (a * ((f_phi - x) - s.alpha_value * a)).flatten(1).sum(1) / omega).mean()

    def _generator_update(self, c):
        self.student.requires_grad_(True)
        self.fake.requires_grad_(False)
        x = self.student(torch.randn(self.B, *self.shape), c)
        self._step(self.opt_g, self.g_params, self._generator_loss(x, c), self.cfg.optim.grad_clip)
        if self.ema_params:  # the same lerp as the engine's EMA, at a fixed rate
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.g_params], 1 - 0.5 ** (1 / 500))
        return x.detach()

    # --- one iteration, in the method's schedule -------------------------------------------------
    def __call__(self) -> None:
        sch, c = self.cfg.schedule, self._cond()
        gen_step = self.step % sch.ratio == sch.gen_offset
        x = None
        if gen_step and not sch.critic_first:
            x = self._generator_update(c)
        if not gen_step or sch.critic_on_gen_steps:
            if x is None:
                with torch.no_grad():
                    x = self.student(torch.randn(self.B, *self.shape), c)
            self._fake_update(x, c)
        if gen_step and sch.critic_first:
            self._generator_update(c)
        self.step += 1


def check_bare(cfg) -> None:
    """The bare loops hold the default forms of their methods only (no extras, one step, no GAN)."""
    from fewstep.errors import ConfigError

    if cfg.method not in BARE_METHODS or cfg.extras or cfg.student.steps != 1:
        raise ConfigError(f"perf --bare times 1-step {', '.join(BARE_METHODS)} without extras; got "
                          f"{cfg.method} with {cfg.student.steps} steps and extras {sorted(cfg.extras)}")
    if cfg.method == "dmd" and (cfg.dmd.gan_gen_weight > 0 or cfg.dmd.reg_weight > 0 or
                                cfg.dmd.normalizer != "sample"):
        raise ConfigError("perf --bare times dmd without GAN head or regression, per-sample normaliser")
    if cfg.method == "sid" and cfg.sid.adversarial:
        raise ConfigError("perf --bare times sid without the SiDA terms (sid.adversarial=false)")
    if not math.isclose(cfg.guidance, 1.0):
        raise ConfigError("perf --bare times unguided runs (--guidance 1)")
