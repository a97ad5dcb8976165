"""The fast torch path and the official-style baseline, built from the same stage modules.

Both are torch backends over one set of networks, so a benchmark can run them side by side and compare
their outputs:

* **fast** (:class:`FastTorchBackend`): FP16 U-Nets (on CUDA), SDPA with its fused kernels (flash /
  memory-efficient), channels-last convolutions, one CUDA graph per (stage, input shapes) for the
  fixed-shape loop calls, optional ``torch.compile``, optionally a BF16 text encoder. The prompt is
  encoded once per request (the pipeline already does this).
* **baseline** (:class:`OfficialStyleBackend` + :class:`OfficialStylePipeline`): the same modules run
  the way the official pipeline does: attention through the "math" kernel (the full attention matrix is
  materialised, like the official einsum/softmax code), U-Nets under CUDA autocast, FP32 text encoder
  and MoVQs, and the prompt re-encoded by every loop that uses it (the official code runs T5 2-4 times
  per video with identical results).

The text-only work of the U-Nets (cross-attention keys/values and the null rows' constants, attention
pooling, all on the two distinct contexts) is hoisted out of each sampler loop (``hoist_text``, via
:class:`kvt.models.unet_layers.HoistedText` and the backend's ``loop_scope``): computed once before the
loop's first step and reused, which is exact. Under CUDA graphs the hoisted tensors are static graph
inputs: they keep their memory across loops and each loop copies its values in before the first replay.
It stays off under torch.compile, whose compiled graph would keep the first request's tensors.
The baseline runs the stage modules without the cuts (``cuts=False``: the official per-row form).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import nn

from kvt.contract.stages import StageTable
from kvt.models.attention_kernels import KERNELS, movq_attention_kernel, seconds_per_call
from kvt.models.model_set import KandinskyVideoModels, Precision
from kvt.models.norms import native_group_norm
from kvt.models.registry import networks_of_family
from kvt.models.stage_modules import UNetStage, stage_module
from kvt.models.unet_layers import HoistedText
from kvt.runtime.backends.torch_backend import TorchBackend
from kvt.runtime.images import psnr_db, to_uint8_tensor
from kvt.runtime.loading import default_size_for as _default_size_for
from kvt.runtime.pipeline import KandinskyVideoPipeline, PromptContext

MEMORY_FORMATS = ("contiguous", "channels_last")
_MEMORY_FORMAT = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class FastPathOptions:
    """Switches of the fast path. ``None`` means: on for CUDA, off for CPU (where it does not help).

    Every GPU-hygiene switch can be flipped on its own, so a benchmark can A/B it (``kvt bench headline``).
    """

    unet_dtype: torch.dtype | None = None  # float16 on CUDA, float32 on CPU
    text_encoder_dtype: torch.dtype | None = None  # bfloat16 on CUDA (changes outputs slightly)
    movq_dtype: torch.dtype = torch.float32  # FP16 MoVQs change outputs; opt-in only
    # Convolution weight layout of the U-Nets and MoVQs: True channels-last, False NCHW, "auto" measured
    # per network on its first call (both layouts timed, the faster kept). None: "auto" on CUDA, else NCHW.
    channels_last: bool | str | None = None
    cuda_graphs: bool | None = None
    # The fixed-shape calls captured as CUDA graphs; None = the stage table's loop stages.
    graph_stages: tuple[str, ...] | None = None
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode; None = torch's default
    # Text-only work (cross-attention K/V, attention pooling) computed once per sampler loop; exact.
    # Works with CUDA graphs (static graph inputs). None = on unless torch.compile is (a compiled graph
    # would keep the first request's tensors).
    hoist_text: bool | None = None
    # GroupNorm on CUDA half/bfloat16 inputs without the explicit float32 round trip (kvt.models.norms).
    native_group_norm: bool | None = None
    # torch.backends.cudnn.benchmark around every call (so autotuning happens in the CUDA-graph warm-up,
    # before capture).
    cudnn_benchmark: bool | None = None
    # Kernel of the MoVQs' single-head attention (kvt.models.attention_kernels): "sdpa", "math" or "auto"
    # (measured per shape). None: "auto" on CUDA, "sdpa" on CPU.
    movq_attention: str | None = None
    # Opt-in reduced precision for the video MoVQ decoder (e.g. torch.bfloat16): used only if the first
    # decoded chunk is within video_movq_min_psnr_db of the movq_dtype decoder (else it falls back).
    video_movq_dtype: torch.dtype | None = None
    video_movq_min_psnr_db: float = 40.0
    # The exact cuts of the U-Net stages (kvt.models.stage_modules.UNetStage); False: the official
    # per-row form, for A/B only.
    cuts: bool = True

    def resolved(self, device: torch.device) -> FastPathOptions:
        """The options with every ``None`` replaced by the choice for ``device``."""
        cuda = device.type == "cuda"
        if self.cuda_graphs and not cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device, the models are on {device}")
        graphs = cuda if self.cuda_graphs is None else self.cuda_graphs
        if self.hoist_text and self.compile:
            raise ValueError("hoist_text=True cannot be combined with torch.compile: a compiled graph would "
                             "keep reading the first request's cached text keys/values")
        if self.channels_last not in (None, True, False, "auto"):
            raise ValueError(f"channels_last={self.channels_last!r}: allowed True, False, 'auto' or None")
        if self.movq_attention not in (None, *KERNELS):
            raise ValueError(f"movq_attention={self.movq_attention!r}: allowed {', '.join(KERNELS)} or None")
        return dataclasses.replace(
            self,
            unet_dtype=self.unet_dtype or (torch.float16 if cuda else torch.float32),
            text_encoder_dtype=self.text_encoder_dtype or (torch.bfloat16 if cuda else torch.float32),
            channels_last=("auto" if cuda else False) if self.channels_last is None else self.channels_last,
            cuda_graphs=graphs,
            hoist_text=(not self.compile) if self.hoist_text is None else self.hoist_text,
            native_group_norm=cuda if self.native_group_norm is None else self.native_group_norm,
            cudnn_benchmark=cuda if self.cudnn_benchmark is None else self.cudnn_benchmark,
            movq_attention=("auto" if cuda else "sdpa") if self.movq_attention is None else self.movq_attention,
        )


def models_with_precision(models: KandinskyVideoModels, unet: torch.dtype | None = None,
                          text_encoder: torch.dtype | None = None,
                          movq: torch.dtype | None = None) -> KandinskyVideoModels:
    """``models`` with the given weight dtypes; networks already in that dtype are shared, not copied.

    Sharing matters at full size: the baseline and the fast path use the same FP16 U-Nets, and only the
    text encoder is held twice (FP32 for the baseline, BF16 for the fast path).
    """
    precision = Precision(unet=unet, text_encoder=text_encoder, movq=movq)
    changes: dict[str, Any] = {}  # network name -> nn.Module, as dataclasses.replace keywords
    for name, module in models.networks().items():
        dtype = precision.of_network(name)
        if dtype is None or next(module.parameters()).dtype == dtype:
            continue
        changes[name] = converted_copy(module, dtype)
    return dataclasses.replace(models, **changes) if changes else models


def converted_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` whose floating-point tensors are ``dtype``, built without a same-dtype copy.

    ``deepcopy(module).to(dtype)`` would first duplicate the weights in their old dtype (35 GB more for
    the FP32 Flan-UL2 on the GPU); here each tensor is converted directly into the copy. Tied
    parameters stay tied (the copy's memo maps a shared tensor once).
    """
    memo: dict[int, object] = {}
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point():
                memo[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
        for buffer in module.buffers():
            if buffer.is_floating_point():
                memo[id(buffer)] = buffer.detach().to(dtype)
    return copy.deepcopy(module, memo)


def to_memory_format_(module: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """Put every 2D convolution's weight in ``memory_format`` (values unchanged, in place).

    ``Module.to(memory_format=...)`` would also try the 5D Conv3d weights of the temporal layers, which
    have no channels-last layout of rank 4, so the 2D convolutions are converted one by one.
    """
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.Conv2d, nn.ConvTranspose2d)):
                sub.weight.data = sub.weight.data.contiguous(memory_format=memory_format)
    return module


def to_channels_last_(module: nn.Module) -> nn.Module:
    """Channels-last 2D convolution weights (see :func:`to_memory_format_`)."""
    return to_memory_format_(module, torch.channels_last)


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set for the block, restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class CudaGraphCall:
    """One stage call captured as a CUDA graph for fixed input shapes.

    Inputs are copied into static buffers before each replay and the outputs are cloned after it, so a
    caller may keep a result across calls. Capturing needs a few eager warm-up calls on a side stream
    first (cuDNN / cuBLAS pick their algorithms there, torch.compile compiles there).
    """

    def __init__(self, fn: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
                 inputs: Mapping[str, torch.Tensor], pool: Any = None, warmup: int = 2) -> None:
        """``pool``: a ``torch.cuda.graph_pool_handle()`` shared by several graphs, or None."""
        self.static_inputs = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch's Stream.__new__ is unannotated
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # A shared pool is safe here: graphs replay one at a time on one stream, the static inputs live
        # outside the pool, and each replay's outputs are cloned before any other graph replays.
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_outputs = fn(self.static_inputs)

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, value in inputs.items():
            self.static_inputs[name].copy_(value)
        self.graph.replay()
        return {name: value.clone() for name, value in self.static_outputs.items()}


def _shape_key(stage: str, inputs: Mapping[str, torch.Tensor]) -> tuple[object, ...]:
    return (stage,) + tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))


class FastTorchBackend(TorchBackend):
    """The torch backend with the fast-path switches of :class:`FastPathOptions`.

    Layout changes convert the convolution weights of the U-Nets and MoVQs in place (their values do not
    change, so a baseline sharing the networks still computes the same numbers, in another layout).
    What the backend measured and chose is in :attr:`memory_formats` and :attr:`video_decoder_gate`.
    """

    name = "torch-fast"

    def __init__(self, models: KandinskyVideoModels, options: FastPathOptions = FastPathOptions(),
                 table: StageTable | None = None, validate: bool = True) -> None:
        super().__init__(models, table, validate, cuts=options.cuts)
        self.options = options.resolved(self.device)
        # network -> {"chosen": "channels_last" | "contiguous", "ms": {format: ms per call} (auto only)}
        self.memory_formats: dict[str, dict[str, Any]] = {}
        if self.options.channels_last in (True, False):
            chosen = "channels_last" if self.options.channels_last else "contiguous"
            for network in networks_of_family("unet") + networks_of_family("movq"):
                to_memory_format_(getattr(models, network), _MEMORY_FORMAT[chosen])
                self.memory_formats[network] = {"chosen": chosen}
        self._callables: dict[str, Callable[..., Any]] = {}
        for stage, module in self.modules.items():
            self._callables[stage] = (torch.compile(module, mode=self.options.compile_mode, dynamic=False)
                                      if self.options.compile and stage in self.table.loop_stages else module)
        self._graphs: dict[tuple[object, ...], CudaGraphCall] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.options.cuda_graphs else None
        # Per loop stage: its network's hoisted text tensors (kept across loops: static graph inputs).
        self._hoisted = {stage: HoistedText(module.network) for stage, module in self.modules.items()
                         if stage in self.table.loop_stages and isinstance(module, UNetStage)}
        self._refreshed: set[str] = set()
        self.video_decoder_gate: dict[str, Any] | None = None  # the reduced-precision decoder's check

    def _channels_last(self, stage: str) -> bool:
        return self.memory_formats.get(self.table[stage].network, {}).get("chosen") == "channels_last"

    def _eager(self, stage: str) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
        spec = self.table[stage]
        fn = self._callables[stage]
        layout_input = spec.layout_input if self._channels_last(stage) else None

        def call(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            args = []
            for name in spec.input_names:
                value = inputs[name]
                if name == layout_input:
                    value = value.contiguous(memory_format=torch.channels_last)
                args.append(value)
            result = fn(*args)
            results = result if isinstance(result, tuple) else (result,)
            return {name: out.contiguous() for name, out in zip(spec.output_names, results)}

        return call

    @contextlib.contextmanager
    def switches(self) -> Iterator[None]:
        """The process-wide switches of the options, set around each call and restored after."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(native_group_norm(bool(self.options.native_group_norm)))
            stack.enter_context(movq_attention_kernel(str(self.options.movq_attention)))
            if self.device.type == "cuda":
                stack.enter_context(cudnn_benchmark(bool(self.options.cudnn_benchmark)))
            yield

    @torch.inference_mode()
    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.switches():
            return self._run_switched(stage, inputs)

    def _run_switched(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec = self.table[stage]
        if (self.options.channels_last == "auto" and spec.layout_input is not None
                and spec.network not in self.memory_formats):
            self._measure_memory_format(stage, inputs)
        if stage == "video_movq_decoder" and self.options.video_movq_dtype is not None \
                and self.video_decoder_gate is None:
            return self._gate_video_decoder(stage, inputs)
        hoisted = self._hoisted.get(stage)
        hoisting = hoisted is not None and hoisted.active
        if hoisting and stage not in self._refreshed:
            # The loop's text work, once, eagerly (outside any graph): the values every step reads.
            assert hoisted is not None
            module = cast(UNetStage, self.modules[stage])
            hoisted.refresh(module.text_context(inputs["context"], inputs["context_mask"], inputs["context_len"],
                                                inputs["sample"].shape[0]))
            self._refreshed.add(stage)
        graph_stages = self.options.graph_stages if self.options.graph_stages is not None else self.table.loop_stages
        if not (self.options.cuda_graphs and stage in graph_stages):
            return self._eager(stage)(inputs)
        # A graph captured inside a loop reads the hoisted tensors; one captured outside computes them.
        key = (hoisting,) + _shape_key(stage, inputs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = CudaGraphCall(self._eager(stage), inputs, pool=self._pool)
        return graph(inputs)

    def _measure_memory_format(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> None:
        """Time ``stage`` with its network's convolution weights in each layout; keep the faster."""
        network = self.table[stage].network
        module = getattr(self.models, network)
        timings = {}
        for name in MEMORY_FORMATS:
            to_memory_format_(module, _MEMORY_FORMAT[name])
            self.memory_formats[network] = {"chosen": name}
            timings[name] = seconds_per_call(functools.partial(self._eager(stage), inputs), self.device)
        chosen = min(timings, key=lambda name: timings[name])
        to_memory_format_(module, _MEMORY_FORMAT[chosen])
        self.memory_formats[network] = {"chosen": chosen, "measured_on": stage,
                                        "ms": {n: 1e3 * t for n, t in timings.items()}}

    def _gate_video_decoder(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decode the first chunk with both decoders; keep the reduced-precision one if its frames are
        within ``video_movq_min_psnr_db`` of the reference decoder's (uint8 frames, PSNR)."""
        dtype = self.options.video_movq_dtype
        assert dtype is not None
        reference = self._eager(stage)(inputs)
        network = converted_copy(self.models.video_movq, dtype)
        previous = self._callables[stage]
        self._callables[stage] = stage_module(stage, network)
        candidate = self._eager(stage)(inputs)
        psnr = psnr_db(to_uint8_tensor(candidate["frames"]), to_uint8_tensor(reference["frames"]))
        passed = psnr >= self.options.video_movq_min_psnr_db
        self.video_decoder_gate = {"dtype": str(dtype).replace("torch.", ""), "psnr_db": psnr,
                                   "min_psnr_db": self.options.video_movq_min_psnr_db, "passed": passed,
                                   "frames": int(inputs["latent"].shape[0])}
        if not passed:
            self._callables[stage] = previous
            return reference
        return candidate

    def loop_scope(self, stage: str) -> contextlib.AbstractContextManager[None]:
        """Hoist the text-only work of ``stage``'s U-Net out of the loop (exact; see HoistedText)."""
        if not self.options.hoist_text or stage not in self._hoisted:
            return contextlib.nullcontext()
        return self._hoisting(stage)

    @contextlib.contextmanager
    def _hoisting(self, stage: str) -> Iterator[None]:
        with self._hoisted[stage].loop():
            self._refreshed.discard(stage)
            try:
                yield
            finally:
                self._refreshed.discard(stage)

    @property
    def captured_graphs(self) -> int:
        return len(self._graphs)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Every ``scaled_dot_product_attention`` call runs the math kernel: the full attention matrix."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


class OfficialStyleBackend(TorchBackend):
    """The stage modules run as the official pipeline runs its networks (math attention, autocast)."""

    name = "torch-official"

    @torch.inference_mode()
    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        autocast = (torch.autocast("cuda", dtype=torch.float16)
                    if self.device.type == "cuda" and stage in self.table.loop_stages else contextlib.nullcontext())
        with math_attention(), autocast:
            return super()._run(stage, inputs)


class OfficialStylePipeline(KandinskyVideoPipeline):
    """The pipeline with the official per-loop prompt encoding: loops B and C re-run the text encoder.

    With the initial encode (which loop A uses) that is 2 runs for fps 'low', 3 for 'medium' and 4 for
    'high', as in the official code; every run gives the same context.
    """

    prompt_encodings = 0

    def encode_prompt(self, prompt: str) -> PromptContext:
        self.prompt_encodings += 1
        return super().encode_prompt(prompt)

    def _reencode(self, text: PromptContext) -> PromptContext:
        self.prompt_encodings += 1
        ids = text.tokens.input_ids.to(self.device, torch.int32)
        mask = text.tokens.attention_mask.to(self.device, torch.int32)
        context = self.backend.run("text_encoder", {"input_ids": ids, "attention_mask": mask})["context"]
        return dataclasses.replace(text, context=context)

    def generate_base_frames(self, text: PromptContext, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().generate_base_frames(self._reencode(text), *args, **kwargs)

    def interpolate(self, text: PromptContext, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().interpolate(self._reencode(text), *args, **kwargs)


_Pipeline = TypeVar("_Pipeline", bound=KandinskyVideoPipeline)


def _pipeline(cls: type[_Pipeline], backend: TorchBackend, models: KandinskyVideoModels) -> _Pipeline:
    return cls(backend, models.tokenizer, models.t2v_null_embedding, models.interpolation_null_embedding,
               _default_size_for(models.config))


def build_baseline_pipeline(models: KandinskyVideoModels, validate: bool = True,
                            text_encoder: torch.dtype = torch.float32) -> OfficialStylePipeline:
    """Official-style run: U-Nets FP16 + autocast on CUDA (FP32 on CPU), T5 and MoVQs FP32 (the T5 in
    ``text_encoder`` where the device cannot hold a second, float32 copy beside the fast path's)."""
    cuda = next(models.unet_t2v.parameters()).device.type == "cuda"
    models = models_with_precision(models, unet=torch.float16 if cuda else torch.float32,
                                   text_encoder=text_encoder, movq=torch.float32)
    return _pipeline(OfficialStylePipeline, OfficialStyleBackend(models, validate=validate, cuts=False), models)


def build_fast_pipeline(models: KandinskyVideoModels, options: FastPathOptions = FastPathOptions(),
                        validate: bool = True) -> KandinskyVideoPipeline:
    """The fast path over ``models`` (networks whose dtype already fits are shared, not copied)."""
    device = next(models.unet_t2v.parameters()).device
    resolved = options.resolved(device)
    models = models_with_precision(models, unet=resolved.unet_dtype, text_encoder=resolved.text_encoder_dtype,
                                   movq=resolved.movq_dtype)
    return _pipeline(KandinskyVideoPipeline, FastTorchBackend(models, resolved, validate=validate), models)
