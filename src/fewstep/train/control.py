"""What both training loops share around the iterations: stop signals, per-step reseeding, refused
steps and their accounting, and metric-line accumulation (docs/scaling.md).

* SIGTERM / SIGINT set a flag; the loop finishes the current iteration, writes a checkpoint and
  raises :class:`Interrupted` (the CLI exits with ``128 + signal``: 143 for SIGTERM, 130 for
  SIGINT). A second SIGINT (a second or more later) interrupts at once. Under torchrun the flag is
  agreed over all ranks, so every rank stops after the same iteration.
* The global torch RNG is reseeded from ``(seed, rank, step)`` before every iteration (EDM2's
  ``misc.set_random_seed``), so a resumed run continues with the same state as an uninterrupted one.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import torch

from fewstep.errors import FewstepError
from fewstep.train import checkpoint as ckpt
from fewstep.train import dist
from fewstep.train.rng import derive_seed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Training stopped on a signal after writing a resumable checkpoint."""

    def __init__(self, signum: int, step: int, where: str):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after iteration {step}; checkpoint written to {where} — "
                         "rerun the same command to resume")
        self.code = 128 + signum


class BadStep(Exception):
    """A non-finite loss term or gradient: the update is refused (nothing was applied)."""


class StopSignals:
    """Context manager: SIGTERM/SIGINT only set a flag that the loop reads between iterations."""

    def __init__(self):
        self.signum, self._old, self._first = 0, {}, 0.0

    def _handle(self, signum, frame):
        # a second Ctrl-C means "do not wait"; but not one within a second of the first: torchrun
        # forwards the SIGINT its workers already got from the terminal
        if self.signum == signal.SIGINT == signum and time.monotonic() - self._first > 1.0:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum, self._first = signum, time.monotonic()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False

    def requested(self) -> int:
        """The signal to stop on (0 = none), agreed over all processes."""
        return dist.all_max(self.signum)


def reseed(seed: int, step: int) -> None:
    """Seed torch's global RNG from ``(seed, rank, step)``; training draws go through ``StepRandom``,
    this only makes any stray global draw reproducible and resumable."""
    torch.manual_seed(derive_seed(seed, dist.env().rank, step, "global"))


def out_of_time(train_cfg, wall_s: float) -> bool:
    """``train.time_budget_s`` reached (agreed over processes, whose clocks differ slightly)."""
    budget = getattr(train_cfg, "time_budget_s", 0.0)
    return bool(budget) and bool(dist.all_max(int(wall_s >= budget)))


def check_refusals(count: int, limit: int, reason: str, step: int) -> None:
    """Stop once ``limit`` steps were refused (no checkpoint is written, so the last good one stays)."""
    if count >= limit:
        raise FewstepError(f"stopped after {count} refused steps (the last at iteration {step}: {reason}); "
                           "the last good checkpoint is intact — lower the learning rates or raise "
                           "train.max_bad_steps, then rerun the command to resume")


class LogAccumulator:
    """Averages logged values between metric lines; its state is checkpointed, so the lines of a
    resumed run equal an uninterrupted run's."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, logs: dict) -> None:
        for k, v in logs.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self.values.setdefault(k, []).append(float(v))

    def pop(self) -> dict:
        rec = {k: sum(v) / len(v) for k, v in self.values.items()}
        self.values = {}
        return dist.mean_floats(rec)

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.values.items()}

    def load_state_dict(self, d: dict | None) -> None:
        self.values = {k: [float(x) for x in v] for k, v in (d or {}).items()}


class Bookkeeper:
    """Rank-0 file work after each iteration, the same for both loops: refusal lines, averaged
    metric lines, evaluations, checkpoints (periodic, final and on a stop signal)."""

    def __init__(self, train_cfg, out: Path, log, stop: StopSignals):
        self.t, self.out, self.log, self.stop = train_cfg, Path(out), log, stop

    def after(self, step: int, wall_s: float, logs: dict, acc: LogAccumulator, bad_steps: int,
              state_fn, evaluate_fn=None, last: bool | None = None) -> dict | None:
        """``step`` iterations are done (``last``: the loop ends here; default ``step == iters``).
        Returns the metric line written (if any)."""
        t, stamp, rec = self.t, {"iteration": step, "wall_s": round(wall_s, 3)}, None
        last = step == t.iters if last is None else last
        if "refused_step" in logs:
            refusal = {**stamp, "refused_step": logs["refused_step"], "bad_steps": bad_steps}
            dist.on_main(self.log.log, refusal)
            check_refusals(bad_steps, t.max_bad_steps, logs["refused_step"], step)
        acc.add(logs)
        if step % t.log_every == 0 or last:
            rec = {**stamp, **acc.pop()}
            dist.on_main(self.log.log, rec)
        if evaluate_fn and t.eval_every and step % t.eval_every == 0 and not last:
            dist.on_main(lambda: self.log.log({**stamp, **evaluate_fn()}))
        signum = self.stop.requested()
        if (t.ckpt_every and step % t.ckpt_every == 0) or last or signum:
            dist.on_main(lambda: ckpt.save_checkpoint(self.out / "checkpoints", step, state_fn()))
        if signum and not last:
            raise Interrupted(signum, step, str(self.out / "checkpoints"))
        return rec

    def final(self, step: int, wall_s: float, evaluate_fn=None) -> None:
        if evaluate_fn:
            dist.on_main(lambda: self.log.log({"iteration": step, "wall_s": round(wall_s, 3),
                                               **evaluate_fn()}))
