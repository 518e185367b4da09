"""Recipes: the one place where a run's configuration is resolved (DESIGN.md "A method is sealed").

``distill_config`` resolves, in this order: the method's own defaults for the shared sections
(``MethodEntry.defaults`` of the base, then of each extra), the presets (``distill_default``, then
``distill_<data>`` and ``distill_<data>_<method>`` for the teacher's data set, or the one preset the
caller names), then the caller's ``key=value`` overrides. ``teacher_config`` does the same for
teachers. The CLI, ``fewstep bench`` / ``perf`` and library users all call these, so
``fewstep distill --method sid`` and ``train_distill(distill_config(teacher, "sid"))`` are one config.
"""

from __future__ import annotations

from pathlib import Path

from fewstep.config import (
    PRESET_DIR,
    DistillRunConfig,
    TeacherRunConfig,
    check_method_names,
    check_text_teacher,
    load_preset,
    parse_override,
    resolve,
)
from fewstep.errors import FewstepError
from fewstep.losses import METHODS


def _merge(into: dict, section: dict) -> dict:
    """Presets and defaults merge per section (a preset's ``optim.lr`` keeps the method's betas)."""
    for key, value in section.items():
        into[key] = {**into.get(key, {}), **value} if isinstance(value, dict) else value
    return into


def teacher_data_name(teacher: str) -> str:
    """The data set a teacher directory records ("" when it records none or is not fewstep's)."""
    from fewstep.models.io import read_model_json

    try:
        return read_model_json(teacher)[1].get("data", {}).get("name", "")
    except FewstepError:
        return ""


def distill_presets(data: str, method: str) -> list[str]:
    """The built-in presets that apply to a teacher trained on ``data`` and a base ``method``."""
    names = ("distill_default", f"distill_{data}", f"distill_{data}_{method}")
    return [p for p in names if (PRESET_DIR / f"{p}.yaml").exists()]


def distill_config(teacher: str, method: str, extras: dict | None = None, overrides=(),
                   preset: str | None = None) -> DistillRunConfig:
    """The resolved, validated config of ``fewstep distill --teacher T --method M [--extra e=w ...]
    [key=value ...]``; ``preset`` replaces the built-in presets by one preset name or YAML path."""
    extras = dict(extras or {})
    check_method_names(method, extras)  # before reading their defaults
    base: dict = {}
    for name in (method, *extras):
        _merge(base, {k: dict(v) for k, v in METHODS[name].defaults.items()})
    for name in [preset] if preset else distill_presets(teacher_data_name(teacher), method):
        _merge(base, load_preset(name))
    fixed = [f"teacher={teacher}", f"method={method}", *(f"extras.{k}={v}" for k, v in extras.items())]
    cfg = resolve(DistillRunConfig, base, fixed + list(overrides))
    # Verbatim (YAML parsing could mangle paths), and absolute when it exists: the run then resumes
    # and evaluates from any working directory, and `--teacher d` equals `--teacher /abs/d`.
    cfg.teacher = str(Path(teacher).resolve()) if Path(teacher).exists() else str(teacher)
    if cfg.prompts:
        cfg.prompts = check_prompts(cfg.teacher, cfg.prompts)
    return cfg


def check_prompts(teacher: str, prompts: str) -> str:
    """``--prompts FILE`` before anything is written: a readable, non-empty file (returned absolute)
    and a text-to-image teacher (one-line errors)."""
    from fewstep.models.io import is_text_pipeline
    from fewstep.models.text_cond import read_prompts

    read_prompts(prompts)
    if Path(teacher).is_dir() and not is_text_pipeline(Path(teacher)):
        raise FewstepError(f"--prompts needs a text-to-image teacher (a Stable Diffusion pipeline directory, "
                           f"e.g. from 'fewstep teacher --text'); {teacher} is not one: omit --prompts")
    return str(Path(prompts).resolve())


def teacher_config(data: str, overrides=(), preset: str | None = None,
                   vae: str | None = None, text: bool = False) -> TeacherRunConfig:
    """The resolved config of ``fewstep teacher --data D [--vae DIR] [--text] [key=value ...]``
    (``teacher_<data>[_text]`` preset when one exists, else ``teacher_default``). ``vae`` (``--vae DIR``)
    is ``data.vae=DIR`` and wins over it; either way the VAE folder is checked and recorded absolute.
    ``text`` (``--text``) is ``data.text=true``."""
    text = text or any(parse_override(o) == ("data.text", True) for o in overrides)
    names = ["teacher_text"] * text + [f"teacher_{data}"]  # teacher_text: the CPU-sized text preset
    name = preset or next((n for n in names if (PRESET_DIR / f"{n}.yaml").exists()), "teacher_default")
    cfg = resolve(TeacherRunConfig, load_preset(name),
                  [f"data.name={data}", *["data.text=true"] * text, *overrides])
    cfg.data.name = str(data)  # keep paths verbatim
    if vae is not None:
        cfg.data.vae = str(vae)  # verbatim, as data.name
    if cfg.data.vae:  # absolute, like user data (data/provenance.py): resumes from any directory
        from fewstep.data.latents import check_vae_dir

        cfg.data.vae = str(check_vae_dir(cfg.data.vae))
    check_text_teacher(cfg)
    return cfg
