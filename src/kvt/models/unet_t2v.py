"""The text-to-video U-Net3D of Kandinsky Video 1.1 (``t2v.pt``), see ``docs/spec/unet_t2v.md``.

One set of weights, two entry points:

* :meth:`UNetT2V.forward_image` - the key-frame model: ``image_in_layer``, no temporal layers;
* :meth:`UNetT2V.forward_video` - the base-frame model: ``in_layer``, temporal layers on.

The official forward picks the input conv by batch size (> 2 -> ``in_layer``) and switches temporal layers
on when a frame index is passed; here the caller picks the mode explicitly, so an exported graph never
depends on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from kvt.models.configs import UNetT2VConfig
from kvt.models.unet_layers import (
    Attention,
    AttentionBlock,
    AttentionPolling,
    ClipLayout,
    ConditionalGroupNorm,
    ContextRows,
    EmbedMLP,
    FeedForward,
    LevelPlan,
    OutLayer,
    Resample,
    ResNetBlock,
    TextContext,
    conv_over_time,
    frames_to_sequences,
    sequences_to_frames,
    unet_levels,
)


@dataclass(frozen=True)
class VideoConditioning:
    """What the temporal layers need: e' = time_embed + temporal_embed, and the frame grouping."""

    embed: Tensor
    layout: ClipLayout


class TemporalConvStage(nn.Sequential):
    """CGN(e') -> SiLU -> Conv3d (k, 1, 1) over frames (keys ``.0`` norm, ``.2`` conv)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, embed_dim: int,
                 groups: int) -> None:
        super().__init__(
            ConditionalGroupNorm(groups, in_channels, embed_dim),
            nn.SiLU(),
            nn.Conv3d(in_channels, out_channels, (kernel_size, 1, 1),
                      padding=((kernel_size - 1) // 2, 0, 0)),
        )

    @property
    def conv(self) -> nn.Conv3d:
        return cast(nn.Conv3d, self[2])  # built in __init__

    # A Sequential whose layers take the conditioning too: not Sequential.forward(input)'s signature.
    def forward(self, x: Tensor, video: VideoConditioning) -> Tensor:  # type: ignore[override]
        norm, activation, _ = self
        return conv_over_time(self.conv, norm(x, video.embed, activation), video.layout)


class TemporalResNetBlock(nn.Module):
    """x + four temporal conv stages (kernels 1, 3, 3, 1; hidden width C // compression)."""

    def __init__(self, channels: int, embed_dim: int, groups: int, compression_ratio: int) -> None:
        super().__init__()
        hidden = channels // compression_ratio
        widths = [(channels, hidden), (hidden, hidden), (hidden, hidden), (hidden, channels)]
        self.temporal_resnet_blocks = nn.ModuleList([
            TemporalConvStage(cin, cout, k, embed_dim, groups)
            for (cin, cout), k in zip(widths, [1, 3, 3, 1])
        ])
        last_conv = cast(TemporalConvStage, self.temporal_resnet_blocks[-1]).conv
        nn.init.zeros_(last_conv.weight)
        assert last_conv.bias is not None  # built with a bias
        nn.init.zeros_(last_conv.bias)

    def forward(self, x: Tensor, video: VideoConditioning) -> Tensor:
        out = x
        for stage in self.temporal_resnet_blocks:
            out = stage(out, video)
        return x + out


class TemporalAttentionBlock(nn.Module):
    """Attention over the frames of each clip at every pixel, then a feed-forward (plain residuals)."""

    def __init__(self, channels: int, embed_dim: int, groups: int, head_dim: int,
                 expansion_ratio: int) -> None:
        super().__init__()
        self.temporal_norm = ConditionalGroupNorm(groups, channels, embed_dim)
        self.temporal_attention = Attention(channels, channels, channels, head_dim)
        nn.init.zeros_(self.temporal_attention.output_layer.weight)
        self.ff_norm = ConditionalGroupNorm(groups, channels, embed_dim)
        self.feed_forward = FeedForward(channels, expansion_ratio)

    def forward(self, x: Tensor, video: VideoConditioning) -> Tensor:
        height, width = x.shape[-2:]
        seq = frames_to_sequences(self.temporal_norm(x, video.embed), video.layout)
        x = x + sequences_to_frames(self.temporal_attention(seq, seq), height, width)
        return x + self.feed_forward(self.ff_norm(x, video.embed))


class _Unit(nn.ModuleList):
    """One entry of ``resnet_attn_blocks``: [in ResNet, cross attention | Identity, out ResNet,
    in temporal ResNet, out temporal ResNet] (the index is part of the checkpoint keys)."""

    def __init__(self, in_resnet: ResNetBlock, cross_attention: AttentionBlock | None,
                 out_resnet: ResNetBlock, in_temporal: TemporalResNetBlock,
                 out_temporal: TemporalResNetBlock) -> None:
        super().__init__([
            in_resnet,
            cross_attention if cross_attention is not None else nn.Identity(),
            out_resnet,
            in_temporal,
            out_temporal,
        ])
        self.has_cross_attention = cross_attention is not None

    def _cross(self, x: Tensor, embed: Tensor, text: TextContext) -> Tensor:
        return self[1](x, embed, text) if self.has_cross_attention else x


class DownUnit(_Unit):
    """ResNet -> [temporal ResNet] -> cross attention -> ResNet (maybe downsampling) -> [temporal ResNet]."""

    def forward(self, x: Tensor, embed: Tensor, text: TextContext,
                video: VideoConditioning | None) -> Tensor:
        in_resnet, _, out_resnet, in_temporal, out_temporal = self
        x = in_resnet(x, embed)
        if video is not None:
            x = in_temporal(x, video)
        x = self._cross(x, embed, text)
        x = out_resnet(x, embed)
        if video is not None:
            x = out_temporal(x, video)
        return x


class UpUnit(_Unit):
    """[temporal ResNet] -> ResNet (maybe upsampling) -> cross attention -> [temporal ResNet] -> ResNet.

    The first temporal ResNet runs before the upsampling ResNet, i.e. at the lower resolution.
    """

    def forward(self, x: Tensor, embed: Tensor, text: TextContext,
                video: VideoConditioning | None) -> Tensor:
        in_resnet, _, out_resnet, in_temporal, out_temporal = self
        if video is not None:
            x = in_temporal(x, video)
        x = in_resnet(x, embed)
        x = self._cross(x, embed, text)
        if video is not None:
            x = out_temporal(x, video)
        return out_resnet(x, embed)


def _attention_block(channels: int, cfg: UNetT2VConfig, context_dim: int | None) -> AttentionBlock:
    return AttentionBlock(channels, cfg.required_time_embed_dim, context_dim, cfg.groups, cfg.head_dim,
                          cfg.expansion_ratio)


def _temporal_attention_block(channels: int, cfg: UNetT2VConfig) -> TemporalAttentionBlock:
    return TemporalAttentionBlock(channels, cfg.required_time_embed_dim, cfg.groups, cfg.head_dim,
                                  cfg.expansion_ratio)


def _resnet(cin: int, cout: int, cfg: UNetT2VConfig, resample: Resample = None) -> ResNetBlock:
    return ResNetBlock(cin, cout, cfg.required_time_embed_dim, cfg.groups, cfg.compression_ratio, resample)


def _temporal_resnet(channels: int, cfg: UNetT2VConfig) -> TemporalResNetBlock:
    return TemporalResNetBlock(channels, cfg.required_time_embed_dim, cfg.groups, cfg.compression_ratio)


class DownLevel(nn.Module):
    """Self attention -> [temporal attention] -> units; the last unit may downsample."""

    def __init__(self, plan: LevelPlan, cfg: UNetT2VConfig) -> None:
        super().__init__()
        cin, cout = plan.in_channels, plan.out_channels
        self.self_attention_block = _attention_block(cin, cfg, None) if plan.self_attention else None
        self.temporal_attention_block = (_temporal_attention_block(cin, cfg)
                                         if plan.self_attention else None)
        widths = [(cin, cout)] + [(cout, cout)] * (plan.num_blocks - 1)
        units = []
        for i, (a, b) in enumerate(widths):
            down: Resample = "down" if plan.resample and i == plan.num_blocks - 1 else None
            cross = _attention_block(b, cfg, cfg.context_dim) if plan.cross_attention else None
            units.append(DownUnit(_resnet(a, b, cfg), cross, _resnet(b, b, cfg, down),
                                  _temporal_resnet(b, cfg), _temporal_resnet(b, cfg)))
        self.resnet_attn_blocks = nn.ModuleList(units)

    def forward(self, x: Tensor, embed: Tensor, text: TextContext,
                video: VideoConditioning | None) -> Tensor:
        if self.self_attention_block is not None:
            x = self.self_attention_block(x, embed)
        if self.temporal_attention_block is not None and video is not None:
            x = self.temporal_attention_block(x, video)
        for unit in self.resnet_attn_blocks:
            x = unit(x, embed, text, video)
        return x


class UpLevel(nn.Module):
    """Units (the first may upsample) -> [temporal attention] -> self attention."""

    def __init__(self, plan: LevelPlan, cfg: UNetT2VConfig) -> None:
        super().__init__()
        cin, cout = plan.in_channels, plan.out_channels
        widths = ([(cin + plan.skip_channels, cin)] + [(cin, cin)] * (plan.num_blocks - 2)
                  + [(cin, cout)])
        units = []
        for i, (a, b) in enumerate(widths):
            up: Resample = "up" if plan.resample and i == 0 else None
            cross = _attention_block(a, cfg, cfg.context_dim) if plan.cross_attention else None
            units.append(UpUnit(_resnet(a, a, cfg, up), cross, _resnet(a, b, cfg),
                                _temporal_resnet(a, cfg), _temporal_resnet(a, cfg)))
        self.resnet_attn_blocks = nn.ModuleList(units)
        self.temporal_attention_block = (_temporal_attention_block(cout, cfg)
                                         if plan.self_attention else None)
        self.self_attention_block = _attention_block(cout, cfg, None) if plan.self_attention else None

    def forward(self, x: Tensor, embed: Tensor, text: TextContext,
                video: VideoConditioning | None) -> Tensor:
        for unit in self.resnet_attn_blocks:
            x = unit(x, embed, text, video)
        if self.temporal_attention_block is not None and video is not None:
            x = self.temporal_attention_block(x, video)
        if self.self_attention_block is not None:
            x = self.self_attention_block(x, embed)
        return x


class UNetT2V(nn.Module):
    """Kandinsky Video 1.1 text-to-video U-Net; predicts epsilon. Keys match the official ``t2v.pt``."""

    def __init__(self, config: UNetT2VConfig) -> None:
        super().__init__()
        config.validate("UNetT2V")
        self.config = config
        init, embed = config.resolved_init_channels, config.required_time_embed_dim
        self.to_time_embed = EmbedMLP(init, embed)
        self.feature_pooling = AttentionPolling(embed, config.required_context_dim, config.head_dim)
        self.to_temporal_embed = EmbedMLP(init, embed)
        self.in_layer = nn.Conv2d(config.num_channels, init, kernel_size=3, padding=1)
        self.image_in_layer = nn.Conv2d(config.num_channels, init, kernel_size=3, padding=1)
        down, up = unet_levels(config)
        self.down_samples = nn.ModuleList([DownLevel(plan, config) for plan in down])
        self.up_samples = nn.ModuleList([UpLevel(plan, config) for plan in up])
        self.out_layer = OutLayer(config.groups, init, config.resolved_out_channels)
        self.temporal_noise_aug_time_encoding = EmbedMLP(init, embed) if config.noise_augmentation else None
        self.temporal_motion_score_encoding = EmbedMLP(init, embed) if config.motion_score else None

    # ---------------------------------------------------------------------------------------------

    def _time_embed(self, timestep: Tensor, text: TextContext) -> Tensor:
        embed = self.to_time_embed(timestep)
        return self.feature_pooling(embed, text)

    def _unet(self, x: Tensor, embed: Tensor, text: TextContext, video: VideoConditioning | None) -> Tensor:
        skips = []
        last = len(self.down_samples) - 1
        for level, down in enumerate(self.down_samples):
            x = down(x, embed, text, video)
            if level != last:
                skips.append(x)
        for level, up in enumerate(self.up_samples):
            if level != 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = up(x, embed, text, video)
        return self.out_layer(x)

    def forward_image(self, x: Tensor, timestep: Tensor, context: Tensor, context_mask: Tensor,
                      context_len: Tensor | None = None, context_rows: ContextRows | None = None) -> Tensor:
        """Key-frame (image) mode: ``image_in_layer``, spatial layers only.

        x (B, C_in, H, W); timestep (B,) any numeric dtype; context (K, L, D); context_mask (K, L) bool
        or integer (nonzero = valid); context_len (K,) float, only for a zero-padded static context;
        context_rows: which context each row reads (None: K = B, one context per row, the official
        form). Returns epsilon (B, C_out, H, W).
        """
        text = TextContext.of(context, context_mask, context_len, context_rows)
        embed = self._time_embed(timestep, text)
        return self._unet(self.image_in_layer(x), embed, text, None)

    def forward_video(self, x: Tensor, timestep: Tensor, context: Tensor, context_mask: Tensor,
                      frame_index: Tensor, noise_aug: Tensor | None, motion_score: Tensor | None,
                      num_frames: int, context_len: Tensor | None = None,
                      context_rows: ContextRows | None = None) -> Tensor:
        """Base-frame (video) mode: ``in_layer`` and the temporal layers.

        The batch is k clips of ``num_frames`` contiguous frames (B = k * num_frames); frame_index,
        noise_aug (noise-augmentation timestep) and motion_score are (B,) in any numeric dtype. As in
        the official code, a None noise_aug / motion_score (or a config without that encoder) skips it.
        Text inputs as in :meth:`forward_image`.
        """
        text = TextContext.of(context, context_mask, context_len, context_rows)
        embed = self._time_embed(timestep, text)
        temporal = self.to_temporal_embed(frame_index)
        if self.temporal_noise_aug_time_encoding is not None and noise_aug is not None:
            temporal = temporal + self.temporal_noise_aug_time_encoding(noise_aug)
        if self.temporal_motion_score_encoding is not None and motion_score is not None:
            temporal = temporal + self.temporal_motion_score_encoding(motion_score)
        video = VideoConditioning(embed + temporal, ClipLayout(frames=num_frames))
        return self._unet(self.in_layer(x), embed, text, video)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, context_mask: Tensor,
                frame_index: Tensor | None = None, noise_aug: Tensor | None = None,
                motion_score: Tensor | None = None, num_frames: int | None = None,
                context_len: Tensor | None = None, context_rows: ContextRows | None = None) -> Tensor:
        """Video mode when ``frame_index`` is given (then ``num_frames`` is required), else image mode."""
        if frame_index is None:
            return self.forward_image(x, timestep, context, context_mask, context_len, context_rows)
        if num_frames is None:
            raise ValueError("num_frames is required when frame_index is given (video mode)")
        return self.forward_video(x, timestep, context, context_mask, frame_index, noise_aug,
                                  motion_score, num_frames, context_len, context_rows)
