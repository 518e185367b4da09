"""Sample grids for images, scatter plots over the true modes for 2-D data, metric curves.

matplotlib is imported inside the functions (Agg backend), so importing fewstep stays fast.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import FewstepError


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile images ``[N, C, H, W]`` in [-1, 1] into one ``[H', W', C]`` float array in [0, 1]."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_image_grid(path: Path, x: torch.Tensor, nrow: int | None = None, scale: int = 4) -> None:
    plt = _plt()
    grid = image_grid(x, nrow)
    if grid.shape[2] == 1:
        grid = np.repeat(grid, 3, axis=2)
    grid = np.kron(grid, np.ones((scale, scale, 1)))  # nearest-neighbour upscaling for small images
    _atomic_bytes(path, lambda buf: plt.imsave(buf, grid, format="png"))


def scatter_2d(ax, x: torch.Tensor, means: torch.Tensor | None = None, stds=None, title: str = ""):
    """Samples as dots, true modes as rings of radius 3 std (the HQ region)."""
    x = x.float().cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color="C0", linewidths=0)
    if means is not None:
        for k, m in enumerate(means.tolist()):
            r = 3 * float(stds[k]) if stds is not None else 0.1
            ax.add_patch(_plt().Circle(m, r, fill=False, color="C3", lw=0.8))
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def save_scatter(path: Path, x: torch.Tensor, mixture=None, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    means = mixture.means if mixture is not None else None
    stds = mixture.mode_stds.max(dim=1).values if mixture is not None else None
    scatter_2d(ax, x, means, stds, title)
    if mixture is not None:
        lim = float(mixture.means.abs().max()) * 1.4 + 0.5
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    fig.tight_layout()
    _atomic_bytes(path, lambda buf: fig.savefig(buf, format="png"))
    plt.close(fig)


def decode_samples(x: torch.Tensor, meta: dict) -> torch.Tensor:
    """Samples of a latent model (model.json ``data.vae``) decoded to pixels by its VAE; others as they
    are."""
    vae = (meta.get("data") or {}).get("vae")
    if not vae:
        return x
    from fewstep.data.latents import load_vae

    with torch.no_grad():
        return load_vae(vae["path"], vae.get("sha256")).decode(x)


def save_samples(path: Path, x: torch.Tensor, y, gen) -> None:
    """Write samples as ``.npz`` (x, y; latent models: x decoded pixels, z the latents) or a picture
    chosen by the data kind (latent samples decoded first)."""
    path = Path(path)
    pixels = decode_samples(x, gen.meta)
    latent, x = (x, pixels) if pixels is not x else (None, x)
    if path.suffix == ".npz":
        arrays = {"x": x.numpy()}
        if latent is not None:
            arrays["z"] = latent.numpy()
        if y is not None:
            arrays["y"] = y.numpy()
        _atomic_bytes(path, lambda buf: np.savez(buf, **arrays))
    elif x.ndim == 4:
        save_image_grid(path, x)
    elif x.ndim == 2 and x.shape[1] == 2:
        from fewstep.data import load_dataset

        data = gen.meta.get("data", {})
        name = data.get("path") or data.get("name")  # user data by its recorded absolute path
        mixture = None
        if name:
            try:
                mixture = load_dataset(name).mixture
            except FewstepError:
                mixture = None
        save_scatter(path, x, mixture, title=f"{len(x)} samples")
    else:
        raise FewstepError(f"cannot draw {x.shape[1]}-D vectors as a picture; use --out FILE.npz")


def _atomic_bytes(path: Path, write) -> None:
    """Render into memory, then write the file in one go via temp + rename."""
    path = Path(path)
    buf = io.BytesIO()
    write(buf)
    if not path.parent.exists():
        raise FewstepError(f"directory {path.parent} does not exist; create it or choose another path")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FewstepError(f"could not write {path} ({e.strerror or e})") from None
