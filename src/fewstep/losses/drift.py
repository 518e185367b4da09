"""Plain Drifting (arXiv 2602.04770; specs/drifting.md part A) as a no-teacher baseline. STUB."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.losses.base import Method

DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": False, "critic_first": False}}


@dataclass
class DriftConfig:
    pass


def build(cfg: DriftConfig, ctx) -> Method:
    raise NotImplementedError("drift is not implemented yet")
