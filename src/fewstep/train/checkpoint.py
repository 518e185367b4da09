"""Resume checkpoints: atomic writes, the previous good one kept, ``weights_only`` loading.

A checkpoint is one ``torch.save`` file of plain containers and tensors (state dicts of every
network and optimiser, counters, RNG states). It is written to a temporary file, flushed and
fsynced, renamed into place and the directory fsynced; older checkpoints are deleted only after
that, keeping ``keep`` of them. So a kill at any moment leaves the previous checkpoint complete.
Loading uses ``torch.load(..., weights_only=True)``, which never runs code. A run resumes from
its newest checkpoint; if that one does not load it is refused (never skipped silently: it may be
a planted or damaged file, and training on would overwrite the evidence).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from fewstep.errors import FewstepError

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def checkpoint_paths(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_torch_save(obj, path: Path) -> None:
    """Write ``obj`` to ``path`` via a temporary file + fsync + rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise FewstepError(f"could not write {path} ({reason}); the previous checkpoint is intact — "
                           "free disk space and rerun the same command to resume") from None


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Save ``state`` as ``ckpt_dir/ckpt_<step>.pt``; then prune to the newest ``keep``."""
    path = ckpt_dir / f"ckpt_{step:08d}.pt"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FewstepError(f"cannot create {ckpt_dir} ({e.strerror or e}); choose a writable --out") from None
    atomic_torch_save(state, path)
    for old in checkpoint_paths(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a safe checkpoint"
        raise FewstepError(f"{path} is not a loadable fewstep checkpoint ({_why(e)}); fewstep never runs "
                           f"code from checkpoints — {_fix(path)}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise FewstepError(f"{path} is not a fewstep checkpoint (no training state); {_fix(path)}")
    return state


def _why(e: Exception) -> str:
    if any(k in str(e) for k in ("WeightsUnpickler", "GLOBAL", "Unsupported global")):
        return "it is a pickle with code or objects that only an unsafe load would run"
    return f"truncated or corrupt: {type(e).__name__}"


def _fix(path: Path) -> str:
    older = [p for p in checkpoint_paths(path.parent) if p.name < path.name]
    if older:
        return f"delete it to resume from {older[-1].name}"
    return "delete it (or the whole checkpoints/ directory) to start over"


def load_latest(ckpt_dir: Path, map_location="cpu") -> dict:
    """The newest checkpoint. Refuses (``FewstepError``) if it does not load: resuming from an older
    one or starting over silently could hide a problem and overwrite the evidence."""
    paths = checkpoint_paths(ckpt_dir)
    if not paths:
        raise FewstepError(f"no checkpoint in {ckpt_dir} to resume from; delete the run directory to "
                           "start over")
    return load_checkpoint(paths[-1], map_location)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
