"""The stage contract table: the single description of every stage's inputs, outputs and shape ranges.

A stage is a network call a backend can run: ``text_encoder``, ``unet_t2v_image``, ``unet_t2v_video``,
``unet_interp``, ``movq_encoder``, ``movq_decoder``, ``video_movq_decoder``. Everything else derives
from this table: ONNX dynamic axes and sample inputs (export), TensorRT optimisation profiles (engines),
``config.pbtxt`` inputs and outputs (Triton), input validation and buffer shapes (runtime). A fact about a
stage's I/O written anywhere else is a bug waiting to happen.

U-Net stages take the text conditioning once per call, as the distinct contexts (``TEXT_CONTEXTS``:
the prompt and the null context) rather than one copy per row; each stage's ``text_rows`` role says
which context each block of rows reads, so the networks broadcast the contexts in the graph.

Shapes are written with symbols: an ``int`` is static; a string names a dimension of the stage
(``"N"``, ``"h"``), optionally scaled by an integer prefix (``"8h"`` = 8 x h). Each dimension has a
min/opt/max range and a step (``multiple_of``). Stages with several optimisation profiles (the
interpolation U-Net: 22 and 88 rows) list them in ``profiles``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from kvt.contract.dtypes import DType
from kvt.contract.errors import UserError

# The pipeline's fixed structure (official code): 12 base frames, 3-way guidance in loop B, 2-way in A/C.
NUM_BASE_FRAMES = 12
FPS_FRAMES = {"low": 12, "medium": 45, "high": 177}
INTERPOLATION_PASSES = {"low": (), "medium": (3,), "high": (3, 1)}  # skip_frames of each pass
LATENT_CHANNELS = 4
PIXEL_MULTIPLE = 64  # three stride-2 U-Net levels on the H/8 latent (docs/spec/deployment.md)
# The distinct text contexts a U-Net stage call receives, in this order along the first axis of its
# `context`, `context_mask` and `context_len` inputs. The null context has exactly one valid position (the
# network's null embedding at position 0), so cross-attention to it is a per-layer constant.
TEXT_CONTEXTS = ("prompt", "null")
NULL_CONTEXT = TEXT_CONTEXTS.index("null")


def video_decode_chunks(num_frames: int) -> list[int]:
    """Chunk lengths of the official ``video.chunk(T // 4)`` (torch.chunk semantics)."""
    if num_frames < 4:
        return [num_frames]
    chunks = num_frames // 4
    size = -(-num_frames // chunks)
    out = [size] * (num_frames // size)
    if num_frames % size:
        out.append(num_frames % size)
    return out


# The longest chunk the video decoder is called with (5 for 45 and 177 frames, 4 for 12): its table
# range stops there, so no engine sizes activation memory for chunks the pipeline never makes.
MAX_DECODE_CHUNK = max(max(video_decode_chunks(frames)) for frames in FPS_FRAMES.values())


# The memory-based frame-size limit of the backends that run any multiple of 64 (torch, ONNX Runtime):
# width x height at most 1024 x 1024 pixels. Activation memory grows with the frame area: at the limit,
# with the released networks, the key frame is decoded at 2048 x 2048 (image MoVQ top level: 256
# channels, 4 GiB per FP32 activation) and every video-decoder chunk holds 5 frames of 256 x 1024 x 1024
# (5 GiB per activation), an estimated 20-40 GiB of activations on top of the weights (README). Any
# aspect ratio within the area is accepted (1280 x 768, 192 x 128, 4096 x 256 ...), as by the official
# code; engines and Triton serve the range they were built for.
MAX_FRAME_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: its range and step. ``opt`` is what engines are tuned for."""

    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def __post_init__(self) -> None:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"Dim needs min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple_of == 0

    def describe(self) -> str:
        step = f", multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
        return f"[{self.min}, {self.max}]{step}"


_SYMBOL = re.compile(r"^(\d*)([A-Za-z_]\w*)$")


def parse_symbol(entry: str) -> tuple[int, str]:
    """``"8h"`` -> (8, "h"); ``"N"`` -> (1, "N")."""
    match = _SYMBOL.match(entry)
    if not match:
        raise ValueError(f"bad shape symbol {entry!r}")
    return int(match.group(1) or 1), match.group(2)


def axis_name(entry: str) -> str:
    """The name an exported graph gives a dynamic axis: "N" -> "N", "8h" -> "8xh"."""
    scale, name = parse_symbol(entry)
    return name if scale == 1 else f"{scale}x{name}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    shape: tuple[int | str, ...]
    doc: str = ""

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for entry in self.shape:
            if isinstance(entry, int):
                out.append(entry)
            else:
                scale, name = parse_symbol(entry)
                out.append(scale * dims[name])
        return tuple(out)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> axis name for the axes that are not static (ONNX ``dynamic_axes``).

        A scaled entry keeps its scale in the name ("8h" -> "8xh"): it is a different size from "h".
        """
        return {i: axis_name(e) for i, e in enumerate(self.shape) if isinstance(e, str)}


class StageInputError(UserError):
    """Inputs of a stage call do not satisfy the stage contract."""


class StageTableError(UserError):
    """A recorded table summary (in an export, engine directory or Triton repository) is unusable."""


@overload
def context_length(n_tokens: int, tokens_length: int) -> int: ...
@overload
def context_length(n_tokens: torch.Tensor, tokens_length: int) -> torch.Tensor: ...
def context_length(n_tokens: int | torch.Tensor, tokens_length: int) -> int | torch.Tensor:
    """The official trimmed context length L = min(n_tokens + 1, S) of a prompt of ``n_tokens`` tokens
    (EOS included) read at static length S: the official code keeps one padding position. Works on
    ints and on tensors (traced into the exported text encoder)."""
    if isinstance(n_tokens, torch.Tensor):
        return torch.clamp(n_tokens + 1, max=tokens_length)
    return min(n_tokens + 1, tokens_length)


@dataclass(frozen=True)
class StageSpec:
    """One row of the table."""

    name: str
    network: str  # which network of kvt.models runs it
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, Dim]
    doc: str = ""
    # Extra optimisation profiles (each a full set of dims); default: the single profile `dims`.
    extra_profiles: tuple[Mapping[str, Dim], ...] = field(default=())
    # Roles. `loop`: the sampler loop that calls this stage once per step ("key_frame", "base_frames",
    # "interpolation"), None for once-per-request stages. `batch_independent`: rows of different
    # requests may share one call (no op mixes rows), so a server may batch requests. `layout_input`: the
    # input in image layout [N, C, H, W] (the one a channels-last memory format applies to).
    # `text_rows` (U-Net stages): the rows are len(text_rows) equal consecutive blocks, block b reads the
    # context named text_rows[b] (of TEXT_CONTEXTS); the guidance branches in the pipeline's batch order.
    loop: str | None = None
    batch_independent: bool = False
    layout_input: str | None = None
    text_rows: tuple[str, ...] = ()

    @property
    def row_contexts(self) -> tuple[int, ...]:
        """``text_rows`` as indices into the context inputs (empty for stages without text)."""
        return tuple(TEXT_CONTEXTS.index(name) for name in self.text_rows)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def profiles(self) -> tuple[Mapping[str, Dim], ...]:
        return (self.dims,) + tuple(self.extra_profiles)

    def shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input and output for the given dimension values."""
        missing = set(self.dims) - set(dims)
        if missing:
            raise ValueError(f"stage {self.name}: values for dims {sorted(missing)} are needed")
        return {t.name: t.concrete_shape(dims) for t in self.inputs + self.outputs}

    def to_dict(self) -> dict[str, Any]:
        """The row as plain data (``kvt stages --json``, manifests)."""
        return {
            "stage": self.name, "network": self.network,
            "inputs": [{"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape)} for t in self.outputs],
            "profiles": [{k: [d.min, d.opt, d.max, d.multiple_of] for k, d in p.items()} for p in self.profiles],
            "loop": self.loop, "batch_independent": self.batch_independent, "layout_input": self.layout_input,
            "text_rows": list(self.text_rows),
        }

    def input_bytes(self, dims: Mapping[str, int]) -> int:
        """Bytes of one call's inputs at ``dims`` (what a caller sends per call)."""
        total = 0
        for spec in self.inputs:
            count = 1
            for size in spec.concrete_shape(dims):
                count *= size
            total += count * spec.dtype.itemsize
        return total

    def opt_dims(self, profile: int = 0) -> dict[str, int]:
        return {name: d.opt for name, d in self.profiles[profile].items()}

    def sample_inputs(self, dims: Mapping[str, int] | None = None, device: torch.device | str = "cpu",
                      seed: int = 0) -> dict[str, torch.Tensor]:
        """Valid inputs of the given (default: opt) dims, with values like the pipeline's own.

        Used to trace exports, to check parity and to warm engines up, so the values matter: timesteps
        in [0, 999], a prompt length shared by context, mask and context_len, masked rows zero, the
        interpolation's [conditional | unconditional] temporal mask, and so on.
        """
        dims = dict(dims or self.opt_dims())
        gen = torch.Generator().manual_seed(seed)
        shapes = {t.name: t.concrete_shape(dims) for t in self.inputs}

        def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            return _sample_value(name, shape, gen)

        out = {spec.name: draw(spec.name, shapes[spec.name]).to(spec.dtype.torch) for spec in self.inputs}
        _make_context_consistent(out, gen)
        return {name: value.to(device) for name, value in out.items()}

    def bind_dims(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Check ``tensors`` against the contract and return the dimension values they imply."""
        names = set(tensors)
        expected = set(self.input_names)
        if names != expected:
            raise StageInputError(
                f"stage {self.name}: inputs {sorted(names)} do not match the contract "
                f"(missing {sorted(expected - names)}, unexpected {sorted(names - expected)})"
            )
        bound: dict[str, int] = {}
        for spec in self.inputs:
            tensor = tensors[spec.name]
            if tensor.dtype != spec.dtype.torch:
                raise StageInputError(
                    f"stage {self.name}: input {spec.name!r} has dtype {tensor.dtype}, "
                    f"the contract says {spec.dtype.value}")
            if tensor.dim() != len(spec.shape):
                raise StageInputError(
                    f"stage {self.name}: input {spec.name!r} has shape {list(tensor.shape)}, "
                    f"the contract says {list(spec.shape)}")
            for axis, (entry, size) in enumerate(zip(spec.shape, tensor.shape)):
                if isinstance(entry, int):
                    if size != entry:
                        raise StageInputError(
                            f"stage {self.name}: input {spec.name!r} axis {axis} is {size}, must be {entry}")
                    continue
                scale, name = parse_symbol(entry)
                if size % scale:
                    raise StageInputError(
                        f"stage {self.name}: input {spec.name!r} axis {axis} ({entry}) is {size}, "
                        f"not a multiple of {scale}")
                value = size // scale
                if bound.setdefault(name, value) != value:
                    raise StageInputError(
                        f"stage {self.name}: dim {name} is {bound[name]} in one input and {value} in "
                        f"{spec.name!r}")
        if self.text_rows and bound.get("N", 0) % len(self.text_rows):
            raise StageInputError(
                f"stage {self.name}: N={bound['N']} rows do not split into {len(self.text_rows)} equal blocks "
                f"{list(self.text_rows)}")
        for name, value in bound.items():
            if not any(profile[name].contains(value) for profile in self.profiles):
                raise StageInputError(
                    f"stage {self.name}: dim {name}={value} is outside the supported range "
                    f"{self.dims[name].describe()}")
        return bound


def _sample_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A value of the kind the pipeline feeds to an input of this name."""
    rows = shape[0] if shape else 1
    if name == "timestep":
        return torch.randint(0, 1000, shape, generator=gen).float()
    if name == "frame_index":
        return (torch.arange(rows) % NUM_BASE_FRAMES).float()
    if name == "noise_aug":
        return torch.full(shape, 20.0)
    if name == "motion_score":
        choices = torch.tensor([1.0, 10.0, 50.0, 100.0])
        return choices[torch.randint(0, 4, (1,), generator=gen)].expand(shape).clone()
    if name == "skip_frames":
        return torch.full(shape, int(torch.randint(0, 2, (1,), generator=gen)) * 2 + 1)
    if name == "perturbation_time":
        return torch.zeros(shape)
    if name == "temporal_mask":
        return (torch.arange(rows) < rows // 2).float()
    if name == "image":
        return torch.rand(shape, generator=gen) * 2 - 1
    if name in ("input_ids", "attention_mask", "context", "context_mask", "context_len"):
        return torch.zeros(shape)  # filled consistently by _make_context_consistent
    return torch.randn(shape, generator=gen)


def _make_context_consistent(out: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """One prompt length: tokens / context positions before it, padding after. U-Net contexts
    (TEXT_CONTEXTS): the prompt, then the null context (position 0 only); both carry the prompt's L."""
    if "input_ids" in out:
        ids = out["input_ids"]
        seq = ids.shape[-1]
        n = int(torch.randint(1, seq + 1, (1,), generator=gen))
        tokens = torch.randint(2, 100, ids.shape, generator=gen)
        tokens[:, n - 1] = 1  # EOS
        tokens[:, n:] = 0
        out["input_ids"] = tokens.to(ids.dtype)
        out["attention_mask"] = (torch.arange(seq) < n).expand(ids.shape).to(out["attention_mask"].dtype)
    if "context" in out:
        context = out["context"]
        seq = context.shape[1]
        n = int(torch.randint(1, seq + 1, (1,), generator=gen))
        positions = torch.arange(seq)
        valid = torch.stack([positions < n if name == "prompt" else positions < 1 for name in TEXT_CONTEXTS])
        values = torch.randn(context.shape, generator=gen)
        out["context"] = torch.where(valid[:, :, None], values, torch.zeros(())).to(context.dtype)
        out["context_mask"] = valid
        out["context_len"] = torch.full(context.shape[:1], float(context_length(n, seq)))


@dataclass(frozen=True)
class ResolutionRange:
    """Output frame sizes the stage ranges are built for (pixels; multiples of 64).

    ``max_pixels`` additionally bounds width x height (None: only the per-side range): the range of a
    backend that runs any size (:func:`any_size_range`). Artifacts record min / opt / max only.
    """

    min: int = 64
    opt: int = 512
    max: int = 1024
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        for value in (self.min, self.opt, self.max):
            if value % PIXEL_MULTIPLE:
                raise ValueError(f"resolution {value} is not a multiple of {PIXEL_MULTIPLE}")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"resolution range needs min <= opt <= max, got {self}")
        if self.max_pixels is not None and self.max_pixels < self.min * self.min:
            raise ValueError(f"max_pixels {self.max_pixels} is below min x min = {self.min * self.min}")

    def contains(self, width: int, height: int) -> bool:
        """Whether a width x height frame is inside the range (sides and area)."""
        sides = all(self.min <= v <= self.max and v % PIXEL_MULTIPLE == 0 for v in (width, height))
        return sides and (self.max_pixels is None or width * height <= self.max_pixels)

    def latent(self, downscale: int) -> Dim:
        """The range of a latent side at pixels / downscale (video latents 8, key-frame latents 4)."""
        return Dim(self.min // downscale, self.opt // downscale, self.max // downscale,
                   PIXEL_MULTIPLE // downscale)


def any_size_range(opt: int = 512) -> ResolutionRange:
    """Every multiple of 64 the official code runs, within the memory-based limit MAX_FRAME_PIXELS:
    sides from 64 up to MAX_FRAME_PIXELS / 64, width x height at most MAX_FRAME_PIXELS. The range of
    the backends without built shape ranges (torch, ONNX Runtime)."""
    return ResolutionRange(PIXEL_MULTIPLE, opt, MAX_FRAME_PIXELS // PIXEL_MULTIPLE, MAX_FRAME_PIXELS)


@dataclass(frozen=True)
class ModelDims:
    """The few model facts the stage shapes depend on."""

    tokens_length: int  # static context length S (128 released)
    context_dim: int  # D (4096 released)

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        """From a :class:`kvt.models.configs.KandinskyVideoConfig` (read by attribute)."""
        return cls(tokens_length=config.text_encoder.tokens_length,
                   context_dim=config.text_encoder.context_dim)


def _unet_inputs(channels: int, sample_doc: str, S: int, D: int) -> tuple[TensorSpec, ...]:
    """The inputs every U-Net stage starts with: sample, timestep and the distinct text contexts."""
    return (
        TensorSpec("sample", DType.FP32, ("N", channels, "h", "w"), sample_doc),
        TensorSpec("timestep", DType.FP32, ("N",)),
        *_context_inputs(S, D),
    )


def _context_inputs(S: int, D: int) -> tuple[TensorSpec, ...]:
    K = len(TEXT_CONTEXTS)
    return (
        TensorSpec("context", DType.FP32, (K, S, D),
                   "the distinct text contexts [prompt, null], static length; positions past the prompt are "
                   "zero; the null context is the null embedding at position 0 and zeros"),
        TensorSpec("context_mask", DType.BOOL, (K, S),
                   "True for valid context positions (the null context: position 0 only)"),
        TensorSpec("context_len", DType.FP32, (K,),
                   "official trimmed length L = min(n_tokens + 1, S) of the request's prompt, for both "
                   "contexts (the null context too: quirk 1)"),
    )


@dataclass(frozen=True)
class StageTable:
    stages: Mapping[str, StageSpec]
    model: ModelDims
    resolution: ResolutionRange

    def __getitem__(self, name: str) -> StageSpec:
        try:
            return self.stages[name]
        except KeyError:
            raise KeyError(f"unknown stage {name!r}; stages: {list(self.stages)}") from None

    def __iter__(self) -> Iterator[StageSpec]:
        return iter(self.stages.values())

    def __contains__(self, name: object) -> bool:
        return name in self.stages

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.stages)

    @property
    def loop_stages(self) -> tuple[str, ...]:
        """Stages a sampler loop calls once per step, in table order."""
        return tuple(s.name for s in self if s.loop is not None)

    def stage_of_loop(self, loop: str) -> str:
        """The stage the sampler loop ``loop`` calls."""
        for spec in self:
            if spec.loop == loop:
                return spec.name
        raise KeyError(f"no stage is called by loop {loop!r}; loops: {[s.loop for s in self if s.loop]}")

    def with_resolution(self, resolution: ResolutionRange) -> StageTable:
        """The same stages for another range of frame sizes."""
        return build_stage_table(self.model, resolution)

    def summary(self) -> dict[str, Any]:
        """The facts the table is built from, as artifacts record them (:meth:`from_summary`)."""
        return {"tokens_length": self.model.tokens_length, "context_dim": self.model.context_dim,
                "resolution": [self.resolution.min, self.resolution.opt, self.resolution.max]}

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any], where: str = "summary") -> StageTable:
        """The table an artifact was made for, from the summary it records (extra keys are ignored)."""
        try:
            model = ModelDims(int(summary["tokens_length"]), int(summary["context_dim"]))
            resolution = ResolutionRange(*(int(v) for v in summary["resolution"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StageTableError(f"{where}: no usable model dims and resolution range ({exc!r})") from None
        return build_stage_table(model, resolution)


@functools.cache
def _roles_table() -> StageTable:
    return build_stage_table(ModelDims(1, 1))


def stage_names() -> tuple[str, ...]:
    """The stages of every table, in table order (the names do not depend on model dims)."""
    return _roles_table().names


def stage_roles(name: str) -> StageSpec:
    """The row of ``name`` in a table of placeholder model dims: for the facts that do not depend on
    them (names, roles, ``text_rows``), e.g. when a stage module is built without its table."""
    return _roles_table()[name]


def build_stage_table(model: ModelDims, resolution: ResolutionRange = ResolutionRange()) -> StageTable:
    S, D, C = model.tokens_length, model.context_dim, LATENT_CHANNELS
    video_latent = resolution.latent(8)
    key_latent = resolution.latent(4)

    stages = [
        StageSpec(
            name="text_encoder", network="text_encoder",
            inputs=(TensorSpec("input_ids", DType.INT32, ("B", S), "token ids, right-padded with 0"),
                    TensorSpec("attention_mask", DType.INT32, ("B", S), "1 for tokens (incl. EOS)")),
            outputs=(TensorSpec("context", DType.FP32, ("B", S, D),
                                "projection_base(T5(ids)); rows with mask 0 exactly zero"),),
            dims={"B": Dim(1, 1, 4)},
            batch_independent=True,
            doc="Flan-UL2 encoder + projection_base + zeroing of padded rows (run once per request)",
        ),
        StageSpec(
            name="unet_t2v_image", network="unet_t2v",
            inputs=_unet_inputs(9, "[x_t | condition | mask]", S, D),
            outputs=(TensorSpec("eps", DType.FP32, ("N", C, "h", "w")),),
            dims={"N": Dim(2, 2, 8, 2), "h": key_latent, "w": key_latent},
            loop="key_frame", layout_input="sample", text_rows=("prompt", "null"),
            doc="t2v U-Net in image mode (image_in_layer, no temporal layers): loop A, the key frame "
                "at twice the video resolution; 2 rows per request [prompt | null]",
        ),
        StageSpec(
            name="unet_t2v_video", network="unet_t2v",
            inputs=(*_unet_inputs(9, "[x_t | condition | mask]", S, D),
                    TensorSpec("frame_index", DType.FP32, ("N",), "0..11 per guidance branch"),
                    TensorSpec("noise_aug", DType.FP32, ("N",), "noise augmentation timestep (20)"),
                    TensorSpec("motion_score", DType.FP32, ("N",), "1 / 10 / 50 / 100")),
            outputs=(TensorSpec("eps", DType.FP32, ("N", C, "h", "w")),),
            dims={"N": Dim(3 * NUM_BASE_FRAMES, 3 * NUM_BASE_FRAMES, 6 * NUM_BASE_FRAMES, NUM_BASE_FRAMES),
                  "h": video_latent, "w": video_latent},
            loop="base_frames", layout_input="sample", text_rows=("prompt", "null", "null"),
            doc="t2v U-Net in video mode (in_layer, temporal layers, 12 frames per group): loop B; "
                "36 rows per request [prompt+image | null+image | null]",
        ),
        StageSpec(
            name="unet_interp", network="unet_interpolation",
            inputs=(*_unet_inputs(20, "[left | x_t (3 frames) | right]", S, D),
                    TensorSpec("skip_frames", DType.INT32, ("N",), "3 (12->45 pass) or 1 (45->177 pass)"),
                    TensorSpec("perturbation_time", DType.FP32, ("N",), "always 0"),
                    TensorSpec("temporal_mask", DType.FP32, ("N",),
                               "1 for the conditional half [0, N/2), 0 on the unconditional half (whose "
                               "temporal layers are skipped: exact pass-throughs)")),
            outputs=(TensorSpec("v", DType.FP32, ("N", 12, "h", "w"), "v-prediction, 3 frames x 4 ch"),),
            dims={"N": Dim(4, 22, 88, 2), "h": video_latent, "w": video_latent},
            extra_profiles=({"N": Dim(4, 88, 88, 2), "h": video_latent, "w": video_latent},),
            loop="interpolation", layout_input="sample", text_rows=("prompt", "null"),
            doc="interpolation U-Net: loop C; rows [G conditional | G unconditional], G = frames - 1 "
                "(11 for 12->45, 44 for 45->177); all G groups in one call (temporal axis = group)",
        ),
        StageSpec(
            name="movq_encoder", network="image_movq",
            inputs=(TensorSpec("image", DType.FP32, ("B", 3, "8h", "8w"), "RGB in [-1, 1]"),),
            outputs=(TensorSpec("latent", DType.FP32, ("B", C, "h", "w")),),
            dims={"B": Dim(1, 1, 4), "h": video_latent, "w": video_latent},
            batch_independent=True, layout_input="image",
            doc="image MoVQ encoder + quant_conv: the key frame (generated or the user's image)",
        ),
        StageSpec(
            name="movq_decoder", network="image_movq",
            inputs=(TensorSpec("latent", DType.FP32, (1, C, "h", "w"), "also the SpatialNorm condition"),),
            outputs=(TensorSpec("image", DType.FP32, (1, 3, "8h", "8w"), "nominally [-1, 1]"),),
            dims={"h": key_latent, "w": key_latent},
            layout_input="latent",
            doc="image MoVQ decoder (post_quant_conv + decoder) for the key frame at 2H x 2W; batch 1 "
                "(the decoder's attention norms couple items of a batch)",
        ),
        StageSpec(
            name="video_movq_decoder", network="video_movq",
            inputs=(TensorSpec("latent", DType.FP32, ("F", C, "h", "w"), "one chunk of frames"),),
            outputs=(TensorSpec("frames", DType.FP32, ("F", 3, "8h", "8w"), "nominally [-1, 1]"),),
            dims={"F": Dim(1, MAX_DECODE_CHUNK, MAX_DECODE_CHUNK), "h": video_latent, "w": video_latent},
            layout_input="latent",
            doc="video MoVQ decoder on one chunk (chunks of video.chunk(T // 4): 4 / 5 / 5 and a 2; "
                "capped at the longest)",
        ),
    ]
    return StageTable(stages={s.name: s for s in stages}, model=model, resolution=resolution)
