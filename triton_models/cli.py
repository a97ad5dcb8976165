"""``kvt triton-repo`` and the client side of ``kvt generate --triton HOST:PORT``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


def _say(message: str, end: str = "\n") -> None:
    print(f"kvt triton: {message}", file=sys.stderr, end=end, flush=True)


def add_triton_repo_parser(sub: argparse._SubParsersAction) -> None:
    from .configs import BACKENDS

    p = sub.add_parser(
        "triton-repo", help="generate a Triton model repository (stage models + orchestrator)",
        description="Writes one model per stage (tensorrt_plan, onnxruntime_onnx, or a python model running "
                    "ONNX Runtime), the text_encoding ensemble, and the kandinsky_video orchestrator (BLS) with "
                    "its decoupled kandinsky_video_stream variant. Configs come from the stage table.")
    p.add_argument("--out", required=True, help="repository directory to create")
    p.add_argument("--backend", required=True, choices=BACKENDS,
                   help="tensorrt (plans of `kvt build`), onnxruntime (Triton's ORT backend) or python-ort "
                        "(ONNX Runtime inside python models: Triton builds with the python backend only)")
    p.add_argument("--engines", metavar="DIR", help="engine directory of `kvt build` (--backend tensorrt)")
    p.add_argument("--onnx", metavar="DIR", help="export directory of `kvt export` (default for tensorrt: the "
                                                 "export the engines were built from)")
    p.add_argument("--tensorrt-version", help="use plans built with this TensorRT version (the server's)")
    p.add_argument("--instances", action="append", default=[], metavar="MODEL=N",
                   help="instances of a model (per GPU listed by --gpus), e.g. unet_t2v_video=2; repeatable")
    p.add_argument("--gpus", action="append", default=[], metavar="MODEL=I[,J]",
                   help="GPUs a model's instances run on, e.g. video_movq_decoder=1; repeatable")
    p.add_argument("--orchestrator-device", choices=("cpu", "cuda"),
                   help="where the orchestrator keeps tensors (default: cuda unless python-ort)")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads per python-ort stage model and orchestrator torch threads")
    p.add_argument("--no-warmup", action="store_true", help="no model_warmup in tensorrt/onnxruntime configs")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="the orchestrator stops a request at the first sampler step past this (default 600)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run_triton_repo)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} {value!r}: expected MODEL=VALUE")
        out[name.strip()] = rest.strip()
    return out


def _placements(args: argparse.Namespace, models: list[str]):
    from .configs import Placement

    counts = _pairs(args.instances, "--instances")
    gpus = _pairs(args.gpus, "--gpus")
    placements = {}
    for name in set(counts) | set(gpus):
        if name not in models:
            raise ValueError(f"--instances/--gpus: unknown model {name!r}; models: {', '.join(models)}")
        try:
            count = int(counts.get(name, "1"))
            ids = tuple(int(i) for i in gpus[name].split(",")) if name in gpus else ()
        except ValueError:
            raise ValueError(f"--instances/--gpus {name}: counts and GPU ids are integers") from None
        if count < 1 or any(i < 0 for i in ids):
            raise ValueError(f"--instances/--gpus {name}: count >= 1 and GPU ids >= 0 are allowed")
        placements[name] = Placement(count, ids)
    return placements


def run_triton_repo(args: argparse.Namespace) -> int:
    from ..engines.manifest import EngineManifestError
    from ..export.manifest import ExportManifestError
    from . import configs
    from .repository import RepositoryError, build_repository
    from ..runtime.stages import build_stage_table, ModelDims

    models = [*build_stage_table(ModelDims(1, 1)).names, configs.TOKENIZER_MODEL, configs.ORCHESTRATOR_MODEL,
              configs.STREAM_MODEL]
    try:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be >= 1")
        if not args.request_timeout > 0:
            raise ValueError(f"--request-timeout {args.request_timeout}: must be a positive number of seconds")
        options = configs.RepositoryOptions(backend=args.backend, placements=_placements(args, models),
                                            orchestrator_device=args.orchestrator_device,
                                            intra_op_threads=args.threads, warmup=not args.no_warmup,
                                            request_timeout_s=args.request_timeout)
        path = build_repository(args.out, args.onnx, args.engines, options,
                                tensorrt_version=args.tensorrt_version, overwrite=args.overwrite)
    except (ValueError, RepositoryError, ExportManifestError, EngineManifestError) as exc:
        _say(f"error: {exc}")
        return EXIT_INVALID
    _say(f"wrote a {args.backend} repository to {path}; serve it with "
         f"`tritonserver --model-repository={path}`")
    print(path)
    return EXIT_OK


def generate_via_triton(url: str, protocol: str, request, out: str | Path, progress: bool = True) -> Path:
    """Send ``request`` (a GenerationRequest) to the server at ``url`` and write the video to ``out``.

    Progress is streamed (kandinsky_video_stream) over gRPC; over HTTP the call waits for the frames.
    Raises TritonRequestError with the server's message when it refuses or fails the request.
    """
    from ..runtime.video_io import check_output_path
    from .client import Progress, TritonRequestError, TritonVideoClient

    out = check_output_path(out)
    with TritonVideoClient(url, protocol) as client:
        if not client.is_ready():
            raise TritonRequestError(f"no ready Triton server with model {client.model!r} at {url} ({protocol})")

        def show(step: Progress) -> None:
            _say(f"{step.stage} step {step.step + 1}/{step.num_steps} ({step.done}/{step.total})",
                 end="\n" if step.done == step.total else "\r")

        if progress and protocol != "grpc":
            _say("progress is streamed over gRPC only (--protocol grpc); waiting for the frames")
        video = client.generate(request, progress=show if progress and protocol == "grpc" else None)
    if video.prompt_truncated:
        _say(f"prompt truncated to {video.prompt_tokens} tokens (it has more than the model reads)")
    path = video.save(out)
    _say(f"{video.num_frames} frames, seed {video.seed}, server time "
         f"{video.timings.get('server_total', float('nan')):.2f} s")
    return path
