"""A backend wrapper for tests that records every stage call (name, bound dims, chosen inputs)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from kvt.runtime.backends.base import StageBackend


@dataclass
class RecordedCall:
    stage: str
    dims: dict[str, int]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class RecordingBackend(StageBackend):
    """Delegates to ``inner`` (runs, sampler-loop scopes and close); keeps copies of the inputs named in
    ``keep`` (stage -> names)."""

    name = "recording"

    def __init__(self, inner: StageBackend, keep: Mapping[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(inner.table, inner.device, validate=True)
        self.inner = inner
        self.keep = dict(keep or {})
        self.calls: list[RecordedCall] = []

    def _run(self, stage, inputs):
        dims = self.table[stage].bind_dims(inputs)
        kept = {name: inputs[name].detach().clone() for name in self.keep.get(stage, ())}
        self.calls.append(RecordedCall(stage, dims, kept))
        return self.inner.run(stage, inputs)

    def loop_scope(self, stage: str) -> AbstractContextManager:
        return self.inner.loop_scope(stage)

    def close(self) -> None:
        self.inner.close()

    def counts(self) -> dict[tuple[str, tuple], int]:
        out: dict[tuple[str, tuple], int] = {}
        for call in self.calls:
            key = (call.stage, tuple(sorted(call.dims.items())))
            out[key] = out.get(key, 0) + 1
        return out
