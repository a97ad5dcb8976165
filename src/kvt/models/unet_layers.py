"""Building blocks shared by the two Kandinsky Video U-Nets (the Kandinsky 3 skeleton).

Attribute names follow the official modules so that ``state_dict`` keys match the released checkpoints
(``docs/spec/checkpoints.md``). Differences from the official code, all numerically neutral:

* attention runs through ``F.scaled_dot_product_attention`` (boolean masks, scale ``head_dim ** -0.5``);
* the official CUDA autocast's float32 islands are explicit: the sinusoidal embeddings, and each group
  norm together with the pointwise ops after it up to the next conv / linear (modulation, SiLU: float32
  by type promotion officially); everything else runs in the weights' dtype, so a bf16/fp16 module needs
  no autocast;
* no Python loops over the batch or frames and no branching on tensor values (export-friendly);
* no registered buffers, so a model built on the meta device loads with ``assign=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvt.models.configs import UNetSkeletonConfig
from kvt.models.norms import FP32GroupNorm

Resample = Literal["up", "down"] | None


# --------------------------------------------------------------------------------------------------
# embeddings and norms


class SinusoidalPosEmb(nn.Module):
    """[sin(x f), cos(x f)] with f_k = 10000^(-k / (half - 1)), always in float32.

    Timesteps (up to 999) lose their phase in fp16, so the official autocast keeps this in fp32 too.
    The frequencies are computed in ``forward`` (no buffer) to keep meta-device construction trivial.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * -step)
        args = x.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class EmbedMLP(nn.Sequential):
    """Scalar -> embedding: SinusoidalPosEmb -> Linear -> SiLU -> Linear (keys ``.1`` and ``.3``).

    Accepts any numeric dtype; the fp32 sinusoid is cast to the first Linear's dtype.
    """

    def __init__(self, sinusoid_dim: int, embed_dim: int) -> None:
        super().__init__(
            SinusoidalPosEmb(sinusoid_dim),
            nn.Linear(sinusoid_dim, embed_dim),
            nn.SiLU(),
            nn.Linear(embed_dim, embed_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        sinusoid, first, activation, second = self
        return second(activation(first(sinusoid(x).to(first.weight.dtype))))


class ConditionalGroupNorm(nn.Module):
    """GN(x) * (1 + scale) + shift, with (scale, shift) = Linear(SiLU(embed)) per sample.

    Official autocast precision: the norm's output is float32, (scale, shift) come from a linear in the
    weights' dtype, so the modulation, and an ``activation`` applied right after it, are float32; the
    result is cast to x's dtype for the conv / linear that follows.
    """

    def __init__(self, groups: int, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = FP32GroupNorm(groups, channels, affine=False)
        linear = nn.Linear(embed_dim, 2 * channels)
        self.context_mlp = nn.Sequential(nn.SiLU(), linear)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, embed: Tensor, activation: nn.Module | None = None) -> Tensor:
        params = self.context_mlp(embed)
        params = params[(...,) + (None,) * (x.dim() - 2)]
        # Slices rather than chunk(): chunk exports as a split into an ONNX sequence, which TensorRT
        # cannot parse; two slices are the same values.
        channels = params.shape[1] // 2
        scale, shift = params[:, :channels], params[:, channels:]
        out = self.norm.fp32(x) * (scale + 1.0).to(torch.float32) + shift.to(torch.float32)
        if activation is not None:
            out = activation(out)
        return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# attention


def as_key_mask(mask: Tensor) -> Tensor:
    """Boolean key mask (True = valid) from a bool or integer mask."""
    return mask if mask.dtype == torch.bool else mask != 0


class Attention(nn.Module):
    """Multi-head attention of x (B, N, in) over context (B, L, ctx), bias-free projections.

    Heads are channel-major ((h d), d fastest) as in the official einops pattern. A key mask
    (B, L) bool removes keys; every query row must keep at least one key (the official code fills
    -finfo.max, equivalent whenever one key is valid).
    """

    def __init__(self, in_channels: int, out_channels: int, context_dim: int, head_dim: int) -> None:
        super().__init__()
        if out_channels % head_dim:
            raise ValueError(f"attention width {out_channels} is not divisible by head_dim {head_dim}")
        self.num_heads = out_channels // head_dim
        self.head_dim = head_dim
        self.to_query = nn.Linear(in_channels, out_channels, bias=False)
        self.to_key = nn.Linear(context_dim, out_channels, bias=False)
        self.to_value = nn.Linear(context_dim, out_channels, bias=False)
        self.output_layer = nn.Linear(out_channels, out_channels, bias=False)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``context``, split into heads (text-only for cross-attention)."""
        return self._split_heads(self.to_key(context)), self._split_heads(self.to_value(context))

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        return self.attend(x, *self.project_kv(context), context_mask)

    def attend(self, x: Tensor, key: Tensor, value: Tensor, context_mask: Tensor | None = None) -> Tensor:
        query = self._split_heads(self.to_query(x))
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             scale=self.head_dim ** -0.5)
        return self.output_layer(out.transpose(1, 2).flatten(2))


class AttentionPolling(nn.Module):
    """Adds attention-pooled text to the time embedding; the query is the mean context row.

    Official: mean over all L positions (masked zero rows included), so the result depends on L.
    ``context_len`` (B,) reproduces that mean for a context zero-padded to a static length.
    """

    def __init__(self, embed_dim: int, context_dim: int, head_dim: int) -> None:
        super().__init__()
        self.attention = Attention(context_dim, embed_dim, context_dim, head_dim)
        self._text_cache: dict[str, Tensor] | None = None  # see text_constant()

    def forward(self, embed: Tensor, context: Tensor, context_mask: Tensor,
                context_len: Tensor | None = None) -> Tensor:
        pooled = None if self._text_cache is None else self._text_cache.get("pooled")
        if pooled is None or pooled.shape[0] != context.shape[0]:
            pooled = self._pooled(context, context_mask, context_len)
            if self._text_cache is not None:
                self._text_cache["pooled"] = pooled
        return embed + pooled

    def _pooled(self, context: Tensor, context_mask: Tensor, context_len: Tensor | None) -> Tensor:
        if context_len is None:
            query = context.mean(dim=1, keepdim=True)
        else:
            query = context.sum(dim=1, keepdim=True) / context_len.to(context.dtype)[:, None, None]
        return self.attention(query, context, context_mask)[:, 0]


class FeedForward(nn.Sequential):
    """1x1 conv MLP: C -> expansion*C -> SiLU -> C, bias-free (keys ``.0`` and ``.2``)."""

    def __init__(self, channels: int, expansion_ratio: int) -> None:
        hidden = expansion_ratio * channels
        super().__init__(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )


class AttentionBlock(nn.Module):
    """Spatial self-attention (no context) or cross-attention to text, then a feed-forward.

    x = x + Attn(CGN_in(x)); x = x + FF(CGN_out(x)); tokens are the H*W positions (row-major).
    """

    def __init__(self, channels: int, embed_dim: int, context_dim: int | None, groups: int,
                 head_dim: int, expansion_ratio: int) -> None:
        super().__init__()
        self.in_norm = ConditionalGroupNorm(groups, channels, embed_dim)
        self.attention = Attention(channels, channels, context_dim or channels, head_dim)
        self.out_norm = ConditionalGroupNorm(groups, channels, embed_dim)
        self.feed_forward = FeedForward(channels, expansion_ratio)
        self._text_cache: dict[str, tuple[Tensor, Tensor]] | None = None  # see text_constant()

    def forward(self, x: Tensor, embed: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        tokens = self.in_norm(x, embed).flatten(2).transpose(1, 2)
        if context is None:  # self-attention
            out = self.attention(tokens, tokens)
        else:
            out = self.attention.attend(tokens, *self._text_kv(context), context_mask)
        x = x + out.transpose(1, 2).reshape(x.shape)
        return x + self.feed_forward(self.out_norm(x, embed))

    def _text_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        kv = None if self._text_cache is None else self._text_cache.get("kv")
        if kv is None or kv[0].shape[0] != context.shape[0] or kv[0].shape[2] != context.shape[1]:
            kv = self.attention.project_kv(context)
            if self._text_cache is not None:
                self._text_cache["kv"] = kv
        return kv


@contextmanager
def text_constant(network: nn.Module) -> Iterator[None]:
    """Hoist the text-only work of ``network`` out of a denoising loop (docs/spec/deployment.md, rewrite 3).

    Inside the block, every cross-attention's keys/values and every attention-pooled text vector are
    computed on the first call and reused: the caller promises that the text inputs (context, mask,
    context_len) stay the same, as they do for all steps of one sampler loop. The math is unchanged
    (the same ops on the same inputs), so outputs are bit-identical. Not for CUDA-graph capture or
    torch.compile: a replayed graph would keep reading the first request's cached tensors.
    """
    holders = [m for m in network.modules() if isinstance(m, (AttentionBlock, AttentionPolling))]
    for module in holders:
        module._text_cache = {}
    try:
        yield
    finally:
        for module in holders:
            module._text_cache = None


# --------------------------------------------------------------------------------------------------
# convolutional blocks


class Block(nn.Module):
    """CGN -> SiLU -> [ConvTranspose2d x2 up] -> Conv(k) -> [stride-2 Conv down]."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, kernel_size: int,
                 groups: int, resample: Resample = None) -> None:
        super().__init__()
        self.group_norm = ConditionalGroupNorm(groups, in_channels, embed_dim)
        self.activation = nn.SiLU()
        self.up_sample = (nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2)
                          if resample == "up" else None)
        self.projection = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size,
                                    padding=0 if kernel_size == 1 else 1)
        self.down_sample = (nn.Conv2d(out_channels, out_channels, kernel_size=2, stride=2)
                            if resample == "down" else None)

    def forward(self, x: Tensor, embed: Tensor) -> Tensor:
        x = self.group_norm(x, embed, self.activation)
        if self.up_sample is not None:
            x = self.up_sample(x)
        x = self.projection(x)
        if self.down_sample is not None:
            x = self.down_sample(x)
        return x


BlockFactory = Callable[[int, int, int, int, int, Resample], Block]


class ResNetBlock(nn.Module):
    """Four Blocks (1x1, 3x3, 3x3, 1x1; hidden width max(in, out) // compression) plus a shortcut.

    Upsampling happens inside Block 1, downsampling inside Block 2; the shortcut mirrors it with its own
    learned ConvTranspose2d / stride-2 conv and a 1x1 projection when the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int,
                 compression_ratio: int, resample: Resample = None,
                 make_block: BlockFactory = Block) -> None:
        super().__init__()
        hidden = max(in_channels, out_channels) // compression_ratio
        widths = [(in_channels, hidden), (hidden, hidden), (hidden, hidden), (hidden, out_channels)]
        kernels = [1, 3, 3, 1]
        resamples: list[Resample] = [None, "up" if resample == "up" else None,
                                     "down" if resample == "down" else None, None]
        self.resnet_blocks = nn.ModuleList([
            make_block(cin, cout, embed_dim, k, groups, r)
            for (cin, cout), k, r in zip(widths, kernels, resamples)
        ])
        self.shortcut_up_sample = (nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2)
                                   if resample == "up" else None)
        self.shortcut_projection = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                                    if in_channels != out_channels else None)
        self.shortcut_down_sample = (nn.Conv2d(out_channels, out_channels, kernel_size=2, stride=2)
                                     if resample == "down" else None)

    def forward(self, x: Tensor, embed: Tensor) -> Tensor:
        out = x
        for block in self.resnet_blocks:
            out = block(out, embed)
        if self.shortcut_up_sample is not None:
            x = self.shortcut_up_sample(x)
        if self.shortcut_projection is not None:
            x = self.shortcut_projection(x)
        if self.shortcut_down_sample is not None:
            x = self.shortcut_down_sample(x)
        return x + out


class OutLayer(nn.Sequential):
    """GroupNorm (affine) -> SiLU, both float32 as under autocast -> Conv3x3 (keys ``out_layer.0`` /
    ``out_layer.2``)."""

    def __init__(self, groups: int, channels: int, out_channels: int) -> None:
        super().__init__(
            FP32GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, kernel_size=3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]  # same signature as Sequential's
        norm, activation, conv = self
        assert isinstance(norm, FP32GroupNorm)  # built in __init__
        return conv(activation(norm.fp32(x)).to(x.dtype))


# --------------------------------------------------------------------------------------------------
# frames <-> clips


@dataclass(frozen=True)
class ClipLayout:
    """How a batch (N*T, ...) of frames splits into N clips of T contiguous frames.

    Give ``frames`` (T, N inferred) or ``clips`` (N, T inferred); reshapes use -1 for the other so an
    exported graph keeps the batch dynamic.
    """

    frames: int | None = None
    clips: int | None = None

    def __post_init__(self) -> None:
        if (self.frames is None) == (self.clips is None):
            raise ValueError(f"give exactly one of frames / clips (got {self.frames}, {self.clips})")

    def split(self, x: Tensor) -> Tensor:
        """(N*T, ...) -> (N, T, ...)."""
        if self.frames is not None:
            return x.reshape(-1, self.frames, *x.shape[1:])
        assert self.clips is not None  # __post_init__: exactly one of frames / clips
        return x.reshape(self.clips, -1, *x.shape[1:])


def conv_over_time(conv: nn.Conv3d, x: Tensor, layout: ClipLayout) -> Tensor:
    """Apply a (k, 1, 1) Conv3d along the frame axis of (N*T, C, H, W); zero padding at clip ends."""
    clips = layout.split(x).transpose(1, 2)  # (N, C, T, H, W)
    return conv(clips).transpose(1, 2).flatten(0, 1)


def frames_to_sequences(x: Tensor, layout: ClipLayout) -> Tensor:
    """(N*T, C, H, W) -> (N*H*W, T, C): one sequence over time per clip and pixel."""
    return layout.split(x).permute(0, 3, 4, 1, 2).flatten(0, 2)


def sequences_to_frames(y: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`frames_to_sequences`."""
    return y.unflatten(0, (-1, height, width)).permute(0, 3, 4, 1, 2).flatten(0, 1)


# --------------------------------------------------------------------------------------------------
# level plan


@dataclass(frozen=True)
class LevelPlan:
    """Widths and switches of one U-Net level (down: in -> out; up: in + skip -> out)."""

    in_channels: int
    out_channels: int
    skip_channels: int
    num_blocks: int
    cross_attention: bool
    self_attention: bool
    resample: bool  # down levels: downsample at the end; up levels: upsample at the start


def unet_levels(config: UNetSkeletonConfig) -> tuple[list[LevelPlan], list[LevelPlan]]:
    """Down and up level plans of the official skeleton (up levels mirror the down levels)."""
    dims = config.hidden_dims
    pairs = list(zip(dims[:-1], dims[1:]))
    last = len(pairs) - 1
    down = [
        LevelPlan(cin, cout, 0, config.num_blocks[level], config.add_cross_attention[level],
                  config.add_self_attention[level], level != last)
        for level, (cin, cout) in enumerate(pairs)
    ]
    up = []
    for u, level in enumerate(reversed(range(len(pairs)))):
        cout, cin = pairs[level]
        # Up level u >= 1 concatenates the output of down level `level` (width cin); u = 0 has no skip.
        up.append(LevelPlan(cin, cout, cin if u else 0, config.num_blocks[level],
                            config.add_cross_attention[level], config.add_self_attention[level], u != 0))
    return down, up
