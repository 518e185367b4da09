"""DP-DMD first-step diversity supervision (arXiv 2602.03139; specs/dp_dmd.md). STUB."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.losses.base import Method


@dataclass
class DPConfig:
    pass


def build(cfg: DPConfig, ctx, weight: float) -> Method:
    raise NotImplementedError("dp is not implemented yet")
