"""``kvt generate``: one video from a prompt (and optionally an image), on any source or a Triton server.

Everything a user can get wrong is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from kvt.cli.common import DTYPES, UsageError, add_threads_option, check_device, dtype, preset, say, threads
from kvt.contract.errors import EXIT_OK
from kvt.contract.request import GenerationRequest, request_warnings, validate_request
from kvt.contract.stages import ResolutionRange
from kvt.formats.export_dir import ExportManifest
from kvt.runtime.backends.onnxruntime_backend import ProviderError, resolve_providers
from kvt.runtime.images import describe_key_frame_fit, load_image
from kvt.runtime.loading import PipelineSource
from kvt.runtime.pipeline import KandinskyVideoPipeline
from kvt.runtime.video_io import check_output_path
from kvt.serving.client import PROTOCOLS, TritonVideoClient, generate_via_triton

_D = GenerationRequest  # the defaults' only home


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video from a prompt (and optionally an image)",
                       description="Text-to-video / image-to-video. Without --weights the embedded tiny "
                                   "preset runs with seeded random weights: its output is noise, useful "
                                   "only to check the installation.")
    p.add_argument("prompt", help="text description of the video (may be empty: EOS only, as officially)")
    p.add_argument("--negative-prompt", help="accepted for drop-in compatibility and ignored, as by the "
                                             "official pipeline (a warning says so)")
    p.add_argument("--out", required=True, help="output file, .mp4 or .gif")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--image", help="condition on this image (image-to-video)")
    p.add_argument("--fps", default=_D.fps, help="low (12 frames), medium (45) or high (177)")
    p.add_argument("--motion", default=_D.motion,
                   help="low, medium, high or extreme ('normal', the official default, is medium)")
    p.add_argument("--width", type=int, help="frame width, multiple of 64 (default: 512; tiny preset 64); "
                                             "torch / onnxruntime: width x height up to 1024 x 1024 pixels, "
                                             "engines and Triton: the built range")
    p.add_argument("--height", type=int, help="frame height, multiple of 64 (default: 512; tiny preset 64)")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    p.add_argument("--weights", help="checkpoint directory in the official layout (t2v.pt, ...)")
    p.add_argument("--text-encoder", help="Flan-UL2 folder (default: configs.json text_encoder.weights_path)")
    p.add_argument("--preset", default="tiny", help="preset for random weights when --weights is not given")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"),
                   help="torch (checkpoints or a preset), onnxruntime (an export directory, --onnx) or "
                        "tensorrt (an engine directory, --engines)")
    p.add_argument("--onnx", metavar="DIR", help="export directory of `kvt export` (with --backend onnxruntime)")
    p.add_argument("--engines", metavar="DIR", help="engine directory of `kvt build` (with --backend tensorrt)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the fixed-shape U-Net calls as CUDA graphs (with --backend tensorrt)")
    p.add_argument("--triton", metavar="URL",
                   help="run the request on a Triton server: HOST:PORT, grpc://HOST:PORT or http://HOST:PORT "
                        "(model kandinsky_video of `kvt triton-repo`); size, fps and ranges come from the server")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="with --triton HOST:PORT: grpc (default: progress streamed, Ctrl-C cancels the "
                        "server's work) or http (cannot cancel)")
    p.add_argument("--providers", metavar="LIST",
                   help="comma-separated ONNX Runtime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider "
                        "(default: CUDA then CPU where onnxruntime-gpu is installed, else CPU)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu; onnxruntime: where its provider runs)")
    p.add_argument("--dtype", choices=DTYPES, help="U-Net weight dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--text-encoder-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="T5 encoder weight dtype (torch backend)")
    p.add_argument("--key-frame-guidance-scale", type=float, default=_D.key_frame_guidance_scale,
                   help="guidance of the key frame image (loop A)")
    p.add_argument("--guidance-weight-prompt", type=float, default=_D.guidance_weight_prompt,
                   help="prompt guidance of the base frames (loop B)")
    p.add_argument("--guidance-weight-image", type=float, default=_D.guidance_weight_image,
                   help="image guidance of the base frames (loop B)")
    p.add_argument("--interpolation-guidance-scale", type=float, default=_D.interpolation_guidance_scale,
                   help="guidance of the interpolation (loop C)")
    p.add_argument("--noise-augmentation", type=int, default=_D.noise_augmentation,
                   help="noise timestep added to the key frame latent")
    p.add_argument("--key-frame-steps", type=int, default=_D.key_frame_steps, help="loop A steps (key frame image)")
    p.add_argument("--base-frame-steps", type=int, default=_D.base_frame_steps, help="loop B steps (12 base frames)")
    p.add_argument("--interpolation-steps", type=int, default=_D.interpolation_steps, help="loop C steps per pass")
    p.add_argument("--playback-fps", type=float, help="frames per second of the file (default: frames / 5.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=run)


# Options that belong to one source of networks; given with another they are errors, not ignored.
_BACKEND_FLAGS = {
    "torch": ("--weights", "--text-encoder", "--dtype", "--text-encoder-dtype", "--preset"),
    "onnxruntime": ("--onnx", "--providers"),
    "tensorrt": ("--engines", "--cuda-graphs"),
    "triton": ("--triton", "--protocol"),
}
_NON_DEFAULT = {"--text-encoder-dtype": "float32", "--preset": "tiny"}


def _given(args: argparse.Namespace, flag: str) -> bool:
    value = getattr(args, flag[2:].replace("-", "_"))
    return value not in (None, False) and value != _NON_DEFAULT.get(flag)


def _check_backend_options(args: argparse.Namespace) -> str:
    """Which source runs the request (torch, onnxruntime, tensorrt or triton); mixed options fail."""
    source = "triton" if args.triton else args.backend
    if args.triton and args.backend != "torch":
        raise UsageError(f"--triton runs the request on the server's own backend; drop --backend {args.backend}")
    for other, flags in _BACKEND_FLAGS.items():
        if other == source:
            continue
        for flag in flags:
            if _given(args, flag):
                needs = "--triton HOST:PORT" if other == "triton" else f"--backend {other}"
                raise UsageError(f"{flag} needs {needs} (this request runs on {source})")
    if source == "triton" and args.device:
        raise UsageError("--device applies to in-process backends; the Triton server places its own models")
    if source == "onnxruntime" and not args.onnx:
        raise UsageError("--backend onnxruntime needs --onnx DIR (an export directory written by `kvt export`)")
    if source == "tensorrt" and not args.engines:
        raise UsageError("--backend tensorrt needs --engines DIR (an engine directory written by `kvt build`)")
    return source


def _request_from_args(args: argparse.Namespace, image: object, width: int | None,
                       height: int | None) -> GenerationRequest:
    return GenerationRequest(
        prompt=args.prompt, image=image, width=width, height=height,  # type: ignore[arg-type]
        fps=args.fps, motion=args.motion,
        key_frame_guidance_scale=args.key_frame_guidance_scale,
        guidance_weight_prompt=args.guidance_weight_prompt,
        guidance_weight_image=args.guidance_weight_image,
        interpolation_guidance_scale=args.interpolation_guidance_scale,
        noise_augmentation=args.noise_augmentation, seed=args.seed,
        key_frame_steps=args.key_frame_steps, base_frame_steps=args.base_frame_steps,
        interpolation_steps=args.interpolation_steps, negative_prompt=args.negative_prompt,
    )


def _generate_on_triton(args: argparse.Namespace, out: Path) -> int:
    """Ask the server what it serves (default size, size range, fps modes), validate against that,
    send."""
    image = load_image(args.image) if args.image else None
    # Everything but the size (which the server decides) is checked before any connection.
    validate_request(_request_from_args(args, image, 64, 64), ResolutionRange(64, 64, 64))
    with TritonVideoClient(args.triton, args.protocol) as client:
        client.require_ready()
        info = client.server_info()
        width, height = args.width or info.default_width, args.height or info.default_height
        request = _request_from_args(args, image, width, height)
        request = validate_request(request, ResolutionRange(info.resolution[0], info.default_width, info.resolution[1]))
        if request.fps not in info.fps_modes:
            raise UsageError(f"--fps {request.fps}: the server serves fps {', '.join(info.fps_modes)} "
                             f"({info.served})")
        for message in request_warnings(request):
            say("", f"warning: {message}")
        path = generate_via_triton(client, request, out, progress=not args.no_progress,
                                   report=lambda message, end="\n": say("triton", message, end))
    print(path)
    return EXIT_OK


def _source(args: argparse.Namespace, kind: str) -> PipelineSource:
    if kind == "tensorrt":
        return PipelineSource.engines(args.engines, device=args.device or "cuda", cuda_graphs=args.cuda_graphs)
    if kind == "onnxruntime":
        return PipelineSource.onnx(args.onnx, providers=args.providers, device=args.device)
    device = args.device or "cpu"
    if args.weights:
        return PipelineSource.checkpoint(args.weights, args.text_encoder, device=device, dtype=dtype(args.dtype),
                                         text_encoder_dtype=dtype(args.text_encoder_dtype) or torch.float32)
    return PipelineSource.preset(preset(args.preset).name, seed=0, device=device, dtype=dtype(args.dtype))


def run(args: argparse.Namespace) -> int:
    kind = _check_backend_options(args)
    if args.device is not None:
        check_device(args.device)
    out = check_output_path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists; pass --overwrite to replace it, or choose another name")
    if args.playback_fps is not None and not args.playback_fps > 0:
        raise UsageError(f"--playback-fps {args.playback_fps}: must be a positive number")
    if kind == "triton":
        return _generate_on_triton(args, out)
    source = _source(args, kind)
    if kind == "onnxruntime":
        manifest = ExportManifest.read(args.onnx)
        manifest.verify_files(args.onnx, list(manifest.stage_table().names))  # sizes: cheap
        try:
            resolve_providers(args.providers, args.device)
        except (ProviderError, ImportError) as exc:
            raise UsageError(f"--providers: {exc}") from None
    resolution = source.stage_table().resolution
    width, height = source.default_size()
    image = load_image(args.image) if args.image else None
    request = _request_from_args(args, image, args.width or width, args.height or height)
    request = validate_request(request, resolution)

    if image is not None:
        fit = describe_key_frame_fit(image.size, request.width, request.height)
        if fit:
            say("", f"{fit} (the model's input is width x height)")

    start = time.perf_counter()
    used_threads = threads(args)
    if kind == "torch" and not args.weights:
        say("", f"no --weights given: running {source.describe()}")
    pipeline = KandinskyVideoPipeline.from_source(source)
    described = source.describe()
    if kind == "onnxruntime":
        providers = sorted({p[0] for p in getattr(pipeline.backend, "providers", {}).values()})
        described += f" on onnxruntime ({', '.join(providers)})"
    loaded = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each one is said once, below, not in the bar
        output = pipeline.generate(request, progress=not args.no_progress)
    for message in output.warnings:  # the truncation notice among them
        say("", f"warning: {message}")
    say("", f"encoding {output.num_frames} frames into {out.name}")  # seconds at fps high: not silent
    path = output.save(out, args.playback_fps)
    done = time.perf_counter()
    playback = args.playback_fps or output.playback_fps
    say("", f"{output.num_frames} frames {request.width}x{request.height} (fps {request.fps}, motion "
            f"{request.motion}, seed {output.seed}) in {output.timings['total']:.2f} s "
            f"(load {loaded - start:.2f} s, total {done - start:.2f} s, {used_threads} CPU thread"
            f"{'s' if used_threads != 1 else ''}) from {described}; {path.stat().st_size:,} bytes, "
            f"{output.num_frames / playback:.1f} s at {playback:g} frames/s")
    print(path)
    return EXIT_OK
