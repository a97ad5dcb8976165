"""End-to-end wall time of two checkouts of this project, interleaved in one run (issue 18, item 4).

Each run is a fresh child process that imports ``kvt`` from one checkout's ``src`` and runs the fast
torch pipeline (random weights of a preset, one prompt, official steps) after a short warm-up request;
runs alternate before / after so that load changes on a shared machine hit both alike, and each run
also records its process CPU time (with one thread, little affected by other processes on the cores). The child code
uses only the API both sides have (``random_models``, ``build_fast_pipeline``, the pipeline call), so a
checkout from before a change runs it unchanged. The outputs of the last runs are compared.

Run: ``python -m kvt.benchmarks.before_after --before-src OLD/src --after-src NEW/src --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvt.benchmarks import report

CHILD = r"""
import json, sys, time
import numpy as np, torch
threads, preset, fps, seed, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
from kvt.models.presets import get_preset
from kvt.models.random_weights import random_models
from kvt.runtime.fast_path import build_fast_pipeline
pipe = build_fast_pipeline(random_models(get_preset(preset), seed=0))
prompt = "a red fox in the snow"
pipe(prompt, fps=fps, seed=seed, progress=False, key_frame_steps=2, base_frame_steps=2, interpolation_steps=2)
start, cpu_start = time.perf_counter(), time.process_time()
video = pipe(prompt, fps=fps, seed=seed, progress=False)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
np.save(out + ".latents.npy", video.latents.numpy())
np.save(out + ".frames.npy", video.frames)
json.dump({"wall_s": wall, "cpu_s": cpu, "timings": video.timings, "kvt": __import__("kvt").__file__}, open(out + ".json", "w"))
"""


def _child(src: Path, threads: int, preset: str, fps: str, seed: int, out: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-c", CHILD, str(threads), preset, fps, str(seed), str(out)], env=env, check=True)
    result: dict[str, Any] = json.loads(Path(str(out) + ".json").read_text())
    return result


def compare(before_src: Path, after_src: Path, preset: str = "small", fps: str = "medium", runs: int = 2,
            threads: int = 1, seed: int = 1) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(runs):
            for side, src in (("before", before_src), ("after", after_src)):
                out = Path(tmp) / f"{side}{index}"
                results[side].append(_child(src, threads, preset, fps, seed, out))
        latents = {side: np.load(Path(tmp) / f"{side}{runs - 1}.latents.npy") for side in results}
        frames = {side: np.load(Path(tmp) / f"{side}{runs - 1}.frames.npy") for side in results}
    walls = {side: [r["wall_s"] for r in rs] for side, rs in results.items()}
    median = {side: statistics.median(w) for side, w in walls.items()}
    # Process CPU time of the timed request: with one thread it is far less sensitive than the wall time
    # to other processes sharing the cores.
    cpu = {side: [r["cpu_s"] for r in rs] for side, rs in results.items()}
    cpu_median = {side: statistics.median(c) for side, c in cpu.items()}
    phases = {side: {k: statistics.median(r["timings"][k] for r in rs) for k in rs[0]["timings"]}
              for side, rs in results.items()}
    diff = np.abs(latents["after"].astype(np.float64) - latents["before"].astype(np.float64))
    frame_diff = np.abs(frames["after"].astype(np.int16) - frames["before"].astype(np.int16))
    return {"preset": preset, "fps": fps, "threads": threads, "seed": seed, "runs": runs,
            "sources": {"before": str(before_src), "after": str(after_src)},
            "wall_s": walls, "median_s": median, "speedup": median["before"] / median["after"],
            "cpu_s": cpu, "cpu_median_s": cpu_median, "cpu_speedup": cpu_median["before"] / cpu_median["after"],
            "phases_median_s": phases,
            "latents_max_abs": float(diff.max()), "latents_scale": float(np.abs(latents["before"]).max()),
            "frames_max_abs": int(frame_diff.max()), "frames_equal_fraction": float((frame_diff == 0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kvt.benchmarks.before_after")
    parser.add_argument("--before-src", required=True, type=Path, help="src folder of the checkout before")
    parser.add_argument("--after-src", required=True, type=Path, help="src folder of the checkout after")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--fps", default="medium")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    info = report.provenance(torch.device("cpu"))
    result = {"provenance": info, **compare(args.before_src, args.after_src, args.preset, args.fps, args.runs,
                                            args.threads)}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"before_after_{args.preset}_{args.fps}_cpu"
    report.write_json_atomic(args.out / f"{name}.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
