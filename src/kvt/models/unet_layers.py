"""Building blocks shared by the two Kandinsky Video U-Nets (the Kandinsky 3 skeleton).

Attribute names follow the official modules so that ``state_dict`` keys match the released checkpoints
(``docs/spec/checkpoints.md``). Differences from the official code, all numerically neutral:

* attention runs through ``F.scaled_dot_product_attention`` (boolean masks, scale ``head_dim ** -0.5``);
* the official CUDA autocast's float32 islands are explicit: the sinusoidal embeddings, and each group
  norm together with the pointwise ops after it up to the next conv / linear (modulation, SiLU: float32
  by type promotion officially); everything else runs in the weights' dtype, so a bf16/fp16 module needs
  no autocast;
* no Python loops over the batch or frames and no branching on tensor values (export-friendly);
* no registered buffers, so a model built on the meta device loads with ``assign=True``;
* text conditioning may come as the distinct contexts of a call plus a row mapping
  (:class:`ContextRows`), computed once per context and broadcast to the rows (exact).
"""

from __future__ import annotations

import abc
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
    (B, L) bool removes keys; every query row must keep at least one key.

    The mask is applied as the official code applies it (quirk 5): a finite -finfo(dtype).max on masked
    keys, here added to the scaled scores. An additive finite mask keeps the exported graph in the form
    TensorRT fuses into one attention kernel (BMM1 -> Add(mask) -> Softmax -> BMM2): a boolean mask
    would export with torchlib's IsNaN/Where guard between Softmax and BMM2, and masked keys get
    probability 0 either way (exp underflows; at least one key per row is valid, so no row is all -inf).
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
        mask = None
        if context_mask is not None:  # (B, L) -> (B, 1, 1, L): 0 on valid keys, -finfo.max on masked ones
            blocked = torch.full((), -torch.finfo(query.dtype).max, dtype=query.dtype, device=query.device)
            mask = torch.where(as_key_mask(context_mask), torch.zeros_like(blocked), blocked)[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             scale=self.head_dim ** -0.5)
        return self.output_layer(out.transpose(1, 2).flatten(2))


# --------------------------------------------------------------------------------------------------
# text conditioning: distinct contexts, broadcast to rows in the graph


@dataclass(frozen=True)
class ContextRows:
    """Which of K distinct text contexts each row of a batch reads (the stage contract's compact form).

    The rows are ``len(blocks)`` equal consecutive blocks; block b reads context ``blocks[b]`` (the
    pipeline's guidance branches: [prompt | null] or [prompt | null | null]). Contexts listed in
    ``constant`` have exactly one valid key (the null context): attention over one key gives that key's
    value whatever the query (softmax over one key is exactly 1), so a cross-attention's output for their
    rows is a per-layer constant, and no query, attention or output projection is computed for them.
    """

    blocks: tuple[int, ...]
    constant: tuple[int, ...] = ()

    def runs(self, rows: int) -> list[tuple[int, int, int]]:
        """(start, stop, context) of each run of consecutive rows reading the same context.

        ``rows`` may be symbolic (an exported graph keeps the batch dynamic): the bounds are b * rows
        // len(blocks), so they stay shape arithmetic.
        """
        count = len(self.blocks)
        out: list[tuple[int, int, int]] = []
        first = 0
        for b in range(1, count + 1):
            if b == count or self.blocks[b] != self.blocks[first]:
                start = 0 if first == 0 else first * rows // count
                stop = rows if b == count else b * rows // count
                out.append((start, stop, self.blocks[first]))
                first = b
        return out

    def block_runs(self) -> list[tuple[int, int, int]]:
        """(first block, block after the last, context) of each run of consecutive blocks reading the
        same context."""
        out: list[tuple[int, int, int]] = []
        first = 0
        for b in range(1, len(self.blocks) + 1):
            if b == len(self.blocks) or self.blocks[b] != self.blocks[first]:
                out.append((first, b, self.blocks[first]))
                first = b
        return out

    def per_row(self, values: Tensor, rows: int) -> Tensor:
        """[K, ...] per context -> [rows, ...] per row (a broadcast, not a copy per context)."""
        parts = [values[k:k + 1].expand(stop - start, *values.shape[1:]) for start, stop, k in self.runs(rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(frozen=True)
class TextContext:
    """The text conditioning of one U-Net call.

    ``context`` [K, S, D] in the network's dtype, ``mask`` [K, S] bool, ``length`` [K] (the official L for
    a zero-padded static context, or None), ``rows``: how the batch's rows map to the K contexts; None is
    the official per-row form (K = batch, row n reads context n).
    """

    context: Tensor
    mask: Tensor
    length: Tensor | None = None
    rows: ContextRows | None = None

    @staticmethod
    def of(context: Tensor, context_mask: Tensor, context_len: Tensor | None = None,
           rows: ContextRows | None = None) -> TextContext:
        """From a network's forward arguments (an integer mask becomes a boolean key mask)."""
        return TextContext(context, as_key_mask(context_mask), context_len, rows)

    def signature(self) -> tuple[object, ...]:
        """What hoisted text values depend on besides the values: shapes, dtype, device, row mapping."""
        return (tuple(self.context.shape), self.context.dtype, self.context.device.type,
                None if self.length is None else tuple(self.length.shape), self.rows)


class _TextCache:
    """Hoisted text-only tensors of one block (see :class:`HoistedText`).

    One set of tensors per text signature (shapes, dtype, row mapping), kept for the cache's life: new
    values of a known signature are copied into its tensors, so the memory a captured CUDA graph reads
    stays valid and the same across sampler loops (static graph inputs).
    """

    def __init__(self) -> None:
        self.signature: tuple[object, ...] | None = None  # the current loop's, None before its first fill
        self.held: dict[tuple[object, ...], dict[str, Tensor]] = {}

    def get(self, text: TextContext) -> dict[str, Tensor] | None:
        signature = text.signature()
        return self.held[signature] if self.signature is not None and self.signature == signature else None

    def put(self, text: TextContext, values: dict[str, Tensor]) -> dict[str, Tensor]:
        signature = text.signature()
        held = self.held.get(signature)
        if held is None or held.keys() != values.keys():
            held = self.held[signature] = dict(values)
        else:
            for key, value in values.items():
                held[key].copy_(value)
        self.signature = signature
        return held

    def invalidate(self) -> None:
        self.signature = None


class _TextHolder(nn.Module, abc.ABC):
    """A block whose text-only work can be hoisted: :meth:`text_work` depends on the text alone."""

    holds_text = True  # False for a block of this class that never sees text (self-attention)

    def __init__(self) -> None:
        super().__init__()
        self._text_cache: _TextCache | None = None  # installed by HoistedText.loop()

    @abc.abstractmethod
    def text_work(self, text: TextContext) -> dict[str, Tensor]:
        """The tensors this block derives from the text alone (keys/values, constants, pooled text)."""

    def _text_values(self, text: TextContext) -> dict[str, Tensor]:
        cache = self._text_cache
        if cache is None:
            return self.text_work(text)
        values = cache.get(text)
        return values if values is not None else cache.put(text, self.text_work(text))


class AttentionPolling(_TextHolder):
    """Adds attention-pooled text to the time embedding; the query is the mean context row.

    Official: mean over all L positions (masked zero rows included), so the result depends on L.
    ``context_len`` (B,) reproduces that mean for a context zero-padded to a static length. The pooled
    vector is computed once per distinct context and broadcast to the rows.
    """

    def __init__(self, embed_dim: int, context_dim: int, head_dim: int) -> None:
        super().__init__()
        self.attention = Attention(context_dim, embed_dim, context_dim, head_dim)

    def forward(self, embed: Tensor, text: TextContext) -> Tensor:
        pooled = self._text_values(text)["pooled"]
        if text.rows is not None:
            pooled = text.rows.per_row(pooled, embed.shape[0])
        return embed + pooled

    def text_work(self, text: TextContext) -> dict[str, Tensor]:
        context, length = text.context, text.length
        if length is None:
            query = context.mean(dim=1, keepdim=True)
        else:
            query = context.sum(dim=1, keepdim=True) / length.to(context.dtype)[:, None, None]
        return {"pooled": self.attention(query, context, text.mask)[:, 0]}


class FeedForward(nn.Sequential):
    """1x1 conv MLP: C -> expansion*C -> SiLU -> C, bias-free (keys ``.0`` and ``.2``)."""

    def __init__(self, channels: int, expansion_ratio: int) -> None:
        hidden = expansion_ratio * channels
        super().__init__(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )


class AttentionBlock(_TextHolder):
    """Spatial self-attention (no context) or cross-attention to text, then a feed-forward.

    x = x + Attn(CGN_in(x)); x = x + FF(CGN_out(x)); tokens are the H*W positions (row-major).

    Cross-attention with distinct contexts (``text.rows``): keys/values are projected once per context
    and every block of rows reading the same context attends as one sequence of queries (the broadcast
    costs nothing); rows of a one-key context (the null context) add the layer's constant
    output_layer(value of that key) and skip in_norm, query, attention and output projection.
    """

    def __init__(self, channels: int, embed_dim: int, context_dim: int | None, groups: int,
                 head_dim: int, expansion_ratio: int) -> None:
        super().__init__()
        self.in_norm = ConditionalGroupNorm(groups, channels, embed_dim)
        self.attention = Attention(channels, channels, context_dim or channels, head_dim)
        self.out_norm = ConditionalGroupNorm(groups, channels, embed_dim)
        self.feed_forward = FeedForward(channels, expansion_ratio)
        self.holds_text = context_dim is not None

    def forward(self, x: Tensor, embed: Tensor, text: TextContext | None = None) -> Tensor:
        if text is None:  # self-attention
            tokens = self._tokens(x, embed)
            x = x + self._to_image(self.attention(tokens, tokens), x)
        elif text.rows is None:  # official per-row form: context n for row n
            work = self._text_values(text)
            out = self.attention.attend(self._tokens(x, embed), work["key"], work["value"], text.mask)
            x = x + self._to_image(out, x)
        else:
            x = self._cross_by_context(x, embed, text)
        return x + self.feed_forward(self.out_norm(x, embed))

    def _tokens(self, x: Tensor, embed: Tensor) -> Tensor:
        return self.in_norm(x, embed).flatten(2).transpose(1, 2)

    @staticmethod
    def _to_image(tokens: Tensor, like: Tensor) -> Tensor:
        return tokens.transpose(1, 2).reshape(like.shape)

    def _cross_by_context(self, x: Tensor, embed: Tensor, text: TextContext) -> Tensor:
        assert text.rows is not None
        work = self._text_values(text)
        # Rows as (blocks, rows per block, ...): a run of blocks is a slice of constant bounds, so an
        # exported graph's shape arithmetic stays one division of the batch (fast to trace).
        count = len(text.rows.blocks)
        xb, eb = x.unflatten(0, (count, -1)), embed.unflatten(0, (count, -1))
        parts = []
        for first, last, k in text.rows.block_runs():
            rows = xb[first:last].flatten(0, 1)
            if k in text.rows.constant:
                parts.append(rows + work[f"constant{k}"][:, :, None, None])
                continue
            tokens = self._tokens(rows, eb[first:last].flatten(0, 1))
            # All rows of the run attend to the same keys: one sequence of (rows x H*W) queries.
            out = self.attention.attend(tokens.reshape(1, -1, tokens.shape[-1]), work[f"key{k}"],
                                        work[f"value{k}"], text.mask[k:k + 1])
            parts.append(rows + self._to_image(out.reshape(tokens.shape), rows))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).view_as(x)

    def text_work(self, text: TextContext) -> dict[str, Tensor]:
        """Keys/values of the attended contexts; the constant of each one-key context."""
        attention = self.attention
        if text.rows is None:
            key, value = attention.project_kv(text.context)
            return {"key": key, "value": value}
        out = {}
        for k in sorted(set(text.rows.blocks)):
            context = text.context[k:k + 1]
            if k in text.rows.constant:
                # The one valid key's context row (mask weights 1 there, 0 elsewhere: exact), its value,
                # and the output projection: what attention returns for every query.
                row = text.mask[k:k + 1].to(context.dtype)[:, None, :] @ context
                out[f"constant{k}"] = attention.output_layer(attention.to_value(row))[:, 0]
            else:
                out[f"key{k}"], out[f"value{k}"] = attention.project_kv(context)
        return out


def text_holders(network: nn.Module) -> list[_TextHolder]:
    """The blocks of ``network`` with hoistable text-only work (cross-attention, attention pooling)."""
    return [m for m in network.modules() if isinstance(m, _TextHolder) and m.holds_text]


class HoistedText:
    """Text-only work of a network (cross-attention keys/values and constants, attention pooling),
    computed once per sampler loop and read by every step (docs/spec/deployment.md, rewrite 3).

    Inside :meth:`loop`, every text holder of the network reads its values from a cache: filled by
    :meth:`refresh` or, lazily, by the loop's first call. The caller promises that the text inputs stay
    the same for the whole loop, as they do for all steps of one sampler loop. The math is unchanged (the
    same ops on the same inputs). The caches keep their tensors across loops and a refresh copies new
    values into them, so a CUDA graph captured inside a loop reads them as static inputs: refresh before
    the loop's first replay.
    """

    def __init__(self, network: nn.Module) -> None:
        self.holders = text_holders(network)
        self.caches = [_TextCache() for _ in self.holders]
        self.active = False

    @contextmanager
    def loop(self) -> Iterator[HoistedText]:
        for holder, cache in zip(self.holders, self.caches):
            if holder._text_cache is not None:
                raise RuntimeError("text work of this network is already hoisted by another loop")
            cache.invalidate()
            holder._text_cache = cache
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            for holder in self.holders:
                holder._text_cache = None

    def refresh(self, text: TextContext) -> None:
        """Compute the loop's text values now (eagerly: never inside a graph capture)."""
        for holder, cache in zip(self.holders, self.caches):
            cache.put(text, holder.text_work(text))


@contextmanager
def text_constant(network: nn.Module) -> Iterator[None]:
    """Hoist the text-only work of ``network`` out of a denoising loop (lazily, on the first call).

    Not for torch.compile (a compiled graph would keep the first request's tensors); for CUDA graphs use
    :class:`HoistedText` with an explicit refresh before each loop.
    """
    with HoistedText(network).loop():
        yield


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
