"""Run directories: creation with clear errors, config consistency, completion markers.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``,
``model.safetensors`` + ``model.json`` and ``samples/``. Re-running the same command on a finished
run is a no-op; on an interrupted run it resumes; a different config is refused, so a good run
is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from fewstep.errors import FewstepError

# keys that may change between an interrupted run and its resumption
# (micro_batch and the process count change only float summation order: a preempted job may be
# resumed on another number of devices)
RESUMABLE_KEYS = {"train.iters", "train.device", "train.log_every", "train.eval_every",
                  "train.eval_n", "train.ckpt_every", "train.max_bad_steps", "train.micro_batch",
                  "train.time_budget_s"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("extras",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Keys whose values differ. A key the old config lacks (a setting added to fewstep after that
    run was made) is no difference while the new value is that setting's default: new settings
    default to the old behaviour."""
    a, b, d = _flatten(old), _flatten(new), _flatten(defaults or {})
    return sorted(k for k in a.keys() | b.keys() if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)
                  and not (k not in a and k in d and b.get(k) == d[k]))


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


def check_run_dir(out: Path, config: dict, defaults: dict | None = None) -> str:
    """Check ``out`` against ``config`` without writing. Returns ``"new"``, ``"resume"`` or ``"done"``.

    ``"done"`` means a finished run with the same config and at least as many iterations."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FewstepError(f"--out {out} exists and is not a directory; choose a directory path")
    cfg_path = out / "config.yaml"
    if cfg_path.exists():
        try:
            old = yaml.safe_load(cfg_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise FewstepError(f"{cfg_path} is unreadable ({str(e).splitlines()[0]}); restore it or choose "
                               "another --out") from None
        diff = config_differences(old if isinstance(old, dict) else {}, config, defaults)
        if diff:
            raise FewstepError(f"{out} holds a run with a different config ({', '.join(diff[:3])}); "
                               "choose another --out, or repeat the original settings to resume")
        done, spent = _finished_iters(out), _finished_wall_s(out)
        train = config.get("train", {})
        budget = train.get("time_budget_s", 0) or 0
        if done is not None and (done >= train.get("iters", 0) or (budget and spent >= budget)):
            return "done"
    elif out.exists() and any(out.iterdir()):
        raise FewstepError(f"--out {out} is a non-empty directory that is not a fewstep run; "
                           "choose a new or empty directory")
    has_ckpt = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("ckpt_*.pt"))
    return "resume" if has_ckpt else "new"


def record_config(out: Path, config: dict) -> None:
    """Create ``out`` (proving it writable) and write the resolved ``config.yaml`` atomically."""
    ensure_writable_dir(Path(out))
    atomic_write_text(Path(out) / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def run_dir_status(env, out: Path, config: dict, what: str, defaults: dict | None = None) -> str:
    """:func:`check_run_dir` on rank 0, shared with every rank (``env`` from ``dist.session``); a
    finished run is announced once, as the finished ``what``."""
    from fewstep.train import dist

    status = dist.on_main(check_run_dir, out, config, defaults)
    if status == "done" and env.is_main:
        print(f"{out} already holds the finished {what}; nothing to do")
    return status


def prepare_run_dir(out: Path, config: dict) -> str:
    """:func:`check_run_dir`, then :func:`record_config` unless the run is done."""
    status = check_run_dir(out, config)
    if status != "done":
        record_config(out, config)
    return status


def _finished_wall_s(out: Path) -> float:
    """Training wall time of the finished model in ``out`` (0 if unknown)."""
    try:
        return float(json.loads((out / "model.json").read_text()).get("meta", {}).get("train_wall_s", 0))
    except (ValueError, OSError, AttributeError):
        return 0.0


def _finished_iters(out: Path) -> int | None:
    """Iterations of the finished model in ``out`` (from model.json), or None."""
    meta_path = out / "model.json"
    if not (meta_path.exists() and (out / "model.safetensors").exists()):
        return None
    try:
        return int(json.loads(meta_path.read_text()).get("meta", {}).get("iterations", -1))
    except (ValueError, OSError):
        return None


# what a run writes before its first checkpoint (never model files: they may predate this attempt)
_UNSTARTED = ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "samples")


@contextmanager
def discard_unstarted_run(out: Path, existed: bool, enabled: bool = True):
    """On a user error (``FewstepError``) before a new run's first checkpoint, remove what it wrote,
    so a failed start leaves nothing behind (and the same command can simply be run again)."""
    try:
        yield
    except FewstepError:
        if enabled and out.is_dir():
            _discard(out, existed)
        raise


def _discard(out: Path, existed: bool) -> None:
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("ckpt_*.pt")):
        return  # the run has started: keep everything for the resume
    for name in _UNSTARTED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink(missing_ok=True)
    if not existed and not any(out.iterdir()):
        out.rmdir()
