"""Diff-Instruct (Luo et al. 2023, arXiv 2305.18455; specs/diff_instruct.md). STUB: to be written."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.losses.base import Method

# the method's own settings for shared config sections (applied before presets and overrides)
DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": True, "critic_first": True},
            "student": {"init_sigma": 1.0}}


@dataclass
class DIConfig:
    pass


def build(cfg: DIConfig, ctx) -> Method:
    raise NotImplementedError("di is not implemented yet")
