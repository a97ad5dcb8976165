"""Where the pipeline's randomness comes from.

The official pipeline draws from torch's global RNG in a fixed order (docs/spec/sampling.md, "RNG
consumption order"). The pipeline asks a :class:`NoiseSource` for every draw in that same order, so a
seeded run is reproducible without touching global state, and a recorded run can be replayed exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvt.contract.errors import KvtError


class NoiseSource(Protocol):
    def randn(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Standard normal noise."""

    def rand(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Uniform noise in [0, 1) (the key frame's noise augmentation)."""


class SeededNoise:
    """A private ``torch.Generator`` on the target device: same seed, same device -> same video."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def randn(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype, device=device)

    def rand(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.rand(tuple(shape), generator=self.generator, dtype=dtype, device=device)


class NoiseReplayError(KvtError, RuntimeError):
    """The pipeline asked for a draw that the recording does not have at this position."""


@dataclass(frozen=True)
class RecordedDraw:
    kind: str  # "randn" or "rand"
    tensor: torch.Tensor


class ReplayNoise:
    """Returns recorded draws in order, checking that each request matches (kind and shape)."""

    def __init__(self, draws: Sequence[RecordedDraw]) -> None:
        self._draws = list(draws)
        self.position = 0

    def _next(self, kind: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.position >= len(self._draws):
            raise NoiseReplayError(f"draw {self.position} ({kind} {list(shape)}) requested but only "
                                   f"{len(self._draws)} were recorded")
        draw = self._draws[self.position]
        if draw.kind != kind or tuple(draw.tensor.shape) != tuple(shape):
            raise NoiseReplayError(
                f"draw {self.position}: pipeline asked for {kind} {list(shape)}, recording has "
                f"{draw.kind} {list(draw.tensor.shape)}"
            )
        self.position += 1
        return draw.tensor.to(device=device, dtype=dtype)

    def randn(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._next("randn", shape, dtype, device)

    def rand(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._next("rand", shape, dtype, device)

    @property
    def exhausted(self) -> bool:
        return self.position == len(self._draws)
