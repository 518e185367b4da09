"""Networks and model I/O: the sigma-conditioned MLP and image UNet raw nets, adapters that turn
foreign (diffusers, rectified-flow) teachers into ``D(x, sigma, cond)``, and the
``model.safetensors`` + ``model.json`` format.

diffusers is imported only inside the functions that need it, so ``import fewstep.models`` is fast.
"""

from fewstep.models.adapters import (
    DiffusersDDPMDenoiser,
    DiffusersFlowDenoiser,
    FlowDenoiser,
    load_diffusers_teacher,
)
from fewstep.models.io import build_denoiser, load_model, load_teacher, normalize_spec, save_model
from fewstep.models.mlp import SigmaMLP
from fewstep.models.unet import UNetRaw

__all__ = [
    "DiffusersDDPMDenoiser",
    "DiffusersFlowDenoiser",
    "FlowDenoiser",
    "SigmaMLP",
    "UNetRaw",
    "build_denoiser",
    "load_diffusers_teacher",
    "load_model",
    "load_teacher",
    "normalize_spec",
    "save_model",
]
