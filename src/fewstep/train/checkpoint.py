"""Resume checkpoints: atomic writes, the previous good one kept, ``weights_only`` loading.

A checkpoint is one ``torch.save`` file of plain containers and tensors (state dicts of every
network and optimiser, counters, RNG states). It is written to a temporary file, flushed and
fsynced, then renamed into place; older checkpoints are deleted only after that, keeping
``keep`` of them. Loading uses ``torch.load(..., weights_only=True)``, which never runs code.
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
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FewstepError(f"could not write {path} ({e.strerror or e}); the previous checkpoint "
                           "is intact — free disk space or choose another --out") from None


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Save ``state`` as ``ckpt_dir/ckpt_<step>.pt``; then prune to the newest ``keep``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"ckpt_{step:08d}.pt"
    atomic_torch_save(state, path)
    for old in checkpoint_paths(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a safe checkpoint"
        raise FewstepError(f"{path} is not a loadable fewstep checkpoint ({type(e).__name__}); "
                           "delete it to resume from the previous one") from None


def load_latest(ckpt_dir: Path, map_location="cpu") -> dict | None:
    """The newest checkpoint that loads; a corrupt newest one falls back to the previous."""
    for path in reversed(checkpoint_paths(ckpt_dir)):
        try:
            return load_checkpoint(path, map_location)
        except FewstepError as e:
            warnings.warn(str(e), stacklevel=2)
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
