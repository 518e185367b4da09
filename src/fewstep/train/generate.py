"""Sampling from any model directory: our teachers (any sampler/NFE, with or without classifier-free
guidance), students, foreign teachers.

NFE counts *network evaluations*: a guided denoiser call evaluates the network on both branches
(one batched call of 2B rows, ``core.guidance``), so guided sampling reports 2 per denoiser call.
``--nfe`` sets the sampler's denoiser calls (Heun 2N - 1); students sample unguided and refuse
``--guidance`` (they learned the guided distribution during distillation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.core.guidance import guided
from fewstep.core.sampling import (
    SAMPLERS,
    karras_sigmas,
    sample_flow_euler,
    sampler_nfe,
    steps_for_nfe,
)
from fewstep.errors import FewstepError


@dataclass
class Generator:
    """A loaded model that can draw samples: a teacher (ODE sampler) or a k-step student."""

    model: torch.nn.Module
    meta: dict = field(default_factory=dict)
    role: str = "teacher"

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def cond_classes(self) -> torch.Tensor | None:
        """Text models: the data class each prompt index names (-1 none); None for label models."""
        net = getattr(self.model, "G", self.model)
        return getattr(net, "cond_classes", None)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape: recorded in model.json, or the adapter's (diffusers teachers)."""
        shape = self.meta.get("data", {}).get("shape") or getattr(self.model, "shape", None)
        if shape is None and hasattr(self.model, "G"):
            shape = getattr(self.model.G, "shape", None)
        return tuple(shape or ())

    def default_nfe(self) -> int:
        if self.role == "student":
            return self.model.num_steps
        return int(self.meta.get("nfe", 35))

    def labels(self, n: int, device) -> torch.Tensor | None:
        """Balanced class labels ``arange(n) % C`` for conditional models, else None."""
        return torch.arange(n, device=device) % self.num_classes if self.num_classes else None

    def denoiser(self, guidance: float = 1.0):
        """The teacher's denoiser at guidance ``w`` (the model itself at w = 1); one-line errors for
        students and for teachers without an unconditional branch."""
        if not math.isfinite(guidance) or guidance < 0:
            raise FewstepError(f"--guidance must be a finite number >= 0 (1 = no guidance), got {guidance}")
        if guidance != 1 and self.role == "student":
            raise FewstepError("students sample without guidance (they learned the guided distribution "
                               "when distilled with --guidance); omit --guidance")
        return guided(self.model, guidance)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, nfe: int | None = None, sampler: str = "heun",
               batch: int = 256, device="cpu", labels: torch.Tensor | None = None,
               progress=None, guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` samples ``[n, *shape]`` (float32, CPU) and their labels. The noise comes from one
        generator seeded by ``seed``, so results do not depend on ``batch``. ``guidance`` is the
        classifier-free guidance scale w of a teacher (1 = none)."""
        D = self.denoiser(guidance)
        if not self.shape:
            raise FewstepError("cannot tell the sample shape of this model; pass a fewstep run "
                               "directory or a diffusers UNet2DModel directory")
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, *self.shape, generator=g)
        labels = self.labels(n, "cpu") if labels is None else labels
        out = []
        for i in range(0, n, batch):
            zb = z[i:i + batch].to(device)
            yb = None if labels is None else labels[i:i + batch].to(device)
            out.append(self._sample_batch(zb, yb, nfe, sampler, seed + i, D).float().cpu())
            if progress:
                progress(len(zb))
        return torch.cat(out), labels

    def _sample_batch(self, z, y, nfe, sampler, seed, D):
        if self.role == "student":
            if nfe not in (None, self.model.num_steps):
                raise FewstepError(f"this student samples in {self.model.num_steps} steps; "
                                   f"omit --nfe or pass --nfe {self.model.num_steps}")
            return self.model.sample(z, y, generator=torch.Generator().manual_seed(seed))
        nfe = nfe or self.default_nfe()
        if sampler == "flow_euler":  # flow teachers: diffusers' flow Euler, from t = 1 (pure noise)
            if not callable(getattr(self.model, "flow_times", None)) or \
                    getattr(self.model, "objective", "flow") != "flow":
                raise FewstepError("--sampler flow_euler needs a flow teacher (fewstep teacher "
                                   "--objective flow, or a diffusers flow-matching model)")
            if D is not self.model:
                raise FewstepError("--sampler flow_euler samples unguided; use --sampler heun or euler "
                                   "with --guidance")
            times = self.model.flow_times(nfe).to(z.device)
            return sample_flow_euler(self.model.velocity, z, times, y)
        if sampler == "dpmpp":
            from fewstep.train.dpm import sample_dpmpp

            lo, hi = _sigma_range(self.model)
            return sample_dpmpp(D, z, nfe, y, sigma_min=lo, sigma_max=hi,
                                sigma_data=float(getattr(self.model, "sigma_data", 0.5)))
        steps = _steps_for_nfe(sampler, nfe)
        sigmas = teacher_sigmas(self.model, steps).to(z.device)
        return SAMPLERS[sampler](D, z.double() * sigmas[0], sigmas, y)

    def nfe(self, nfe: int | None, sampler: str, guidance: float = 1.0) -> int:
        """Network evaluations per sample: the sampler's denoiser calls, times 2 when guided."""
        if self.role == "student":
            return self.model.num_steps
        calls = nfe or self.default_nfe()
        if sampler not in ("dpmpp", "flow_euler"):  # Heun's 2N - 1
            calls = sampler_nfe(sampler, _steps_for_nfe(sampler, calls))
        return calls * (1 if guidance == 1 else 2)


def _steps_for_nfe(sampler: str, nfe: int) -> int:
    """``core.sampling.steps_for_nfe`` with its refusal (an even Heun NFE) as a user error."""
    try:
        return steps_for_nfe(sampler, nfe)
    except ValueError as e:
        raise FewstepError(str(e)) from None


def _sigma_range(model) -> tuple[float, float]:
    """EDM's [0.002, 80] clamped to the model's native range (foreign teachers have a table)."""
    lo = max(0.002, float(getattr(model, "sigma_min", 0.0) or 0.0))
    hi = min(80.0, float(getattr(model, "sigma_max", math.inf) or math.inf))
    return lo, hi


def teacher_sigmas(model, steps: int) -> torch.Tensor:
    """The Karras grid over the model's sigma range, ending in 0; a model with its own grid (a
    diffusers flow teacher: its scheduler's shifted grid) uses that."""
    lo, hi = _sigma_range(model)
    if hasattr(model, "sampling_sigmas"):
        return model.sampling_sigmas(steps, sigma_max=hi)
    return karras_sigmas(steps, sigma_min=lo, sigma_max=hi)


def load_generator(path: str | Path, device="cpu", prompts: list[str] | None = None) -> Generator:
    """Load a run directory (teacher or student) or a diffusers directory for sampling; ``prompts``
    (``--prompts FILE``): the conditions of a text model (a student's are encoded by its teacher's text
    encoder), sampled in turn."""
    from fewstep.models.io import MODEL_JSON, load_teacher, read_model_json

    student = (Path(path) / MODEL_JSON).is_file() and read_model_json(path)[1].get("role") == "student"
    model, meta = load_teacher(path, None if student else prompts)
    if student and prompts is not None:
        from fewstep.models.text_cond import with_prompts

        model = with_prompts(model, prompts, meta.get("teacher", ""))
    role = meta.get("role", "teacher")
    if role == "student":
        from fewstep.models.student import Student

        model = Student(model, meta["sigmas"], renoise=meta.get("renoise", "fresh"))
    model = model.to(device).eval().requires_grad_(False)
    return Generator(model=model, meta=meta, role=role)


def throughput(gen: Generator, nfe, sampler, device, batch: int = 256, repeats: int = 2,
               guidance: float = 1.0) -> float:
    """Samples per second at ``batch`` after one warm-up batch (BENCHMARKS.md samples_per_sec); a
    guided teacher is timed guided (both branches)."""
    kw = {"nfe": nfe, "sampler": sampler, "batch": batch, "device": device, "guidance": guidance}
    gen.sample(min(batch, 32), seed=12345, **kw)
    t0 = time.perf_counter()
    for r in range(repeats):
        gen.sample(batch, seed=r, **kw)
    return repeats * batch / (time.perf_counter() - t0)


def sample_to_file(model: str, out: Path, n: int, nfe: int | None = None, sampler: str = "heun",
                   seed: int = 0, device: str = "auto", data: str | None = None,
                   guidance: float = 1.0, prompts: list[str] | None = None) -> int:
    """``fewstep sample``: ``n`` samples of a teacher or student into ``out`` (a grid or 2-D scatter
    ``.png``, or ``.npz``), guided by ``guidance`` (teachers); ``data`` names the data set whose modes
    a scatter draws (default: the model's). Returns the network evaluations used."""
    from fewstep.report.pictures import save_samples
    from fewstep.train.device import resolve_device

    out = Path(out)
    if out.suffix not in (".png", ".npz"):
        raise FewstepError(f"--out must end in .png or .npz, got '{out.name}'")
    if n <= 0:
        raise FewstepError(f"--n must be positive, got {n}")
    dev = resolve_device(device)
    gen = load_generator(model, dev, prompts)
    if data:
        gen.meta = {**gen.meta, "data": {**gen.meta.get("data", {}), "name": data, "path": None}}
    x, y = gen.sample(n, seed=seed, nfe=nfe, sampler=sampler, device=dev, guidance=guidance)
    save_samples(out, x, y, gen)
    return gen.nfe(nfe, sampler, guidance)
