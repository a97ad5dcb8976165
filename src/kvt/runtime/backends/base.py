"""The stage backend interface: run a named stage of the stage table on a dict of tensors.

A backend knows nothing of diffusion. The pipeline builds the inputs a stage's contract asks for, calls
``run`` and reads the outputs by name; torch, ONNX Runtime, TensorRT and Triton backends all sit behind
this one interface, so the denoising loops are written once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

import torch

from kvt.contract.profiles import ServedProfiles
from kvt.contract.stages import StageTable, any_size_range


class StageBackend(ABC):
    """Runs stages of ``table``. Inputs and outputs are torch tensors on ``device``.

    A backend with ``any_frame_size`` (torch, ONNX Runtime: no built shape ranges) serves every frame
    size the official code runs, within the memory-based limit (:func:`any_size_range`): its table keeps
    the given table's model dims and opt size with that range. The others (TensorRT, Triton) serve the
    range their artifacts were built for.
    """

    name: str = "abstract"
    any_frame_size: bool = False

    def __init__(self, table: StageTable, device: torch.device | str = "cpu", validate: bool = True) -> None:
        if self.any_frame_size:
            table = table.with_resolution(any_size_range(table.resolution.opt))
        self.table = table
        self.device = torch.device(device)
        self.validate = validate

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``stage`` on ``inputs`` (names, dtypes and shapes per the contract)."""
        spec = self.table[stage]
        if self.validate:
            spec.bind_dims(inputs)  # metadata only: no device sync
        outputs = self._run(stage, inputs)
        if set(outputs) != set(spec.output_names):
            raise RuntimeError(f"backend {self.name}: stage {stage} returned {sorted(outputs)}, "
                               f"the contract says {list(spec.output_names)}")
        return outputs

    @abstractmethod
    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backend-specific execution; inputs already validated."""

    def served_profiles(self) -> ServedProfiles:
        """Stage -> the profiles of each plan this backend runs it with. A request whose stage calls fit
        none is refused before any stage runs. Default: the stage table's own ranges (what an export or
        the torch networks support); engine-backed backends answer with their plans' profiles."""
        return {spec.name: (spec.profiles,) for spec in self.table}

    def loop_scope(self, stage: str) -> AbstractContextManager[None]:
        """Entered around one sampler loop over ``stage``: every call of the loop gets the same text
        inputs, which a backend may exploit (the fast torch path hoists text-only work). Default:
        nothing."""
        return nullcontext()

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release resources (sessions, engines, connections)."""

    def __enter__(self) -> StageBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DelegatingBackend(StageBackend):
    """A wrapper around ``inner`` (timing, recording, fault injection): forwards every hook of the
    interface (``run``, ``loop_scope``, ``close``), so a wrapper never silently drops a backend's loop
    optimisations. Subclasses override :meth:`_run` and call ``self.inner.run`` inside it."""

    def __init__(self, inner: StageBackend, validate: bool = False) -> None:
        super().__init__(inner.table, inner.device, validate)
        self.inner = inner
        self.name = f"{type(self).__name__}({inner.name})"

    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.inner.run(stage, inputs)

    def loop_scope(self, stage: str) -> AbstractContextManager[None]:
        return self.inner.loop_scope(stage)

    def served_profiles(self) -> ServedProfiles:
        return self.inner.served_profiles()

    def close(self) -> None:
        self.inner.close()
