"""``fewstep vae``: train a small diffusers ``AutoencoderKL`` for latent teachers (flow_and_latent.md §2).

Loss per batch: ``mean |decode(z) - x|`` (L1 on [-1, 1] pixels) ``+ kl_weight * mean KL`` with ``z`` a
posterior sample and the KL of the diagonal Gaussian posterior to N(0, I) averaged over latent
elements (the SD VAE's recipe without its LPIPS and GAN terms, which need pretrained networks).
Adam, cosine learning rate. After training, ``scaling_factor`` = 1 / std of the training set's
posterior means (the SD convention: unit-variance latents for the diffusion model) is written into
the config, and the VAE is saved with ``save_pretrained`` (config.json + safetensors) next to
``fewstep_vae.json`` (settings, time, reconstruction metrics). The json is written last: a folder
with it is a finished VAE; rerunning the same command on it does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.errors import FewstepError

META_NAME = "fewstep_vae.json"


@dataclass
class VAETrainConfig:
    data: str = "mnist28"
    # Defaults measured on mnist28 (benchmarks/RESULTS.md "mnist28"): 0.24 M parameters, 4x7x7 latents,
    # ~7 min of one CPU core; fd_vae_floor 0.168 vs fd_floor 0.167 at n = 500. Widths (32, 64, 64)
    # cost ~4x more per step on a CPU for a floor that has no room left to drop.
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # one block each; 2^(n-1) downsampling
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_attention: bool = True       # self-attention in the 7x7 mid blocks (diffusers' default)
    iters: int = 2000
    batch: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-3
    seed: int = 0


def build_vae(cfg: VAETrainConfig, channels_in: int, size: int):
    from diffusers import AutoencoderKL

    n = len(cfg.channels)
    if any(c % cfg.norm_num_groups for c in cfg.channels):
        raise FewstepError(f"VAE channels {cfg.channels} must be multiples of norm_num_groups="
                           f"{cfg.norm_num_groups}")
    return AutoencoderKL(in_channels=channels_in, out_channels=channels_in,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                         sample_size=size, scaling_factor=1.0, mid_block_add_attention=cfg.mid_attention)


def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, averaged: ``0.5 (m^2 + v - 1 - log v)``."""
    return 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).mean()


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
    rec = (vae.decode(z).sample - x).abs().mean()
    kl = kl_per_element(post.mean, post.logvar)
    return rec + kl_weight * kl, {"l1": float(rec.detach()), "kl": float(kl.detach())}


def _fit(vae, x: torch.Tensor, cfg: VAETrainConfig, log: Callable[[str], None]) -> None:
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, cfg.iters))))
    vae.train()
    every = max(1, cfg.iters // 10)
    for step in range(cfg.iters):
        idx = torch.randint(0, len(x), (cfg.batch,), generator=gen)
        loss, parts = vae_loss(vae, x[idx], cfg.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == cfg.iters:
            log(f"step {step + 1}/{cfg.iters} l1 {parts['l1']:.4f} kl {parts['kl']:.3f}")


@torch.no_grad()
def latent_statistics(vae, x: torch.Tensor, batch: int = 256) -> dict:
    """Posterior means' global mean/std and the mean posterior std of ``x`` (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(x), batch):
        post = vae.encode(x[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    m, s = torch.cat(means).double(), torch.cat(stds).double()
    return {"mean": float(m.mean()), "std": float(m.std()), "posterior_std": float(s.mean()),
            "shape": list(m.shape[1:])}


def reconstruction_metrics(out: Path, data_name: str) -> dict:
    """Pixel errors of decode(encode(test)) and the VAE floors next to the data floor (n = test size)."""
    from fewstep.data import load_dataset
    from fewstep.train.evaluate import default_n, floors, metric_space, vae_floors

    latent = load_dataset(data_name, vae=str(out))
    x = latent.pixels.x_test
    with torch.no_grad():
        rec = latent.decode(latent.x_test)
    mse = float(((rec - x) ** 2).mean())
    res = {"test_l1": float((rec - x).abs().mean()), "test_mse": mse,
           "test_psnr_db": 10 * math.log10(4.0 / mse),  # peak-to-peak 2 on [-1, 1]
           "latent_train_std": float(latent.x_train.std()), "latent_train_mean": float(latent.x_train.mean())}
    space = metric_space(latent)
    n = default_n(latent.pixels)
    res.update({"n": n, "metric_space": space.name, "fd_floor": floors(space, n).get("fd_floor")})
    res.update({k: v for k, v in vae_floors(space, n).items() if k.startswith("fd_")})
    return res


def _settings(cfg: VAETrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def _check_out(out: Path, cfg: VAETrainConfig) -> bool:
    """True when ``out`` already holds this VAE (finished); raises if it holds something else."""
    meta = out / META_NAME
    if meta.is_file():
        old = json.loads(meta.read_text()).get("settings", {})
        if old != _settings(cfg):
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in _settings(cfg).items()
                             if old.get(k) != v)
            raise FewstepError(f"{out} holds a VAE trained with other settings ({diff}); choose another "
                               "--out")
        return True
    if out.exists() and any(out.iterdir()):
        raise FewstepError(f"{out} exists and is not a finished fewstep VAE; choose an empty or new --out")
    return False


def train_vae(cfg: VAETrainConfig, out: str | Path, log: Callable[[str], None] = print,
              measure: bool = True) -> dict:
    """Train, measure the scaling factor, save; returns the contents of ``fewstep_vae.json``.
    ``measure=False`` skips the reconstruction metrics (their floors run the feature network over
    thousands of images)."""
    from fewstep.data import load_dataset
    from fewstep.train.rundir import atomic_write_text

    out = Path(out)
    if _check_out(out, cfg):
        log(f"{out} already holds this VAE; nothing to do")
        return json.loads((out / META_NAME).read_text())
    data = load_dataset(cfg.data)
    if data.kind != "image" or data.x_train is None:
        raise FewstepError(f"a VAE encodes images, but {cfg.data} holds {data.kind}s; pass an image data set")
    c, h, _ = data.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg, c, h)
    t0 = time.perf_counter()
    _fit(vae, data.x_train, cfg, log)
    seconds = time.perf_counter() - t0
    vae.eval()
    stats = latent_statistics(vae, data.x_train)
    vae.register_to_config(scaling_factor=1.0 / stats["std"])  # SD convention: unit-std latents
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(out), safe_serialization=True)
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)  # safetensors writes 0600; a VAE is meant to be shared
    meta = {"settings": _settings(cfg), "data": cfg.data, "train_seconds": round(seconds, 1),
            "parameters": sum(p.numel() for p in vae.parameters()),
            "latent_shape": stats.pop("shape"),
            "scaling_factor": 1.0 / stats["std"], "unscaled_latent": stats,
            "latent": "posterior mean (fewstep.data.latents)", "torch": torch.__version__}
    if measure:
        meta.update(reconstruction_metrics(out, cfg.data))
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2) + "\n")
    log(f"VAE {meta['latent_shape']} latents, scaling_factor {meta['scaling_factor']:.4f}, test L1 "
        f"{meta.get('test_l1')}, fd_vae_recon {meta.get('fd_vae_recon')}, {seconds:.0f} s -> {out}")
    return meta

