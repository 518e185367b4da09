"""Objectives: one file per method and one line per method in ``METHODS`` (DESIGN.md "A method
is sealed"; docs/adding-a-method.md).

``METHODS[name]`` is the method's :class:`~fewstep.losses.base.MethodEntry`: its config class (the
run-config section of the same name, ``dmd.*``, ``el.*``, ...), its ``build``, its defaults for the
shared config sections (applied before presets and overrides by ``fewstep.recipe``), its kind
(``base`` or ``extra``) and an optional check of the run config. ``BASES`` and ``EXTRAS`` are views.
"""

from fewstep.losses import cd, di, dmd, dp, drift, el, fdistill, sid, tfd
from fewstep.losses.base import MethodEntry

METHODS: dict[str, MethodEntry] = {
    "dmd": dmd.METHOD,
    "di": di.METHOD,
    "sid": sid.METHOD,
    "cd": cd.METHOD,
    "tfd": tfd.METHOD,
    "drift": drift.METHOD,
    "fdistill": fdistill.METHOD,
    "el": el.METHOD,
    "dp": dp.METHOD,
}

BASES = {k: m for k, m in METHODS.items() if m.kind == "base"}
EXTRAS = {k: m for k, m in METHODS.items() if m.kind == "extra"}
