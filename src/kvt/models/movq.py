"""MoVQ image encoder/decoder and the temporal ("video") MoVQ decoder of Kandinsky Video 1.1.

One class serves both checkpoints: ``movq.pt`` (image MoVQ) and ``video_movq.pt`` (same network plus
3x3x3 temporal convolutions in every decoder ResnetBlock and temporal attention at the lowest level).
Attribute names reproduce the official ``state_dict`` keys exactly (see docs/spec/checkpoints.md).

Unlike the official code, which loops over frames in Python, every op here is batched so the graph
exports with a dynamic batch. The official per-frame loops have observable numerical side effects that
are reproduced on purpose (docs/spec/movq.md, quirks 25-28):

* a decode call is split into chunks of ``chunk_size`` frames; temporal convolutions zero-pad at each
  chunk's first/last frame and temporal attention only sees the frames of its chunk;
* the decoder's spatial AttnBlocks modulate every item of a chunk with the ``zq`` of the chunk's FIRST
  item (the official AttnBlock hands the whole ``zq`` batch to a norm that reads item 0);
* the temporal attention blocks own ``conv_y``/``conv_b`` weights that are never used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvt.models.attention_kernels import movq_attention
from kvt.models.configs import MoVQConfig
from kvt.models.norms import FP32GroupNorm

__all__ = ["MoVQ", "MoVQEncoder", "MoVQDecoder"]

_GROUPS = 32
_EPS = 1e-6


class SpatialNorm(nn.Module):
    """GroupNorm, optionally modulated by the latent ``zq`` (MoVQ's spatially conditioned norm).

    Without ``zq_channels`` (encoder) it is a plain affine GroupNorm. With it, the normalised features
    are scaled/shifted by 1x1 convolutions of ``zq`` resized (nearest) to the feature size, after an
    optional 3x3 conv (``add_conv``). The official key layout nests the GroupNorm as ``norm_layer``.
    """

    def __init__(self, channels: int, zq_channels: int | None = None, add_conv: bool = False) -> None:
        super().__init__()
        self.norm_layer = FP32GroupNorm(_GROUPS, channels, eps=_EPS, affine=True)
        self.conv: nn.Conv2d | None = None
        self.conv_y: nn.Conv2d | None = None
        self.conv_b: nn.Conv2d | None = None
        if zq_channels is not None:
            if add_conv:
                self.conv = nn.Conv2d(zq_channels, zq_channels, kernel_size=3, padding=1)
            self.conv_y = nn.Conv2d(zq_channels, channels, kernel_size=1)
            self.conv_b = nn.Conv2d(zq_channels, channels, kernel_size=1)

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        normed = self.norm_layer(x)
        if zq is None:
            return normed
        if self.conv_y is None or self.conv_b is None:
            raise ValueError("this SpatialNorm was built without zq_channels and cannot take zq")
        z = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        if self.conv is not None:
            z = self.conv(z)
        return normed * self.conv_y(z) + self.conv_b(z)


def _to_chunks(h: Tensor, frames: int) -> Tensor:
    """(K*F, C, H, W) -> (K, C, F, H, W): one Conv3d batch item per chunk; K stays dynamic (-1)."""
    return h.unflatten(0, (-1, frames)).transpose(1, 2)


def _from_chunks(h: Tensor) -> Tensor:
    """(K, C, F, H, W) -> (K*F, C, H, W), inverse of :func:`_to_chunks`."""
    return h.transpose(1, 2).flatten(0, 1)


def first_item_per_chunk(t: Tensor, frames: int) -> Tensor:
    """Replace every item by the first item of its chunk of ``frames`` items (same shape).

    Reproduces the official AttnBlock's spatial norm, which conditions every frame of a decode call on
    the first frame's latent.
    """
    # A gather by index rather than slice+expand+reshape: no size-1 special case (one chunk) for an
    # exporter to guard on.
    first = torch.arange(t.shape[0], device=t.device).div(frames, rounding_mode="floor") * frames
    return t.index_select(0, first)


class ResnetBlock(nn.Module):
    """Pre-norm residual block (norm, SiLU, 3x3 conv, twice), optionally with temporal 3x3x3 mixing.

    Temporal mixing (video decoder) follows each conv: ``h = (1 - m) * h + m * Conv3d(h)`` over the
    frames of a chunk. ``temporal_flicker_proj`` only exists for checkpoint compatibility: the official
    model uses it only with an augmentation embedding that inference never passes.
    """

    def __init__(self, in_channels: int, out_channels: int, zq_channels: int | None = None,
                 add_conv: bool = False, temporal: bool = False,
                 flicker_augmentation: bool = False) -> None:
        super().__init__()
        self.norm1 = SpatialNorm(in_channels, zq_channels, add_conv)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = SpatialNorm(out_channels, zq_channels, add_conv)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                             if in_channels != out_channels else None)
        self.temporal = temporal
        if temporal:
            # Zero init as in the official code: an untrained temporal branch is a no-op.
            self.temporal_merge1 = nn.Parameter(torch.zeros(1))
            self.temporal_projection1 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
            self.temporal_merge2 = nn.Parameter(torch.zeros(1))
            self.temporal_projection2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
            for conv in (self.temporal_projection1, self.temporal_projection2):
                nn.init.zeros_(conv.weight)
                assert conv.bias is not None  # built with a bias
                nn.init.zeros_(conv.bias)
            if flicker_augmentation:
                self.temporal_flicker_proj = nn.Linear(1, out_channels)

    @staticmethod
    def _mix(h: Tensor, projection: nn.Conv3d, merge: Tensor, frames: int) -> Tensor:
        mixed = _from_chunks(projection(_to_chunks(h, frames)))
        return (1 - merge) * h + merge * mixed

    def forward(self, x: Tensor, zq: Tensor | None = None, frames: int | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        if self.temporal and frames is not None:
            h = self._mix(h, self.temporal_projection1, self.temporal_merge1, frames)
        h = self.conv2(F.silu(self.norm2(h, zq)))
        if self.temporal and frames is not None:
            h = self._mix(h, self.temporal_projection2, self.temporal_merge2, frames)
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class _QKVProjections(nn.Module):
    """Norm + single-head q/k/v/proj_out 1x1 convolutions shared by both attention blocks."""

    def __init__(self, channels: int, zq_channels: int | None, add_conv: bool) -> None:
        super().__init__()
        self.norm = SpatialNorm(channels, zq_channels, add_conv)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)


class AttnBlock(_QKVProjections):
    """Spatial self-attention over the H*W positions of each item (single head, scale C^-0.5).

    The caller passes the ``zq`` the norm should use; the decoder passes each chunk's first-item latent
    to reproduce the official behaviour.
    """

    def forward(self, x: Tensor, zq: Tensor | None = None) -> Tensor:
        h = self.norm(x, zq)
        # (N, C, H, W) -> (N, 1, H*W, C): one head whose dim is C, so SDPA's default scale is C^-0.5.
        q, k, v = (proj(h).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = movq_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(x.shape)
        return x + self.proj_out(out)


class TemporalAttnBlock(_QKVProjections):
    """Self-attention over the frames of a chunk, independently at every pixel (single head).

    Its norm is a plain affine GroupNorm: the official decoder never passes ``zq`` here, so the norm's
    ``conv_y``/``conv_b`` (and ``conv``) weights are loaded but unused.
    """

    def forward(self, x: Tensor, frames: int) -> Tensor:
        h = self.norm(x)
        channels, height, width = x.shape[1], x.shape[2], x.shape[3]

        def per_pixel(t: Tensor) -> Tensor:  # (K*F, C, H, W) -> (K*H*W, 1, F, C)
            t = t.unflatten(0, (-1, frames)).permute(0, 3, 4, 1, 2)
            return t.reshape(-1, 1, frames, channels)

        out = movq_attention(per_pixel(self.q(h)), per_pixel(self.k(h)), per_pixel(self.v(h)))
        out = out.reshape(-1, height, width, frames, channels).permute(0, 3, 4, 1, 2)
        return x + self.proj_out(out.reshape(x.shape))


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one, then a stride-2 3x3 conv (official asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repetition, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def encoder_attention_levels(config: MoVQConfig) -> tuple[bool, ...]:
    """Which encoder levels attend: the nominal resolution (``config.resolution`` halved per level)
    must be in ``attn_resolutions``; independent of the actual input size, as in the official code."""
    flags, res = [], config.resolution
    for level in range(config.num_resolutions):
        flags.append(res in config.attn_resolutions)
        if level != config.num_resolutions - 1:
            res //= 2
    return tuple(flags)


def decoder_attention_levels(config: MoVQConfig) -> tuple[bool, ...]:
    """Which decoder levels attend (indexed by level, 0 = full resolution), derived as officially:
    start from ``resolution // 2**(levels-1)`` at the lowest level and double on the way up."""
    n = config.num_resolutions
    flags = [False] * n
    res = config.resolution // 2 ** (n - 1)
    for level in reversed(range(n)):
        flags[level] = res in config.attn_resolutions
        if level != 0:
            res *= 2
    return tuple(flags)


class EncoderLevel(nn.Module):
    """One encoder resolution level: ResnetBlocks (each optionally followed by attention), downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attend: bool,
                 downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels, None, False) for _ in range(num_blocks if attend else 0))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h if self.downsample is None else self.downsample(h)


class EncoderMid(nn.Module):
    """Encoder bottleneck: ResnetBlock, AttnBlock, ResnetBlock."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels, None, False)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class MoVQEncoder(nn.Module):
    """Image -> pre-quant latent (before ``quant_conv``); every item is processed independently."""

    def __init__(self, config: MoVQConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, padding=1)
        attend = encoder_attention_levels(config)
        in_mult = (1,) + tuple(mult)
        last = config.num_resolutions - 1
        self.down = nn.ModuleList(
            EncoderLevel(ch * in_mult[i], ch * mult[i], config.num_res_blocks, attend[i], i != last)
            for i in range(config.num_resolutions))
        top = ch * mult[-1]
        self.mid = EncoderMid(top)
        self.norm_out = SpatialNorm(top)
        out = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(top, out, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DecoderLevel(nn.Module):
    """One decoder resolution level: ResnetBlocks, each optionally followed by spatial then temporal
    attention, then an optional upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attend: bool,
                 upsample: bool, zq_channels: int, config: MoVQConfig) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, zq_channels,
                        config.add_conv, temporal=config.temporal)
            for i in range(num_blocks))
        n_attn = num_blocks if attend else 0
        self.attn = nn.ModuleList(AttnBlock(out_channels, zq_channels, config.add_conv) for _ in range(n_attn))
        n_temporal = n_attn if config.temporal_attention_block else 0
        self.temporal_attn = nn.ModuleList(
            TemporalAttnBlock(out_channels, zq_channels, config.add_conv) for _ in range(n_temporal))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, h: Tensor, zq: Tensor, zq_attn: Tensor, frames: int) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h, zq, frames)
            if len(self.attn) > 0:
                h = self.attn[i](h, zq_attn)
            if len(self.temporal_attn) > 0:
                h = self.temporal_attn[i](h, frames)
        return h if self.upsample is None else self.upsample(h)


class DecoderMid(nn.Module):
    """Decoder bottleneck: ResnetBlock, AttnBlock, [TemporalAttnBlock], ResnetBlock."""

    def __init__(self, channels: int, zq_channels: int, config: MoVQConfig) -> None:
        super().__init__()
        temporal = config.temporal and config.temporal_mid_blocks
        self.block_1 = ResnetBlock(channels, channels, zq_channels, config.add_conv, temporal=temporal,
                                   flicker_augmentation=config.flicker_augmentation)
        self.attn_1 = AttnBlock(channels, zq_channels, config.add_conv)
        self.temporal_attn_1 = (TemporalAttnBlock(channels, zq_channels, config.add_conv)
                                if config.temporal_attention_block else None)
        self.block_2 = ResnetBlock(channels, channels, zq_channels, config.add_conv, temporal=temporal)

    def forward(self, h: Tensor, zq: Tensor, zq_attn: Tensor, frames: int) -> Tensor:
        h = self.attn_1(self.block_1(h, zq, frames), zq_attn)
        if self.temporal_attn_1 is not None:
            h = self.temporal_attn_1(h, frames)
        return self.block_2(h, zq, frames)


class MoVQDecoder(nn.Module):
    """Latent (after ``post_quant_conv``) + conditioning latent ``zq`` -> image, in chunks of frames."""

    def __init__(self, config: MoVQConfig) -> None:
        super().__init__()
        ch, mult, zq_ch = config.ch, config.ch_mult, config.z_channels
        n = config.num_resolutions
        attend = decoder_attention_levels(config)
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, top, kernel_size=3, padding=1)
        self.mid = DecoderMid(top, zq_ch, config)
        levels: list[DecoderLevel] = []  # built lowest resolution first, stored by level index
        block_in = top
        for i in reversed(range(n)):
            levels.append(DecoderLevel(block_in, ch * mult[i], config.num_res_blocks + 1, attend[i],
                                       i != 0, zq_ch, config))
            block_in = ch * mult[i]
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = SpatialNorm(block_in, zq_ch, config.add_conv)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor, zq: Tensor, frames: int) -> Tensor:
        """``frames`` = chunk length; the batch must be a whole number of chunks."""
        zq_attn = first_item_per_chunk(zq, frames)
        h = self.mid(self.conv_in(z), zq, zq_attn, frames)
        for level in reversed(self.up):
            h = level(h, zq, zq_attn, frames)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


class MoVQ(nn.Module):
    """Kandinsky Video 1.1 MoVQ (no quantiser): ``encode`` image -> latent, ``decode`` latent -> image.

    The same class loads ``movq.pt`` (image MoVQ) and ``video_movq.pt`` (temporal decoder) strictly.
    """

    def __init__(self, config: MoVQConfig) -> None:
        super().__init__()
        config.validate("MoVQ")
        self.config = config
        self.encoder = MoVQEncoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, kernel_size=1)
        self.decoder = MoVQDecoder(config)

    def encode(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, z_channels, H/8, W/8); items are independent."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: Tensor, chunk_size: int | None = None) -> Tensor:
        """(N, z_channels, h, w) -> (N, 3, 8h, 8w), decoding consecutive chunks of ``chunk_size`` frames.

        Each chunk behaves like one official ``decode`` call (temporal context, zero padding at its
        edges, first-item ``zq`` in the spatial attention norms); ``None`` = the whole batch is one chunk.
        """
        if chunk_size is None:
            frames = z.shape[0]
        else:
            if chunk_size < 1 or z.shape[0] % chunk_size != 0:
                raise ValueError(
                    f"MoVQ.decode: batch of {z.shape[0]} latents is not a whole number of chunks of "
                    f"chunk_size={chunk_size}; pass a multiple of chunk_size or decode the remainder "
                    "in a separate call")
            frames = chunk_size
        return self.decoder(self.post_quant_conv(z), z, frames)
