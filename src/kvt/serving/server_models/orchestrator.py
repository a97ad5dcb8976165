"""Triton python-backend model ``kandinsky_video`` (and ``kandinsky_video_stream``): one whole
generation per request, server-side.

Each instance builds :class:`KandinskyVideoPipeline` over a :class:`TritonStageBackend`, so the stage
networks run in their own models (TensorRT, ONNX Runtime or the python ORT model) and the denoising loop
is kvt.runtime's. The tokenizer, null embeddings, model dims and the profiles each stage model serves
are read from files the repository generator wrote into this model's version folder, checked against
that folder's own record (``kvt_model.json``); nothing a client sends is used as a path.

A request is parsed (:mod:`kvt.serving.protocol`) and validated before any stage work: against the
request limits and against the stage models' profiles (a size or fps mode no plan serves is refused,
naming what is served). An invalid request gets INVALID_ARG, a cancelled one CANCELLED, one past its
time limit or meeting a stage model that is not ready UNAVAILABLE; the instance goes on serving.
The decoupled variant streams a progress response after every sampler step and the frames last.
Prompts are never logged.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvt.contract.errors import CancelledError, TimedOutError, UnavailableError, UserError
from kvt.contract.profiles import profiles_from_data
from kvt.contract.request import GenerationRequest, validate_request
from kvt.contract.stages import StageTable
from kvt.formats.triton_repo import PIPELINE_FILE, verify_model_record
from kvt.models.text_encoder import PromptTokenizer
from kvt.runtime.pipeline import KandinskyVideoPipeline, StepInfo, VideoOutput
from kvt.serving.protocol import IMAGE_INPUTS, SCALAR_FIELDS, arrays_to_request
from kvt.serving.server_models.metrics import OrchestratorMetrics
from kvt.serving.server_models.stage_backend import StageModelNotReady, TritonStageBackend

# Error kind -> Triton error code (the HTTP endpoint answers INVALID_ARG with 400, UNAVAILABLE with 503).
_CODES: tuple[tuple[type[BaseException], str, str], ...] = (
    (UserError, "INVALID_ARG", "invalid request"),
    (TimedOutError, "UNAVAILABLE", "timed out"),
    (UnavailableError, "UNAVAILABLE", "unavailable"),
    (CancelledError, "CANCELLED", "cancelled"),
)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
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
        verify_model_record(folder)  # this model's own files; a truncated one stops the load, naming it
        with open(os.path.join(folder, PIPELINE_FILE)) as handle:
            meta = json.load(handle)
        table = StageTable.from_summary(meta["model"], os.path.join(folder, PIPELINE_FILE))
        tokenizer = PromptTokenizer(os.path.join(folder, meta["tokenizer"]), table.model.tokens_length)
        nulls = load_file(os.path.join(folder, meta["null_embeddings"]))
        served = {stage: tuple(profiles_from_data(plan) for plan in plans)
                  for stage, plans in meta["served_profiles"].items()}
        stage_timeout = float(params.get("stage_timeout_s", "0") or 0)
        self.metrics = OrchestratorMetrics(pb_utils, self.name, tuple(meta.get("stage_models") or table.names))
        backend = TritonStageBackend(table, pb_utils, device, meta.get("stage_models"),
                                     unsqueezed_inputs=meta.get("unsqueezed_inputs"), served_profiles=served,
                                     call_timeout_s=stage_timeout if stage_timeout > 0 else None,
                                     on_call=self.metrics.stage_call)
        self.in_flight = 0
        timeout = float(params.get("request_timeout_s", "0") or 0)
        self.request_timeout_s = timeout if timeout > 0 else None
        width, height = meta.get("default_size") or (table.resolution.opt, table.resolution.opt)
        self.default_size = (int(width), int(height))
        self.pipeline = KandinskyVideoPipeline(backend, tokenizer, nulls["t2v"], nulls["interpolation"],
                                               self.default_size)
        pb_utils.Logger.log_info(f"{self.name}: pipeline on {device}, stages as BLS calls, "
                                 f"frame sizes {table.resolution.min}..{table.resolution.max}")

    # ------------------------------------------------------------------ requests

    def _parse(self, request: Any) -> GenerationRequest:
        arrays = {}
        for name in [f.name for f in SCALAR_FIELDS] + list(IMAGE_INPUTS):
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = tensor.as_numpy()
        parsed = arrays_to_request(arrays, self.default_size)
        validate_request(parsed, self.pipeline.table.resolution)
        self.pipeline.check_served(parsed)  # the plans' profiles, before any stage runs
        return parsed

    def _outcome(self, exc: BaseException | None) -> str:
        if exc is None:
            return "completed"
        if isinstance(exc, (UserError, StageModelNotReady)):
            return "rejected"
        if isinstance(exc, TimedOutError):
            return "timed_out"
        if isinstance(exc, CancelledError):
            return "cancelled"
        return "failed"

    def _error(self, exc: Exception) -> Any:
        pb = self.pb
        for kind, kind_code, label in _CODES:
            if isinstance(exc, kind):
                code, message = kind_code, f"{label}: {exc}"
                break
        else:
            pb.Logger.log_error(f"{self.name}: generation failed: {type(exc).__name__}: {exc}")
            code, message = "INTERNAL", f"generation failed: {type(exc).__name__}: {exc}"
        try:
            return pb.TritonError(message, getattr(pb.TritonError, code))
        except (AttributeError, TypeError):  # python backends before error codes
            return pb.TritonError(message)

    def _result(self, output: VideoOutput, seconds: float) -> Any:
        pb = self.pb
        timings = dict(output.timings, server_total=seconds)
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("FRAMES", np.ascontiguousarray(output.frames)),
            pb.Tensor("SEED", np.array([output.seed], dtype=np.int64)),
            pb.Tensor("PROMPT_TOKENS", np.array([output.prompt_tokens], dtype=np.int32)),
            pb.Tensor("PROMPT_TRUNCATED", np.array([output.prompt_truncated], dtype=bool)),
            pb.Tensor("TIMINGS", np.array([json.dumps(timings).encode()], dtype=np.object_)),
        ])

    def _generate(self, request: Any, on_step: Callable[[StepInfo], None] | None = None) -> Any:
        parsed = self._parse(request)
        backend = self.pipeline.backend
        assert isinstance(backend, TritonStageBackend)
        backend.require_ready(parsed)  # a stage model unloaded since: refuse now, not after minutes of work
        cancelled = getattr(request, "is_cancelled", None)
        last_step = [time.perf_counter()]

        def callback(info: StepInfo) -> bool:
            now = time.perf_counter()
            if info.step > 0:  # step 0's interval includes the loop's set-up
                self.metrics.step(info.stage, now - last_step[0])
            last_step[0] = now
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

    def _counted(self, request: Any, on_step: Callable[[StepInfo], None] | None = None) -> Any:
        """``_generate`` with the request counted in the metrics (in flight, outcome)."""
        self.in_flight += 1
        self.metrics.set_in_flight(self.in_flight)
        try:
            response = self._generate(request, on_step)
        except Exception as exc:
            self.metrics.outcome(self._outcome(exc))
            raise
        finally:
            self.in_flight -= 1
            self.metrics.set_in_flight(self.in_flight)
        self.metrics.outcome("completed")
        return response

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.decoupled:
            for index, request in enumerate(requests):
                self.metrics.set_queued(len(requests) - index - 1)
                self._stream(request)
            return None
        responses = []
        for index, request in enumerate(requests):
            self.metrics.set_queued(len(requests) - index - 1)
            try:
                responses.append(self._counted(request))
            except Exception as exc:  # the error goes to this request's client; the instance goes on
                responses.append(self.pb.InferenceResponse(error=self._error(exc)))
        return responses

    def _stream(self, request: Any) -> None:
        pb = self.pb
        sender = request.get_response_sender()

        def on_step(info: StepInfo) -> None:
            sender.send(pb.InferenceResponse(output_tensors=[
                pb.Tensor("STAGE", np.array([info.stage.encode()], dtype=np.object_)),
                pb.Tensor("STEP", np.array([info.step], dtype=np.int32)),
                pb.Tensor("NUM_STEPS", np.array([info.num_steps], dtype=np.int32)),
            ]))

        try:
            response = self._counted(request, on_step)
        except Exception as exc:
            response = pb.InferenceResponse(error=self._error(exc))
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.pipeline.backend.close()


__all__ = ["StageModelNotReady", "TritonPythonModel"]
