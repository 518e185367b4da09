"""Run directory logging: ``metrics.jsonl`` (one JSON object per line) and TensorBoard events."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fewstep.errors import FewstepError


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _iteration(line: str) -> float:
    """A line's iteration, or +inf for a blank or torn (unparsable) line."""
    try:
        return json.loads(line).get("iteration", -1)
    except (ValueError, AttributeError):
        return float("inf")


class RunLog:
    """Append-only metrics log for rank 0. ``resume_from(step)`` drops lines written after the
    checkpoint a run resumes from, so the log of a resumed run equals an uninterrupted one's."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        self._tb_dir = Path(run_dir) / "tb" if tensorboard else None

    def resume_from(self, step: int) -> None:
        """Keep the lines up to ``step``; a line torn by a kill mid-write is dropped."""
        if not (self.enabled and self.path.exists()):
            return
        from fewstep.train.rundir import atomic_write_text

        keep = [line for line in self.path.read_text().splitlines() if _iteration(line) <= step]
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise FewstepError(f"could not write {self.path} ({e.strerror or e}); checkpoints are intact "
                               "— free disk space and rerun the same command to resume") from None
        self._tensorboard(record)

    def _tensorboard(self, record: dict) -> None:
        if self._tb_dir is None:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                self._tb_dir = None
                return
            self._tb = SummaryWriter(str(self._tb_dir))
        step = record.get("iteration", 0)
        for k, v in record.items():
            if k != "iteration" and isinstance(v, int | float) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line torn by a kill mid-write
            continue
    return out
