"""fewstep's model format and teacher loading: ``model.safetensors`` (weights) + ``model.json``.

``model.json`` is ``{"format": "fewstep-model", "version": 1, "spec": {...}, "meta": {...}}``. ``spec``
rebuilds the denoiser: the raw net (``type`` "mlp" -> :class:`SigmaMLP`, "unet" -> :class:`UNetRaw`, with
their constructor arguments) and the ``EDMPrecond`` fields (``sigma_data``, ``sigma_min``, ``sigma_max``,
``boundary``, ``boundary_sigma_min``). Saved specs are complete (defaults filled in), so a model still
loads if a default changes later. ``meta`` is free-form JSON (what trained it, data, steps, ...).

Spec types "edm_songunet" / "edm_dhariwal" / "edm2_unet" are fewstep's versions of the NVlabs/edm and
edm2 networks (``models/edm_precond.py``). Pickles are never unpickled: ``.pt/.pth/.bin/.ckpt`` files are
refused with a message naming safetensors; an EDM / EDM2 network ``.pkl`` is read as data by the
restricted loader in ``models/edm_pickle.py`` (it refuses anything else).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from fewstep.core.guidance import NULL_ATTR
from fewstep.core.precond import SIGMA_DATA, SIGMA_MIN, EDMPrecond
from fewstep.errors import ModelError
from fewstep.models.adapters import PICKLE_SUFFIXES, is_diffusers_dir, load_diffusers_teacher
from fewstep.models.mlp import SigmaMLP
from fewstep.models.unet import UNetRaw

MODEL_JSON, MODEL_WEIGHTS = "model.json", "model.safetensors"
FORMAT, VERSION = "fewstep-model", 1
ARCHS: dict[str, type[nn.Module]] = {"mlp": SigmaMLP, "unet": UNetRaw}
# EDMPrecond fields stored in the spec; sigma_max None means +inf (JSON has no infinity)
PRECOND_DEFAULTS = {"sigma_data": SIGMA_DATA, "sigma_min": 0.0, "sigma_max": None, "boundary": False,
                    "boundary_sigma_min": SIGMA_MIN, "objective": "edm"}  # objective: edm | flow


def _arch_params(arch: type[nn.Module]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(arch.__init__).parameters
    return {k: p for k, p in params.items() if k != "self"}


EDM_TYPES = ("edm_songunet", "edm_dhariwal", "edm2_unet")  # models/edm_precond.py SPEC_TYPES
DIFFUSERS_KEYS = {"type", "unet_config", "alphas_cumprod", "prediction_type", "quantize", "null_class"}
# consistency students; the teacher's scheduler config (flow time scale, diffusers export)
DIFFUSERS_OPTIONAL = {"boundary": False, "boundary_sigma_min": SIGMA_MIN, "scheduler_config": None}


def normalize_spec(spec: dict) -> dict:
    """Check a spec and fill in every default -> a complete, JSON-ready spec (tuples become lists)."""
    if isinstance(spec, dict) and spec.get("type") == "diffusers":  # an adapted diffusers UNet
        allowed = DIFFUSERS_KEYS | set(DIFFUSERS_OPTIONAL)
        missing, unknown = sorted(DIFFUSERS_KEYS - set(spec)), sorted(set(spec) - allowed)
        if missing or unknown:
            raise ModelError(f"diffusers model spec: missing {missing}, unknown {unknown}")
        return {**DIFFUSERS_OPTIONAL, **spec}
    if isinstance(spec, dict) and spec.get("type") == "text":  # a text-to-image UNet + prompt table
        from fewstep.models.text_cond import normalize_text_spec

        return normalize_text_spec(spec)
    if isinstance(spec, dict) and spec.get("type") in EDM_TYPES:  # an NVlabs/edm or edm2 network
        from fewstep.models.edm_precond import normalize_edm_spec

        return normalize_edm_spec(spec)
    if not isinstance(spec, dict) or spec.get("type") not in ARCHS:
        kind = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
        raise ModelError(f"model spec type {kind!r} is unknown; expected one of "
                         f"{sorted([*ARCHS, 'diffusers', 'text', *EDM_TYPES])}")
    params = _arch_params(ARCHS[spec["type"]])
    allowed = {"type", *params, *PRECOND_DEFAULTS}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ModelError(f"unknown key(s) {unknown} in the {spec['type']} model spec; "
                         f"allowed: {sorted(allowed)}")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in spec]
    if missing:
        raise ModelError(f"the {spec['type']} model spec needs {missing}")
    out = {"type": spec["type"]}
    for k, p in params.items():
        v = spec.get(k, p.default)
        out[k] = list(v) if isinstance(v, tuple) else v
    for k, default in PRECOND_DEFAULTS.items():
        out[k] = spec.get(k, default)
    return out


def build_denoiser(spec: dict) -> EDMPrecond:
    """``spec`` -> ``EDMPrecond(raw_net, ...)`` with fresh weights; ``.spec`` holds the full spec and
    ``.shape`` the per-sample data shape (``(dim,)`` or ``(C, H, W)``)."""
    spec = normalize_spec(spec)
    if spec["type"] == "diffusers":
        from fewstep.models.adapters import build_diffusers_denoiser

        return build_diffusers_denoiser(spec)
    if spec["type"] == "text":
        from fewstep.models.text_cond import build_text_denoiser

        return build_text_denoiser(spec)
    if spec["type"] in EDM_TYPES:
        from fewstep.models.edm_precond import build_edm_denoiser

        return build_edm_denoiser(spec)
    kwargs = {k: spec[k] for k in _arch_params(ARCHS[spec["type"]])}
    try:
        net = ARCHS[spec["type"]](**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"cannot build the {spec['type']} model from its spec: {e}") from None
    sigma_max = math.inf if spec["sigma_max"] is None else float(spec["sigma_max"])
    D = EDMPrecond(net, num_classes=int(spec.get("num_classes", 0)), sigma_data=float(spec["sigma_data"]),
                   sigma_min=float(spec["sigma_min"]), sigma_max=sigma_max, boundary=bool(spec["boundary"]),
                   boundary_sigma_min=float(spec["boundary_sigma_min"]), objective=str(spec["objective"]))
    D.spec = spec
    D.shape = (int(spec["dim"]),) if spec["type"] == "mlp" else tuple(int(s) for s in spec["shape"])
    return D


def _state_diff(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """A short description of key/shape differences between two state dicts ('' if they agree)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: {list(got[k].shape)} vs {list(expected[k].shape)}"
              for k in sorted(set(expected) & set(got)) if got[k].shape != expected[k].shape]
    parts = [f"{name} {items[:3]}{' ...' if len(items) > 3 else ''}" for name, items in
             (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
    return "; ".join(parts)


def save_model(dir: str | Path, denoiser: nn.Module, spec: dict, meta: dict) -> None:
    """Write ``dir/model.safetensors`` and ``dir/model.json`` atomically (both temps first, then rename
    the weights, then the json, so a complete model.json always has its weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    dir = Path(dir)
    spec = normalize_spec(spec)
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    fresh = build_denoiser(spec)
    diff = _state_diff(fresh.state_dict(), state)
    diff += "".join(f"; {k}: {getattr(denoiser, k)!r} vs spec {getattr(fresh, k)!r}"
                    for k in ("num_classes", "sigma_data", "boundary")
                    if hasattr(denoiser, k) and getattr(denoiser, k) != getattr(fresh, k))
    if diff:
        raise ModelError(f"the denoiser does not match its spec ({diff.lstrip('; ')})")
    text = json.dumps({"format": FORMAT, "version": VERSION, "spec": spec, "meta": meta}, indent=2,
                      allow_nan=False)
    tmp_w, tmp_j = dir / f".{MODEL_WEIGHTS}.tmp{os.getpid()}", dir / f".{MODEL_JSON}.tmp{os.getpid()}"
    try:
        dir.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp_w), metadata={"format": "pt"})
        with open(tmp_j, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_w, dir / MODEL_WEIGHTS)
        os.replace(tmp_j, dir / MODEL_JSON)
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise ModelError(f"could not write the model to {dir} ({reason}); any previous model there "
                         "is intact — free disk space and rerun the same command") from None
    finally:
        for tmp in (tmp_w, tmp_j):
            tmp.unlink(missing_ok=True)


def read_model_json(dir: str | Path) -> tuple[dict, dict]:
    """``dir/model.json`` -> (complete spec, meta), validated."""
    path = Path(dir) / MODEL_JSON
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"no {MODEL_JSON} in {dir}; pass a directory written by fewstep") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path} ({e}); restore it or re-export the model") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{path} is not a fewstep model.json (missing \"format\": \"{FORMAT}\")")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise ModelError(f"{path} has version {doc.get('version')!r}; this fewstep reads up to {VERSION}")
    missing = [k for k in ("spec", "meta") if not isinstance(doc.get(k), dict)]
    if missing:
        raise ModelError(f"{path} lacks the required key(s) {missing}")
    return normalize_spec(doc["spec"]), doc["meta"]


def _refuse_pickles(dir: Path, what: str) -> None:
    pickles = sorted(p.name for p in dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        edm = " (an EDM network .pkl: pass the file itself)" if any(n.endswith(".pkl") for n in pickles) \
            else ""
        raise ModelError(f"{dir} has only pickle weights ({', '.join(pickles)}) and no {what}; fewstep "
                         f"never unpickles: convert the weights to safetensors{edm}")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: truncated or not a safetensors file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path} is truncated or corrupt ({msg}); re-export the model") from None


def load_model(dir: str | Path) -> tuple[EDMPrecond, dict]:
    """``dir`` with ``model.json`` + ``model.safetensors`` -> (denoiser in eval mode, meta)."""
    dir = Path(dir)
    if not dir.is_dir():
        raise ModelError(f"model directory {dir} does not exist")
    spec, meta = read_model_json(dir)
    if not (dir / MODEL_WEIGHTS).is_file():
        _refuse_pickles(dir, MODEL_WEIGHTS)
        raise ModelError(f"no {MODEL_WEIGHTS} beside {dir / MODEL_JSON}; copy the weights there or "
                         "re-export the model")
    state = _load_weights(dir / MODEL_WEIGHTS)
    denoiser = build_denoiser(spec)
    diff = _state_diff(denoiser.state_dict(), state)
    if diff:
        raise ModelError(f"{MODEL_WEIGHTS} does not match {MODEL_JSON} ({diff}); keep the two files of one "
                         "export together")
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    if floats:  # keep the saved precision (float64 identity tests round-trip bit-exactly)
        denoiser.to(floats[0])
    try:
        denoiser.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{MODEL_WEIGHTS} does not match {MODEL_JSON} ({str(e).splitlines()[0]})") from None
    if meta.get("role") != "student" and meta.get("null_label") is not None:
        setattr(denoiser, NULL_ATTR, int(meta["null_label"]))  # trained with label dropout: guidable
    elif meta.get("role") == "teacher" and "null_label" in meta:  # trained without dropout: not guidable
        setattr(denoiser, NULL_ATTR, None)
    return denoiser.eval(), meta


def load_teacher(path: str | Path, prompts: list[str] | None = None) -> tuple[nn.Module, dict]:
    """Any supported teacher -> (denoiser ``D(x, sigma, cond)`` in eval mode, meta).

    A fewstep model directory (``model.json``), a diffusers ``save_pretrained`` directory
    (``model_index.json`` or ``config.json``), or their ``model.json`` / ``model.safetensors`` file, or
    an NVlabs/edm / edm2 network snapshot ``.pkl`` (read as data, never executed). Other pickle files
    are refused. ``prompts`` (``--prompts FILE``): the conditions of a text-to-image pipeline directory
    (``models/text_cond.py``); without them a fewstep text teacher uses its training prompts.
    """
    p = Path(path)
    if prompts is not None:
        return _load_text_teacher(p, prompts)
    if not p.exists():
        raise ModelError(f"teacher path {p} does not exist; pass a fewstep teacher run directory, a "
                         "diffusers directory or an EDM network .pkl")
    if p.is_file():
        if p.suffix == ".pkl":
            from fewstep.models.edm_pickle import load_edm_pickle

            return load_edm_pickle(p)
        if p.suffix in PICKLE_SUFFIXES:
            raise ModelError(f"{p} is a pickle file; fewstep never unpickles: give a directory with "
                             "model.safetensors + model.json (or a diffusers safetensors directory)")
        if p.name not in (MODEL_JSON, MODEL_WEIGHTS):
            raise ModelError(f"{p} is not a model: give a fewstep model directory or a diffusers directory")
        p = p.parent
    if (p / MODEL_JSON).is_file():
        return load_model(p)
    if is_text_pipeline(p):
        raise ModelError(f"{p} is a text-to-image pipeline: give the prompts to distil on with --prompts "
                         "FILE (one prompt per line)")
    if is_diffusers_dir(p):
        D = load_diffusers_teacher(p)
        return D, {"source": "diffusers", "path": str(p), "prediction_type": D.prediction_type}
    _refuse_pickles(p, f"{MODEL_JSON} / config.json")
    raise ModelError(f"{p} is not a model directory: expected {MODEL_JSON} (fewstep) or "
                     "config.json / model_index.json (diffusers)")


def is_text_pipeline(path: Path) -> bool:
    """A Stable-Diffusion-style directory: ``model_index.json`` naming a text encoder."""
    index = path / "model_index.json"
    return index.is_file() and "text_encoder" in json.loads(index.read_text() or "{}")


def _load_text_teacher(p: Path, prompts: list[str]) -> tuple[nn.Module, dict]:
    """A text pipeline directory with ``prompts`` encoded by its own text encoder; the meta of a
    fewstep-trained one (its data and VAE) when it has a model.json."""
    from fewstep.models.text import load_text_pipeline
    from fewstep.models.text_cond import prompt_denoiser

    if not (p.is_dir() and is_text_pipeline(p)):
        raise ModelError(f"--prompts needs a text-to-image teacher (a Stable Diffusion pipeline directory, "
                         f"e.g. from 'fewstep teacher --text'); {p} is not one: omit --prompts")
    D = prompt_denoiser(load_text_pipeline(p), prompts).eval()
    if (p / MODEL_JSON).is_file():
        meta = read_model_json(p)[1]
    else:  # a pipeline from elsewhere: its data are latents of its own VAE (the data name is the user's)
        meta = {"source": "diffusers", "path": str(p), "role": "teacher",
                "data": {"vae": {"path": str(p / "vae")}, "shape": list(D.shape or ())}}
    if "null_label" in meta and meta["null_label"] is None:  # trained without prompt dropout
        setattr(D, NULL_ATTR, None)
    return D, {**meta, "prompts": len(prompts)}
