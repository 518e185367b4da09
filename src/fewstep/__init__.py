"""fewstep: distil a diffusion teacher into a 1-4 step generator.

Layers (see docs/DESIGN.md): ``core`` (pure math) <- ``models`` / ``losses`` <- ``train`` <- ``cli``.
"""

__version__ = "0.1.0"
