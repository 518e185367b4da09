"""Embedding Loss (arXiv 2604.22379; specs/embedding_loss.md). STUB."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.losses.base import Method


@dataclass
class ELConfig:
    pass


def build(cfg: ELConfig, ctx, weight: float) -> Method:
    raise NotImplementedError("el is not implemented yet")
