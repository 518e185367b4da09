"""Consistency distillation (Song et al. 2023, arXiv 2303.01469; specs/consistency.md). STUB."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.losses.base import Method

DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": False, "critic_first": False}}


@dataclass
class CDConfig:
    pass


def build(cfg: CDConfig, ctx) -> Method:
    raise NotImplementedError("cd is not implemented yet")
