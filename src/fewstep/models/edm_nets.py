"""fewstep's own, parameter-compatible versions of the EDM networks (Karras et al. 2022, arXiv 2206.00364):
``SongUNet`` (DDPM++ / NCSN++ of Song et al. 2021) and ``DhariwalUNet`` (ADM, Dhariwal & Nichol 2021).

Written from the papers and the structure documented in NVlabs/edm ``training/networks.py``: module
names, parameter names and shapes are the checkpoint's (``model.enc.32x32_conv.weight``,
``model.map_noise``, ``model.dec.16x16_block3.qkv.weight``, ...) so that an EDM state dict loads strictly
(``edm_pickle.py``). Constructor arguments keep EDM's names and defaults because a pickle records them
(``_init_kwargs``) and we rebuild the network from them. Weight initialisation is not EDM's (a loaded
teacher overwrites it); ``EDM_CLASS`` is the class name EDM pickles record for each module.

Differences that do not change the function: ops are out-of-place (autograd-safe), and attention and
the embeddings are computed in at least float32 (EDM: exactly float32), so float64 runs stay float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.functional import silu


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _resample_kernel(f: Sequence[float]) -> torch.Tensor:
    """Separable FIR filter ``f`` -> normalised 2-D kernel ``[1, 1, k, k]`` (sum 1)."""
    f = torch.as_tensor(f, dtype=torch.float32)
    return (f.outer(f) / f.sum().square())[None, None]


class Linear(nn.Module):
    EDM_CLASS = "Linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(max(in_features, 1)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        return x if self.bias is None else x + self.bias.to(x.dtype)


class Conv2d(nn.Module):
    """Convolution with optional 2x up/downsampling by a FIR filter; ``kernel=0`` resamples only.

    ``fused_resample`` filters and strides in one go around the convolution (NCSN++'s residual encoder
    path); the unfused path resamples first (depthwise), then convolves.
    """

    EDM_CLASS = "Conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in = in_channels * kernel * kernel
        shape = (out_channels, in_channels, kernel, kernel)
        self.weight = nn.Parameter(torch.randn(shape) / math.sqrt(fan_in)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if up or down else None)

    def forward(self, x):
        F = nn.functional
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                             padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)


class GroupNorm(nn.Module):
    """Group norm whose group count shrinks so that each group has >= ``min_channels_per_group``."""

    EDM_CLASS = "GroupNorm"

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                        self.eps)


class UNetBlock(nn.Module):
    """Residual block with an embedding-conditioned norm, optional resampling and self-attention:
    the union of the DDPM++, NCSN++ and ADM blocks (EDM Appendix F.2)."""

    EDM_CLASS = "UNetBlock"

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:  # ADM: scale-shift norm
            scale, shift = params.chunk(2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:  # DDPM++ / NCSN++: additive embedding
            x = silu(self.norm1(x + params))
        x = self.conv1(nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self._attend(self.qkv(self.norm2(x)), x.shape)) + x) * self.skip_scale
        return x

    def _attend(self, qkv: torch.Tensor, shape) -> torch.Tensor:
        """Multi-head softmax(q^T k / sqrt(c)) v over pixels; weights in >= float32 as in EDM."""
        q, k, v = qkv.reshape(shape[0] * self.num_heads, shape[1] // self.num_heads, 3, -1).unbind(2)
        dt = _at_least_fp32(q.dtype)
        w = torch.einsum("ncq,nck->nqk", q.to(dt), (k / math.sqrt(k.shape[1])).to(dt)).softmax(dim=2)
        return torch.einsum("nqk,nck->ncq", w.to(q.dtype), v).reshape(*shape)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(x f_i), sin(x f_i)]``, ``f_i = (1/max_positions)^(i/(n/2 - endpoint))``."""

    EDM_CLASS = "PositionalEmbedding"

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs  # float32 like EDM, then cast
        x = x.outer(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi x f), sin(2 pi x f)]``, ``f ~ N(0, scale^2)`` (NCSN++)."""

    EDM_CLASS = "FourierEmbedding"

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.outer((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


class SongUNet(nn.Module):
    """DDPM++ (``embedding_type='positional'``, standard encoder) and NCSN++ (``'fourier'``,
    ``encoder_type='residual'``, ``resample_filter=[1,3,3,1]``, ``channel_mult_noise=2``) of Song et
    al. 2021, as re-implemented in EDM. ``F(x [B,C,H,W], c_noise [B], labels [B,K] | None)``.

    The encoder is a ``ModuleDict`` ``{res}x{res}_{conv|down|block<i>|aux_*}``; skip connections are the
    outputs of every non-aux entry. The decoder starts with ``in0`` (attention) / ``in1`` at the lowest
    resolution; ``aux_norm``/``aux_conv`` produce the output (every level for ``decoder_type='skip'``).
    """

    EDM_CLASS = "SongUNet"

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        _check_choice("embedding_type", embedding_type, ("fourier", "positional"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.enc = self._encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                 attn_resolutions, encoder_type, resample_filter, block)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]
        self.dec = self._decoder(img_resolution, out_channels, model_channels, channel_mult, num_blocks,
                                 attn_resolutions, decoder_type, resample_filter, block, skips)

    @staticmethod
    def _encoder(img_res, in_channels, mc, channel_mult, num_blocks, attn_res, encoder_type, filt, block):
        enc, cout, caux = nn.ModuleDict(), in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_res >> level
            if level == 0:
                enc[f"{res}x{res}_conv"] = Conv2d(cout, mc, 3)
                cout = mc
            else:
                enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":  # downsampled input, projected and added (progressive input)
                    enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=filt)
                    enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":  # NCSN++: residual path from the previous level
                    enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, resample_filter=filt,
                                                              fused_resample=True)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, mc * mult
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_res, **block)
        return enc

    @staticmethod
    def _decoder(img_res, out_channels, mc, channel_mult, num_blocks, attn_res, decoder_type, filt, block,
                 skips):
        dec, cout = nn.ModuleDict(), skips[-1]
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_res >> level
            if level == len(channel_mult) - 1:
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), mc * mult
                attn = idx == num_blocks and res in attn_res
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                        resample_filter=filt)
                dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)
        return dec

    def embed(self, noise_labels, class_labels):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin, cos] order as in NCSN++
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def forward(self, x, noise_labels, class_labels=None):
        """``x [B,C,H,W]``, ``noise_labels [B]``, ``class_labels [B,K]`` -> ``[B,C,H,W]``; augmentation
        labels are not used (EDM skips ``map_augment`` when they are None, as at sampling time)."""
        emb = self.embed(noise_labels, class_labels)
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol 2021) as re-implemented in EDM: scale-shift blocks, attention heads of 64
    channels, bias-free label embedding added to the noise embedding. Same call as :class:`SongUNet`."""

    EDM_CLASS = "DhariwalUNet"

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None
        self.enc, cout = nn.ModuleDict(), in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, 3)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def embed(self, noise_labels, class_labels):
        emb = self.map_layer1(silu(self.map_layer0(self.map_noise(noise_labels))))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return silu(emb)

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.embed(noise_labels, class_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))
