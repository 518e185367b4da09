"""EDM's preconditioners around fewstep's EDM networks, as fewstep denoisers ``D(x, sigma, cond)``.

``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels)`` with the scalings of EDM Table 1, as
``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond`` in NVlabs/edm ``training/networks.py`` and ``Precond`` in
NVlabs/edm2 ``training/networks_edm2.py``:

* EDM:  ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
  ``c_noise = ln(s)/4`` (EDM2 the same).
* VP:   ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = (M-1) sigma^-1(s)`` with
  ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``; ``sigma_min = sigma(epsilon_t)``,
  ``sigma_max = sigma(1)``.
* VE:   ``c_skip = 1``, ``c_out = s``, ``c_in = 1``, ``c_noise = ln(s/2)``.

The constructors take EDM's arguments (a pickle's ``_init_kwargs``); parameters live under ``model.``
(``unet.`` for EDM2) exactly as in the checkpoints. ``cond`` is a class index ``[B]`` (-1 or None =
unconditional: the zero one-hot, as EDM). The network runs in its parameter dtype; ``use_fp16`` is
recorded but not acted on. ``boundary=True`` (consistency students) re-expresses the output in EDM form
and recombines it with the consistency-model scalings, so ``D(x, boundary_sigma_min) = x`` exactly.

Spec (``model.json``): ``{"type": "edm_songunet" | "edm_dhariwal" | "edm2_unet", "precond": ...,
"precond_kwargs": {...}, "model_kwargs": {...}, "boundary": bool, "boundary_sigma_min": float}``;
an infinite ``sigma_max`` is stored as null.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from fewstep.core.precond import (
    SIGMA_DATA,
    SIGMA_MIN,
    boundary_scalings,
    edm_scalings,
    one_hot,
    precond_dtype,
)
from fewstep.core.utils import append_dims, as_sigma
from fewstep.errors import ModelError
from fewstep.models.edm_nets import DhariwalUNet, SongUNet
from fewstep.models.edm_nets2 import EDM2UNet, MPConv, MPFourier

# spec type -> EDM model class name; the preconditioners allowed with it
SPEC_TYPES = {"edm_songunet": "SongUNet", "edm_dhariwal": "DhariwalUNet", "edm2_unet": "UNet"}
MODELS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "UNet": EDM2UNet}
# arguments the preconditioner passes to the model itself (not part of model_kwargs)
INTERFACE_ARGS = {"img_resolution", "in_channels", "out_channels", "label_dim", "img_channels"}


class _Precond(nn.Module):
    """Shared denoiser plumbing; subclasses give ``native_scalings(sigma [B])`` and ``model_forward``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        self.num_classes = int(label_dim)
        self.shape = (img_channels, img_resolution, img_resolution)
        self.sigma_data = SIGMA_DATA  # VP/VE have none: fewstep's losses and boundary use 0.5
        self.sigma_min, self.sigma_max = 0.0, math.inf
        self.boundary, self.boundary_sigma_min = False, SIGMA_MIN

    def scalings(self, sigma: torch.Tensor):
        c_skip, c_out, c_in, c_noise = self.native_scalings(sigma)
        if self.boundary:  # F_edm = (D - e_skip x)/e_out, then D_b = b_skip x + b_out F_edm
            e_skip, e_out, _, _ = edm_scalings(sigma, self.sigma_data)
            b_skip, b_out, _, _ = boundary_scalings(sigma, self.sigma_data, self.boundary_sigma_min)
            ratio = b_out / e_out
            c_skip, c_out = b_skip + ratio * (c_skip - e_skip), ratio * c_out
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, C, H, W]``, ``sigma`` float or ``[B]``, ``cond`` class indices ``[B]`` -> ``D``."""
        dtype = next(self.parameters()).dtype
        x_in = x.to(precond_dtype(dtype))
        sigma = as_sigma(sigma, x_in)
        labels = one_hot(cond, self.label_dim, x.shape[0], x_in.to(dtype))
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.model_forward((append_dims(c_in, x.ndim) * x_in).to(dtype), c_noise, labels)
        D_x = append_dims(c_skip, x.ndim) * x_in + append_dims(c_out, x.ndim) * F_x.to(x_in.dtype)
        return D_x.to(x.dtype)


class _EDM1Precond(_Precond):
    """EDM (2022) preconditioners: the network is ``self.model`` (SongUNet or DhariwalUNet)."""

    def _build_model(self, model_type: str, model_kwargs: dict) -> None:
        if model_type not in ("SongUNet", "DhariwalUNet"):
            raise ValueError(f"model_type={model_type!r} is not one of ['SongUNet', 'DhariwalUNet']")
        self.model = MODELS[model_type](img_resolution=self.img_resolution, in_channels=self.img_channels,
                                        out_channels=self.img_channels, label_dim=self.label_dim,
                                        **model_kwargs)

    def model_forward(self, x, c_noise, labels):
        return self.model(x, c_noise, labels)


class EDMPrecondNet(_EDM1Precond):
    EDM_CLASS = "EDMPrecond"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.0, sigma_max: float = math.inf, sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(sigma_data)
        self._build_model(model_type, model_kwargs)

    def native_scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)


class VPPrecondNet(_EDM1Precond):
    EDM_CLASS = "VPPrecond"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        # EDM evaluates these on float32 tensors; so do we, so the recorded values agree bit for bit
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float32)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float32)))
        self._build_model(model_type, model_kwargs)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """VP noise level ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (EDM Table 1)."""
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """``t(sigma)``: the positive root of ``beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2)``."""
        root = (self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt()
        return (root - self.beta_min) / self.beta_d

    def native_scalings(self, sigma):
        one = torch.ones_like(sigma)
        return one, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecondNet(_EDM1Precond):
    EDM_CLASS = "VEPrecond"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100.0, model_type: str = "SongUNet",
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._build_model(model_type, model_kwargs)

    def native_scalings(self, sigma):
        one = torch.ones_like(sigma)
        return one, sigma, one, (0.5 * sigma).log()


class EDM2PrecondNet(_Precond):
    """EDM2's ``Precond``: EDM scalings around the EDM2 UNet (``self.unet``); the uncertainty head
    (``logvar_*``) is loaded with the weights but not used by fewstep."""

    EDM_CLASS = "Precond"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_data = float(sigma_data)
        self.unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                             **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])

    def native_scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)

    def model_forward(self, x, c_noise, labels):
        return self.unet(x, c_noise, labels)


PRECONDS = {c.EDM_CLASS: c for c in (EDMPrecondNet, VPPrecondNet, VEPrecondNet, EDM2PrecondNet)}
SPEC_KEYS = {"type", "precond", "precond_kwargs", "model_kwargs", "boundary", "boundary_sigma_min"}


# --- spec <-> network ----------------------------------------------------------------------------
def _named_args(fn, skip=()) -> dict[str, inspect.Parameter]:
    params = inspect.signature(fn).parameters
    return {k: p for k, p in params.items() if k not in ("self", *skip)
            and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _complete(owner: str, params: dict[str, inspect.Parameter], given: dict) -> dict:
    """``given`` checked against ``params`` (unknown / missing -> ModelError) with defaults filled in,
    JSON-ready (tuples -> lists, infinity -> None)."""
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ModelError(f"unknown argument(s) {unknown} for {owner}; fewstep's version accepts "
                         f"{sorted(params)}")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in given]
    if missing:
        raise ModelError(f"{owner} needs the argument(s) {missing}")
    out = {}
    for k, p in params.items():
        v = given.get(k, p.default)
        out[k] = list(v) if isinstance(v, tuple) else None if isinstance(v, float) and math.isinf(v) else v
    return out


def _precond_for(spec_type: str, precond: str):
    allowed = ["Precond"] if spec_type == "edm2_unet" else ["EDMPrecond", "VPPrecond", "VEPrecond"]
    if precond not in allowed:
        raise ModelError(f"model spec {spec_type!r}: precond {precond!r} is not one of {allowed}")
    return PRECONDS[precond]


def normalize_edm_spec(spec: dict) -> dict:
    """Check an EDM model spec and fill in every default -> a complete, JSON-ready spec."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ModelError(f"unknown key(s) {unknown} in the {spec['type']} model spec; "
                         f"allowed: {sorted(SPEC_KEYS)}")
    default_precond = "Precond" if spec["type"] == "edm2_unet" else None
    precond = spec.get("precond", default_precond)
    cls = _precond_for(spec["type"], precond)
    model_name = SPEC_TYPES[spec["type"]]
    pk, mk = dict(spec.get("precond_kwargs") or {}), dict(spec.get("model_kwargs") or {})
    if pk.get("model_type", model_name) != model_name:
        raise ModelError(f"model spec {spec['type']!r} has model_type {pk['model_type']!r}, "
                         f"expected {model_name!r}")
    pk.pop("model_type", None)
    model_args = _named_args(MODELS[model_name].__init__, INTERFACE_ARGS)
    return {"type": spec["type"], "precond": precond,
            "precond_kwargs": _complete(precond, _named_args(cls.__init__, ("model_type",)), pk),
            "model_kwargs": _complete(model_name, model_args, mk),
            "boundary": bool(spec.get("boundary", False)),
            "boundary_sigma_min": float(spec.get("boundary_sigma_min", SIGMA_MIN))}


def build_edm_denoiser(spec: dict) -> _Precond:
    """A (normalised or not) EDM spec -> the denoiser with fresh weights; ``.spec`` is the full spec."""
    spec = normalize_edm_spec(spec)
    cls = PRECONDS[spec["precond"]]
    pk = {k: (math.inf if k == "sigma_max" and v is None else v) for k, v in spec["precond_kwargs"].items()}
    if spec["type"] != "edm2_unet":
        pk["model_type"] = SPEC_TYPES[spec["type"]]
    try:
        D = cls(**pk, **spec["model_kwargs"])
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ModelError(f"cannot build the {spec['precond']} / {SPEC_TYPES[spec['type']]} network from its "
                         f"arguments ({e})") from None
    D.boundary, D.boundary_sigma_min = spec["boundary"], spec["boundary_sigma_min"]
    D.spec = spec
    return D


def spec_from_init_kwargs(class_name: str, init_kwargs: dict) -> dict:
    """An EDM pickle's top-level class name and ``_init_kwargs`` -> a complete spec."""
    if class_name not in PRECONDS:
        raise ModelError(f"unsupported EDM network class {class_name!r}; fewstep loads "
                         f"{sorted(PRECONDS)} (EDM / EDM2 preconditioners)")
    cls = PRECONDS[class_name]
    precond_names = set(_named_args(cls.__init__))
    kwargs = dict(init_kwargs)
    if class_name == "Precond":
        spec_type = "edm2_unet"
    else:
        default = inspect.signature(cls.__init__).parameters["model_type"].default
        model_type = kwargs.get("model_type", default)
        types = {v: k for k, v in SPEC_TYPES.items() if k != "edm2_unet"}
        if model_type not in types:
            raise ModelError(f"unsupported EDM model_type {model_type!r}; fewstep loads {sorted(types)}")
        spec_type = types[model_type]
    pk = {k: v for k, v in kwargs.items() if k in precond_names}
    mk = {k: v for k, v in kwargs.items() if k not in precond_names}
    return normalize_edm_spec({"type": spec_type, "precond": class_name, "precond_kwargs": pk,
                               "model_kwargs": mk})
