"""SiD / SiDA (Zhou et al. 2024/2025, arXiv 2404.04057, 2410.14919; specs/sid.md). STUB."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.losses.base import Method

DEFAULTS = {"schedule": {"ratio": 1, "gen_offset": 0, "critic_on_gen_steps": True, "critic_first": True},
            "student": {"init_sigma": 2.5}}


@dataclass
class SiDConfig:
    pass


def build(cfg: SiDConfig, ctx) -> Method:
    raise NotImplementedError("sid is not implemented yet")
