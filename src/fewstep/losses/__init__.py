"""Objectives: one file per method, plain-dict registries (DESIGN.md convention 5).

``BASES[name] = (ConfigClass, build, defaults)``: ``build(cfg, ctx) -> Method``; ``defaults`` are
the method's own settings for the shared config sections (schedule, student, optim, ...), applied
before presets and overrides. ``EXTRAS[name] = (ConfigClass, build)``:
``build(cfg, ctx, weight) -> Method``. Each method's config is the run-config section of its name
(``dmd.*``, ``el.*``, ...).
"""

from fewstep.losses import cd, di, dmd, dp, drift, el, sid, tfd

BASES = {
    "dmd": (dmd.DMDConfig, dmd.build, dmd.DEFAULTS),
    "di": (di.DIConfig, di.build, di.DEFAULTS),
    "sid": (sid.SiDConfig, sid.build, sid.DEFAULTS),
    "cd": (cd.CDConfig, cd.build, cd.DEFAULTS),
    "tfd": (tfd.TFDConfig, tfd.build, tfd.DEFAULTS),
    "drift": (drift.DriftConfig, drift.build, drift.DEFAULTS),
}

EXTRAS = {
    "el": (el.ELConfig, el.build),
    "dp": (dp.DPConfig, dp.build),
}
