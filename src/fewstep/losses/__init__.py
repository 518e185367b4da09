"""Objectives: one file per method, plain-dict registries (DESIGN.md convention 5).

``BASES[name] = (ConfigClass, build, defaults)`` where ``build(cfg, ctx) -> Method`` and
``defaults`` are the method's own settings for the shared config sections (schedule, student, ...),
applied before presets and overrides. ``EXTRAS[name] = (ConfigClass, build)`` where
``build(cfg, ctx, weight) -> Method``.
"""

from fewstep.losses import dmd

BASES = {
    "dmd": (dmd.DMDConfig, dmd.build, {"schedule": {"ratio": 5, "gen_offset": 0,
                                                    "critic_on_gen_steps": True,
                                                    "critic_first": False}}),
}

EXTRAS: dict = {}
