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
from contextlib import contextmanager
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
    "TCDScheduler", "SASolverScheduler", "DPMSolverMultistepInverseScheduler"})
# Rectified-flow schedulers: x_s = (1 - s) x0 + s eps, the net predicts v = eps - x0 at t = T s
FLOW_MATCH = frozenset({"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                        "FlowMatchLCMScheduler"})
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


class _UNetAdapter(nn.Module):
    """What the diffusers ``UNet2DModel`` adapters share: the net, its label input and the optional
    consistency-boundary re-expression.

    Labels: a class-conditional UNet (``num_class_embeds = K``) whose ``null_class`` is set has ``K - 1``
    real classes; fewstep's labels ``0..K-2`` skip the null slot (label ``c`` feeds index ``c`` below
    it, ``c + 1`` above) and ``-1`` / ``None`` feed the null slot. Without a null class all ``K``
    indices are classes and unlabelled calls are an error.

    ``boundary=True`` (consistency students): the output is re-expressed in EDM form,
    ``F = (D - c_skip x) / c_out`` with EDM's scalings, and recombined with the consistency-model
    scalings (CM Appendix C), so ``D(x, sigma_min) = x`` exactly while the network is unchanged.
    """

    def __init__(self, unet: nn.Module, null_class: int | None = None, boundary: bool = False,
                 boundary_sigma_min: float = SIGMA_MIN, scheduler_config: dict | None = None):
        super().__init__()
        config = getattr(unet, "config", {})
        if config.get("class_embed_type") is not None:
            raise ModelError(f"unsupported UNet class_embed_type {config.get('class_embed_type')!r}; "
                             "only plain num_class_embeds label conditioning is supported")
        self.unet, self.null_class = unet, null_class
        # guidable when it has a null class: label -1 selects it (core.guidance.NULL_ATTR)
        self.null_label = -1 if null_class is not None else None
        self.boundary, self.boundary_sigma_min = boundary, boundary_sigma_min
        self.scheduler_config = scheduler_config
        self.num_class_embeds = int(config.get("num_class_embeds") or 0)
        self.cross_attention = config.get("cross_attention_dim") is not None  # text-conditional UNet
        if null_class is not None and not 0 <= null_class < max(self.num_class_embeds, 1):
            raise ModelError(f"null class {null_class} is outside the UNet's {self.num_class_embeds} class "
                             f"embeddings; pick 0..{self.num_class_embeds - 1} or none")
        self.sigma_data = 0.5
        size = config.get("sample_size")
        if size is not None and "in_channels" in config:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            self.shape = (config["in_channels"], *hw)

    @property
    def num_classes(self) -> int:
        """Real classes: the embeddings minus the null slot."""
        k = self.num_class_embeds
        return k - 1 if (k and self.null_class is not None) else k

    def _labels(self, cond: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        if not self.num_class_embeds:
            return None
        if cond is None or not self.num_classes:
            cond = torch.full((batch,), -1, dtype=torch.long, device=device)
        cond = cond.long()
        if (cond >= self.num_classes).any():
            raise ModelError(f"class label {int(cond.max())} is out of range: this teacher has "
                             f"{self.num_classes} classes")
        if self.null_class is None:
            if (cond < 0).any():
                raise ModelError("this diffusers teacher is class-conditional and has no unconditional "
                                 "class; give class labels (or name its null class: --null-class N)")
            return cond
        index = cond + (cond >= self.null_class).long()
        return torch.where(cond < 0, torch.full_like(cond, self.null_class), index)

    def _net(self, x_in: torch.Tensor, timestep: torch.Tensor, cond, channels: int) -> torch.Tensor:
        """The UNet's output ``[B, channels, ...]`` in ``x_in``'s dtype (learned variance: first C)."""
        dtype = next(self.unet.parameters()).dtype
        if self.cross_attention:  # UNet2DConditionModel: cond = text encoder hidden states [B, L, d]
            if not (torch.is_tensor(cond) and cond.is_floating_point() and cond.ndim == 3):
                raise ModelError("this text-conditional teacher takes text embeddings [B, L, d] as cond "
                                 "(encode the prompts with its text encoder), not class labels")
            kwargs = {"encoder_hidden_states": cond.to(device=x_in.device, dtype=dtype)}
        else:
            kwargs = {"class_labels": self._labels(cond, x_in.shape[0], x_in.device)}
        out = self.unet(x_in.to(dtype), timestep, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        return out[:, :channels].to(x_in.dtype)

    def _to_boundary(self, x: torch.Tensor, sigma: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """EDM form ``D = c_skip x + c_out F`` -> boundary form with the same ``F`` (``sigma [B]``)."""
        c_skip, c_out, _, _ = edm_scalings(sigma, self.sigma_data)
        b_skip, b_out, _, _ = boundary_scalings(sigma, self.sigma_data, self.boundary_sigma_min)
        F = (D - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)
        return append_dims(b_skip, x.ndim) * x + append_dims(b_out, x.ndim) * F


class DiffusersDDPMDenoiser(_UNetAdapter):
    """A discrete-time diffusers ``UNet2DModel`` as ``D(x, sigma, cond)`` (k-diffusion
    ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``; edm_core.md section 6).

    ``sigma_t = sqrt((1 - abar_t)/abar_t)``; the net sees ``x_vp = x / sqrt(sigma^2 + 1)`` and the
    fractional timestep ``t(sigma)`` (``quantize=True``: nearest integer). Then
    eps: ``D = x - sigma eps_hat``; v: ``D = x/(sigma^2+1) - sigma/sqrt(sigma^2+1) v_hat``;
    sample: ``D = x0_hat``. Learned-variance nets (2C output channels) use the first C.
    Labels and ``boundary``: see :class:`_UNetAdapter`.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 quantize: bool = False, null_class: int | None = None, boundary: bool = False,
                 boundary_sigma_min: float = SIGMA_MIN, scheduler_config: dict | None = None):
        super().__init__(unet, null_class, boundary, boundary_sigma_min, scheduler_config)
        if prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"unsupported prediction_type {prediction_type!r}; fewstep supports "
                             f"{', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        # learned time embeddings are nn.Embedding lookups: they need integer timesteps
        self.quantize = quantize or getattr(unet, "config", {}).get("time_embedding_type") == "learned"
        # float64 CPU table kept off the buffer list so .float()/.half()/.to(mps) cannot round it
        self.sigma_table = vp_sigmas_from_alphas_cumprod(torch.as_tensor(alphas_cumprod)).cpu()
        self.sigma_min, self.sigma_max = float(self.sigma_table[0]), float(self.sigma_table[-1])

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, C, H, W]`` in EDM space, ``sigma [B]`` (or a float) -> ``D [B, C, H, W]``."""
        sigma64 = _batch_sigma(sigma, x)
        t = sigma_to_t(sigma64, self.sigma_table, self.quantize)
        sig = sigma64.to(device=x.device, dtype=x.dtype)
        c_in = (1 / (sigma64**2 + 1).sqrt()).to(device=x.device, dtype=x.dtype)  # = sqrt(abar_t)
        dtype = next(self.unet.parameters()).dtype
        timestep = (t.long() if self.quantize else t.to(_time_dtype(dtype))).to(x.device)
        out = self._net(append_dims(c_in, x.ndim) * x, timestep, cond, x.shape[1])
        if self.prediction_type == "epsilon":
            D = eps_to_denoised(x, sig, out)
        elif self.prediction_type == "v_prediction":
            D = v_to_denoised(x, sig, out)
        else:
            D = out
        return self._to_boundary(x, sig, D) if self.boundary else D


def _flow_denoised(x: torch.Tensor, sigma, velocity: Callable, shift: float, t_scale: float) -> torch.Tensor:
    """Rectified flow -> EDM (flow_and_latent.md section 1): ``s = sigma/(1+sigma)``,
    ``x_s = x/(1+sigma)``, the model sees ``t_scale * shift(s)``, ``D = x_s - s v_hat``."""
    sigma64 = _batch_sigma(sigma, x)
    s = sigma_to_flow_s(sigma64)
    s_model = shift * s / (1 + (shift - 1) * s)
    sig = sigma64.to(device=x.device, dtype=x.dtype)
    x_s = x / append_dims(1 + sig, x.ndim)
    t = (t_scale * s_model).to(device=x.device, dtype=_time_dtype(x.dtype))
    return flow_to_denoised(x, sig, velocity(x_s, t).to(x.dtype))


class FlowDenoiser(nn.Module):
    """A rectified-flow velocity model as ``D(x, sigma, cond)`` (edm_core.md section 6, convention A).

    ``x_s = (1 - s) x_0 + s eps`` and ``v = eps - x_0``; ``s = sigma/(1 + sigma)``, the model sees
    ``x_s = x/(1 + sigma)`` and time ``t_scale * s'`` with ``s' = shift s / (1 + (shift - 1) s)`` (SD3
    timestep shift; ``shift=1`` is the identity); ``D = x/(1+sigma) - sigma/(1+sigma) v_hat``.
    ``model(x_s [B, ...], t [B], cond) -> v [B, ...]`` may be any callable.

    Note: diffusers' SD3/Flux schedulers feed the model the already-shifted *physical* s, i.e. their
    shift only moves the sampling grid; such models need ``shift=1`` here (:class:`DiffusersFlowDenoiser`
    does that and samples on the shifted grid instead).
    """

    def __init__(self, model: Callable, shift: float = 1.0, t_scale: float = 1000.0,
                 num_classes: int | None = None, sigma_data: float = 0.5):
        super().__init__()
        self.model, self.shift, self.t_scale = model, shift, t_scale
        self.num_classes = int(getattr(model, "num_classes", 0) if num_classes is None else num_classes)
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, math.inf, sigma_data

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        return _flow_denoised(x, sigma, lambda x_s, t: self.model(x_s, t, cond), self.shift, self.t_scale)


class DiffusersFlowDenoiser(_UNetAdapter):
    """A diffusers ``UNet2DModel`` trained by flow matching (``FlowMatchEulerDiscreteScheduler``, or a
    multistep solver with ``use_flow_sigmas`` and ``prediction_type="flow_prediction"``) as
    ``D(x, sigma, cond)``: :class:`FlowDenoiser`'s conversion with ``shift=1`` (diffusers feeds the
    net ``t = num_train_timesteps * s`` with the physical, already shifted ``s``).

    The scheduler's ``shift`` (and its other grid options) is honoured where it acts, in sampling:
    :meth:`sampling_sigmas` is the scheduler's own grid mapped by ``sigma = s / (1 - s)``.
    """

    prediction_type, quantize = "flow_prediction", False

    def __init__(self, unet: nn.Module, scheduler_config: dict, null_class: int | None = None,
                 boundary: bool = False, boundary_sigma_min: float = SIGMA_MIN):
        super().__init__(unet, null_class, boundary, boundary_sigma_min, scheduler_config)
        if getattr(unet, "config", {}).get("time_embedding_type") == "learned":
            raise ModelError("a flow-matching UNet with a learned (integer) time embedding is not "
                             "supported; flow timesteps are fractional")
        self.t_scale = float(scheduler_config.get("num_train_timesteps", 1000))
        self.sigma_min, self.sigma_max = 0.0, math.inf

    def forward(self, x: torch.Tensor, sigma, cond: torch.Tensor | None = None) -> torch.Tensor:
        def velocity(x_s, t):
            return self._net(x_s, t.to(_time_dtype(next(self.unet.parameters()).dtype)), cond, x.shape[1])

        D = _flow_denoised(x, sigma, velocity, 1.0, self.t_scale)
        if self.boundary:
            D = self._to_boundary(x, _batch_sigma(sigma, x).to(device=x.device, dtype=x.dtype), D)
        return D

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The net's velocity at flow time ``t [B]`` in [0, 1] (diffusers' timestep ``t_scale t``)."""
        t_net = (self.t_scale * t).to(_time_dtype(next(self.unet.parameters()).dtype))
        return self._net(x_t, t_net, cond, x_t.shape[1])

    def flow_times(self, steps: int) -> torch.Tensor:
        """The scheduler's own ``steps``-step flow times (from 1, ending in 0) for ``flow_euler``."""
        return flow_schedule(self.scheduler_config, steps)

    def sampling_sigmas(self, steps: int, sigma_max: float = 80.0) -> torch.Tensor:
        """The scheduler's ``steps``-step grid as EDM sigmas (float64, ending in 0). Its first point,
        ``s = 1`` (pure noise, sigma = inf), is clamped to ``sigma_max``: the EDM contract starts at
        ``x = sigma_max z``."""
        s = flow_schedule(self.scheduler_config, steps)
        sig = torch.where(s < 1, s / (1 - s).clamp_min(1e-300), torch.full_like(s, math.inf))
        return sig.clamp(max=sigma_max)


def flow_schedule(config: dict, steps: int) -> torch.Tensor:
    """The physical flow times ``s`` (float64, descending, ending in 0) that diffusers' own scheduler
    visits in ``steps`` steps: built by diffusers itself, so ``shift``, dynamic shifting (``mu = ln
    shift``), Karras/exponential/beta spacing and ``shift_terminal`` are all honoured. The FlowMatch
    family shares FlowMatchEulerDiscreteScheduler's grid (Heun interleaves its points, LCM re-noises on
    them); multistep solvers with use_flow_sigmas use their own class."""
    import diffusers

    name = config.get("_class_name", "")
    cls = diffusers.FlowMatchEulerDiscreteScheduler if name in FLOW_MATCH else getattr(diffusers, name, None)
    if cls is None:
        raise ModelError(f"diffusers has no scheduler {name!r}; upgrade diffusers")
    sched = _from_config(cls, config)
    kwargs = {"mu": math.log(float(config.get("shift", 1.0)))} if config.get("use_dynamic_shifting") else {}
    sched.set_timesteps(steps, **kwargs)
    s = torch.as_tensor(sched.sigmas).double().flatten()
    return torch.cat([s[:steps], s.new_zeros(1)])


# --- loading a save_pretrained directory ---------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def is_diffusers_dir(path: Path) -> bool:
    """A pipeline dir (``model_index.json`` or ``unet/``) or a model dir (``config.json``)."""
    return any((path / name).is_file() for name in ("model_index.json", "config.json", "unet/config.json"))


def _scheduler_file(given: str | Path) -> Path:
    """``--scheduler``: a scheduler_config.json, a directory holding one, or a pipeline directory."""
    p = Path(given)
    for cand in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return cand
    raise ModelError(f"--scheduler {p}: no scheduler config there; give a scheduler_config.json or the "
                     "directory scheduler.save_pretrained wrote")


def _locate(path: Path, scheduler: str | Path | None = None) -> tuple[Path, Path | None]:
    """-> (UNet directory, scheduler config path or None) for a pipeline dir (with or without
    model_index.json) or a UNet dir; ``scheduler`` overrides where the scheduler config is."""
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if "unet" not in index:
            parts = sorted(k for k in index if not k.startswith("_"))
            raise ModelError(f"unsupported pipeline in {path}: no 'unet' component (has {parts}); "
                             "fewstep loads UNet2DModel teachers")
    if (path / "model_index.json").is_file() or (path / "unet").is_dir():
        unet_dir, cands = path / "unet", [path / "scheduler" / "scheduler_config.json"]
    else:
        unet_dir = path
        cands = [path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"]
    if scheduler is not None:
        return unet_dir, _scheduler_file(scheduler)
    return unet_dir, next((c for c in cands if c.is_file()), None)


def _check_unet_dir(unet_dir: Path, classes: tuple[str, ...] = ("UNet2DModel",)) -> dict:
    """Config present, class supported, safetensors weights present (never unpickle)."""
    if not (unet_dir / "config.json").is_file():
        raise ModelError(f"no config.json in {unet_dir}; expected a diffusers save_pretrained directory")
    config = _read_json(unet_dir / "config.json")
    cls = config.get("_class_name")
    if cls not in classes:
        raise ModelError(f"unsupported model class {cls!r} in {unet_dir}; fewstep loads "
                         f"{' or '.join(classes)} teachers")
    has_st = (unet_dir / UNET_WEIGHTS).is_file() or (unet_dir / f"{UNET_WEIGHTS}.index.json").is_file()
    if not has_st:
        pickles = sorted(p.name for p in unet_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(f"{unet_dir} has only pickle weights ({', '.join(pickles)}); fewstep never "
                             "unpickles: convert them to safetensors "
                             "(save_pretrained(..., safe_serialization=True))")
        raise ModelError(f"no {UNET_WEIGHTS} in {unet_dir}")
    return config


def scheduler_kind(config: dict) -> str:
    """``"ddpm"`` (discrete VP table from betas) or ``"flow"`` (rectified flow); refusals name why."""
    cls = config.get("_class_name", "DDPMScheduler")
    flow_sigmas = bool(config.get("use_flow_sigmas"))
    flow_pred = config.get("prediction_type") == "flow_prediction"
    if cls in FLOW_MATCH:
        if config.get("invert_sigmas"):
            raise ModelError(f"unsupported scheduler config ({cls}): invert_sigmas=True puts data at "
                             "s = 1; fewstep reads flows with noise at s = 1")
        return "flow"
    if cls not in DDPM_FAMILY:
        raise ModelError(f"unsupported scheduler {cls!r}; fewstep reads DDPM-family schedulers "
                         f"({', '.join(sorted(DDPM_FAMILY))}) and flow-matching ones "
                         f"({', '.join(sorted(FLOW_MATCH))})")
    if flow_sigmas or flow_pred:
        if not (flow_sigmas and flow_pred):
            raise ModelError(f"unsupported scheduler config ({cls}): use_flow_sigmas={flow_sigmas} with "
                             f"prediction_type={config.get('prediction_type')!r}; a flow model needs both "
                             "use_flow_sigmas=True and prediction_type='flow_prediction'")
        return "flow"
    if config.get("timestep_type", "discrete") != "discrete":
        raise ModelError(f"unsupported scheduler config ({cls}): timestep_type="
                         f"{config.get('timestep_type')!r} (the UNet takes 0.25 ln sigma); fewstep reads "
                         "discrete timesteps")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"unsupported prediction_type {prediction_type!r}; fewstep supports "
                         f"{', '.join(PREDICTION_TYPES)} (and flow_prediction with use_flow_sigmas)")
    return "ddpm"


def alphas_cumprod_from_config(config: dict) -> tuple[torch.Tensor, str]:
    """A DDPM-family scheduler config -> (``alphas_cumprod [T]`` float64, prediction_type).

    The table is built by the named diffusers scheduler class itself (linear, scaled_linear,
    squaredcos_cap_v2, sigmoid, trained_betas, rescale_betas_zero_snr, ...), so it is exactly the one
    that scheduler samples with; DDPMScheduler builds it when that class cannot be constructed here
    (e.g. DPMSolverSDEScheduler without torchsde; the beta code is shared).
    """
    import diffusers

    if scheduler_kind(config) != "ddpm":
        raise ModelError("a flow-matching scheduler has no alphas_cumprod table; load it with "
                         "load_diffusers_teacher")
    cls = config.get("_class_name", "DDPMScheduler")
    prediction_type = config.get("prediction_type", "epsilon")
    sched_cls = getattr(diffusers, cls, diffusers.DDPMScheduler)
    try:
        sched = _from_config(sched_cls, config)
    except ImportError:  # a dummy class: an optional dependency of that scheduler is missing
        sched = _from_config(diffusers.DDPMScheduler, config)
    abar = torch.as_tensor(sched.alphas_cumprod).double().clone()
    if abar[-1] <= 0:  # zero terminal SNR: sigma_T would be infinite; diffusers' Euler uses 2^-24 too
        abar[-1] = 2.0**-24
    return abar, prediction_type


def _from_config(cls, config: dict):
    accepted = inspect.signature(cls.__init__).parameters
    try:
        return cls.from_config({k: v for k, v in config.items() if k in accepted})
    except (NotImplementedError, ValueError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"unsupported scheduler config ({config.get('_class_name', cls.__name__)}): "
                         f"{why}") from None


# defaults for load_diffusers_teacher when the caller names none (the CLI's --scheduler / --null-class
# reach the teacher loaded inside training through this, see teacher_options)
_OPTIONS: dict = {"scheduler": None, "null_class": "last"}


@contextmanager
def teacher_options(scheduler: str | Path | None = None, null_class="last"):
    """Within the block, diffusers teachers load with this scheduler config and null class."""
    saved = dict(_OPTIONS)
    _OPTIONS.update(scheduler=scheduler, null_class=null_class)
    try:
        yield
    finally:
        _OPTIONS.clear()
        _OPTIONS.update(saved)


def parse_null_class(value) -> int | str | None:
    """``--null-class``: an index, ``none`` (every embedding is a class) or ``last`` (the default)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text in ("none", "null", "-1"):
        return None
    if text == "last":
        return "last"
    try:
        return int(text)
    except ValueError:
        raise ModelError(f"--null-class {value}: give a class index, 'last' or 'none'") from None


def _null_index(unet_config: dict, null_class) -> int | None:
    k = int(unet_config.get("num_class_embeds") or 0)
    if not k:
        return None
    return k - 1 if null_class == "last" else null_class


_UNSET = object()


def load_diffusers_teacher(path: str | Path, quantize: bool = False, null_class=_UNSET,
                           scheduler: str | Path | None = None) -> _UNetAdapter:
    """A diffusers teacher -> :class:`DiffusersDDPMDenoiser` or :class:`DiffusersFlowDenoiser` in eval
    mode. Layouts: a pipeline dir (``model_index.json`` or just ``unet/`` + ``scheduler/``), a UNet dir
    (``config.json`` + ``diffusion_pytorch_model.safetensors``) with ``scheduler_config.json`` beside it,
    in ``../scheduler``, or named by ``scheduler`` (a json file or a directory). ``null_class``: the
    unconditional class of a class-conditional UNet (``"last"`` default, an index, or None). Safetensors
    only."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"teacher directory {path} does not exist")
    null_class = parse_null_class(_OPTIONS["null_class"] if null_class is _UNSET else null_class)
    unet_dir, sched_path = _locate(path, scheduler if scheduler is not None else _OPTIONS["scheduler"])
    if not unet_dir.is_dir():
        raise ModelError(f"no unet/ directory in pipeline {path}")
    unet_config = _check_unet_dir(unet_dir)
    if sched_path is None:
        raise ModelError(f"no scheduler config for {unet_dir}: put scheduler_config.json beside it or in "
                         "../scheduler, or pass --scheduler FILE_OR_DIR")
    sched_config = _read_json(sched_path)
    kind = scheduler_kind(sched_config)
    abar, prediction_type = alphas_cumprod_from_config(sched_config) if kind == "ddpm" else (None, None)
    null = _null_index(unet_config, null_class)
    unet = _load_unet(unet_dir)
    if kind == "flow":
        D = DiffusersFlowDenoiser(unet, sched_config, null)
    else:
        D = DiffusersDDPMDenoiser(unet, abar, prediction_type, quantize, null, scheduler_config=sched_config)
    D = D.eval()
    D.spec = diffusers_spec(D)
    return D


def diffusers_spec(D: _UNetAdapter) -> dict:
    """The model.json spec that rebuilds an adapted diffusers UNet (students of diffusers teachers
    are exported in fewstep's own format with this spec)."""
    # private keys (_name_or_path, _diffusers_version, ...) are provenance, not architecture
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(D.unet.config).items()
              if not k.startswith("_")}
    abar = None
    if isinstance(D, DiffusersDDPMDenoiser):
        abar = (1 / (1 + D.sigma_table.double() ** 2)).tolist()  # inverts sigma_t = sqrt((1-abar)/abar)
    return {"type": "diffusers", "unet_config": config, "alphas_cumprod": abar,
            "prediction_type": D.prediction_type, "quantize": D.quantize, "null_class": D.null_class,
            "boundary": D.boundary, "boundary_sigma_min": D.boundary_sigma_min,
            "scheduler_config": D.scheduler_config}


def build_diffusers_denoiser(spec: dict) -> _UNetAdapter:
    """Inverse of :func:`diffusers_spec` (fresh weights)."""
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_config(spec["unet_config"])
        common = {"null_class": spec.get("null_class"), "boundary": bool(spec.get("boundary", False)),
                  "boundary_sigma_min": float(spec.get("boundary_sigma_min", SIGMA_MIN))}
        if spec["prediction_type"] == "flow_prediction":
            D = DiffusersFlowDenoiser(unet, spec.get("scheduler_config") or {}, **common)
        else:
            D = DiffusersDDPMDenoiser(unet, torch.tensor(spec["alphas_cumprod"], dtype=torch.float64),
                                      spec["prediction_type"], bool(spec["quantize"]),
                                      scheduler_config=spec.get("scheduler_config"), **common)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"cannot rebuild the diffusers model from its spec ({e})") from None
    D.spec = spec
    return D


def _load_unet(unet_dir: Path, class_name: str = "UNet2DModel") -> nn.Module:
    import diffusers

    try:
        # low_cpu_mem_usage=False: the default needs `accelerate` (and only warns without it)
        unet, info = getattr(diffusers, class_name).from_pretrained(
            unet_dir, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False,
            output_loading_info=True)
    except Exception as e:  # diffusers/safetensors raise many types for corrupt or mismatched files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the UNet in {unet_dir}: {msg}") from None
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise ModelError(f"{unet_dir / UNET_WEIGHTS} does not match config.json ({bad})")
    return unet
