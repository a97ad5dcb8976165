"""The stage calls one request makes: its loops, their step counts and the video decoder's chunks
(:func:`video_decode_chunks`, kept beside the stage table that caps the decoder's chunk length by it).

Derived from the stage table's facts (:mod:`kvt.contract.stages`) and the request's defaults
(:mod:`kvt.contract.request`); the pipeline's recorded calls are checked against :func:`request_plan`
in the tests, and engine profiles, progress totals and benchmark phases are computed from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvt.contract.request import GenerationRequest
from kvt.contract.stages import (
    FPS_FRAMES,
    INTERPOLATION_PASSES,
    NUM_BASE_FRAMES,
    StageInputError,
    StageTable,
    video_decode_chunks,
)

_DEFAULT_STEPS = (GenerationRequest.key_frame_steps, GenerationRequest.base_frame_steps,
                  GenerationRequest.interpolation_steps)


@dataclass(frozen=True)
class StageCall:
    stage: str
    dims: Mapping[str, int]
    calls: int


def loop_phases(fps: str, with_image: bool) -> tuple[str, ...]:
    """The sampler loops of a request in order: ``key_frame`` (text-to-video only), ``base_frames``,
    then ``interpolation_skip<k>`` per interpolation pass of the fps mode."""
    key = () if with_image else ("key_frame",)
    return key + ("base_frames",) + tuple(f"interpolation_skip{k}" for k in INTERPOLATION_PASSES[fps])


def phase_loop(phase: str) -> str:
    """The loop a phase runs (the stage table's ``loop`` role): ``interpolation_skip3`` -> ``interpolation``."""
    return "interpolation" if phase.startswith("interpolation") else phase


def all_loop_phases() -> tuple[str, ...]:
    """Every phase any request can have, in order."""
    return loop_phases("high", with_image=False)


def total_steps(fps: str, with_image: bool, key_frame_steps: int = _DEFAULT_STEPS[0],
                base_frame_steps: int = _DEFAULT_STEPS[1], interpolation_steps: int = _DEFAULT_STEPS[2]) -> int:
    """Sampler steps of a request (what a progress bar counts to)."""
    steps = {"key_frame": key_frame_steps, "base_frames": base_frame_steps, "interpolation": interpolation_steps}
    return sum(steps[phase_loop(phase)] for phase in loop_phases(fps, with_image))


def request_total_steps(request: GenerationRequest) -> int:
    """Sampler steps of ``request``. Not a validation: an fps mode outside the table counts no interpolation
    steps, so a client can still send the request and report the server's refusal."""
    if request.fps not in INTERPOLATION_PASSES:
        return (0 if request.image is not None else request.key_frame_steps) + request.base_frame_steps
    return total_steps(request.fps, request.image is not None, request.key_frame_steps,
                       request.base_frame_steps, request.interpolation_steps)


def request_plan(width: int, height: int, fps: str, with_image: bool, key_frame_steps: int = _DEFAULT_STEPS[0],
                 base_frame_steps: int = _DEFAULT_STEPS[1],
                 interpolation_steps: int = _DEFAULT_STEPS[2]) -> list[StageCall]:
    """The stage calls one request makes, in order, with their dims and repeat counts."""
    h, w = height // 8, width // 8
    plan = [StageCall("text_encoder", {"B": 1}, 1)]
    if not with_image:
        plan.append(StageCall("unet_t2v_image", {"N": 2, "h": 2 * h, "w": 2 * w}, key_frame_steps))
        plan.append(StageCall("movq_decoder", {"h": 2 * h, "w": 2 * w}, 1))
    plan.append(StageCall("movq_encoder", {"B": 1, "h": h, "w": w}, 1))
    plan.append(StageCall("unet_t2v_video", {"N": 3 * NUM_BASE_FRAMES, "h": h, "w": w}, base_frame_steps))
    frames = NUM_BASE_FRAMES
    for _ in INTERPOLATION_PASSES[fps]:
        plan.append(StageCall("unet_interp", {"N": 2 * (frames - 1), "h": h, "w": w}, interpolation_steps))
        frames = 4 * frames - 3
    chunk_sizes = video_decode_chunks(frames)
    for size in sorted(set(chunk_sizes), reverse=True):
        plan.append(StageCall("video_movq_decoder", {"F": size, "h": h, "w": w}, chunk_sizes.count(size)))
    return plan


def frames_for(fps: str) -> int:
    return FPS_FRAMES[fps]


def check_plan_consistency(table: StageTable, plan: Sequence[StageCall]) -> None:
    """Every call of a plan fits its stage's ranges (used by tests and build-time checks)."""
    for call in plan:
        stage = table[call.stage]
        for name, value in call.dims.items():
            if not any(p[name].contains(value) for p in stage.profiles):
                raise StageInputError(
                    f"stage {call.stage}: dim {name}={value} is outside {stage.dims[name].describe()}")
