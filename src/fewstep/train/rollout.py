"""The student rollouts a run chooses with ``student.rollout`` (DMD2 section 4), for the generator
and critic phases; a method may bring its own instead (``Method.rollout``, e.g. DP-DMD's).

* ``full``: the whole k-step chain with gradient through every step (DP-DMD's baseline arm).
* ``backsim``: DMD2's backward simulation: a step index j shared by all processes; the first j
  steps run without gradient from fresh noise, the result is re-noised to sigma_j, and the
  generator is trained on its x0 prediction at sigma_j.
"""

from __future__ import annotations

import torch

from fewstep.losses.base import Batch, GenOut
from fewstep.models.student import Student


def _noises(batch: Batch, student: Student, stream: str, like: torch.Tensor) -> list[torch.Tensor]:
    return [batch.rnd.randn(f"{stream}{i}", *like.shape[1:]).to(like)
            for i in range(student.num_steps - 1)]


def rollout_full(student: Student, batch: Batch, z: torch.Tensor) -> GenOut:
    x_T = student.sigma(0) * z
    noises = _noises(batch, student, "renoise", z) if student.renoise == "fresh" else None
    x = student(z, batch.cond, noises)
    return GenOut(x=x, x_T=x_T, sigma=student.sigma(student.num_steps - 1))


def rollout_backsim(student: Student, batch: Batch, z: torch.Tensor) -> GenOut:
    k = student.num_steps
    x_T = student.sigma(0) * z
    j = batch.rnd.shared_randint("backsim", 0, k) if k > 1 else 0
    x_j = x_T
    if j > 0:
        with torch.no_grad():
            x = student.sigma(0) * batch.rnd.randn("backsim_z", *z.shape[1:]).to(z)
            for i in range(j):
                x0 = student.denoise(x, i, batch.cond)
                eps = batch.rnd.randn(f"backsim_eps{i}", *z.shape[1:]).to(z)
                x = student.move(x, x0, i, eps)
            x_j = x
    return GenOut(x=student.denoise(x_j, j, batch.cond), x_T=x_T, sigma=student.sigma(j))


STUDENT_ROLLOUTS = {"full": rollout_full, "backsim": rollout_backsim}  # student.rollout
