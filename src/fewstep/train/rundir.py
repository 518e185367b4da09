"""Run directories: creation with clear errors, config consistency, completion markers.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``,
``model.safetensors`` + ``model.json`` and ``samples/``. Re-running the same command on a finished
run is a no-op; on an interrupted run it resumes; a different config is refused, so a good run
is never overwritten.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from fewstep.errors import FewstepError

# keys that may change between an interrupted run and its resumption
RESUMABLE_KEYS = {"train.iters", "train.device", "train.log_every", "train.eval_every",
                  "train.eval_n", "train.ckpt_every"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("extras",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if k not in RESUMABLE_KEYS and a.get(k) != b.get(k))


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` (and parents) and prove it is writable, or raise a one-line error."""
    if path.exists() and not path.is_dir():
        raise FewstepError(f"--out {path} exists and is not a directory; choose a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe"):
            pass
    except OSError as e:
        raise FewstepError(f"cannot write to output directory {path} ({e.strerror or e}); "
                           "choose a writable --out") from None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FewstepError(f"could not write {path} ({e.strerror or e})") from None


def prepare_run_dir(out: Path, config: dict) -> str:
    """Check ``out`` and record ``config``. Returns ``"new"``, ``"resume"`` or ``"done"``.

    ``"done"`` means a finished run with the same config and at least as many iterations.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FewstepError(f"--out {out} exists and is not a directory; choose a directory path")
    cfg_path = out / "config.yaml"
    if cfg_path.exists():
        old = yaml.safe_load(cfg_path.read_text()) or {}
        diff = config_differences(old, config)
        if diff:
            raise FewstepError(f"{out} holds a run with a different config ({', '.join(diff[:3])}); "
                               "choose another --out, or repeat the original settings to resume")
        done = _finished_iters(out)
        if done is not None and done >= config.get("train", {}).get("iters", 0):
            return "done"
    elif out.exists() and any(out.iterdir()):
        raise FewstepError(f"--out {out} is a non-empty directory that is not a fewstep run; "
                           "choose a new or empty directory")
    ensure_writable_dir(out)
    atomic_write_text(cfg_path, yaml.safe_dump(config, sort_keys=False))
    has_ckpt = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("ckpt_*.pt"))
    return "resume" if has_ckpt else "new"


def _finished_iters(out: Path) -> int | None:
    """Iterations of the finished model in ``out`` (from model.json), or None."""
    meta_path = out / "model.json"
    if not (meta_path.exists() and (out / "model.safetensors").exists()):
        return None
    import json

    try:
        return int(json.loads(meta_path.read_text()).get("meta", {}).get("iterations", -1))
    except (ValueError, OSError):
        return None
