"""Latent data: an image data set encoded once by a diffusers VAE and cached (specs/flow_and_latent.md §2).

A VAE is a diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` directory (``save_pretrained``; the
folder itself or a pipeline folder with a ``vae/`` subfolder), loaded locally from safetensors only
(never a pickle). fewstep trains small ones with ``fewstep vae``.

Latents are ``z = scaling_factor * (mean - shift_factor)`` (``shift_factor`` only where the config has
one), with ``mean`` the *posterior mean* of ``AutoencoderKL`` (``AutoencoderTiny`` is deterministic).
The mean, not a posterior sample, so that the cached training set is a pure function of (data, VAE):
no seed to record, and encoding twice gives the same file. With the small KL weight of fewstep's VAE
the posterior std is a fraction of the latent spread (mnist28 default VAE: mean posterior std 0.17
against a spread of 0.82 before scaling, recorded in ``fewstep_vae.json``), and decode(mean) is
the VAE's best reconstruction. ``decode(z)`` inverts the scaling, decodes, and does not clip.

Cache: ``<vae dir>/.fewstep-latents/<data>-<key>.safetensors``, ``key`` hashing the data's pixels and
the VAE's files (config + weights); beside the VAE so deleting it deletes its caches. If that folder
is read-only, ``$FEWSTEP_CACHE/latents`` (default ``~/.cache/fewstep``) is used instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.errors import DataError

VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
CACHE_DIR = ".fewstep-latents"
LATENT_VERSION = 1  # bump when the encoding rule changes (invalidates caches)
ENCODE_BATCH = 256


@dataclass
class VAE:
    """A loaded VAE: ``encode`` pixels -> scaled latents, ``decode`` scaled latents -> pixels."""

    path: Path
    module: torch.nn.Module = field(repr=False)
    sha256: str
    class_name: str

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.module.config, "scaling_factor", 1.0) or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.module.config, "shift_factor", None) or 0.0)

    def record(self) -> dict:
        """What a model.json records: ``{"path", "sha256"}`` (absolute path)."""
        return {"path": str(self.path), "sha256": self.sha256}

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch: int = ENCODE_BATCH) -> torch.Tensor:
        """Pixels ``[N, C, H, W]`` in [-1, 1] -> scaled latents ``[N, c, h, w]`` float32 (CPU)."""
        return torch.cat([self._encode(x[i:i + batch]) for i in range(0, len(x), batch)])

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        self.module.to(x.device)
        out = self.module.encode(x.float())
        z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def decode(self, z: torch.Tensor, batch: int = ENCODE_BATCH) -> torch.Tensor:
        """Scaled latents ``[N, c, h, w]`` -> pixels ``[N, C, H, W]`` float32 on ``z``'s device.

        Differentiable (no ``no_grad``): Embedding Loss on decoded pixels backpropagates through it.
        """
        self.module.to(z.device)
        parts = [self.module.decode(zb / self.scaling_factor + self.shift_factor).sample.float()
                 for zb in z.split(batch)]
        return torch.cat(parts)


def vae_dir(path: str | os.PathLike) -> Path:
    """The folder holding the VAE's ``config.json``: ``path`` itself or its ``vae/`` subfolder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"VAE directory {p} does not exist; train one with 'fewstep vae --data NAME --out "
                        f"{p}' or pass a diffusers AutoencoderKL folder")
    for d in (p, p / "vae"):
        if (d / "config.json").is_file():
            return d.resolve()
    raise DataError(f"{p} has no config.json (nor vae/config.json); pass a folder written by diffusers' "
                    "save_pretrained or by 'fewstep vae'")


def _vae_config(d: Path) -> dict:
    """``d/config.json`` of a VAE folder (``d`` from :func:`vae_dir`), its class checked."""
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {d}/config.json ({e}); restore it or re-save the VAE") from None
    name = config.get("_class_name", "") if isinstance(config, dict) else ""
    if name not in VAE_CLASSES:
        raise DataError(f"{d} holds a {name or 'unknown'} model, not a VAE; pass a diffusers "
                        f"{' or '.join(VAE_CLASSES)} folder")
    return config


def check_vae_dir(path: str | os.PathLike) -> Path:
    """``path`` as given, made absolute, once it is a loadable VAE folder: a diffusers VAE config and
    safetensors weights (without loading them); :class:`DataError` otherwise. What ``--vae DIR`` and
    ``data.vae=DIR`` record, so a run finds its VAE again from any working directory."""
    d = vae_dir(path)
    _vae_config(d)
    _weight_files(d)
    return Path(path).expanduser().resolve()


def _weight_files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in d.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise DataError(f"VAE {d} has {what}; fewstep loads safetensors only: save it with "
                        "save_pretrained(dir, safe_serialization=True)")
    return files


def vae_sha256(path: str | os.PathLike) -> str:
    """sha256 over the VAE's ``config.json`` and its ``*.safetensors`` files (names and bytes)."""
    d = vae_dir(path)
    h = hashlib.sha256()
    for f in [d / "config.json", *_weight_files(d)]:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_vae(path: str | os.PathLike, expected_sha256: str | None = None) -> VAE:
    """Load a diffusers VAE directory (local files, safetensors only), in eval mode, no gradients.

    ``expected_sha256`` (from a model.json) must match the files on disk, else :class:`DataError`.
    """
    d = vae_dir(path)
    sha = vae_sha256(d)
    if expected_sha256 and expected_sha256 != sha:
        raise DataError(f"the VAE in {d} changed since the model was trained (sha256 {sha[:12]} vs recorded "
                        f"{expected_sha256[:12]}); restore that VAE or retrain the model on this one")
    return _load_vae_cached(str(d), sha)


@functools.lru_cache(maxsize=4)
def _load_vae_cached(d: str, sha: str) -> VAE:
    name = _vae_config(Path(d))["_class_name"]
    import diffusers

    try:
        module = getattr(diffusers, name).from_pretrained(d, local_files_only=True, use_safetensors=True,
                                                      low_cpu_mem_usage=False)  # no accelerate needed
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise DataError(f"cannot load the VAE in {d} ({str(e).splitlines()[0]}); re-save it with "
                        "diffusers' save_pretrained") from None
    return VAE(Path(d), module.eval().requires_grad_(False), sha, name)


# ---------------------------------------------------------------------------------------------
# encoded data sets


def data_sha256(x_train: torch.Tensor, x_test: torch.Tensor) -> str:
    """sha256 of a data set's pixels (train then test, float32 bytes)."""
    h = hashlib.sha256()
    for x in (x_train, x_test):
        h.update(str(tuple(x.shape)).encode())
        h.update(x.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_paths(vae: VAE, name: str, key: str) -> list[Path]:
    """Where the latents may live: beside the VAE first, then the user cache."""
    stem = f"{Path(name).name}-{key}.safetensors"
    root = Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))
    return [vae.path / CACHE_DIR / stem, root / "latents" / stem]


def cached_latents(vae: VAE, name: str, x_train: torch.Tensor, x_test: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, Path | None]:
    """``(z_train, z_test, cache file)``: read from the cache, or encoded once and written there
    (``None`` when no cache folder is writable)."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(f"{data_sha256(x_train, x_test)}:{vae.sha256}:v{LATENT_VERSION}".encode())
    paths = _cache_paths(vae, name, key.hexdigest()[:20])
    for p in paths:
        if p.is_file():
            try:
                z = load_file(str(p))
            except (OSError, ValueError, RuntimeError):
                continue  # a truncated file: encode again
            if len(z.get("train", ())) == len(x_train) and len(z.get("test", ())) == len(x_test):
                return z["train"], z["test"], p
    z_train, z_test = vae.encode(x_train), vae.encode(x_test)
    meta = {"data": name, "vae": str(vae.path), "vae_sha256": vae.sha256, "latent": "posterior mean, "
            f"scaled by {vae.scaling_factor:.6g}", "version": str(LATENT_VERSION)}
    for p in paths:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            save_file({"train": z_train.contiguous(), "test": z_test.contiguous()}, str(tmp), metadata=meta)
            os.chmod(tmp, 0o644)  # safetensors writes 0600
            os.replace(tmp, p)
            return z_train, z_test, p
        except OSError:  # read-only VAE folder: try the user cache
            continue
    return z_train, z_test, None


def check_vae_fits(vae: VAE, x: torch.Tensor, name: str) -> None:
    """The VAE must take the data's channels and give back images of the data's size."""
    in_ch = int(getattr(vae.module.config, "in_channels", x.shape[1]))
    if in_ch != x.shape[1]:
        raise DataError(f"the VAE in {vae.path} encodes {in_ch}-channel images but {name} has {x.shape[1]} "
                        "channel(s); use a VAE trained on this data (fewstep vae --data ...)")
    with torch.no_grad():
        back = vae.decode(vae.encode(x[:1]))
    if back.shape[1:] != x.shape[1:]:
        raise DataError(f"the VAE in {vae.path} turns {name}'s {list(x.shape[1:])} images into "
                        f"{list(back.shape[1:])}; use a VAE whose downsampling divides the image size")
