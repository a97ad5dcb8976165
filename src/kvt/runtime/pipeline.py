"""The Kandinsky Video 1.1 pipeline, written once over any stage backend.

Flow of one request (docs/spec/README.md, sampling.md)::

    prompt -> [text_encoder] once -> context (static length) + context_len; U-Net stages get the prompt
    and null contexts once per call, never a copy per row
    no image: loop A [unet_t2v_image] x steps -> [movq_decoder] -> uint8 key frame (2H x 2W)
    key frame (generated or the user's) -> Pillow resize/crop -> [movq_encoder] -> latent
    loop B [unet_t2v_video] x steps, 3-way guidance -> 12 base frames
    fps medium / high: loop C [unet_interp] x steps per pass -> 45 / 177 frames
    [video_movq_decoder] per chunk -> uint8 frames [T, H, W, 3]

The official code encodes the prompt 2-4 times with identical results; here it is encoded once. All
three loops run through :meth:`KandinskyVideoPipeline._denoise`; each loop's model inputs are allocated
once, and a step only copies the latent in, fills the timestep, runs the stage, combines guidance and
steps the sampler. Randomness is drawn from a :class:`NoiseSource` in the official order.
"""

from __future__ import annotations

import logging
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from kvt.contract.errors import CancelledError, TimedOutError
from kvt.contract.plan import request_total_steps
from kvt.contract.profiles import coverage, unserved_calls
from kvt.contract.request import (
    GenerationRequest,
    InvalidRequestError,
    _short,
    request_warnings,
    validate_request,
)
from kvt.contract.stages import (
    INTERPOLATION_PASSES,
    LATENT_CHANNELS,
    NUM_BASE_FRAMES,
    TEXT_CONTEXTS,
    StageTable,
    context_length,
    video_decode_chunks,
)
from kvt.models.model_set import KandinskyVideoModels
from kvt.models.text_encoder import PromptTokenizer, TokenizedPrompt
from kvt.runtime import guidance
from kvt.runtime.backends.base import StageBackend
from kvt.runtime.images import image_from_array, key_frame_pixels, load_image, to_uint8, to_uint8_tensor
from kvt.runtime.loading import PipelineParts, PipelineSource, open_parts, parts_from_models
from kvt.runtime.noise import NoiseSource, SeededNoise
from kvt.runtime.schedulers import Sampler, base_frame_sampler, interpolation_sampler, key_frame_sampler
from kvt.runtime.video_io import default_playback_fps, save_video

log = logging.getLogger(__name__)


class PromptTruncatedWarning(UserWarning):
    """The prompt has more tokens than the text encoder reads; it was cut as the official pipeline does
    (``VideoOutput.prompt_truncated`` says so too, for callers that silence the warning)."""


class GenerationCancelled(CancelledError):
    """The per-step callback asked to stop."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage, self.step = stage, step
        super().__init__(f"generation cancelled by the callback at {stage} step {step}")


class GenerationTimeout(GenerationCancelled, TimedOutError):
    """The request ran past its time limit; it stopped at the next step boundary."""

    def __init__(self, stage: str, step: int, limit_s: float, stage_name: str | None = None) -> None:
        Exception.__init__(self, f"generation exceeded its time limit of {limit_s:g} s at {stage} "
                                 f"step {step} (stage {stage_name or stage}); stopped")
        self.stage, self.step, self.limit_s = stage, step, limit_s


@dataclass(frozen=True)
class StepInfo:
    """What a per-step callback sees after each sampler step."""

    stage: str  # "key_frame" (loop A), "base_frames" (loop B), "interpolation" (loop C)
    step: int  # 0-based index within the loop
    num_steps: int
    timestep: int
    latents: torch.Tensor  # the sampler state after this step (do not modify)


StepCallback = Callable[[StepInfo], "bool | None"]


@dataclass(frozen=True)
class PromptContext:
    """The encoded prompt: static-length context, its mask and the official trimmed length L."""

    context: torch.Tensor  # [1, S, D] fp32
    mask: torch.Tensor  # [1, S] bool
    length: int  # L = min(n_tokens + 1, S)
    tokens: TokenizedPrompt


@dataclass
class VideoOutput:
    """A generated video.

    ``frames`` is uint8 RGB with layout [T, H, W, 3]: ``frames[t]`` is frame t in display order. T is 12
    (fps 'low'), 45 ('medium') or 177 ('high'); frames 0, 4, 8, ... are the 12 base frames at medium fps
    (every 16th at high fps); the rest are interpolated. ``latents`` [T, 4, H/8, W/8] are the decoder
    inputs. ``key_frame`` is the image the video is conditioned on: the user's image, or the generated
    key frame at 2H x 2W. ``warnings`` are the notices of :func:`kvt.contract.request.request_warnings`
    (inputs served as the official pipeline serves them but probably not meant) and of prompt truncation.
    """

    frames: npt.NDArray[np.uint8]
    latents: torch.Tensor
    key_frame: Image.Image
    request: GenerationRequest
    prompt_tokens: int
    prompt_truncated: bool
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def seed(self) -> int | None:
        return self.request.seed

    @property
    def playback_fps(self) -> float:
        """T / 5.5: the official clips last about 5.5 s whatever the fps mode."""
        return default_playback_fps(self.num_frames)

    def to_pil(self) -> list[Image.Image]:
        return [Image.fromarray(frame) for frame in self.frames]

    def save(self, path: str | Path, fps: float | None = None) -> Path:
        """Write .mp4 or .gif atomically (temporary name, renamed when complete)."""
        return save_video(self.frames, path, fps if fps is not None else self.playback_fps)


class _Progress:
    """One tqdm bar over every sampler step of a request and every video-decoder chunk, or nothing.

    The decoder chunks are counted so that the bar does not sit at 100 % through the video decode
    (about half a minute at fps high on a CPU)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="step", desc="kvt", leave=False)

    def stage(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_description(f"kvt {name}")

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class KandinskyVideoPipeline:
    """Text-to-video and image-to-video generation over a :class:`StageBackend`."""

    # Video decode keeps each chunk's uint8 frames on the device and copies once (False: per chunk).
    decode_on_device = True

    def __init__(
        self,
        backend: StageBackend,
        tokenizer: PromptTokenizer,
        t2v_null_embedding: torch.Tensor,
        interpolation_null_embedding: torch.Tensor,
        default_size: tuple[int, int] = (512, 512),
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.device = backend.device
        self.table = backend.table
        self.t2v_null_embedding = t2v_null_embedding.to(self.device, torch.float32)
        self.interpolation_null_embedding = interpolation_null_embedding.to(self.device, torch.float32)
        self.default_width, self.default_height = default_size
        if tokenizer.tokens_length != self.table.model.tokens_length:
            raise ValueError(f"tokenizer length {tokenizer.tokens_length} != stage table "
                             f"{self.table.model.tokens_length}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_parts(cls, parts: PipelineParts) -> KandinskyVideoPipeline:
        return cls(parts.backend, parts.tokenizer, parts.t2v_null_embedding, parts.interpolation_null_embedding,
                   parts.default_size)

    @classmethod
    def from_source(cls, source: PipelineSource) -> KandinskyVideoPipeline:
        """A pipeline over any source of networks (see :mod:`kvt.runtime.loading`)."""
        return cls.from_parts(open_parts(source))

    @classmethod
    def from_models(cls, models: KandinskyVideoModels, default_size: tuple[int, int] | None = None,
                    validate: bool = True) -> KandinskyVideoPipeline:
        """A torch-backend pipeline over already loaded networks."""
        return cls.from_parts(parts_from_models(models, default_size, validate))

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path, text_encoder_dir: str | Path | None = None,
                            device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                            text_encoder_dtype: torch.dtype = torch.float32,
                            movq_dtype: torch.dtype = torch.float32) -> KandinskyVideoPipeline:
        """Load a checkpoint directory in the official layout (strict) on the torch backend.

        ``dtype`` is the U-Nets' weight dtype (default: float16 on CUDA as the official release runs
        them, float32 on CPU); the T5 encoder and the MoVQs stay float32 unless asked otherwise.
        """
        return cls.from_source(PipelineSource.checkpoint(path, text_encoder_dir, device, dtype,
                                                         text_encoder_dtype, movq_dtype))

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> KandinskyVideoPipeline:
        """A preset's networks with seeded random weights (no files; outputs are noise)."""
        return cls.from_source(PipelineSource.preset(name, seed, device, dtype))

    @classmethod
    def from_onnx(cls, export_dir: str | Path, providers: list[str] | str | None = None,
                  device: str | torch.device | None = None, *,
                  session_options: Any = None) -> KandinskyVideoPipeline:
        """An ONNX Runtime pipeline over an export directory (``kvt export``).

        The tokenizer and null embeddings come from the directory, so no checkpoint is needed; every
        stage the pipeline can call must be exported. The default frame size is the manifest's
        resolution opt (what engines are tuned for). Assets are checked before sessions are built.
        """
        return cls.from_source(PipelineSource.onnx(export_dir, providers, device, session_options))

    @classmethod
    def from_engines(cls, engine_dir: str | Path, device: str | torch.device = "cuda", *,
                     cuda_graphs: bool = False) -> KandinskyVideoPipeline:
        """A TensorRT pipeline over an engine directory (``kvt build``).

        ``kvt build`` copies the tokenizer and null embeddings next to the plans under the export's
        asset names, so the engine directory is self-contained; when they are missing there (copied
        without them) they are read from the export directory the manifest records. Assets are checked
        before any engine is loaded. The default frame size is the export's resolution opt.
        """
        return cls.from_source(PipelineSource.engines(engine_dir, device, cuda_graphs))

    # ------------------------------------------------------------------ the request

    def __call__(
        self,
        prompt: str,
        image: Image.Image | str | Path | bytes | None = None,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        fps: str = GenerationRequest.fps,
        motion: str = GenerationRequest.motion,
        key_frame_guidance_scale: float = GenerationRequest.key_frame_guidance_scale,
        guidance_weight_prompt: float = GenerationRequest.guidance_weight_prompt,
        guidance_weight_image: float = GenerationRequest.guidance_weight_image,
        interpolation_guidance_scale: float = GenerationRequest.interpolation_guidance_scale,
        noise_augmentation: int = GenerationRequest.noise_augmentation,
        seed: int | None = None,
        key_frame_steps: int = GenerationRequest.key_frame_steps,
        base_frame_steps: int = GenerationRequest.base_frame_steps,
        interpolation_steps: int = GenerationRequest.interpolation_steps,
        progress: bool = True,
        callback: StepCallback | None = None,
        noise: NoiseSource | None = None,
        timeout_s: float | None = None,
    ) -> VideoOutput:
        """Generate a video. Defaults and accepted values are the official ones (``motion='normal'``,
        the official default, is 'medium'; ``negative_prompt`` is accepted and has no effect; an image
        smaller than the frame is padded with black; an empty prompt is EOS only: each with a warning,
        see :func:`kvt.contract.request.request_warnings`). ``image`` turns it into image-to-video.
        ``noise`` replaces the seeded noise (e.g. to replay recorded noise); ``callback`` returning False
        cancels; ``timeout_s`` stops the request at the first step boundary past the limit."""
        if isinstance(image, (np.ndarray, torch.Tensor)):
            try:
                image = image_from_array(image)
            except ValueError as exc:
                raise InvalidRequestError("image", "<array>", str(exc)) from None
        elif image is not None and not isinstance(image, Image.Image):
            if not isinstance(image, (str, Path, bytes)):
                raise InvalidRequestError("image", type(image).__name__,
                                          "a PIL image, a uint8 array [H, W, 3], the bytes of an image file "
                                          "or a path to one")
            try:
                image = load_image(image)
            except ValueError as exc:
                shown = f"<{len(image)} bytes>" if isinstance(image, bytes) else str(image)[:200]
                raise InvalidRequestError("image", shown, f"a readable image file ({exc})") from None
        request = GenerationRequest(
            prompt=prompt, image=image, width=self.default_width if width is None else width,
            height=self.default_height if height is None else height, fps=fps, motion=motion,
            key_frame_guidance_scale=key_frame_guidance_scale,
            guidance_weight_prompt=guidance_weight_prompt, guidance_weight_image=guidance_weight_image,
            interpolation_guidance_scale=interpolation_guidance_scale,
            noise_augmentation=noise_augmentation, seed=seed, key_frame_steps=key_frame_steps,
            base_frame_steps=base_frame_steps, interpolation_steps=interpolation_steps,
            negative_prompt=negative_prompt,
        )
        return self.generate(request, progress=progress, callback=callback, noise=noise, timeout_s=timeout_s)

    @torch.inference_mode()
    def generate(self, request: GenerationRequest, progress: bool = True,
                 callback: StepCallback | None = None, noise: NoiseSource | None = None,
                 timeout_s: float | None = None) -> VideoOutput:
        request = validate_request(request, self.table.resolution)
        self.check_served(request)
        notices = list(request_warnings(request))
        for message in notices:
            warnings.warn(message, stacklevel=3)
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
                raise InvalidRequestError("timeout_s", _short(timeout_s), "a positive number of seconds")
            callback = _with_deadline(callback, time.monotonic() + timeout_s, float(timeout_s), self.table)
        if request.seed is None and noise is None:
            request = request.with_seed(secrets.randbelow(2**31))
        if not noise:
            assert request.seed is not None  # set just above whenever no noise source is given
            noise = SeededNoise(request.seed, self.device)
        timings: dict[str, float] = {}
        passes = INTERPOLATION_PASSES[request.fps]
        bar = _Progress(request_total_steps(request) + len(video_decode_chunks(request.num_frames)), progress)
        try:
            with self._timed(timings, "text_encoder"):
                text = self.encode_prompt(request.prompt)
            if request.image is None:
                with self._timed(timings, "key_frame"):
                    latent = self.generate_key_frame_latent(
                        text, request.width, request.height, request.key_frame_guidance_scale,
                        request.key_frame_steps, noise, bar, callback)
                with self._timed(timings, "key_frame_decode"):
                    key_frame = self.decode_key_frame(latent)
            else:
                key_frame = request.image
            with self._timed(timings, "key_frame_encode"):
                key_latent = self.encode_key_frame(key_frame, request.width, request.height)
            with self._timed(timings, "base_frames"):
                latents = self.generate_base_frames(
                    text, key_latent, request.motion_score, request.guidance_weight_prompt,
                    request.guidance_weight_image, request.noise_augmentation, request.base_frame_steps,
                    noise, bar, callback)
            for skip_frames in passes:
                with self._timed(timings, f"interpolation_skip{skip_frames}"):
                    latents = self.interpolate(text, latents, skip_frames,
                                               request.interpolation_guidance_scale,
                                               request.interpolation_steps, noise, bar, callback)
            with self._timed(timings, "video_decode"):
                frames = self.decode_video(latents, bar)
        finally:
            bar.close()
        timings["total"] = sum(timings.values())
        if text.tokens.truncated:
            notices.append(truncation_notice(text.tokens))
        return VideoOutput(frames=frames, latents=latents.cpu(), key_frame=key_frame, request=request,
                           prompt_tokens=text.tokens.n_tokens, prompt_truncated=text.tokens.truncated,
                           timings=timings, warnings=tuple(notices))

    def check_served(self, request: GenerationRequest) -> None:
        """Refuse, before any stage runs, a request whose stage calls no profile of the backend fits
        (engines built for other sizes or fps modes): the error names what is served."""
        with_image = request.image is not None
        served = self.backend.served_profiles()
        if not unserved_calls(served, request.width, request.height, request.fps, with_image):
            return
        cover = coverage(self.table, served)
        size = (request.width, request.height)
        other_fps = [fps for fps in cover.fps_modes(with_image) if size in cover.sizes[(fps, with_image)]]
        if other_fps:
            raise InvalidRequestError("fps", request.fps, f"one of {other_fps} at {size[0]}x{size[1]}: the "
                                      f"deployment serves {cover.describe(with_image)}")
        raise InvalidRequestError("width x height", f"{size[0]}x{size[1]}",
                                  f"a size the deployment was built for: {cover.describe(with_image)}")

    # ------------------------------------------------------------------ stages of a request

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> PromptContext:
        """Tokenize (static length S, official truncation) and run the text encoder once."""
        tokens = self.tokenizer(prompt)
        if tokens.truncated:
            message = truncation_notice(tokens)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=3)
        ids = tokens.input_ids.to(self.device, torch.int32)
        mask = tokens.attention_mask.to(self.device, torch.int32)
        context = self.backend.run("text_encoder", {"input_ids": ids, "attention_mask": mask})["context"]
        length = context_length(tokens.n_tokens, tokens.tokens_length)
        return PromptContext(context=context, mask=mask.bool(), length=length, tokens=tokens)

    def _null_context(self, null_embedding: torch.Tensor, like: PromptContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Unconditional rows: zeros with the null embedding at position 0, mask only there."""
        context = torch.zeros_like(like.context)
        context[:, 0] = null_embedding
        mask = torch.zeros_like(like.mask)
        mask[:, 0] = True
        return context, mask

    def _text_inputs(self, text: PromptContext, null_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text inputs of a U-Net stage call: the distinct contexts (TEXT_CONTEXTS: the prompt, the
        null context), once per call; the stage's ``text_rows`` say which rows read which, and every
        loop below lays its rows out in that branch order."""
        null_context, null_mask = self._null_context(null_embedding, text)
        sources = {"prompt": (text.context, text.mask), "null": (null_context, null_mask)}
        return {
            "context": torch.cat([sources[name][0] for name in TEXT_CONTEXTS]),
            "context_mask": torch.cat([sources[name][1] for name in TEXT_CONTEXTS]),
            # The prompt's L for the null context too (quirk 1: official pooling over L positions).
            "context_len": torch.full((len(TEXT_CONTEXTS),), float(text.length), device=self.device),
        }

    @torch.inference_mode()
    def generate_key_frame_latent(self, text: PromptContext, width: int, height: int, scale: float,
                                  steps: int, noise: NoiseSource, progress: _Progress | None = None,
                                  callback: StepCallback | None = None) -> torch.Tensor:
        """Loop A: the key frame latent [1, 4, H/4, W/4] (twice the video resolution), image mode."""
        sampler = key_frame_sampler(steps)
        shape = (1, LATENT_CHANNELS, height // 4, width // 4)
        x = noise.randn(shape, torch.float32, self.device)
        inputs = self._text_inputs(text, self.t2v_null_embedding)  # rows [prompt | null]
        # [x_t | condition (zeros) | mask (zeros)] for both rows; only x_t changes per step.
        inputs["sample"] = torch.zeros((2, 2 * LATENT_CHANNELS + 1) + shape[2:], device=self.device)
        inputs["timestep"] = torch.zeros(2, device=self.device)

        def predict(x: torch.Tensor, t: int) -> torch.Tensor:
            inputs["sample"][:, :LATENT_CHANNELS] = x
            inputs["timestep"].fill_(t)
            eps = self.backend.run("unet_t2v_image", inputs)["eps"]
            return guidance.two_way(eps, scale)

        return self._denoise("key_frame", sampler, x, predict, noise, progress, callback)

    @torch.inference_mode()
    def decode_key_frame(self, latent: torch.Tensor) -> Image.Image:
        """Image MoVQ decode -> clip -> x255 -> truncate -> PIL RGB (2H x 2W)."""
        image = self.backend.run("movq_decoder", {"latent": latent.float()})["image"]
        return Image.fromarray(to_uint8(image)[0])

    @torch.inference_mode()
    def encode_key_frame(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """Pillow resize / centre-crop to width x height, image MoVQ encode -> latent [4, H/8, W/8]."""
        pixels = key_frame_pixels(image, width, height).to(self.device)
        return self.backend.run("movq_encoder", {"image": pixels})["latent"][0]

    @torch.inference_mode()
    def generate_base_frames(self, text: PromptContext, key_latent: torch.Tensor, motion_score: int,
                             weight_prompt: float, weight_image: float, noise_augmentation: int,
                             steps: int, noise: NoiseSource, progress: _Progress | None = None,
                             callback: StepCallback | None = None) -> torch.Tensor:
        """Loop B: 12 base frames [12, 4, h, w] conditioned on the key frame latent, video mode."""
        sampler = base_frame_sampler(steps)
        frames = NUM_BASE_FRAMES
        h, w = key_latent.shape[-2:]
        x = noise.randn((frames, LATENT_CHANNELS, h, w), torch.float32, self.device)
        uniform = noise.rand(tuple(key_latent.shape), key_latent.dtype, self.device)
        noisy_key = sampler.add_noise(key_latent, uniform, noise_augmentation)

        rows = 3 * frames
        inputs = self._text_inputs(text, self.t2v_null_embedding)  # rows [prompt | null | null] x 12
        sample = torch.zeros((3, frames, 2 * LATENT_CHANNELS + 1, h, w), device=self.device)
        # Branches full and image-only carry the noisy key frame on frame 0 (mask 1); uncond: zeros.
        sample[:2, 0, LATENT_CHANNELS:2 * LATENT_CHANNELS] = noisy_key
        sample[:2, 0, 2 * LATENT_CHANNELS] = 1.0
        inputs["sample"] = sample.view(rows, 2 * LATENT_CHANNELS + 1, h, w)
        inputs["timestep"] = torch.zeros(rows, device=self.device)
        inputs["frame_index"] = torch.arange(frames, device=self.device, dtype=torch.float32).repeat(3)
        inputs["noise_aug"] = torch.full((rows,), float(noise_augmentation), device=self.device)
        inputs["motion_score"] = torch.full((rows,), float(motion_score), device=self.device)

        def predict(x: torch.Tensor, t: int) -> torch.Tensor:
            sample[:, :, :LATENT_CHANNELS] = x
            inputs["timestep"].fill_(t)
            eps = self.backend.run("unet_t2v_video", inputs)["eps"]
            return guidance.three_way(eps, weight_prompt, weight_image)

        return self._denoise("base_frames", sampler, x, predict, noise, progress, callback)

    @torch.inference_mode()
    def interpolate(self, text: PromptContext, frames: torch.Tensor, skip_frames: int, scale: float,
                    steps: int, noise: NoiseSource, progress: _Progress | None = None,
                    callback: StepCallback | None = None) -> torch.Tensor:
        """Loop C: three new frames between every pair of neighbours; T frames -> 4T - 3."""
        sampler = interpolation_sampler(steps)
        groups = frames.shape[0] - 1
        h, w = frames.shape[-2:]
        x = noise.randn((groups, 3 * LATENT_CHANNELS, h, w), torch.float32, self.device)
        inputs = self._text_inputs(text, self.interpolation_null_embedding)  # rows [prompt | null] x G
        # [left | x_t (3 frames) | right]; the unconditional half has zero neighbours.
        sample = torch.zeros((2, groups, 5 * LATENT_CHANNELS, h, w), device=self.device)
        sample[0, :, :LATENT_CHANNELS] = frames[:-1]
        sample[0, :, 4 * LATENT_CHANNELS:] = frames[1:]
        inputs["sample"] = sample.view(2 * groups, 5 * LATENT_CHANNELS, h, w)
        inputs["timestep"] = torch.zeros(2 * groups, device=self.device)
        inputs["skip_frames"] = torch.full((2 * groups,), skip_frames, dtype=torch.int32, device=self.device)
        inputs["perturbation_time"] = torch.zeros(2 * groups, device=self.device)
        inputs["temporal_mask"] = torch.cat([torch.ones(groups, device=self.device),
                                             torch.zeros(groups, device=self.device)])

        def predict(x: torch.Tensor, t: int) -> torch.Tensor:
            sample[:, :, LATENT_CHANNELS:4 * LATENT_CHANNELS] = x
            inputs["timestep"].fill_(t)
            v = self.backend.run("unet_interp", inputs)["v"]
            return guidance.two_way(v, scale)

        new_frames = self._denoise("interpolation", sampler, x, predict, noise, progress, callback)
        return interleave(frames, new_frames)

    @torch.inference_mode()
    def decode_video(self, latents: torch.Tensor, progress: _Progress | None = None) -> npt.NDArray[np.uint8]:
        """Video MoVQ decode in the official chunks (``chunk(T // 4)``) -> uint8 [T, H, W, 3].

        With ``decode_on_device`` (default) the uint8 frames stay on the device and are copied to the
        host once at the end, so a GPU never waits for the host between chunks."""
        on_device: list[torch.Tensor] = []
        on_host: list[npt.NDArray[np.uint8]] = []
        start = 0
        if progress is not None:
            progress.stage("video_decode")
        for size in video_decode_chunks(latents.shape[0]):
            chunk = latents[start:start + size].float().contiguous()
            frames = self.backend.run("video_movq_decoder", {"latent": chunk})["frames"]
            if self.decode_on_device:
                on_device.append(to_uint8_tensor(frames))
            else:
                on_host.append(to_uint8(frames))
            start += size
            if progress is not None:
                progress.update()
        return torch.cat(on_device).cpu().numpy() if self.decode_on_device else np.concatenate(on_host)

    # ------------------------------------------------------------------ the one loop

    def _denoise(self, stage: str, sampler: Sampler, x: torch.Tensor,
                 predict: Callable[[torch.Tensor, int], torch.Tensor], noise: NoiseSource,
                 progress: _Progress | None, callback: StepCallback | None) -> torch.Tensor:
        """Run ``sampler`` from ``x``: predict (stage call + guidance), draw variance noise, step."""
        if progress is not None:
            progress.stage(stage)
        with self.backend.loop_scope(self.table.stage_of_loop(stage)):
            for index, t in enumerate(sampler.timesteps):
                guided = predict(x, t)
                step_noise = (noise.randn(guided.shape, guided.dtype, self.device) if sampler.draws_noise(t)
                              else None)
                x = sampler.step(guided, t, x, step_noise)
                if progress is not None:
                    progress.update()
                if callback is not None and callback(StepInfo(stage, index, len(sampler), t, x)) is False:
                    raise GenerationCancelled(stage, index)
        return x

    @contextmanager
    def _timed(self, timings: dict[str, float], name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[name] = time.perf_counter() - start


def truncation_notice(tokens: TokenizedPrompt) -> str:
    return (f"prompt has {tokens.n_tokens_requested} tokens (with EOS); the model reads "
            f"{tokens.tokens_length}: it was truncated to the first {tokens.tokens_length - 1} "
            "pieces + EOS, as the official pipeline does")


def _with_deadline(callback: StepCallback | None, deadline: float, limit_s: float,
                   table: StageTable) -> StepCallback:
    """Wrap the per-step callback so that a step ending past ``deadline`` stops the request."""

    def check(info: StepInfo) -> bool | None:
        if time.monotonic() > deadline:
            raise GenerationTimeout(info.stage, info.step, limit_s, table.stage_of_loop(info.stage))
        return None if callback is None else callback(info)

    return check


def interleave(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Base frames [T, 4, h, w] and per-gap triples [T - 1, 12, h, w] -> [4T - 3, 4, h, w]: base frame k
    at index 4k, group g's frames at 4g + 1 .. 4g + 3 (channels frame-major)."""
    groups = base.shape[0] - 1
    triples = new.reshape(groups, 3, LATENT_CHANNELS, *new.shape[-2:])
    body = torch.cat([base[:-1, None], triples], dim=1).flatten(0, 1)
    return torch.cat([body, base[-1:]])
