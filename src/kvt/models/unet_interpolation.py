"""The interpolation U-Net of Kandinsky Video 1.1 (``interpolation.pt``), see
``docs/spec/unet_interpolation.md``.

The temporal axis is the *group* index: a batch (B, ...) is regrouped as (B // G, G, ...), with the
pipeline's layout [G conditional | G unconditional]. Every temporal layer is gated per row:
out = (1 - m_b) x + m_b f(x) with m_b = merge * temporal_mask[b]; rows with mask 0 are exact
pass-throughs (``torch.where``), so a non-finite f(x) in those rows cannot leak in as 0 * inf = NaN.
When the caller says that only the first clips carry a nonzero mask (``temporal_clips``: the pipeline's
conditional half), the temporal layers run on those rows alone and the others pass through untouched:
the same values, without computing what the mask throws away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kvt.models.configs import UNetInterpolationConfig
from kvt.models.unet_layers import (
    Attention,
    AttentionBlock,
    AttentionPolling,
    Block,
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
class GroupGating:
    """What the temporal layers need: the group layout, the per-row mask (B, 1, 1, 1) and, optionally,
    the number of leading clips whose rows the temporal layers run on (the rest pass through)."""

    layout: ClipLayout
    mask: Tensor
    active_clips: int | None = None

    def blend(self, x: Tensor, y: Tensor, merge: Tensor) -> Tensor:
        """(1 - m) x + m y with m = merge * mask, and exactly x where mask == 0."""
        m = merge * self.mask
        return torch.where(self.mask != 0, (1 - m) * x + m * y, x)

    def active(self, x: Tensor) -> tuple[Tensor, Tensor | None, GroupGating]:
        """(rows the temporal layers run on, rows that pass through or None, the gating of the former)."""
        if self.active_clips is None:
            return x, None, self
        if self.layout.frames is not None:
            rows = self.active_clips * self.layout.frames
            return x[:rows], x[rows:], GroupGating(self.layout, self.mask[:rows])
        assert self.layout.clips is not None  # ClipLayout: exactly one of frames / clips
        # Slices of (clips, rows per clip, ...) with constant bounds: an exported graph's shape arithmetic
        # stays one division of the batch (fast to trace).
        clips, mask = x.unflatten(0, (self.layout.clips, -1)), self.mask.unflatten(0, (self.layout.clips, -1))
        n = self.active_clips
        return (clips[:n].flatten(0, 1), clips[n:].flatten(0, 1),
                GroupGating(ClipLayout(clips=n), mask[:n].flatten(0, 1)))

    @staticmethod
    def join(active: Tensor, rest: Tensor | None, like: Tensor) -> Tensor:
        """The rows of :meth:`active` back in ``like``'s shape."""
        return active if rest is None else torch.cat([active, rest]).view_as(like)


class TemporalConv3D(nn.Module):
    """Gated Conv3d (3, 1, 1) over the group axis (zero padding at the first/last group)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.temporal_merge = nn.Parameter(torch.zeros(1))
        self.temporal_projection = nn.Conv3d(in_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))
        nn.init.zeros_(self.temporal_projection.weight)
        assert self.temporal_projection.bias is not None  # built with a bias
        nn.init.zeros_(self.temporal_projection.bias)

    def forward(self, x: Tensor, gating: GroupGating) -> Tensor:
        whole = x
        x, rest, gating = gating.active(x)
        out = conv_over_time(self.temporal_projection, x, gating.layout)
        return gating.join(gating.blend(x, out, self.temporal_merge), rest, whole)


class TemporalAttentionBlock(nn.Module):
    """Gated attention over groups per pixel, then a gated feed-forward (both convex blends)."""

    def __init__(self, channels: int, embed_dim: int, groups: int, head_dim: int,
                 expansion_ratio: int) -> None:
        super().__init__()
        self.in_norm = ConditionalGroupNorm(groups, channels, embed_dim)
        self.attention = Attention(channels, channels, channels, head_dim)
        self.out_norm = ConditionalGroupNorm(groups, channels, embed_dim)
        self.feed_forward = FeedForward(channels, expansion_ratio)
        self.temporal_merge1 = nn.Parameter(torch.zeros(1))
        self.temporal_merge2 = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, embed: Tensor, gating: GroupGating) -> Tensor:
        height, width = x.shape[-2:]
        whole, embed = x, gating.active(embed)[0]
        x, rest, gating = gating.active(x)
        seq = frames_to_sequences(self.in_norm(x, embed), gating.layout)
        out = sequences_to_frames(self.attention(seq, seq), height, width)
        x = gating.blend(x, out, self.temporal_merge1)
        out = self.feed_forward(self.out_norm(x, embed))
        return gating.join(gating.blend(x, out, self.temporal_merge2), rest, whole)


class InterpolationBlock(Block):
    """Block with a gated temporal conv after its projection (``temporal_projection_new``).

    With ``add_new_temporal_params`` an upsampling Block also runs ``temporal_post_upsample`` right
    after the ConvTranspose2d, and a downsampling Block ``temporal_post_downsample`` after the
    stride-2 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, kernel_size: int,
                 groups: int, resample: Resample = None, new_params: bool = False) -> None:
        super().__init__(in_channels, out_channels, embed_dim, kernel_size, groups, resample)
        self.temporal_post_upsample = (TemporalConv3D(out_channels, out_channels)
                                       if new_params and resample == "up" else None)
        self.temporal_projection_new = TemporalConv3D(out_channels, out_channels)
        self.temporal_post_downsample = (TemporalConv3D(out_channels, out_channels)
                                         if new_params and resample == "down" else None)

    def forward(self, x: Tensor, embed: Tensor, gating: GroupGating) -> Tensor:  # type: ignore[override]
        x = self.group_norm(x, embed, self.activation)
        if self.up_sample is not None:
            x = self.up_sample(x)
        if self.temporal_post_upsample is not None:
            x = self.temporal_post_upsample(x, gating)
        x = self.temporal_projection_new(self.projection(x), gating)
        if self.down_sample is not None:
            x = self.down_sample(x)
        if self.temporal_post_downsample is not None:
            x = self.temporal_post_downsample(x, gating)
        return x


class InterpolationResNetBlock(ResNetBlock):
    """ResNetBlock of InterpolationBlocks; with ``add_new_temporal_params`` the shortcut gets temporal
    convs too.

    Official quirk reproduced: the shortcut applies ``temporal_post_upsample`` twice (after the
    up-sampling and again after the down-sampling slot) and never ``temporal_post_downsample``, whose
    weights exist in the checkpoint but are dead.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int,
                 compression_ratio: int, resample: Resample = None, new_params: bool = False) -> None:
        def make_block(cin: int, cout: int, emb: int, k: int, g: int, r: Resample) -> Block:
            return InterpolationBlock(cin, cout, emb, k, g, r, new_params)

        super().__init__(in_channels, out_channels, embed_dim, groups, compression_ratio, resample,
                         make_block)
        self.temporal_post_upsample = (TemporalConv3D(in_channels, out_channels)
                                       if new_params and resample == "up" else None)
        self.temporal_post_downsample = (TemporalConv3D(out_channels, out_channels)
                                         if new_params and resample == "down" else None)

    def forward(self, x: Tensor, embed: Tensor, gating: GroupGating) -> Tensor:  # type: ignore[override]
        out = x
        for block in self.resnet_blocks:
            out = block(out, embed, gating)
        if self.shortcut_up_sample is not None:
            x = self.shortcut_up_sample(x)
        if self.temporal_post_upsample is not None:
            x = self.temporal_post_upsample(x, gating)
        if self.shortcut_projection is not None:
            x = self.shortcut_projection(x)
        if self.shortcut_down_sample is not None:
            x = self.shortcut_down_sample(x)
        if self.temporal_post_upsample is not None:  # sic: not temporal_post_downsample
            x = self.temporal_post_upsample(x, gating)
        return x + out


class Unit(nn.ModuleList):
    """One entry of ``resnet_attn_blocks``: [in ResNet, cross attention | Identity, out ResNet]."""

    def __init__(self, in_resnet: InterpolationResNetBlock, cross_attention: AttentionBlock | None,
                 out_resnet: InterpolationResNetBlock) -> None:
        super().__init__([
            in_resnet,
            cross_attention if cross_attention is not None else nn.Identity(),
            out_resnet,
        ])
        self.has_cross_attention = cross_attention is not None

    def forward(self, x: Tensor, embed: Tensor, text: TextContext, gating: GroupGating) -> Tensor:
        in_resnet, cross_attention, out_resnet = self
        x = in_resnet(x, embed, gating)
        if self.has_cross_attention:
            x = cross_attention(x, embed, text)
        return out_resnet(x, embed, gating)


class _LevelFactory:
    """Builds the sub-modules of a level from the config (one place for the shared keywords)."""

    def __init__(self, cfg: UNetInterpolationConfig) -> None:
        self.cfg = cfg

    def attention(self, channels: int, context_dim: int | None) -> AttentionBlock:
        c = self.cfg
        return AttentionBlock(channels, c.required_time_embed_dim, context_dim, c.groups, c.head_dim,
                              c.expansion_ratio)

    def temporal_attention(self, channels: int) -> TemporalAttentionBlock:
        c = self.cfg
        return TemporalAttentionBlock(channels, c.required_time_embed_dim, c.groups, c.head_dim, c.expansion_ratio)

    def resnet(self, cin: int, cout: int, resample: Resample = None) -> InterpolationResNetBlock:
        c = self.cfg
        return InterpolationResNetBlock(cin, cout, c.required_time_embed_dim, c.groups, c.compression_ratio,
                                        resample, c.add_new_temporal_params)

    def unit(self, cin: int, mid: int, cout: int, cross: bool, in_resample: Resample,
             out_resample: Resample) -> Unit:
        attention = self.attention(mid, self.cfg.context_dim) if cross else None
        return Unit(self.resnet(cin, mid, in_resample), attention, self.resnet(mid, cout, out_resample))


class DownLevel(nn.Module):
    """Self attention -> temporal attention -> units; the last unit may downsample."""

    def __init__(self, plan: LevelPlan, make: _LevelFactory) -> None:
        super().__init__()
        cin, cout = plan.in_channels, plan.out_channels
        self.self_attention_block = make.attention(cin, None) if plan.self_attention else None
        self.temporal_attention_block = make.temporal_attention(cin) if plan.self_attention else None
        widths = [cin] + [cout] * (plan.num_blocks - 1)
        self.resnet_attn_blocks = nn.ModuleList([
            make.unit(a, cout, cout, plan.cross_attention, None,
                      "down" if plan.resample and i == plan.num_blocks - 1 else None)
            for i, a in enumerate(widths)
        ])

    def forward(self, x: Tensor, embed: Tensor, text: TextContext, gating: GroupGating) -> Tensor:
        if self.self_attention_block is not None:
            x = self.self_attention_block(x, embed)
        if self.temporal_attention_block is not None:
            x = self.temporal_attention_block(x, embed, gating)
        for unit in self.resnet_attn_blocks:
            x = unit(x, embed, text, gating)
        return x


class UpLevel(nn.Module):
    """Units (the first may upsample) -> self attention -> temporal attention (t2v: the reverse)."""

    def __init__(self, plan: LevelPlan, make: _LevelFactory) -> None:
        super().__init__()
        cin, cout = plan.in_channels, plan.out_channels
        widths = ([(cin + plan.skip_channels, cin)] + [(cin, cin)] * (plan.num_blocks - 2)
                  + [(cin, cout)])
        self.resnet_attn_blocks = nn.ModuleList([
            make.unit(a, a, b, plan.cross_attention, "up" if plan.resample and i == 0 else None, None)
            for i, (a, b) in enumerate(widths)
        ])
        self.self_attention_block = make.attention(cout, None) if plan.self_attention else None
        self.temporal_attention_block = make.temporal_attention(cout) if plan.self_attention else None

    def forward(self, x: Tensor, embed: Tensor, text: TextContext, gating: GroupGating) -> Tensor:
        for unit in self.resnet_attn_blocks:
            x = unit(x, embed, text, gating)
        if self.self_attention_block is not None:
            x = self.self_attention_block(x, embed)
        if self.temporal_attention_block is not None:
            x = self.temporal_attention_block(x, embed, gating)
        return x


class UNetInterpolation(nn.Module):
    """Kandinsky Video 1.1 interpolation U-Net; predicts v for 3 in-between frames (frame-major channels).

    Keys match the official ``interpolation.pt`` for both ``add_new_temporal_params`` variants.
    """

    def __init__(self, config: UNetInterpolationConfig) -> None:
        super().__init__()
        config.validate("UNetInterpolation")
        self.config = config
        init, embed = config.resolved_init_channels, config.required_time_embed_dim
        self.to_time_embed = EmbedMLP(init, embed)
        self.perturbation_to_time_embed = EmbedMLP(init, embed)
        self.time_embed_merge = nn.Parameter(torch.zeros(1))
        self.skip_merge = nn.Parameter(torch.zeros(1))
        self.skip_embeddings = nn.Embedding(20, embed)
        self.feature_pooling = AttentionPolling(embed, config.required_context_dim, config.head_dim)
        self.in_layer = nn.Conv2d(config.num_channels, init, kernel_size=3, padding=1)
        make = _LevelFactory(config)
        down, up = unet_levels(config)
        self.down_samples = nn.ModuleList([DownLevel(plan, make) for plan in down])
        self.up_samples = nn.ModuleList([UpLevel(plan, make) for plan in up])
        self.out_layer = OutLayer(config.groups, init, config.resolved_out_channels)
        new = config.add_new_temporal_params
        self.temporal_conv_in = TemporalConv3D(init, init) if new else None
        self.temporal_conv_out = TemporalConv3D(init, init) if new else None

    def _time_embed(self, timestep: Tensor, perturbation_time: Tensor, skip_frames: Tensor,
                    text: TextContext) -> Tensor:
        embed = self.to_time_embed(timestep)
        perturbation = self.perturbation_to_time_embed(perturbation_time)
        embed = self.time_embed_merge * perturbation + (1 - self.time_embed_merge) * embed
        embed = self.skip_merge * self.skip_embeddings(skip_frames.long()) + embed
        return self.feature_pooling(embed, text)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, context_mask: Tensor,
                skip_frames: Tensor, perturbation_time: Tensor, temporal_mask: Tensor,
                num_groups: int | None = None, context_len: Tensor | None = None,
                context_rows: ContextRows | None = None, temporal_clips: int | None = None) -> Tensor:
        """Predict v for a batch laid out as B // G sequences of G consecutive groups.

        x (B, C_in, H, W); timestep, perturbation_time (B,) any numeric dtype (the pipeline passes 0
        for perturbation_time); skip_frames (B,) integer, indexes Embedding(20); temporal_mask (B,)
        (1 = temporal layers on, 0 = exact pass-through); num_groups G, default B // 2 (the pipeline's
        [G cond | G uncond] batch); context (K, L, D), context_mask (K, L), context_len (K,) float
        (only for a zero-padded static context) and context_rows as in UNetT2V.forward_image;
        temporal_clips: the temporal layers run on the first ``temporal_clips`` sequences of G groups
        only, the other rows pass through; exact when their temporal_mask is 0 (the pipeline's
        unconditional half: temporal_clips=1). None runs them on every row, as the official code does.
        """
        text = TextContext.of(context, context_mask, context_len, context_rows)
        embed = self._time_embed(timestep, perturbation_time, skip_frames, text)
        layout = ClipLayout(frames=num_groups) if num_groups is not None else ClipLayout(clips=2)
        gating = GroupGating(layout, temporal_mask.to(x.dtype)[:, None, None, None], temporal_clips)

        x = self.in_layer(x)
        if self.temporal_conv_in is not None:
            x = self.temporal_conv_in(x, gating)
        skips = []
        last = len(self.down_samples) - 1
        for level, down in enumerate(self.down_samples):
            x = down(x, embed, text, gating)
            if level != last:
                skips.append(x)
        for level, up in enumerate(self.up_samples):
            if level != 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = up(x, embed, text, gating)
        if self.temporal_conv_out is not None:
            x = self.temporal_conv_out(x, gating)
        return self.out_layer(x)
