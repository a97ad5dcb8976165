"""``TritonVideoClient``: send a generation request to the ``kandinsky_video`` models and get frames back.

HTTP or gRPC (tritonclient). With a progress callback over gRPC, the decoupled
``kandinsky_video_stream`` model is used and the callback sees every sampler step; otherwise one request
to ``kandinsky_video`` returns the frames. The image of image-to-video is sent in its own
mode, losslessly (PNG or TIFF bytes), and preprocessed by the server as the official code does.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from kvt.contract.errors import CancelledError, KvtError, UnavailableError, UserError
from kvt.contract.plan import request_total_steps
from kvt.contract.request import GenerationRequest
from kvt.formats.triton_repo import ORCHESTRATOR_MODEL, STREAM_MODEL, TEXT_ENCODING_MODEL
from kvt.runtime.video_io import check_output_path, default_playback_fps, save_video
from kvt.serving import protocol as wire

PROTOCOLS = ("http", "grpc")
DEFAULT_TIMEOUT = 3600.0  # seconds; a full-size video takes minutes


class TritonRequestError(KvtError, RuntimeError):
    """The server refused or failed a request; the message is the server's."""

    @classmethod
    def from_status(cls, status: str | None, message: str) -> TritonRequestError:
        """The error class of a server status: gRPC ``StatusCode.*`` or an HTTP status code
        (Triton answers INVALID_ARG with 400 and UNAVAILABLE with 503 over HTTP)."""
        kind = _STATUS_KINDS.get(str(status), cls)
        return kind(message)


class TritonInvalidRequest(TritonRequestError, UserError):
    """The server refused the request's values (nothing ran); the message names the value."""


class TritonCancelled(TritonRequestError, CancelledError):
    """The request was cancelled (by this client or the server)."""


class TritonUnavailable(TritonRequestError, UnavailableError):
    """No server, or the server cannot take the request now."""


_STATUS_KINDS: dict[str, type[TritonRequestError]] = {
    "StatusCode.INVALID_ARGUMENT": TritonInvalidRequest, "400": TritonInvalidRequest,
    "StatusCode.CANCELLED": TritonCancelled,
    "StatusCode.UNAVAILABLE": TritonUnavailable, "503": TritonUnavailable,
}


def _server_error(exc: Exception) -> TritonRequestError:
    """A tritonclient InferenceServerException (or a stream error) as our error kind."""
    message = exc.message() if hasattr(exc, "message") else str(exc)
    status = exc.status() if hasattr(exc, "status") else None
    return TritonRequestError.from_status(status, message or str(exc))


@dataclass(frozen=True)
class Progress:
    """One streamed sampler step."""

    stage: str  # key_frame, base_frames, interpolation
    step: int  # 0-based within the loop
    num_steps: int
    done: int  # steps finished in the whole request
    total: int


@dataclass
class TritonVideo:
    """Frames uint8 [T, H, W, 3] as in VideoOutput, and what the server reported."""

    frames: np.ndarray
    seed: int
    prompt_tokens: int
    prompt_truncated: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def save(self, path: str | Path, fps: float | None = None) -> Path:
        return save_video(self.frames, path, fps if fps is not None else default_playback_fps(self.num_frames))


def _module(protocol_name: str) -> ModuleType:
    if protocol_name not in PROTOCOLS:
        raise UserError(f"--protocol {protocol_name!r}: allowed: {', '.join(PROTOCOLS)}")
    try:
        if protocol_name == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as exc:
        raise UnavailableError(f"the Triton client needs tritonclient: `pip install 'tritonclient[http]' grpcio` "
                               f"({exc})") from exc
    return module


class TritonVideoClient:
    """A client of one server. Not shared between threads: make one per thread."""

    def __init__(self, url: str, protocol: str = "http", timeout: float = DEFAULT_TIMEOUT,
                 model: str = ORCHESTRATOR_MODEL, stream_model: str = STREAM_MODEL) -> None:
        self.url = url
        self.protocol = protocol
        self.timeout = timeout
        self.model, self.stream_model = model, stream_model
        self._tc = _module(protocol)
        from tritonclient.utils import InferenceServerException

        self._server_error = InferenceServerException
        if protocol == "http":
            self._client = self._tc.InferenceServerClient(url, connection_timeout=min(timeout, 60.0),
                                                          network_timeout=timeout)
        else:
            self._client = self._tc.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonVideoClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:
            return False

    # ------------------------------------------------------------------ requests

    def _inputs(self, arrays: dict[str, np.ndarray]) -> list:
        inputs = []
        for name, array in arrays.items():  # the arrays' own dtypes: the server checks them
            item = self._tc.InferInput(name, list(array.shape), _wire_of(array))
            item.set_data_from_numpy(array)
            inputs.append(item)
        return inputs

    def _outputs(self, names) -> list:
        return [self._tc.InferRequestedOutput(name) for name in names]

    def infer_arrays(self, arrays: dict[str, np.ndarray], model: str | None = None) -> dict[str, np.ndarray]:
        """One raw request: input name -> array (sent with the array's dtype)."""
        names = [name for name, _, _ in wire.RESULT_OUTPUTS]
        try:
            kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
            result = self._client.infer(model or self.model, self._inputs(arrays),
                                        outputs=self._outputs(names), **kwargs)
        except self._server_error as exc:
            raise _server_error(exc) from None
        return {name: result.as_numpy(name) for name in names}

    def generate(self, request: GenerationRequest,
                 progress: Callable[[Progress], None] | None = None) -> TritonVideo:
        """Run ``request`` on the server. ``progress`` (gRPC only) is called after every sampler step."""
        arrays = wire.request_to_arrays(request)
        if progress is not None and self.protocol == "grpc":
            return _video(self._stream(arrays, progress, request_total_steps(request)))
        return _video(self.infer_arrays(arrays))

    def _stream(self, arrays: dict[str, np.ndarray], progress: Callable[[Progress], None],
                total: int) -> dict[str, np.ndarray]:
        replies: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: replies.put((result, error)))
        try:
            self._client.async_stream_infer(self.stream_model, self._inputs(arrays))
            done = 0
            while True:
                result, error = replies.get(timeout=self.timeout)
                if error is not None:
                    raise _server_error(error)
                frames = result.as_numpy("FRAMES")
                if frames is not None:
                    return {name: result.as_numpy(name) for name, _, _ in wire.RESULT_OUTPUTS}
                stage = result.as_numpy("STAGE")
                if stage is not None:
                    done += 1
                    progress(Progress(stage.reshape(-1)[0].decode(), int(result.as_numpy("STEP")[0]),
                                      int(result.as_numpy("NUM_STEPS")[0]), done, total))
        except queue.Empty:
            raise TritonUnavailable(f"no reply from {self.url} within {self.timeout:.0f} s") from None
        finally:
            self._client.stop_stream()

    def encode_text(self, prompt: str) -> dict[str, np.ndarray]:
        """The ``text_encoding`` ensemble: context [1, S, D], attention_mask [1, S], context_len [1, 1]."""
        arrays = {"PROMPT": np.array([[prompt.encode("utf-8")]], dtype=np.object_)}
        names = ("context", "attention_mask", "context_len")
        try:
            result = self._client.infer(TEXT_ENCODING_MODEL, self._inputs(arrays), outputs=self._outputs(names))
        except self._server_error as exc:
            raise _server_error(exc) from None
        return {name: result.as_numpy(name) for name in names}


def _wire_of(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def _video(outputs: dict[str, np.ndarray]) -> TritonVideo:
    timings = outputs.get("TIMINGS")
    text = timings.reshape(-1)[0] if timings is not None else b"{}"
    return TritonVideo(
        frames=outputs["FRAMES"], seed=int(outputs["SEED"].reshape(-1)[0]),
        prompt_tokens=int(outputs["PROMPT_TOKENS"].reshape(-1)[0]),
        prompt_truncated=bool(outputs["PROMPT_TRUNCATED"].reshape(-1)[0]),
        timings=json.loads(text.decode() if isinstance(text, bytes) else text))


def generate_via_triton(url: str, protocol: str, request: GenerationRequest, out: str | Path, progress: bool = True,
                        report: Callable[..., None] = lambda message, end="\n": None) -> Path:
    """Send ``request`` (a GenerationRequest) to the server at ``url`` and write the video to ``out``.

    Progress is streamed (kandinsky_video_stream) over gRPC; over HTTP the call waits for the frames.
    Raises TritonRequestError with the server's message when it refuses or fails the request.
    """
    out = check_output_path(out)
    with TritonVideoClient(url, protocol) as client:
        if not client.is_ready():
            raise TritonUnavailable(f"no ready Triton server with model {client.model!r} at {url} ({protocol})")

        def show(step: Progress) -> None:
            report(f"{step.stage} step {step.step + 1}/{step.num_steps} ({step.done}/{step.total})",
                   end="\n" if step.done == step.total else "\r")

        if progress and protocol != "grpc":
            report("progress is streamed over gRPC only (--protocol grpc); waiting for the frames")
        video = client.generate(request, progress=show if progress and protocol == "grpc" else None)
    if video.prompt_truncated:
        report(f"prompt truncated to {video.prompt_tokens} tokens (it has more than the model reads)")
    path = video.save(out)
    report(f"{video.num_frames} frames, seed {video.seed}, server time "
           f"{video.timings.get('server_total', float('nan')):.2f} s")
    return path
