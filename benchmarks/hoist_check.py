"""Fast path with and without text-only hoisting (small preset, CPU, same weights and seed, interleaved).

Run: python -m kvt.benchmarks.hoist_check  (prints JSON; the recorded run is in benchmarks/RESULTS.md)
"""
import json, statistics, time, torch
torch.set_num_threads(1)
from kvt.models.checkpoints import random_models
from kvt.models.presets import get_preset
from kvt.runtime.fast_path import FastPathOptions, build_fast_pipeline
models = random_models(get_preset("small"), seed=0)
pipes = {h: build_fast_pipeline(models, FastPathOptions(hoist_text=h)) for h in (False, True)}
kw = dict(fps="low", seed=1, progress=False, key_frame_steps=50, base_frame_steps=50, interpolation_steps=10)
for p in pipes.values():
    p("a red fox in the snow", fps="low", seed=1, progress=False, key_frame_steps=2, base_frame_steps=2)
times = {False: [], True: []}
outs = {}
for _ in range(2):
    for h, p in pipes.items():
        t = time.perf_counter(); out = p("a red fox in the snow", **kw); times[h].append(time.perf_counter() - t)
        outs[h] = out
res = {"no_hoist_s": times[False], "hoist_s": times[True],
       "median_no_hoist": statistics.median(times[False]), "median_hoist": statistics.median(times[True]),
       "bit_identical": bool(torch.equal(outs[False].latents, outs[True].latents) and (outs[False].frames == outs[True].frames).all()),
       "loops": {h: {k: v for k, v in outs[h].timings.items()} for h in (False, True)}}
res["speedup"] = res["median_no_hoist"] / res["median_hoist"]
print(json.dumps(res, indent=1, default=str))
