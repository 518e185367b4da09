"""Teacher-Feature Drifting (arXiv 2605.07327; specs/drifting.md part B). STUB."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.losses.base import Method

DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": False, "critic_first": False}}


@dataclass
class TFDConfig:
    pass


def build(cfg: TFDConfig, ctx) -> Method:
    raise NotImplementedError("tfd is not implemented yet")
