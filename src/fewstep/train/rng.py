"""Counter-based randomness: every draw derives from ``(seed, step, stream)``.

Like EDM2's per-step reseeding, this makes a resumed run equal an uninterrupted one without
saving generator states. Draws are made for the *global* batch and sliced to this process's
shard, so one process and N processes with the same global batch see the same numbers.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs and machines)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


class StepRandom:
    """Random draws for one training step of one process.

    ``lo:hi`` is this process's slice of the global batch of size ``global_batch``. Each stream
    name gives an independent generator, so adding a new random draw does not shift the others.
    """

    def __init__(self, seed: int, step: int, global_batch: int, lo: int = 0, hi: int | None = None,
                 device: torch.device | str = "cpu"):
        self.seed, self.step, self.global_batch = seed, step, global_batch
        self.lo, self.hi = lo, global_batch if hi is None else hi
        self.device = torch.device(device)

    def generator(self, stream: str) -> torch.Generator:
        return generator(self.seed, self.step, stream)

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.lo:self.hi].to(self.device)

    def randn(self, stream: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """Standard normal ``[local_batch, *shape]``."""
        g = self.generator(stream)
        return self._slice(torch.randn(self.global_batch, *shape, generator=g, dtype=dtype))

    def rand(self, stream: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """Uniform [0, 1) ``[local_batch, *shape]``."""
        g = self.generator(stream)
        return self._slice(torch.rand(self.global_batch, *shape, generator=g, dtype=dtype))

    def randint(self, stream: str, low: int, high: int, *shape: int) -> torch.Tensor:
        """Integers in [low, high) ``[local_batch, *shape]``."""
        g = self.generator(stream)
        return self._slice(torch.randint(low, high, (self.global_batch, *shape), generator=g))

    def shared_randint(self, stream: str, low: int, high: int) -> int:
        """One integer shared by every process (e.g. DMD2's backward-simulation step index)."""
        return int(torch.randint(low, high, (1,), generator=self.generator(stream)))
