"""Triton python-backend model ``kandinsky_video`` (and ``kandinsky_video_stream``): one whole
generation per request, server-side.

Each instance builds :class:`KandinskyVideoPipeline` over a :class:`TritonStageBackend`, so the stage
networks run in their own models (TensorRT, ONNX Runtime or the python ORT model) and the denoising loop
is kvt.runtime's. The tokenizer, null embeddings and model dims are read from files the repository
generator copied into this model's version folder; nothing a client sends is used as a path.

A request is parsed (:mod:`kvt.serving.protocol`) and validated with ``validate_request`` before
any stage work; an invalid one gets an error naming the value and what is allowed, and the instance goes
on serving. The decoupled variant (config ``model_transaction_policy { decoupled: true }``) streams a
progress response after every sampler step and the frames last. Prompts are never logged.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from kvt.contract.request import InvalidRequestError, validate_request
from kvt.contract.stages import ModelDims, ResolutionRange, build_stage_table
from kvt.formats.triton_repo import verify_repository
from kvt.models.text_encoder import PromptTokenizer
from kvt.runtime.pipeline import GenerationCancelled, KandinskyVideoPipeline
from kvt.serving.protocol import IMAGE_INPUTS, SCALAR_FIELDS, arrays_to_request
from kvt.serving.server_models.stage_backend import TritonStageBackend

PIPELINE_FILE = "pipeline.json"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch
        import triton_python_backend_utils as pb_utils
        from safetensors.torch import load_file

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.name = args["model_name"]
        torch.set_num_threads(max(1, int(params.get("torch_threads", "1"))))
        device = params.get("device", "cpu")
        if device == "cuda":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        folder = os.path.join(args["model_repository"], args["model_version"])

        verify_repository(os.path.dirname(args["model_repository"]))  # a truncated file stops the load
        with open(os.path.join(folder, PIPELINE_FILE)) as handle:
            meta = json.load(handle)
        model = meta["model"]
        table = build_stage_table(ModelDims(model["tokens_length"], model["context_dim"]),
                                  ResolutionRange(*model["resolution"]))
        tokenizer = PromptTokenizer(os.path.join(folder, meta["tokenizer"]), model["tokens_length"])
        nulls = load_file(os.path.join(folder, meta["null_embeddings"]))
        backend = TritonStageBackend(table, pb_utils, device, meta.get("stage_models"),
                                     unsqueezed_inputs=meta.get("unsqueezed_inputs"))
        timeout = float(params.get("request_timeout_s", "0") or 0)
        self.request_timeout_s = timeout if timeout > 0 else None
        opt = table.resolution.opt
        self.default_size = (opt, opt)
        self.pipeline = KandinskyVideoPipeline(backend, tokenizer, nulls["t2v"], nulls["interpolation"],
                                               self.default_size)
        pb_utils.Logger.log_info(f"{self.name}: pipeline on {device}, stages as BLS calls, "
                                 f"frame sizes {table.resolution.min}..{table.resolution.max}")

    # ------------------------------------------------------------------ requests

    def _parse(self, request):
        arrays = {}
        for name in [f.name for f in SCALAR_FIELDS] + list(IMAGE_INPUTS):
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = tensor.as_numpy()
        parsed = arrays_to_request(arrays, self.default_size)
        return validate_request(parsed, self.pipeline.table.resolution)

    def _error(self, exc: Exception):
        pb = self.pb
        if isinstance(exc, InvalidRequestError):
            message, code = f"invalid request: {exc}", "INVALID_ARG"
        elif isinstance(exc, GenerationCancelled):
            message, code = f"cancelled: {exc}", "CANCELLED"
        else:
            pb.Logger.log_error(f"{self.name}: generation failed: {type(exc).__name__}: {exc}")
            message, code = f"generation failed: {type(exc).__name__}: {exc}", "INTERNAL"
        try:
            return pb.TritonError(message, getattr(pb.TritonError, code))
        except (AttributeError, TypeError):  # python backends before error codes
            return pb.TritonError(message)

    def _result(self, output, seconds: float):
        pb = self.pb
        timings = dict(output.timings, server_total=seconds)
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("FRAMES", np.ascontiguousarray(output.frames)),
            pb.Tensor("SEED", np.array([output.seed], dtype=np.int64)),
            pb.Tensor("PROMPT_TOKENS", np.array([output.prompt_tokens], dtype=np.int32)),
            pb.Tensor("PROMPT_TRUNCATED", np.array([output.prompt_truncated], dtype=bool)),
            pb.Tensor("TIMINGS", np.array([json.dumps(timings).encode()], dtype=np.object_)),
        ])

    def _generate(self, request, on_step=None):
        parsed = self._parse(request)
        cancelled = getattr(request, "is_cancelled", None)

        def callback(info) -> bool:
            if cancelled is not None and cancelled():  # client gone or request cancelled: stop now
                self.pb.Logger.log_info(f"{self.name}: request cancelled by the client at {info.stage} "
                                        f"step {info.step}; stopped")
                return False
            if on_step is not None:
                on_step(info)
            return True

        start = time.perf_counter()
        output = self.pipeline.generate(parsed, progress=False, callback=callback,
                                        timeout_s=self.request_timeout_s)
        return self._result(output, time.perf_counter() - start)

    def execute(self, requests: list):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses = []
        for request in requests:
            try:
                responses.append(self._generate(request))
            except Exception as exc:  # the error goes to this request's client; the instance goes on
                responses.append(self.pb.InferenceResponse(error=self._error(exc)))
        return responses

    def _stream(self, request) -> None:
        pb = self.pb
        sender = request.get_response_sender()

        def on_step(info) -> None:
            sender.send(pb.InferenceResponse(output_tensors=[
                pb.Tensor("STAGE", np.array([info.stage.encode()], dtype=np.object_)),
                pb.Tensor("STEP", np.array([info.step], dtype=np.int32)),
                pb.Tensor("NUM_STEPS", np.array([info.num_steps], dtype=np.int32)),
            ]))

        try:
            response = self._generate(request, on_step)
        except Exception as exc:
            response = pb.InferenceResponse(error=self._error(exc))
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.pipeline.backend.close()
