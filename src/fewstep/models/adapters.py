"""Foreign teachers behind the denoiser contract ``D(x, sigma, cond) -> x0_hat`` (edm_core.md section 6).

Like ``k_diffusion/external.py``: a diffusers DDPM-family UNet (eps-, v- or x0-prediction) or a
rectified-flow velocity model is converted at the boundary, so losses and samplers only see sigma and
D. The conversion formulas live in ``core.schedules``; this file only wires them to the models.
diffusers is imported inside the functions that need it.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fewstep.core.precond import SIGMA_MIN, boundary_scalings, edm_scalings
from fewstep.core.schedules import (
    eps_to_denoised,
    flow_to_denoised,
    sigma_to_flow_s,
    sigma_to_t,
    v_to_denoised,
    vp_sigmas_from_alphas_cumprod,
)
from fewstep.core.utils import append_dims
from fewstep.errors import ModelError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Schedulers whose training noise is the discrete VP table built from betas (DDPM, Ho et al. 2020).
DDPM_FAMILY = frozenset({
    "DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler", "LCMScheduler",
    "TCDScheduler", "SASolverScheduler"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (float or ``[B]``/scalar tensor) -> float64 ``[B]`` on the CPU, so that ``t(sigma)`` is
    computed at full precision whatever dtype and device the caller uses (MPS has no float64).
    sigma is not differentiated through a foreign teacher."""
    s = torch.as_tensor(sigma).detach().cpu().double()
    return s.expand(x.shape[0]) if s.ndim == 0 else s.reshape(x.shape[0])


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least for timesteps (half precision cannot tell 999 from 999.5); float64 only
    when the model runs in float64 (identity tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class DiffusersDDPMDenoiser(nn.Module):
    """A discrete-time diffusers ``UNet2DModel`` as ``D(x, sigma, cond)`` (k-diffusion
    ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``; edm_core.md section 6).

    ``sigma_t = sqrt((1 - abar_t)/abar_t)``; the net sees ``x_vp = x / sqrt(sigma^2 + 1)`` and the
    fractional timestep ``t(sigma)`` (``quantize=True``: nearest integer). Then
    eps: ``D = x - sigma eps_hat``; v: ``D = x/(sigma^2+1) - sigma/sqrt(sigma^2+1) v_hat``;
    sample: ``D = x0_hat``. Learned-variance nets (2C output channels) use the first C.
    A class-conditional UNet (``num_class_embeds``) gets labels ``[B]``; labels ``-1``/None map to
    ``null_class`` if the model has one, else they are an error.

    ``boundary=True`` (consistency students): the output is re-expressed in EDM form,
    ``F = (D - c_skip x) / c_out`` with EDM's scalings, and recombined with the consistency-model
    scalings (CM Appendix C), so ``D(x, sigma_min) = x`` exactly while the network is unchanged.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 quantize: bool = False, null_class: int | None = None, boundary: bool = False,
                 boundary_sigma_min: float = SIGMA_MIN):
        super().__init__()
        self.boundary, self.boundary_sigma_min = boundary, boundary_sigma_min
        if prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"unsupported prediction_type {prediction_type!r}; fewstep supports "
                             f"{', '.join(PREDICTION_TYPES)}")
        config = getattr(unet, "config", {})
        if config.get("class_embed_type") is not None:
            raise ModelError(f"unsupported UNet class_embed_type {config.get('class_embed_type')!r}; "
                             "only plain num_class_embeds label conditioning is supported")
        self.unet, self.prediction_type, self.null_class = unet, prediction_type, null_class
        # learned time embeddings are nn.Embedding lookups: they need integer timesteps
        self.quantize = quantize or config.get("time_embedding_type") == "learned"
        # float64 CPU table kept off the buffer list so .float()/.half()/.to(mps) cannot round it
        self.sigma_table = vp_sigmas_from_alphas_cumprod(torch.as_tensor(alphas_cumprod)).cpu()
        self.num_classes = int(config.get("num_class_embeds") or 0)
        self.sigma_min, self.sigma_max = float(self.sigma_table[0]), float(self.sigma_table[-1])
        self.sigma_data = 0.5
        size = config.get("sample_size")
        if size is not None and "in_channels" in config:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            self.shape = (config["in_channels"], *hw)

    def _labels(self, cond: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if cond is None:
            cond = torch.full((batch,), -1, dtype=torch.long, device=device)
        if (cond < 0).any():
            if self.null_class is None:
                raise ModelError("this diffusers teacher is class-conditional and has no unconditional "
                                 "class; give class labels (or pass null_class=)")
            cond = torch.where(cond < 0, torch.full_like(cond, self.null_class), cond)
        return cond.long()

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, C, H, W]`` in EDM space, ``sigma [B]`` (or a float) -> ``D [B, C, H, W]``."""
        sigma64 = _batch_sigma(sigma, x)
        t = sigma_to_t(sigma64, self.sigma_table, self.quantize)
        sig = sigma64.to(device=x.device, dtype=x.dtype)
        c_in = (1 / (sigma64**2 + 1).sqrt()).to(device=x.device, dtype=x.dtype)  # = sqrt(abar_t)
        dtype = next(self.unet.parameters()).dtype
        x_in = (append_dims(c_in, x.ndim) * x).to(dtype)
        timestep = (t.long() if self.quantize else t.to(_time_dtype(dtype))).to(x.device)
        out = self.unet(x_in, timestep, class_labels=self._labels(cond, x.shape[0], x.device))
        out = out.sample if hasattr(out, "sample") else out
        out = out[:, : x.shape[1]].to(x.dtype)  # learned variance: first C channels are the mean part
        if self.prediction_type == "epsilon":
            D = eps_to_denoised(x, sig, out)
        elif self.prediction_type == "v_prediction":
            D = v_to_denoised(x, sig, out)
        else:
            D = out
        return self._to_boundary(x, sig, D) if self.boundary else D

    def _to_boundary(self, x: torch.Tensor, sigma: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """EDM form ``D = c_skip x + c_out F`` -> boundary form with the same ``F`` (``sigma [B]``)."""
        c_skip, c_out, _, _ = edm_scalings(sigma, self.sigma_data)
        b_skip, b_out, _, _ = boundary_scalings(sigma, self.sigma_data, self.boundary_sigma_min)
        F = (D - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)
        return append_dims(b_skip, x.ndim) * x + append_dims(b_out, x.ndim) * F


class FlowDenoiser(nn.Module):
    """A rectified-flow velocity model as ``D(x, sigma, cond)`` (edm_core.md section 6, convention A).

    ``x_s = (1 - s) x_0 + s eps`` and ``v = eps - x_0``; ``s = sigma/(1 + sigma)``, the model sees
    ``x_s = x/(1 + sigma)`` and time ``t_scale * s'`` with ``s' = shift s / (1 + (shift - 1) s)`` (SD3
    timestep shift; ``shift=1`` is the identity); ``D = x/(1+sigma) - sigma/(1+sigma) v_hat``.
    ``model(x_s [B, ...], t [B], cond) -> v [B, ...]`` may be any callable.

    Note: diffusers' SD3/Flux schedulers feed the model the already-shifted *physical* s, i.e. their
    shift only moves the sampling grid; such models need ``shift=1`` here.
    """

    def __init__(self, model: Callable, shift: float = 1.0, t_scale: float = 1000.0,
                 num_classes: int | None = None, sigma_data: float = 0.5):
        super().__init__()
        self.model, self.shift, self.t_scale = model, shift, t_scale
        self.num_classes = int(getattr(model, "num_classes", 0) if num_classes is None else num_classes)
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, math.inf, sigma_data

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma64 = _batch_sigma(sigma, x)
        s = sigma_to_flow_s(sigma64)
        s_model = self.shift * s / (1 + (self.shift - 1) * s)
        sig = sigma64.to(device=x.device, dtype=x.dtype)
        x_s = x / append_dims(1 + sig, x.ndim)
        t = (self.t_scale * s_model).to(device=x.device, dtype=_time_dtype(x.dtype))
        v = self.model(x_s, t, cond)
        return flow_to_denoised(x, sig, v.to(x.dtype))


# --- loading a save_pretrained directory ---------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def _locate(path: Path) -> tuple[Path, Path | None]:
    """-> (UNet directory, scheduler config path or None) for a pipeline dir or a UNet dir."""
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if "unet" not in index:
            parts = sorted(k for k in index if not k.startswith("_"))
            raise ModelError(f"unsupported pipeline in {path}: no 'unet' component (has {parts}); "
                             "fewstep loads UNet2DModel DDPM-family teachers")
        sched = path / "scheduler" / "scheduler_config.json"
        return path / "unet", sched if sched.is_file() else None
    for cand in (path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return path, cand
    return path, None


def _check_unet_dir(unet_dir: Path) -> dict:
    """Config present, class supported, safetensors weights present (never unpickle)."""
    if not (unet_dir / "config.json").is_file():
        raise ModelError(f"no config.json in {unet_dir}; expected a diffusers save_pretrained directory")
    config = _read_json(unet_dir / "config.json")
    cls = config.get("_class_name")
    if cls != "UNet2DModel":
        raise ModelError(f"unsupported model class {cls!r} in {unet_dir}; fewstep loads UNet2DModel teachers")
    has_st = (unet_dir / UNET_WEIGHTS).is_file() or (unet_dir / f"{UNET_WEIGHTS}.index.json").is_file()
    if not has_st:
        pickles = sorted(p.name for p in unet_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(f"{unet_dir} has only pickle weights ({', '.join(pickles)}); fewstep never "
                             "unpickles: convert them to safetensors "
                             "(save_pretrained(..., safe_serialization=True))")
        raise ModelError(f"no {UNET_WEIGHTS} in {unet_dir}")
    return config


def alphas_cumprod_from_config(config: dict) -> tuple[torch.Tensor, str]:
    """A DDPM-family scheduler config -> (``alphas_cumprod [T]`` float64, prediction_type).

    The betas are built by ``diffusers.DDPMScheduler`` itself (linear, scaled_linear,
    squaredcos_cap_v2, sigmoid, trained_betas), so the table is exactly the scheduler's.
    """
    from diffusers import DDPMScheduler

    cls = config.get("_class_name", "DDPMScheduler")
    if cls not in DDPM_FAMILY:
        hint = " (a flow model: wrap it with fewstep.models.FlowDenoiser)" if "Flow" in cls else ""
        raise ModelError(f"unsupported scheduler {cls!r}; fewstep reads DDPM-family schedulers{hint}")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"unsupported prediction_type {prediction_type!r}; fewstep supports "
                         f"{', '.join(PREDICTION_TYPES)}")
    accepted = inspect.signature(DDPMScheduler.__init__).parameters
    try:
        sched = DDPMScheduler.from_config({k: v for k, v in config.items() if k in accepted})
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ModelError(f"unsupported scheduler config ({cls}): {e}") from None
    abar = sched.alphas_cumprod.double().clone()
    if abar[-1] <= 0:  # zero terminal SNR: sigma_T would be infinite; diffusers uses 2^-24 too
        abar[-1] = 2.0**-24
    return abar, prediction_type


def load_diffusers_teacher(path: str | Path, quantize: bool = False,
                           null_class: int | None = None) -> DiffusersDDPMDenoiser:
    """A ``save_pretrained`` pipeline dir (``model_index.json``, ``unet/``, ``scheduler/``) or UNet dir
    (``config.json`` + ``diffusion_pytorch_model.safetensors`` with ``scheduler_config.json`` beside it
    or in ``../scheduler``) -> :class:`DiffusersDDPMDenoiser` in eval mode. Safetensors only."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"teacher directory {path} does not exist")
    unet_dir, sched_path = _locate(path)
    if not unet_dir.is_dir():
        raise ModelError(f"no unet/ directory in pipeline {path}")
    _check_unet_dir(unet_dir)
    if sched_path is None:
        raise ModelError(f"no scheduler config for {unet_dir}: put scheduler_config.json beside it or "
                         "in ../scheduler (save it with scheduler.save_pretrained)")
    alphas_cumprod, prediction_type = alphas_cumprod_from_config(_read_json(sched_path))
    unet = _load_unet(unet_dir)
    D = DiffusersDDPMDenoiser(unet, alphas_cumprod, prediction_type, quantize, null_class).eval()
    D.spec = diffusers_spec(D)
    return D


def diffusers_spec(D: DiffusersDDPMDenoiser) -> dict:
    """The model.json spec that rebuilds an adapted diffusers UNet (students of diffusers teachers
    are exported in fewstep's own format with this spec)."""
    # private keys (_name_or_path, _diffusers_version, ...) are provenance, not architecture
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(D.unet.config).items()
              if not k.startswith("_")}
    abar = 1 / (1 + D.sigma_table.double() ** 2)  # inverts sigma_t = sqrt((1 - abar) / abar)
    return {"type": "diffusers", "unet_config": config, "alphas_cumprod": abar.tolist(),
            "prediction_type": D.prediction_type, "quantize": D.quantize, "null_class": D.null_class,
            "boundary": D.boundary, "boundary_sigma_min": D.boundary_sigma_min}


def build_diffusers_denoiser(spec: dict) -> DiffusersDDPMDenoiser:
    """Inverse of :func:`diffusers_spec` (fresh weights)."""
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_config(spec["unet_config"])
        D = DiffusersDDPMDenoiser(unet, torch.tensor(spec["alphas_cumprod"], dtype=torch.float64),
                                  spec["prediction_type"], bool(spec["quantize"]), spec.get("null_class"),
                                  bool(spec.get("boundary", False)),
                                  float(spec.get("boundary_sigma_min", SIGMA_MIN)))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"cannot rebuild the diffusers model from its spec ({e})") from None
    D.spec = spec
    return D


def _load_unet(unet_dir: Path) -> nn.Module:
    from diffusers import UNet2DModel

    try:
        # low_cpu_mem_usage=False: the default needs `accelerate` (and only warns without it)
        unet, info = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True,
                                                 low_cpu_mem_usage=False, output_loading_info=True)
    except Exception as e:  # diffusers/safetensors raise many types for corrupt or mismatched files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the UNet in {unet_dir}: {msg}") from None
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise ModelError(f"{unet_dir / UNET_WEIGHTS} does not match config.json ({bad})")
    return unet
