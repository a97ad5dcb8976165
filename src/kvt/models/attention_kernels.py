"""Which kernel runs the MoVQs' single-head attention, chosen per shape.

The MoVQ attention blocks have one head whose dimension is the channel count (512-1024 at full size), in
float32 by default: too wide for the flash and cuDNN kernels (head dim <= 256), so SDPA falls back to
its memory-efficient kernel, whose float32 path for wide heads is slow. The alternative is the plain
form: two batched matrix products and a softmax (chunked over queries so the score matrix stays under
``MATH_CHUNK_BYTES``), which runs on cuBLAS. Both are exact (the same math; float reassociation only).

``movq_attention_kernel(...)`` sets the choice for the block: ``"sdpa"`` (default: what torch picks),
``"math"`` (the plain form), ``"auto"``: per (shapes, dtype, device) the faster of the two, measured
once on the first call of that shape (never while a CUDA graph is being captured, nor on the meta device
or under tracing, where it falls back to ``"sdpa"``). :func:`auto_choices` reports what was measured.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("sdpa", "math", "auto")
MATH_CHUNK_BYTES = 512 << 20  # bound on one chunk of the score matrix in the plain form

_kernel = "sdpa"  # a plain global: torch.compile guards on it
_choices: dict[tuple[object, ...], dict[str, object]] = {}


@contextmanager
def movq_attention_kernel(kernel: str) -> Iterator[None]:
    global _kernel
    if kernel not in KERNELS:
        raise ValueError(f"MoVQ attention kernel {kernel!r}: allowed {', '.join(KERNELS)}")
    previous, _kernel = _kernel, kernel
    try:
        yield
    finally:
        _kernel = previous


def auto_choices() -> list[dict[str, object]]:
    """What ``"auto"`` measured and chose, per shape (for benchmark records)."""
    return [dict(entry) for entry in _choices.values()]


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v as two matrix products, chunked over queries; softmax in float32."""
    scale = q.shape[-1] ** -0.5
    batch = 1
    for size in q.shape[:-2]:
        batch *= size
    row_bytes = max(1, batch * k.shape[-2] * 4)
    chunk = max(1, min(q.shape[-2], MATH_CHUNK_BYTES // row_bytes))
    key_t = k.transpose(-1, -2)
    outs = []
    for start in range(0, q.shape[-2], chunk):
        scores = torch.matmul(q[..., start:start + chunk, :], key_t) * scale
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        outs.append(torch.matmul(weights, v))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"sdpa": _sdpa, "math": math_attention}


def _measurable(q: Tensor) -> bool:
    if q.device.type == "meta" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return not isinstance(q, torch._subclasses.FakeTensor)


def seconds_per_call(fn: Callable[[], object], device: torch.device, iterations: int = 3, warmup: int = 1) -> float:
    """Mean wall seconds of ``fn()`` after ``warmup`` calls (synchronising a GPU around the timed calls):
    how the kernel and layout choices are measured."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iterations


def _choose(q: Tensor, k: Tensor, v: Tensor) -> str:
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device.type)
    entry = _choices.get(key)
    if entry is None:
        timings = {name: seconds_per_call(functools.partial(fn, q, k, v), q.device) for name, fn in _FUNCTIONS.items()}
        entry = _choices[key] = {"q": list(q.shape), "k": list(k.shape), "dtype": str(q.dtype),
                                 "device": q.device.type, "ms": {n: 1e3 * s for n, s in timings.items()},
                                 "chosen": min(timings, key=lambda name: timings[name])}
    return str(entry["chosen"])


def movq_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Single-head attention of the MoVQ blocks with the kernel chosen by :func:`movq_attention_kernel`."""
    kernel = _kernel
    if kernel == "auto":
        kernel = _choose(q, k, v) if _measurable(q) else "sdpa"
    return _FUNCTIONS[kernel](q, k, v)
