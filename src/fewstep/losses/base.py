"""The method contract shared by every objective (DESIGN.md "The loss interface", "A method is sealed").

A method is one file in ``losses/`` and one line in the registry (``losses/__init__.py``). It hands
the engine a :class:`MethodEntry` (its config class, its ``build`` and its defaults for the shared
config sections); ``build`` returns a :class:`Method`: a set of *terms* plus what the method needs
from the engine (a fake score, a GAN head, an EMA target and its rate, the student's boundary
scalings, its own student rollout). Every hook the engine calls is declared here with a default,
so the engine never asks a method what it is.

A term (:class:`Term`) has its hyperparameters given to ``__init__``, networks and the batch at
call time; it declares its update *phase* and returns ``LossOutput(loss, terms)`` where ``loss`` is
unreduced ``[B]`` (per sample) or 0-dim for set-level objectives (MMD, drifting). The engine
reduces (mean), weights, steps and logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import nn

from fewstep.core.guidance import check_guidable
from fewstep.errors import ConfigError, FewstepError

PHASES = ("generator", "fake_score", "discriminator")
KINDS = ("base", "extra")


@dataclass
class LossOutput:
    loss: torch.Tensor                                   # [B] unreduced, or [] for set-level terms
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached values to log


@dataclass
class Nets:
    """The networks of one distillation run. Terms read them; only the trainer steps them."""

    teacher: nn.Module                 # frozen D_real(x, sigma, cond)
    student: nn.Module                 # the k-step Student (trainable in the generator phase)
    fake: nn.Module | None = None      # D_fake, trained in the fake_score phase
    head: nn.Module | None = None      # GAN head on the fake network's bottleneck
    target: nn.Module | None = None    # EMA target of the student (consistency distillation)

    def extra_networks(self) -> dict[str, nn.Module]:
        """The networks besides the student that a checkpoint must hold (those that exist)."""
        return {k: v for k, v in (("fake", self.fake), ("head", self.head), ("target", self.target))
                if v is not None}


class RandomSource(Protocol):
    """Injectable randomness (``train.rng.StepRandom``); tests can pass their own."""

    def randn(self, stream: str, *shape: int, dtype=torch.float32) -> torch.Tensor: ...
    def rand(self, stream: str, *shape: int, dtype=torch.float32) -> torch.Tensor: ...
    def randint(self, stream: str, low: int, high: int, *shape: int) -> torch.Tensor: ...


def _alone(t: torch.Tensor) -> torch.Tensor:
    """The mean over processes when there is one process."""
    return t


@dataclass
class Batch:
    """One iteration's inputs for this process."""

    z: torch.Tensor                       # [B, *shape] standard-normal student input noise
    cond: torch.Tensor | None             # [B] class labels or None
    real: torch.Tensor | None             # [B, *shape] real training samples with the same labels;
    #                                       None when the conditions have none (read: real_batch)
    rnd: RandomSource                     # noise / sigma draws
    step: int = 0                         # iteration index
    seed: int = 0                         # run seed
    draw_real: object = None              # (labels [n] | n, stream) -> real samples (TFD, ...)
    global_batch: int = 0                 # batch size over all processes (images seen = step * this)
    all_mean: Callable = _alone          # averages a float tensor over the processes
    #                                       (identity in one process): batch-level statistics a
    #                                       term normalises by must be global (f-distill's weights)
    no_real: str = ""                     # why ``real`` is None


@dataclass
class GenOut:
    """What the student produced this iteration (with graph in the generator phase)."""

    x: torch.Tensor                       # [B, *shape] the sample the base objective acts on
    x_T: torch.Tensor                     # [B, *shape] the student's starting point sigma_0 z
    sigma: float | None = None            # noise level the student denoised at to produce x
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # other outputs a method's rollout
    #                                       returns (DP-DMD: "first", the first-step prediction);
    #                                       the engine logs each term's gradient norm on them too


@dataclass
class Context:
    """What a method's ``build`` may know about the run (no networks to own, no files)."""

    sigma_data: float
    shape: tuple
    num_classes: int
    kind: str                              # "vector" | "image"
    seed: int
    iters: int
    bottleneck_channels: int = 0           # the teacher's bottleneck (GAN heads); 0 = none found
    bottleneck_spatial: bool = False
    teacher: nn.Module | None = None       # the frozen teacher, to inspect at build time only
    guidance: float = 1.0                  # the run's classifier-free guidance scale (--guidance; 1 = off)
    null_cond: int | None = None           # the teacher's null label (core.guidance.null_label);
    #                                        None: it has no unconditional branch
    decode: Callable | None = None         # latent data: scaled latents -> pixels (differentiable,
    #                                        the VAE decoder); None for pixel and vector data
    pixel_shape: tuple | None = None       # latent data: the decoded sample shape


def real_batch(batch: Batch, who: str) -> torch.Tensor:
    """``batch.real``, or a one-line error naming ``who`` needs it and why there is none."""
    if batch.real is None:
        raise FewstepError(f"{who} needs a real batch paired with the conditions, but {batch.no_real}")
    return batch.real


class Term:
    """A loss term and the hooks the engine calls on it, with their defaults.

    Subclasses set ``name`` (unique in a run; the log prefix), ``phase`` (one of ``PHASES``),
    ``uses_sample`` (needs the student's sample ``gen.x``) and implement ``__call__``."""

    name: str = ""
    phase: str = "generator"
    uses_sample: bool = True
    weight: float = 1.0                   # the engine's multiplier of loss.mean() (extras: --extra w)
    calibrates: bool = False              # the weight comes from calibrated_weight() each update

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut | None) -> LossOutput:
        raise NotImplementedError

    def setup(self, nets: Nets, ctx: Context) -> None:
        """Once before training, after the networks exist (precomputation, checks on them)."""

    def state_dict(self) -> dict:
        """Term state that must survive a resume (and a refused update restores)."""
        return {}

    def load_state_dict(self, d: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def warming_up(self) -> bool:
        """True while an update costs more than it will in steady state (EL's calibration takes two
        extra gradients per update); timings (``fewstep perf``) start after it."""
        return False

    def calibrated_weight(self, params, base_loss, term_loss, step: int, all_mean=None) -> float:
        """This generator update's weight when ``calibrates`` (EL's gradient-ratio rule): called once
        per update (first micro-batch) with the student's trainable ``params``, the weighted sum of
        the terms before it and this term's mean loss; ``all_mean`` averages a float tensor over
        processes so every rank gets the same weight."""
        return self.weight


class Rollout(Protocol):
    """A student rollout: ``(student, batch, z) -> GenOut`` (with graph unless under no_grad)."""

    def __call__(self, student: nn.Module, batch: Batch, z: torch.Tensor) -> GenOut: ...


@dataclass
class Method:
    """A base method or extra as the engine sees it: its terms and what it needs from the engine."""

    terms: list[Term]                      # in the order their losses are summed within a phase
    needs_fake: bool = False               # a fake score initialised from the teacher (fake_score phase)
    head: nn.Module | None = None          # a GAN head the engine trains in the discriminator phase
    target_rate: float | None = None       # keep an EMA target of the student with this rate
    #                                        (theta- <- mu theta- + (1 - mu) theta); None = no target
    boundary: bool = False                 # the student uses the consistency boundary scalings
    rollout: Rollout | None = None         # the method's own student rollout (None: student.rollout)


class MethodEntry(NamedTuple):
    """One registry line: how the recipe and the engine make a method from its config section."""

    config: type                           # dataclass: the run-config section of the method's name
    build: Callable                        # base: build(cfg, ctx) -> Method;
    #                                        extra: build(cfg, ctx, weight) -> Method
    defaults: dict = {}                    # the method's settings for shared config sections
    #                                        (schedule, student, optim, ...), before presets
    kind: str = "base"                     # "base" (one per run) | "extra" (any number, weighted)
    check: Callable | None = None          # check(run_cfg) -> None: rules on shared sections
    #                                        that only this method has (raise ConfigError)

    def make(self, cfg, ctx: Context, weight: float = 1.0) -> Method:
        return self.build(cfg, ctx) if self.kind == "base" else self.build(cfg, ctx, weight)


def check_non_negative(cfg, section: str, names: tuple[str, ...]) -> None:
    """Config rule for a method section: each named field is a number >= 0 (one-line error)."""
    for n in names:
        v = getattr(cfg, n)
        if v < 0:
            raise ConfigError(f"{section}.{n} must be >= 0, got {v}")


def guidance_scale(ctx: Context, own: float | None = None, key: str = "--guidance") -> float:
    """A method's guidance scale: its own setting ``own`` (config key ``key``) or the run's
    ``ctx.guidance``; refuses w != 1 for a teacher without an unconditional branch (one line)."""
    w = getattr(ctx, "guidance", 1.0) if own is None else float(own)  # unit tests pass ctx stand-ins
    what = key if own is not None else "--guidance"
    check_guidable(getattr(ctx, "num_classes", 0), null_cond(ctx), w, what)
    return w


def null_cond(ctx: Context | None) -> int | None:
    """The teacher's null label from ``ctx`` (None without a context or in a stand-in)."""
    return getattr(ctx, "null_cond", None)


def refuse_guidance(ctx: Context, method: str, why: str) -> None:
    """For methods that use no teacher score as a target: --guidance would do nothing, so say so."""
    if getattr(ctx, "guidance", 1.0) != 1:
        raise ConfigError(f"{method} {why}, so --guidance has no effect on it; omit --guidance "
                          "(docs/guidance.md)")
