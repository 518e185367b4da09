"""Shared test utilities: a pinned random source and tiny analytic/neural denoisers."""

from __future__ import annotations

import copy

import torch

from fewstep.losses import BASES
from fewstep.train.rng import StepRandom

# a tiny MLP teacher spec for engine smoke tests
MLP = {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "num_classes": 0, "sigma_data": 0.5}


class FixedRandom(StepRandom):
    """A StepRandom whose streams can be pinned to given tensors (``overrides[stream]``)."""

    def __init__(self, batch: int, seed: int = 0, step: int = 0, overrides: dict | None = None,
                 dtype=torch.float64):
        super().__init__(seed, step, batch)
        self.overrides = overrides or {}
        self.dtype = dtype

    def randn(self, stream, *shape, dtype=None):
        if stream in self.overrides:
            return self.overrides[stream]
        return super().randn(stream, *shape, dtype=dtype or self.dtype)

    def rand(self, stream, *shape, dtype=None):
        if stream in self.overrides:
            return self.overrides[stream]
        return super().rand(stream, *shape, dtype=dtype or self.dtype)

    def randint(self, stream, low, high, *shape):
        if stream in self.overrides:
            return self.overrides[stream]
        return super().randint(stream, low, high, *shape)


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(mu, s^2 I): D = (s^2 x + sigma^2 mu)/(s^2 + sigma^2); mu is a parameter
    so tests can check which networks receive gradients."""

    def __init__(self, mu, s: float):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.as_tensor(mu, dtype=torch.float64).clone())
        self.s, self.num_classes, self.sigma_data = s, 0, 0.5

    def forward(self, x, sigma, cond=None):
        s2, sig2 = self.s**2, sigma.to(x.dtype)[:, None] ** 2
        return (s2 * x + sig2 * self.mu) / (s2 + sig2)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def tiny_run(method: str, overrides: dict | None = None):
    from fewstep.config import DistillRunConfig, from_dict
    from fewstep.models.io import build_denoiser
    from fewstep.train.distill import build_run

    torch.manual_seed(0)
    teacher = build_denoiser(MLP)
    with torch.no_grad():  # leave the zero-initialised output layer: a non-trivial teacher
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = _merge(BASES[method].defaults,
               {"method": method, "train": {"batch": 16, "iters": 4}, **(overrides or {})})
    cfg = from_dict(DistillRunConfig, d)
    return build_run(cfg, torch.device("cpu"), teacher=teacher,
                     teacher_meta={"data": {"name": "ring8", "shape": [2]}})


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(module, before) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


def save_tiny_teacher(out, spec: dict | None = None, data: dict | None = None):
    """A tiny randomised MLP teacher saved as a fewstep model directory (for CLI/engine runs)."""
    from fewstep.models.io import build_denoiser, save_model

    spec = spec or MLP
    torch.manual_seed(0)
    teacher = build_denoiser(spec)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    data = data or {"name": "ring8", "kind": "vector", "shape": [spec["dim"]],
                    "num_classes": spec["num_classes"]}
    save_model(out, teacher, spec, {"role": "teacher", "iterations": 0, "data": data,
                                    "sampler": "heun", "nfe": 9})
    return out


def tensors_max_diff(a, b, skip=("wall_s",)) -> float:
    """Largest absolute difference between two nested state containers (structure must match)."""
    if isinstance(a, dict):
        assert set(a) == set(b), set(a) ^ set(b)
        return max([tensors_max_diff(a[k], b[k], skip) for k in a if k not in skip] or [0.0])
    if isinstance(a, list | tuple):
        assert len(a) == len(b)
        return max([tensors_max_diff(x, y, skip) for x, y in zip(a, b)] or [0.0])
    if torch.is_tensor(a):
        assert a.shape == b.shape and a.dtype == b.dtype
        return 0.0 if a.numel() == 0 else float((a.double() - b.double()).abs().max())
    return 0.0 if a == b else float("inf")


def assert_states_equal(a, b, skip=("wall_s",), where="state") -> None:
    """Bit-for-bit equality of two nested state containers (tensors via ``torch.equal``)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            if k not in skip:
                assert_states_equal(a[k], b[k], skip, f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, skip, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)
