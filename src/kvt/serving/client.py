"""``TritonVideoClient``: send a generation request to the ``kandinsky_video`` models and get frames back.

HTTP or gRPC (tritonclient). With a progress callback over gRPC, the decoupled
``kandinsky_video_stream`` model is used and the callback sees every sampler step; otherwise one request
to ``kandinsky_video`` returns the frames. The image of image-to-video is sent in its own
mode, losslessly (PNG or TIFF bytes), and preprocessed by the server as the official code does.
"""

from __future__ import annotations

import json
import queue
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from kvt.contract.errors import CancelledError, KvtError, UnavailableError, UserError
from kvt.contract.plan import request_total_steps
from kvt.contract.request import GenerationRequest
from kvt.formats.triton_repo import ORCHESTRATOR_MODEL, STREAM_MODEL, TEXT_ENCODING_MODEL
from kvt.runtime.video_io import check_output_path, default_playback_fps, save_video
from kvt.serving import protocol as wire

PROTOCOLS = ("grpc", "http")
DEFAULT_PROTOCOL = "grpc"  # gRPC cancels server-side work when the client stops; HTTP cannot
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


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """``host:port``, ``grpc://host:port`` or ``http://host:port`` -> (host:port, protocol). A scheme
    decides the protocol; otherwise ``protocol`` does (default gRPC)."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if sep:
        if scheme not in PROTOCOLS:
            raise UserError(f"Triton URL {url!r}: scheme {scheme!r} is not one of {', '.join(PROTOCOLS)}")
        if protocol is not None and protocol != scheme:
            raise UserError(f"Triton URL {url!r} says {scheme} but the protocol asked is {protocol}")
        protocol, text = scheme, rest.rstrip("/")
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or "/" in text:
        raise UserError(f"Triton URL {url!r}: expected HOST:PORT, grpc://HOST:PORT or http://HOST:PORT "
                        "(e.g. 127.0.0.1:8001 for gRPC, 127.0.0.1:8000 for HTTP)")
    return text, protocol or DEFAULT_PROTOCOL


@dataclass(frozen=True)
class ServerInfo:
    """What the served repository says about itself (the orchestrator's config parameters)."""

    default_width: int
    default_height: int
    resolution: tuple[int, int]  # min, max frame side
    fps_modes: tuple[str, ...]  # fps modes some plan serves
    served: str  # the sizes per fps mode, in words


class TritonVideoClient:
    """A client of one server. Not shared between threads: make one per thread.

    gRPC is the default: when the client stops waiting (Ctrl-C, a timeout, an exception in the progress
    callback) the request is cancelled and the server stops its work within a step. Over HTTP an
    abandoned request runs on until it ends or reaches the server's request timeout.
    """

    def __init__(self, url: str, protocol: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 model: str = ORCHESTRATOR_MODEL, stream_model: str = STREAM_MODEL) -> None:
        url, protocol = parse_url(url, protocol)
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

    def require_ready(self) -> None:
        """The server answers and the model is ready; else :class:`TritonUnavailable` saying why, with a
        hint when the port speaks the other protocol."""
        if self.is_ready():
            return
        other = "http" if self.protocol == "grpc" else "grpc"
        hint = ""
        try:
            with TritonVideoClient(self.url, other, timeout=5.0, model=self.model) as probe:
                if probe._client.is_server_live():
                    hint = (f"; {self.url} answers {other.upper()}, not {self.protocol.upper()}: use "
                            f"{other}://{self.url} (or the server's {self.protocol.upper()} port)")
        except Exception:
            pass
        raise TritonUnavailable(f"no ready Triton server with model {self.model!r} at {self.url} "
                                f"({self.protocol}){hint}")

    def server_info(self) -> ServerInfo:
        """Defaults and ranges of the served repository (its orchestrator's config parameters)."""
        try:
            config = self._client.get_model_config(self.model)
        except self._server_error as exc:
            raise _server_error(exc) from None
        if self.protocol == "grpc":
            params = {k: v.string_value for k, v in config.config.parameters.items()}
        else:
            params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        try:
            low, high = (int(v) for v in params["resolution"].split(","))
            return ServerInfo(int(params["default_width"]), int(params["default_height"]), (low, high),
                              tuple(m for m in params["fps_modes"].split(",") if m), params.get("served", ""))
        except (KeyError, ValueError) as exc:
            raise TritonRequestError(f"{self.url}: model {self.model!r} does not describe what it serves "
                                     f"({exc!r}); regenerate the repository with `kvt triton-repo`") from None

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
        """One raw request: input name -> array (sent with the array's dtype). Over gRPC the call is
        asynchronous underneath, so an interruption (Ctrl-C) cancels it on the server too."""
        names = [name for name, _, _ in wire.RESULT_OUTPUTS]
        if self.protocol == "grpc":
            return self._infer_cancellable(model or self.model, arrays, names)
        try:
            result = self._client.infer(model or self.model, self._inputs(arrays), outputs=self._outputs(names))
        except self._server_error as exc:
            raise _server_error(exc) from None
        return {name: result.as_numpy(name) for name in names}

    def _infer_cancellable(self, model: str, arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
        call = self._client.async_infer(model, self._inputs(arrays), callback=lambda result, error: replies.put((result, error)),
                                        outputs=self._outputs(names), client_timeout=self.timeout)
        try:
            result, error = replies.get(timeout=self.timeout + 5.0)
        except BaseException:  # interrupted or no answer: cancel the request on the server
            call.cancel()
            if isinstance(sys.exc_info()[1], queue.Empty):
                raise TritonUnavailable(f"no reply from {self.url} within {self.timeout:.0f} s") from None
            raise
        if error is not None:
            raise _server_error(error)
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
        replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._client.start_stream(callback=lambda result, error: replies.put((result, error)))
        failed = False
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
            failed = True
            raise TritonUnavailable(f"no reply from {self.url} within {self.timeout:.0f} s") from None
        except BaseException:
            failed = True
            raise
        finally:
            # On any failure (a server error, Ctrl-C, a raising progress callback) cancel what is in
            # flight: without cancel_requests, stop_stream blocks until the server has finished.
            self._client.stop_stream(cancel_requests=failed)

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


def generate_via_triton(client: TritonVideoClient, request: GenerationRequest, out: str | Path,
                        progress: bool = True, report: Callable[..., None] = lambda message, end="\n": None) -> Path:
    """Run ``request`` on ``client``'s server and write the video to ``out``.

    Progress is streamed (kandinsky_video_stream) over gRPC; over HTTP the call waits for the frames.
    Raises a :class:`TritonRequestError` kind with the server's message when it refuses or fails.
    """
    out = check_output_path(out)
    client.require_ready()

    def show(step: Progress) -> None:
        report(f"{step.stage} step {step.step + 1}/{step.num_steps} ({step.done}/{step.total})",
               end="\n" if step.done == step.total else "\r")

    if progress and client.protocol != "grpc":
        report("progress is streamed over gRPC only; waiting for the frames (an HTTP request cannot be "
               "cancelled: it runs to the end on the server even if you stop waiting)")
    video = client.generate(request, progress=show if progress and client.protocol == "grpc" else None)
    if video.prompt_truncated:
        report(f"prompt truncated to {video.prompt_tokens} tokens (it has more than the model reads)")
    path = video.save(out)
    report(f"{video.num_frames} frames, seed {video.seed}, server time "
           f"{video.timings.get('server_total', float('nan')):.2f} s")
    return path
