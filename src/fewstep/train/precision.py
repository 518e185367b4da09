"""Mixed precision, a half-precision frozen teacher, and activation checkpointing (issue 21;
docs/scaling.md "Precision and memory").

* ``train.precision = bf16 | fp16``: every *network forward* of a training iteration runs under
  ``torch.autocast(device, dtype)``, and nothing else does. The networks of a run (teacher,
  student's denoiser, fake score, GAN head, target) get a forward pre-hook that enters autocast
  and an always-called forward hook that leaves it and casts half-precision outputs to float32. So
  the student's k-step chain, sigma conversions, every loss and the float64 kernels run outside
  autocast on float32/float64 tensors, and parameters and optimiser state stay float32 (master
  weights). The hooks enter autocast only while :meth:`Precision.training` is active, so in-loop
  evaluation runs in float32 like ``fewstep eval``. ``fp32`` installs no hook: the path is today's.
* fp16 adds one ``torch.amp.GradScaler`` per update phase (:data:`SCALED_PHASES`): the critic
  phase's one backward feeds the fake score and the GAN head, so they share one loss scale (the
  multi-optimiser pattern of the PyTorch AMP docs); each optimiser is unscaled and stepped (or
  skipped on overflow) on its own. The scalers' state is part of the resume checkpoint.
* ``train.teacher_dtype = bf16``: the frozen teacher's weights are stored in bfloat16 (half the
  memory; it has no optimiser) and it runs in bfloat16 whatever ``train.precision`` is (no autocast
  hook: its weights already are half precision); the preconditioning around it stays float32 and
  its output is cast to float32 at the denoiser boundary.
* ``train.checkpointing``: diffusers' ``enable_gradient_checkpointing()`` (non-reentrant
  ``torch.utils.checkpoint`` on each UNet block) on every diffusers model inside a trained network.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fewstep.core.utils import upcast
from fewstep.errors import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEACHER_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
SCALED_PHASES = ("generator", "critic")  # distillation: one GradScaler per backward pass


def to_float32(out):
    """Half-precision tensors in a network's output (a tensor or a tuple/list of them) -> float32;
    float32/float64 outputs are left as they are."""
    if isinstance(out, tuple | list):
        return type(out)(to_float32(o) for o in out)
    return upcast(out)


class Precision:
    """The autocast policy of one run: ``name`` is ``train.precision``, ``device`` the run device."""

    def __init__(self, name: str, device):
        self.name, self.dtype = name, DTYPES[name]
        self.device_type = torch.device(device).type
        self.armed = False
        self._stack: list = []  # (module, autocast context) of the network forwards now running
        self.handles: list = []

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def install(self, modules) -> None:
        """Hook ``modules`` (networks called by the losses) so their forwards autocast."""
        if not self.enabled:
            return
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _enter(self, module, args):
        if self.armed and not self._stack:  # nested hooked calls run inside the outer context
            ctx = torch.autocast(self.device_type, dtype=self.dtype)
            ctx.__enter__()
            self._stack.append((module, ctx))

    def _leave(self, module, args, out):
        if self._stack and self._stack[-1][0] is module:
            self._stack.pop()[1].__exit__(None, None, None)
        return to_float32(out)

    @contextmanager
    def training(self):
        """Arm the hooks for one training iteration (evaluation stays float32)."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False
            while self._stack:  # a forward that raised before its hook ran: leave its context
                self._stack.pop()[1].__exit__(None, None, None)


def unscale(opt, scaler) -> None:
    """fp16: the gradients of ``opt``'s parameters back to their true size before clipping."""
    if scaler is not None:
        scaler.unscale_(opt)


def step(opt, scaler) -> None:
    """``opt.step()``, or under a GradScaler its step (skipped, with the scale lowered, on overflow;
    call ``scaler.update()`` once after every optimiser of the backward pass has stepped)."""
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)


def make_scalers(precision: Precision, names) -> dict:
    """fp16: ``{name: GradScaler}`` for each backward pass; otherwise none."""
    if precision.dtype is not torch.float16:
        return {}
    return {n: torch.amp.GradScaler(precision.device_type) for n in names}


def cast_teacher(teacher: nn.Module, name: str) -> nn.Module:
    """Store the frozen teacher's weights in ``train.teacher_dtype`` (in place); a forward hook casts
    its outputs back to float32 (the denoiser boundary; the preconditioning itself runs in float32,
    ``core.precond.precond_dtype``)."""
    dtype = TEACHER_DTYPES[name]
    if dtype is not None:
        for p in teacher.parameters():  # parameters only: fixed buffers such as the MLP's Fourier
            p.data = p.data.to(dtype)   # frequencies (up to 1000) keep float32 phases
        teacher.register_forward_hook(lambda _m, _a, out: to_float32(out), always_call=True)
    return teacher


def enable_checkpointing(net: nn.Module, what: str) -> int:
    """Activation checkpointing on every diffusers model inside ``net`` (``UNet2DModel``'s blocks
    recompute their activations in the backward pass); returns how many models were switched.

    MLPs (and networks without a diffusers model, e.g. EDM's own UNets) are refused: an MLP stores
    a few activations per sample, so there is nothing worth recomputing."""
    found = 0
    for module in net.modules():
        if getattr(module, "_supports_gradient_checkpointing", False):  # a diffusers ModelMixin
            module.enable_gradient_checkpointing()
            found += 1
    if not found:
        raise ConfigError(f"train.checkpointing=true needs a diffusers UNet network, but the {what} "
                          f"({type(net).__name__}) has none (MLPs store few activations); set "
                          "train.checkpointing=false")
    return found
