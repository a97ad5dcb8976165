"""The fast path with and without text-only hoisting, same weights and seed, runs interleaved.

Run: ``python -m kvt.benchmarks.hoist_check [--preset small] [--runs 2]``; prints JSON (the recorded run
is in benchmarks/RESULTS.md, "Text-only hoisting").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from kvt.models.presets import get_preset
from kvt.models.random_weights import random_models
from kvt.runtime.fast_path import FastPathOptions, build_fast_pipeline

PROMPT = "a red fox in the snow"


def compare(preset: str = "small", runs: int = 2, fps: str = "low", seed: int = 1) -> dict:
    """Wall time per request of both variants (medians), per-loop timings and bit-exactness."""
    models = random_models(get_preset(preset), seed=0)
    pipes = {hoist: build_fast_pipeline(models, FastPathOptions(hoist_text=hoist)) for hoist in (False, True)}
    request: dict[str, Any] = dict(fps=fps, seed=seed, progress=False, key_frame_steps=50, base_frame_steps=50,
                   interpolation_steps=10)
    for pipe in pipes.values():  # warm-up
        pipe(PROMPT, fps=fps, seed=seed, progress=False, key_frame_steps=2, base_frame_steps=2)
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs = {}
    for _ in range(runs):
        for hoist, pipe in pipes.items():
            start = time.perf_counter()
            outputs[hoist] = pipe(PROMPT, **request)
            times[hoist].append(time.perf_counter() - start)
    plain, hoisted = outputs[False], outputs[True]
    result: dict[str, Any] = {
        "preset": preset, "fps": fps, "torch_threads": torch.get_num_threads(),
        "no_hoist_s": times[False], "hoist_s": times[True],
        "median_no_hoist_s": statistics.median(times[False]), "median_hoist_s": statistics.median(times[True]),
        "bit_identical": bool(torch.equal(plain.latents, hoisted.latents) and (plain.frames == hoisted.frames).all()),
        "timings": {"no_hoist": plain.timings, "hoist": hoisted.timings},
    }
    result["speedup"] = result["median_no_hoist_s"] / result["median_hoist_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kvt.benchmarks.hoist_check")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(compare(args.preset, args.runs), indent=1))


if __name__ == "__main__":
    main()
