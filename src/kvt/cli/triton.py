"""``kvt triton-repo``: a Triton model repository (stage models, text ensemble, orchestrator)."""

from __future__ import annotations

import argparse

from kvt.cli.common import UsageError, say
from kvt.contract.errors import EXIT_OK
from kvt.contract.stages import stage_names
from kvt.formats.triton_repo import BACKENDS, ORCHESTRATOR_MODEL, STREAM_MODEL, TOKENIZER_MODEL
from kvt.serving.generator.configs import TENSORRT_ALLOCATION, Placement, RepositoryOptions
from kvt.serving.generator.repository import build_repository

_D = RepositoryOptions()  # the defaults' only home


def register(sub: argparse._SubParsersAction) -> None:
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
                   help="GPUs a model's instances run on, e.g. video_movq_decoder=1; repeatable. Models "
                        "without one run on GPU 0, so one request's calls stay on one GPU (serve several "
                        "GPUs with one server per GPU behind a load balancer)")
    p.add_argument("--orchestrator-device", choices=("cpu", "cuda"),
                   help="where the orchestrator keeps tensors (default: cuda unless python-ort)")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads per python-ort stage model and orchestrator torch threads")
    p.add_argument("--no-warmup", action="store_true", help="no model_warmup in tensorrt/onnxruntime configs")
    p.add_argument("--request-timeout", type=float, default=_D.request_timeout_s, metavar="SECONDS",
                   help="the orchestrator stops a request at the first sampler step past this "
                        f"(default {_D.request_timeout_s:g}); the client gets UNAVAILABLE")
    p.add_argument("--max-queue", type=int, default=_D.max_queue_size, metavar="N",
                   help="orchestrator requests waiting beyond this are refused at once with UNAVAILABLE "
                        f"(default {_D.max_queue_size})")
    p.add_argument("--queue-timeout", type=float, default=_D.queue_timeout_s, metavar="SECONDS",
                   help=f"a request queued longer is refused (default {_D.queue_timeout_s:g})")
    p.add_argument("--stage-timeout", type=float, default=_D.stage_timeout_s, metavar="SECONDS",
                   help="one stage call taking longer fails its request with UNAVAILABLE "
                        f"(default {_D.stage_timeout_s:g})")
    p.add_argument("--tensorrt-allocation", choices=TENSORRT_ALLOCATION, default=_D.tensorrt_allocation,
                   help="TensorRT backend execution_context_allocation_strategy: STATIC holds each context's "
                        "activation memory for its largest profile; ON_PROFILE_CHANGE reallocates per profile")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"{flag} {value!r}: expected MODEL=VALUE")
        out[name.strip()] = rest.strip()
    return out


def _placements(args: argparse.Namespace, models: list[str]) -> dict[str, Placement]:
    counts = _pairs(args.instances, "--instances")
    gpus = _pairs(args.gpus, "--gpus")
    placements = {}
    for name in set(counts) | set(gpus):
        if name not in models:
            raise UsageError(f"--instances/--gpus: unknown model {name!r}; models: {', '.join(models)}")
        try:
            count = int(counts.get(name, "1"))
            ids = tuple(int(i) for i in gpus[name].split(",")) if name in gpus else ()
        except ValueError:
            raise UsageError(f"--instances/--gpus {name}: counts and GPU ids are integers") from None
        if count < 1 or any(i < 0 for i in ids):
            raise UsageError(f"--instances/--gpus {name}: count >= 1 and GPU ids >= 0 are allowed")
        placements[name] = Placement(count, ids)
    return placements


def run(args: argparse.Namespace) -> int:
    models = [*stage_names(), TOKENIZER_MODEL, ORCHESTRATOR_MODEL, STREAM_MODEL]
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    for flag, value in (("--request-timeout", args.request_timeout), ("--queue-timeout", args.queue_timeout),
                        ("--stage-timeout", args.stage_timeout)):
        if not value > 0:
            raise UsageError(f"{flag} {value}: must be a positive number of seconds")
    if args.max_queue < 1:
        raise UsageError(f"--max-queue {args.max_queue}: must be >= 1")
    options = RepositoryOptions(backend=args.backend, placements=_placements(args, models),
                                orchestrator_device=args.orchestrator_device,
                                intra_op_threads=args.threads, warmup=not args.no_warmup,
                                request_timeout_s=args.request_timeout, max_queue_size=args.max_queue,
                                queue_timeout_s=args.queue_timeout, stage_timeout_s=args.stage_timeout,
                                tensorrt_allocation=args.tensorrt_allocation)
    path = build_repository(args.out, args.onnx, args.engines, options,
                            tensorrt_version=args.tensorrt_version, overwrite=args.overwrite)
    say("triton", f"wrote a {args.backend} repository to {path}; serve it with `kvt serve {path}`"
                  + (" (the bundled CPU tritonserver runs the python backend only)" if args.backend != "python-ort"
                     else ""))
    print(path)
    return EXIT_OK
