"""The loss interface shared by every objective (DESIGN.md "The loss interface").

A method is a set of *terms*. Each term is a small callable with its hyperparameters in a
dataclass given to ``__init__``; networks and the batch are given at call time; it declares the
update *phase* it belongs to and returns ``LossOutput(loss, terms)`` where ``loss`` is unreduced
``[B]`` (per sample) or a 0-dim tensor for set-level objectives (MMD, drifting). The trainer
reduces (mean), weights, steps and logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

PHASES = ("generator", "fake_score", "discriminator")


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
    target: nn.Module | None = None    # consistency target network (EMA of the student's G)


class RandomSource(Protocol):
    """Injectable randomness (``train.rng.StepRandom``); tests can pass their own."""

    def randn(self, stream: str, *shape: int, dtype=torch.float32) -> torch.Tensor: ...
    def rand(self, stream: str, *shape: int, dtype=torch.float32) -> torch.Tensor: ...
    def randint(self, stream: str, low: int, high: int, *shape: int) -> torch.Tensor: ...


@dataclass
class Batch:
    """One iteration's inputs for this process."""

    z: torch.Tensor                       # [B, *shape] standard-normal student input noise
    cond: torch.Tensor | None             # [B] class labels or None
    real: torch.Tensor                    # [B, *shape] real training samples with the same labels
    rnd: RandomSource                     # noise / sigma draws
    step: int = 0                         # iteration index
    seed: int = 0                         # run seed
    draw_real: object = None              # (labels [n] | n, stream) -> real samples (TFD, ...)
    global_batch: int = 0                 # batch size over all processes (images seen = step * this)


@dataclass
class GenOut:
    """What the student produced this iteration (with graph in the generator phase)."""

    x: torch.Tensor                       # [B, *shape] the sample the base objective acts on
    x_T: torch.Tensor                     # [B, *shape] the student's starting point sigma_0 z
    x0_first: torch.Tensor | None = None  # first-step prediction (DP-DMD's supervised output)
    sigma: float | None = None            # noise level the student denoised at to produce x


class Term(Protocol):
    name: str
    phase: str
    uses_sample: bool                     # needs the student's sample (GenOut.x)

    def __call__(self, nets: Nets, batch: Batch, gen: GenOut | None) -> LossOutput: ...


@dataclass
class Method:
    """A base method or extra, as the trainer sees it."""

    terms: list                            # Term instances
    needs_fake: bool = False               # trains a fake score initialised from the teacher
    needs_head: nn.Module | None = None    # a GAN head to train (built by the method)
    needs_target: bool = False             # keeps an EMA target of the student (consistency)
    boundary: bool = False                 # student uses the CM boundary parameterisation
    rollout: str | None = None             # required student rollout ("dp" for DP-DMD)
    setup: object = None                   # optional callable(nets, context) run once before training
