"""The ``kvt`` command line. Subcommands mirror the workflow:

    kvt generate "PROMPT" --out video.mp4     generate (embedded tiny preset unless --weights DIR)
    kvt generate "PROMPT" --out v.mp4 --backend onnxruntime --onnx DIR   the same from an ONNX export
    kvt generate "PROMPT" --out v.mp4 --backend tensorrt --engines DIR   from TensorRT plans (kvt build)
    kvt generate "PROMPT" --out v.mp4 --triton HOST:PORT [--protocol grpc]   on a Triton server
    kvt make-weights --preset tiny --out DIR  write a checkpoint directory with seeded random weights
    kvt convert-weights DIR --out DIR         rewrite official .pt checkpoints as safetensors (same keys)
    kvt stages [--preset full] [--json]       print the stage contract table

Exit codes: 0 done, 2 invalid input (nothing is written), 130 cancelled, 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 130

_DTYPES = ("float32", "float16", "bfloat16")


class UsageError(ValueError):
    """A command-line value is wrong (exit code 2)."""


def _preset(name: str):
    from ..models.presets import get_preset

    try:
        return get_preset(name)
    except ValueError as exc:
        raise UsageError(f"--preset: {exc}") from None


def _err(message: str) -> None:
    print(f"kvt: {message}", file=sys.stderr)


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _check_device(device: str) -> None:
    import torch

    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: allowed: cpu, cuda, cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'no GPU found' if torch.backends.cuda.is_built() else 'built without CUDA'})")


# -------------------------------------------------------------------------------------- generate

def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video from a prompt (and optionally an image)",
                       description="Text-to-video / image-to-video. Without --weights the embedded tiny "
                                   "preset runs with seeded random weights: its output is noise, useful "
                                   "only to check the installation.")
    p.add_argument("prompt", help="text description of the video")
    p.add_argument("--out", required=True, help="output file, .mp4 or .gif")
    p.add_argument("--image", help="condition on this image (image-to-video)")
    p.add_argument("--fps", default="low", help="low (12 frames), medium (45) or high (177)")
    p.add_argument("--motion", default="medium", help="low, medium, high or extreme")
    p.add_argument("--width", type=int, help="frame width, multiple of 64 (default: 512; tiny preset 64)")
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
    p.add_argument("--triton", metavar="HOST:PORT",
                   help="run the request on a Triton server (model kandinsky_video; `kvt triton-repo`)")
    p.add_argument("--protocol", choices=("http", "grpc"),
                   help="with --triton: http (default) or grpc (streams per-step progress)")
    p.add_argument("--providers", metavar="LIST",
                   help="comma-separated ONNX Runtime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider "
                        "(default: CUDA then CPU where onnxruntime-gpu is installed, else CPU)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu; onnxruntime: where its provider runs)")
    p.add_argument("--dtype", choices=_DTYPES, help="U-Net weight dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--text-encoder-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--key-frame-guidance-scale", type=float, default=5.0)
    p.add_argument("--guidance-weight-prompt", type=float, default=5.0)
    p.add_argument("--guidance-weight-image", type=float, default=2.0)
    p.add_argument("--interpolation-guidance-scale", type=float, default=0.5)
    p.add_argument("--noise-augmentation", type=int, default=20)
    p.add_argument("--key-frame-steps", type=int, default=50, help="loop A steps (key frame image)")
    p.add_argument("--base-frame-steps", type=int, default=50, help="loop B steps (12 base frames)")
    p.add_argument("--interpolation-steps", type=int, default=10, help="loop C steps per pass")
    p.add_argument("--playback-fps", type=float, help="frames per second of the file (default: frames / 5.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate)


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


def _request_from_args(args: argparse.Namespace, image, width: int | None, height: int | None):
    from .request import GenerationRequest

    return GenerationRequest(
        prompt=args.prompt, image=image, width=width, height=height, fps=args.fps, motion=args.motion,
        key_frame_guidance_scale=args.key_frame_guidance_scale,
        guidance_weight_prompt=args.guidance_weight_prompt,
        guidance_weight_image=args.guidance_weight_image,
        interpolation_guidance_scale=args.interpolation_guidance_scale,
        noise_augmentation=args.noise_augmentation, seed=args.seed,
        key_frame_steps=args.key_frame_steps, base_frame_steps=args.base_frame_steps,
        interpolation_steps=args.interpolation_steps,
    )


def _generate_on_triton(args: argparse.Namespace, out: Path) -> int:
    """Validate what can be validated here (the server checks sizes against its own ranges), send."""
    from ..triton_models.cli import generate_via_triton
    from .images import load_image
    from .request import validate_request
    from .stages import ResolutionRange

    image = load_image(args.image) if args.image else None
    request = _request_from_args(args, image, args.width, args.height)
    # Everything but the size range, which only the server's export knows: checked with the widest one.
    probe = request.__class__(**{**request.__dict__, "width": args.width or 64, "height": args.height or 64})
    validate_request(probe, ResolutionRange(64, 64, 1024))
    path = generate_via_triton(args.triton, args.protocol or "http", request, out, progress=not args.no_progress)
    print(path)
    return EXIT_OK


def _generate(args: argparse.Namespace) -> int:
    from ..models.checkpoints import check_checkpoint_dir
    from .images import load_image
    from .pipeline import KandinskyVideoPipeline, _default_size_for
    from .request import validate_request
    from .stages import stage_table_for
    from .video_io import check_output_path

    # Everything a user can get wrong is checked before any model is loaded.
    source = _check_backend_options(args)
    onnx = source == "onnxruntime"
    if args.device is not None:
        _check_device(args.device)
    out = check_output_path(args.out)
    if args.playback_fps is not None and not args.playback_fps > 0:
        raise UsageError(f"--playback-fps {args.playback_fps}: must be a positive number")
    if source == "triton":
        return _generate_on_triton(args, out)
    if source == "tensorrt":
        from ..engines.manifest import EngineManifest
        from .backends.tensorrt_backend import stage_table_of

        resolution = stage_table_of(EngineManifest.read(args.engines), Path(args.engines)).resolution
        default_size = (resolution.opt, resolution.opt)
    elif onnx:
        from ..export.manifest import ExportManifest
        from .backends.onnxruntime_backend import ProviderError, resolve_providers

        manifest = ExportManifest.read(args.onnx)
        manifest.verify_files(args.onnx, list(manifest.stage_table().names))  # sizes: cheap
        try:
            resolve_providers(args.providers, args.device)
        except (ProviderError, ImportError) as exc:
            raise UsageError(f"--providers: {exc}") from None
        resolution = manifest.stage_table().resolution
        default_size = (resolution.opt, resolution.opt)
    elif args.weights:
        config, _ = check_checkpoint_dir(args.weights, args.text_encoder)
    else:
        config = _preset(args.preset).config
    if source == "torch":
        default_size = _default_size_for(config)
        resolution = stage_table_for(config).resolution
    image = load_image(args.image) if args.image else None
    request = _request_from_args(args, image, args.width or default_size[0], args.height or default_size[1])
    validate_request(request, resolution)

    start = time.perf_counter()
    device = args.device or "cpu"
    if source == "tensorrt":
        pipeline = KandinskyVideoPipeline.from_engines(args.engines, device=args.device or "cuda",
                                                       cuda_graphs=args.cuda_graphs)
        source = f"TensorRT engines {args.engines}"
    elif onnx:
        pipeline = KandinskyVideoPipeline.from_onnx(args.onnx, providers=args.providers, device=args.device)
        providers = sorted({p[0] for p in pipeline.backend.providers.values()})
        source = f"ONNX export {args.onnx} on onnxruntime ({', '.join(providers)})"
    elif args.weights:
        pipeline = KandinskyVideoPipeline.from_checkpoint_dir(
            args.weights, args.text_encoder, device=device, dtype=_dtype(args.dtype),
            text_encoder_dtype=_dtype(args.text_encoder_dtype))
        source = f"weights {args.weights}"
    else:
        pipeline = KandinskyVideoPipeline.from_preset(args.preset, seed=0, device=device,
                                                      dtype=_dtype(args.dtype))
        source = f"the embedded {args.preset!r} preset with seeded random weights (the video is noise)"
        _err(f"no --weights given: running {source}")
    loaded = time.perf_counter()
    output = pipeline.generate(request, progress=not args.no_progress)
    if output.prompt_truncated:
        _err(f"prompt truncated to {output.prompt_tokens} tokens (it has more than the model reads)")
    path = output.save(out, args.playback_fps)
    done = time.perf_counter()
    _err(f"{output.num_frames} frames {request.width}x{request.height} (fps {request.fps}, seed "
         f"{output.seed}) in {output.timings['total']:.2f} s "
         f"(load {loaded - start:.2f} s, total {done - start:.2f} s) from {source}")
    print(path)
    return EXIT_OK


# ---------------------------------------------------------------------------------- make-weights

def _add_make_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-weights", help="write a checkpoint directory with seeded random weights",
                       description="Writes configs.json, t2v.pt, interpolation.pt, movq.pt, video_movq.pt, "
                                   "t5_projections.pt and a T5 folder in the official layout.")
    p.add_argument("--preset", default="tiny", help="tiny or full (full needs ~40 GB of RAM in float32)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=_DTYPES, help="cast stored weights (e.g. float16 for full size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(func=_make_weights)


def _make_weights(args: argparse.Namespace) -> int:
    from ..models.checkpoints import random_models, write_checkpoint_dir

    preset = _preset(args.preset)
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists (pass --overwrite to replace it)")
    models = random_models(preset, seed=args.seed)
    path = write_checkpoint_dir(models, args.out, overwrite=args.overwrite, dtype=_dtype(args.dtype))
    _err(f"wrote preset {preset.name!r} (seed {args.seed}) to {path}")
    print(path)
    return EXIT_OK


# ------------------------------------------------------------------------------- convert-weights

def _add_convert_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-weights", help="rewrite official .pt checkpoints as safetensors (same keys)",
                       description="Reads each .pt once with weights_only=True (a pickle that would run "
                                   "code is refused) and writes <stem>.safetensors, configs.json and the "
                                   "Flan-UL2 folder (pickled shards rewritten as safetensors) to --out, "
                                   "with sizes and SHA-256 of every file in kvt-weights.json.")
    p.add_argument("weights", help="checkpoint directory in the official layout")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--text-encoder", help="Flan-UL2 folder (default: configs.json text_encoder.weights_path)")
    p.add_argument("--keep-text-encoder-in-place", action="store_true",
                   help="do not copy the Flan-UL2 folder; the new configs.json points at it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=_convert_weights)


def _convert_weights(args: argparse.Namespace) -> int:
    from ..models.convert import convert_checkpoint_dir

    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists (pass --overwrite to replace it)")
    path = convert_checkpoint_dir(args.weights, args.out, args.text_encoder, overwrite=args.overwrite,
                                  include_text_encoder=not args.keep_text_encoder_in_place,
                                  report=lambda message: _err(message))
    _err(f"wrote {path} (safetensors; load it with --weights {path})")
    print(path)
    return EXIT_OK


# ---------------------------------------------------------------------------------------- stages

def _add_stages(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stages", help="print the stage contract table")
    p.add_argument("--preset", default="full")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_stages)


def _stages(args: argparse.Namespace) -> int:
    from .stages import stage_table_for

    table = stage_table_for(_preset(args.preset).config)
    if args.json:
        rows = []
        for stage in table:
            rows.append({
                "stage": stage.name, "network": stage.network,
                "inputs": [{"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape)} for t in stage.inputs],
                "outputs": [{"name": t.name, "dtype": t.dtype.value, "shape": list(t.shape)} for t in stage.outputs],
                "profiles": [{k: [d.min, d.opt, d.max, d.multiple_of] for k, d in p.items()}
                             for p in stage.profiles],
            })
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    for stage in table:
        print(f"{stage.name}  ({stage.network})  {stage.doc}")
        for kind, tensors in (("in ", stage.inputs), ("out", stage.outputs)):
            for t in tensors:
                print(f"   {kind} {t.name:<18} {t.dtype.value:<8} [{', '.join(map(str, t.shape))}]")
        for i, profile in enumerate(stage.profiles):
            dims = ", ".join(f"{k} {d.min}/{d.opt}/{d.max}" + (f" step {d.multiple_of}" if d.multiple_of > 1 else "")
                             for k, d in profile.items())
            print(f"   profile {i}: {dims}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvt", description="Kandinsky Video 1.1 deployment toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_make_weights(sub)
    _add_convert_weights(sub)
    _add_stages(sub)
    from ..engines.cli import add_build_parser, add_doctor_parser
    from ..export.cli import add_export_parser
    from ..triton_models.cli import add_triton_repo_parser

    add_export_parser(sub)
    add_build_parser(sub)
    add_triton_repo_parser(sub)
    add_doctor_parser(sub)
    from ..benchmarks.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..export.manifest import ExportManifestError
    from ..models.checkpoints import CheckpointError
    from ..models.configs import ConfigError
    from .backends.onnxruntime_backend import ProviderError
    from .images import ImageInputError
    from .pipeline import GenerationCancelled
    from .request import InvalidRequestError
    from .video_io import OutputPathError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..engines.manifest import EngineManifestError
    from ..engines.runner import EngineError
    from ..engines.trt_env import TensorRTUnavailable
    from ..triton_models.client import TritonInvalidRequest, TritonRequestError

    try:
        return args.func(args)
    except (InvalidRequestError, CheckpointError, ConfigError, ImageInputError, OutputPathError,
            ExportManifestError, EngineManifestError, ProviderError, UsageError, TritonInvalidRequest) as exc:
        _err(f"error: {exc}")
        return EXIT_INVALID
    except (TensorRTUnavailable, EngineError, TritonRequestError) as exc:
        _err(f"error: {exc}")
        return EXIT_FAILURE
    except (GenerationCancelled, KeyboardInterrupt):
        _err("cancelled; nothing was written")
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
