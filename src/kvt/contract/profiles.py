"""Optimisation profiles of each stage, derived from the stage table and the requests to serve.

Two ways to choose them:

* the stage table's own ranges (no ``--resolution``): every frame size of the export's resolution range
  and every batch the table allows; one engine serves everything the export can, tuned for the table's
  opt values;
* tight ranges for the resolutions and fps modes asked for: the calls :func:`request_plan` makes for
  each (resolution, fps mode, with and without an input image) are collected per stage and each dim
  gets min/max over those calls. ``opt`` is taken from the first resolution given (the one to tune
  for) and, for batch-like dims, is the value called most often. Tight profiles build faster, use less
  activation memory and are tuned for the sizes really served.

Stages with several table profiles (the interpolation U-Net: 22 and 88 rows) keep one engine profile
per table profile that some call needs; a call belongs to the table profile whose opt is nearest.
A stage no requested mode calls (the interpolation U-Net at fps 'low') gets no profile: no engine.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvt.contract.errors import UserError
from kvt.contract.plan import request_plan
from kvt.contract.stages import FPS_FRAMES, PIXEL_MULTIPLE, Dim, StageSpec, StageTable, parse_symbol

Profile = Mapping[str, Dim]
# Spatial dims follow the frame size; every other dim is batch-like (rows, frames, chunk length).
SPATIAL_DIMS = frozenset({"h", "w"})

_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class ProfileError(UserError):
    """A requested resolution or fps mode cannot be served by the stage table."""


@dataclass(frozen=True)
class Resolution:
    """A frame size in pixels, written WIDTHxHEIGHT as on the command line."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def parse_resolution(text: str) -> Resolution:
    """``"640x384"`` -> Resolution(640, 384) (width x height, multiples of 64)."""
    match = _RESOLUTION.match(text)
    if not match:
        raise ProfileError(f"resolution {text!r}: expected WIDTHxHEIGHT, e.g. 512x512 or 640x384")
    width, height = int(match.group(1)), int(match.group(2))
    for side, value in (("width", width), ("height", height)):
        if value <= 0 or value % PIXEL_MULTIPLE:
            raise ProfileError(f"resolution {text!r}: {side} {value} must be a positive multiple of "
                               f"{PIXEL_MULTIPLE}")
    return Resolution(width, height)


def parse_fps_modes(modes: Iterable[str]) -> tuple[str, ...]:
    """Validated fps modes in the order given, without repeats."""
    out: list[str] = []
    for mode in modes:
        if mode not in FPS_FRAMES:
            raise ProfileError(f"fps mode {mode!r}: allowed: {', '.join(FPS_FRAMES)}")
        if mode not in out:
            out.append(mode)
    return tuple(out)


def table_profiles(spec: StageSpec) -> tuple[dict[str, Dim], ...]:
    """The stage table's own profiles (the whole range the export supports)."""
    return tuple(dict(profile) for profile in spec.profiles)


def check_resolutions(table: StageTable, resolutions: Sequence[Resolution]) -> None:
    """Every resolution lies in the export's range (a plan cannot serve more than the ONNX allows)."""
    rng = table.resolution
    for res in resolutions:
        for side, value in (("width", res.width), ("height", res.height)):
            if not rng.min <= value <= rng.max:
                raise ProfileError(f"resolution {res}: {side} {value} is outside the export's range "
                                   f"[{rng.min}, {rng.max}] (re-export with a wider resolution range)")


def _nearest_profile(spec: StageSpec, dims: Mapping[str, int]) -> int:
    """Index of the table profile that serves ``dims``: it contains them and its batch opt is nearest."""
    best: tuple[int, int] | None = None
    for index, profile in enumerate(spec.profiles):
        if not all(profile[name].contains(value) for name, value in dims.items()):
            continue
        distance = sum(abs(profile[name].opt - value) for name, value in dims.items()
                       if name not in SPATIAL_DIMS)
        if best is None or distance < best[0]:
            best = (distance, index)
    if best is None:
        raise ProfileError(f"stage {spec.name}: dims {dict(dims)} are outside every profile of the "
                           f"stage table ({[{k: d.describe() for k, d in p.items()} for p in spec.profiles]})")
    return best[1]


def _opt_value(values: Counter[int], primary: Counter[int]) -> int:
    """opt of one dim: the value the primary resolution calls most often (ties: the larger)."""
    source = primary if primary else values
    return max(source.items(), key=lambda item: (item[1], item[0]))[0]


def request_profiles(
    table: StageTable,
    resolutions: Sequence[Resolution],
    fps_modes: Sequence[str],
    stages: Sequence[str] | None = None,
    table_batch: bool = False,
) -> dict[str, tuple[dict[str, Dim], ...]]:
    """Tight profiles per stage for these resolutions and fps modes (see the module docstring).

    Stages no call needs are absent from the result. The first resolution is the one tuned for.
    ``table_batch``: batch-like dims keep the stage table's min/max (room for batching several
    requests, e.g. Triton's dynamic batcher); only their opt comes from the calls.
    """
    if not resolutions:
        raise ProfileError("at least one resolution is needed for request profiles")
    fps_modes = parse_fps_modes(fps_modes) or tuple(FPS_FRAMES)  # no --fps: every mode
    check_resolutions(table, resolutions)
    wanted = set(table.names if stages is None else stages)
    # stage -> table profile index -> dim -> Counter(value -> calls); and the same for the primary size
    seen: dict[str, dict[int, dict[str, Counter[int]]]] = {}
    primary: dict[str, dict[int, dict[str, Counter[int]]]] = {}
    for order, res in enumerate(resolutions):
        for fps in fps_modes:
            for with_image in (False, True):
                for call in request_plan(res.width, res.height, fps, with_image):
                    if call.stage not in wanted:
                        continue
                    spec = table[call.stage]
                    index = _nearest_profile(spec, call.dims)
                    targets = [seen] + ([primary] if order == 0 else [])
                    for target in targets:
                        per_dim = target.setdefault(call.stage, {}).setdefault(index, {})
                        for name, value in call.dims.items():
                            per_dim.setdefault(name, Counter())[value] += call.calls
    out: dict[str, tuple[dict[str, Dim], ...]] = {}
    for stage in table.names:
        if stage not in seen:
            continue
        spec = table[stage]
        profiles = []
        for index in sorted(seen[stage]):
            values = seen[stage][index]
            prim = primary.get(stage, {}).get(index, {})
            profile: dict[str, Dim] = {}
            for name in spec.profiles[index]:
                counts = values[name]
                table_dim = spec.profiles[index][name]
                opt = _opt_value(counts, prim.get(name, Counter()))
                if table_batch and name not in SPATIAL_DIMS:
                    profile[name] = Dim(table_dim.min, opt, table_dim.max, table_dim.multiple_of)
                else:
                    profile[name] = Dim(min(counts), opt, max(counts), table_dim.multiple_of)
            profiles.append(profile)
        out[stage] = tuple(profiles)
    return out


def select_profiles(
    table: StageTable,
    resolutions: Sequence[Resolution] = (),
    fps_modes: Sequence[str] = (),
    stages: Sequence[str] | None = None,
    table_batch: bool = False,
) -> dict[str, tuple[dict[str, Dim], ...]]:
    """The profiles to build: the table's (no resolution given) or tight ones for the requests."""
    names = list(table.names if stages is None else stages)
    for name in names:
        table[name]  # unknown stage: KeyError naming the stages
    if resolutions:
        return request_profiles(table, resolutions, fps_modes, names, table_batch)
    if fps_modes:
        parse_fps_modes(fps_modes)
        # fps modes alone narrow nothing spatially, but a stage no mode calls is not built.
        rng = table.resolution
        called = {call.stage for fps in fps_modes for image in (False, True)
                  for call in request_plan(rng.opt, rng.opt, fps, image)}
        names = [n for n in names if n in called]
    return {name: table_profiles(table[name]) for name in names}


def input_shapes(spec: StageSpec, profile: Profile) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name -> (min, opt, max) shape for one profile; static inputs are left out."""
    lows = {name: d.min for name, d in profile.items()}
    opts = {name: d.opt for name, d in profile.items()}
    highs = {name: d.max for name, d in profile.items()}
    out = {}
    for tensor in spec.inputs:
        if not any(isinstance(entry, str) for entry in tensor.shape):
            continue
        for entry in tensor.shape:
            if isinstance(entry, str) and parse_symbol(entry)[1] not in profile:
                raise ProfileError(f"stage {spec.name}: profile has no dim {entry!r} of input {tensor.name!r}")
        out[tensor.name] = (tensor.concrete_shape(lows), tensor.concrete_shape(opts), tensor.concrete_shape(highs))
    return out


def profile_key(profiles: Sequence[Profile]) -> tuple[tuple[tuple[str, int, int, int], ...], ...]:
    """The profiles as BuildKey stores them: per profile, sorted (dim, min, opt, max)."""
    return tuple(tuple((name, d.min, d.opt, d.max) for name, d in sorted(profile.items()))
                 for profile in profiles)


def describe_profiles(profiles: Sequence[Profile]) -> str:
    return "; ".join(", ".join(f"{name} {d.min}/{d.opt}/{d.max}" for name, d in profile.items())
                     for profile in profiles)


def profiles_from_key(key_profiles: Sequence[Sequence[Sequence[str | int]]]) -> tuple[dict[str, Dim], ...]:
    """Profiles from their recorded form (``BuildKey.profiles``: per profile (dim, min, opt, max))."""
    return tuple({str(name): Dim(int(low), int(opt), int(high)) for name, low, opt, high in profile}
                 for profile in key_profiles)


def profiles_to_data(profiles: Sequence[Profile]) -> list[dict[str, list[int]]]:
    """Profiles as JSON-able data: per profile, dim -> [min, opt, max, multiple_of]."""
    return [{name: [d.min, d.opt, d.max, d.multiple_of] for name, d in profile.items()} for profile in profiles]


def profiles_from_data(data: Sequence[Mapping[str, Sequence[int]]]) -> tuple[dict[str, Dim], ...]:
    return tuple({name: Dim(*(int(v) for v in values)) for name, values in profile.items()} for profile in data)


# ---------------------------------------------------------------------------------------- coverage
# What a deployment serves is decided by its profiles (a plan cannot run a shape outside them), not by
# the export's stage table. A request is served when every stage call it makes fits some profile of
# its stage; requests that would fail there are refused before any stage runs.

ServedProfiles = Mapping[str, Sequence[Sequence[Profile]]]  # stage -> per plan (e.g. per GPU arch) profiles


def call_fits(plans: Sequence[Sequence[Profile]], dims: Mapping[str, int]) -> bool:
    """Whether every plan of a stage has a profile containing ``dims``."""
    return bool(plans) and all(
        any(all(profile[name].min <= value <= profile[name].max for name, value in dims.items()
                if name in profile) for profile in profiles)
        for profiles in plans)


def unserved_calls(served: ServedProfiles, width: int, height: int, fps: str, with_image: bool) -> list[str]:
    """The stage calls of this request that no plan serves (empty: the request is served)."""
    out = []
    for call in request_plan(width, height, fps, with_image, 1, 1, 1):
        if not call_fits(served.get(call.stage, ()), call.dims):
            out.append(f"{call.stage} {dict(call.dims)}")
    return out


@dataclass(frozen=True)
class Coverage:
    """The requests a deployment serves: (width, height) per (fps mode, with an image)."""

    sizes: Mapping[tuple[str, bool], tuple[tuple[int, int], ...]]

    def fps_modes(self, with_image: bool) -> list[str]:
        return [fps for fps in FPS_FRAMES if self.sizes.get((fps, with_image))]

    def describe(self, with_image: bool, fps: str | None = None) -> str:
        """What is served, in words (for errors naming what a request may ask)."""
        modes = [fps] if fps is not None else self.fps_modes(with_image)
        parts = []
        for mode in modes:
            sizes = self.sizes.get((mode, with_image), ())
            if sizes:
                parts.append(f"fps {mode}: {_sizes_text(sizes)}")
        kind = "image-to-video" if with_image else "text-to-video"
        return f"{kind} " + ("; ".join(parts) if parts else "nothing")


def _sizes_text(sizes: Sequence[tuple[int, int]]) -> str:
    if len(sizes) <= 6:
        return ", ".join(f"{w}x{h}" for w, h in sizes)
    widths = sorted({w for w, _ in sizes})
    heights = sorted({h for _, h in sizes})
    return (f"{len(sizes)} sizes, widths {widths[0]}..{widths[-1]}, heights {heights[0]}..{heights[-1]} "
            f"(multiples of {PIXEL_MULTIPLE})")


def coverage(table: StageTable, served: ServedProfiles) -> Coverage:
    """Every frame size of the table's range and every fps mode, with and without an image, checked."""
    rng = table.resolution
    sides = range(rng.min, rng.max + 1, PIXEL_MULTIPLE)
    sizes: dict[tuple[str, bool], tuple[tuple[int, int], ...]] = {}
    for fps in FPS_FRAMES:
        for with_image in (False, True):
            sizes[(fps, with_image)] = tuple((w, h) for h in sides for w in sides
                                             if not unserved_calls(served, w, h, fps, with_image))
    return Coverage(sizes)
