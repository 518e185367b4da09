"""Pure tensor math: preconditioning, conversions, sigma grids, samplers, mixtures, kernels.

Imports torch only, so ``import fewstep.core`` is fast and has no side effects.
"""

from fewstep.core.utils import append_dims

__all__ = ["append_dims"]
