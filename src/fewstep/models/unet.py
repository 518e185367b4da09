"""A small image raw net: diffusers ``UNet2DModel`` behind the ``F(x_in, c_noise, onehot | None)``
signature that ``core.precond.EDMPrecond`` wraps (EDM eq. 7).

Default size (measured on a 2-core CPU, batch 64 of 1x8x8, forward + backward): channels (32, 64),
one ResNet per level, self-attention in the 4x4 mid block only: about 0.65 M parameters and
55-60 ms per step. diffusers is imported inside ``UNetRaw.__init__`` so ``import fewstep.models`` stays
fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# ADM timestep scale: EDM's c_noise = ln(sigma)/4 lies in about [-1.55, 1.1]; diffusers' sinusoidal
# embedding has frequencies 10000^(-i/half) in (1e-4, 1], tuned for timesteps 0..1000. Feeding
# 1000 * c_noise (= 250 ln sigma) spreads sigma over that range, so the low frequencies are monotone
# in sigma across [0.002, 80] and the high ones resolve small relative changes of sigma. Fed raw,
# most channels would be nearly constant.
TIMESTEP_SCALE = 1000.0


def _block_types(attention: Sequence[bool]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down/up block type names for per-level attention flags (up blocks run in reverse order)."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return down, up


def _check_config(shape, block_out_channels, attention, norm_num_groups) -> None:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"UNetRaw needs a square image shape [C, H, H], got {list(shape)}")
    if len(attention) != len(block_out_channels):
        raise ValueError(f"attention needs one flag per level ({len(block_out_channels)}), "
                         f"got {len(attention)}")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"block_out_channels {list(block_out_channels)} must be multiples of "
                         f"norm_num_groups={norm_num_groups}")


class UNetRaw(nn.Module):
    """Raw net ``F(x_in [B, C, H, W], c_noise [B], labels [B, K] | None) -> [B, C, H, W]``.

    ``attention`` has one flag per level (self-attention in that level's blocks; None = none);
    ``mid_attention`` adds self-attention in the bottleneck. Sizes that ``2^(levels - 1)`` does not divide
    (e.g. a 4x7x7 VAE latent) are zero-padded at the bottom/right to the next multiple and the output
    is cropped back (zero is the mean of EDM's unit-variance ``c_in x``); the UNet then runs on the
    padded size. ``self.unet`` is the ``UNet2DModel``
    (hooks reach ``unet.down_blocks``, ``unet.mid_block``, ``unet.up_blocks``). The timestep fed to it
    is ``1000 * c_noise`` (see ``TIMESTEP_SCALE``).
    Class conditioning: our bias-free ``Linear(num_classes -> time_embed_dim)`` of the one-hot is passed
    through ``class_embed_type="identity"`` and added to the time embedding, so a zero one-hot
    (unconditional) adds nothing. ``conv_out`` is zero-initialised: ``F == 0`` at init, ``D = c_skip x``.
    """

    def __init__(self, shape: Sequence[int] = (1, 8, 8), num_classes: int = 0,
                 block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
                 attention: Sequence[bool] | None = None, mid_attention: bool = True,
                 norm_num_groups: int = 8, attention_head_dim: int = 8):
        super().__init__()
        from diffusers import UNet2DModel

        shape, block_out_channels = tuple(shape), tuple(block_out_channels)
        attention = (False,) * len(block_out_channels) if attention is None else tuple(map(bool, attention))
        _check_config(shape, block_out_channels, attention, norm_num_groups)
        down, up = _block_types(attention)
        self.shape, self.num_classes = shape, num_classes
        self.size_multiple = 2 ** (len(block_out_channels) - 1)  # the down/up path halves and doubles
        self.unet = UNet2DModel(
            sample_size=shape[1], in_channels=shape[0], out_channels=shape[0],
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            down_block_types=down, up_block_types=up, add_attention=mid_attention,
            norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim,
            class_embed_type="identity" if num_classes else None)
        time_embed_dim = 4 * block_out_channels[0]  # UNet2DModel's default time_embedding_dim
        self.embed_label = nn.Linear(num_classes, time_embed_dim, bias=False) if num_classes else None
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """``x_in [B, C, H, W]``, ``c_noise [B]``, ``labels [B, K]`` one-hot or None -> ``[B, C, H, W]``."""
        dtype = self.unet.conv_in.weight.dtype
        class_emb = None
        if self.embed_label is not None:
            if labels is None:  # conditional net without labels: zero one-hot, as EDM does
                labels = x_in.new_zeros(x_in.shape[0], self.num_classes)
            class_emb = self.embed_label(labels.to(dtype))
        t_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp16 cannot resolve t
        timestep = (TIMESTEP_SCALE * c_noise).to(t_dtype).reshape(x_in.shape[0])
        H, W = x_in.shape[-2:]
        pad_h, pad_w = -H % self.size_multiple, -W % self.size_multiple
        if pad_h or pad_w:
            x_in = nn.functional.pad(x_in, (0, pad_w, 0, pad_h))
        out = self.unet(x_in.to(dtype), timestep, class_labels=class_emb).sample
        return out[..., :H, :W] if (pad_h or pad_w) else out
