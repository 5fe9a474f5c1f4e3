"""Cross-attention K/V compression: its error against the uncompressed cache, its bytes, its speed.

    .venv/bin/python bench/kv_error.py [-m MODEL] [-n 50] [--size 64] [--steps 20] [--threads 2]

For each option (bf16, int8 per head, tokens through the first end-of-text token, int8 + those tokens),
on the first `n` prompts of `bench_prompts` (their own seeds, DPM++ 2M, cfg 7.5):
  kv_rel_err     ||K' - K|| / ||K|| over every cross-attention layer's cached K and V (the stores only;
                 truncation drops tokens instead, so it has none)
  cache_bytes    the K/V the cache holds for one request (uncond + cond), as stored
  image_diff     8-bit image difference against the uncompressed run: mean and max levels (mean over prompts
                 of each image's mean; max over all)
  s_per_step     the UNet call at batch 2 (CFG), median over the run's steps
One JSON line per option. On a random-weight model (`-m /tmp/sdlite-sd15-fp16 --size 512 -n 2 --steps 2`)
only the bytes and speed mean anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = [("compute", "all"), ("bf16", "all"), ("int8", "all"), ("compute", "eot"), ("int8", "eot")]


def kv_errors(pipe, prompt: str, store: str) -> float:
    """Relative error of the stored K/V against the exact ones, over all cross-attention layers."""
    from sdlite.models.layers import BasicTransformerBlock
    from sdlite.runtime.kv_cache import StoredKV
    cond, uncond = pipe.encode_prompt(prompt), pipe.encode_prompt("")
    context = torch.cat([uncond, cond])
    num = den = 0.0
    with torch.inference_mode():
        for b in pipe.unet.module.modules():
            if isinstance(b, BasicTransformerBlock):
                for t in b.attn2.key_value(context):
                    num += float((StoredKV(t, store).restore() - t).float().pow(2).sum())
                    den += float(t.float().pow(2).sum())
    return (num / den) ** 0.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=str(ROOT / "src" / "sdlite" / "assets" / "sdlite-shapes"))
    p.add_argument("-n", type=int, default=50)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    from sdlite.pipeline import Pipeline
    from sdlite.runtime.kv_cache import cached_bytes
    from sdlite.runtime.planner import Plan
    from sdlite.train.shapes import bench_prompts
    prompts = bench_prompts(a.n)
    reference = {}
    for store, tokens in OPTIONS:
        pipe = Pipeline.load(a.model, precision="fp32", threads=a.threads,
                             plan=Plan(kv_store=store, kv_tokens=tokens, width=a.size or 512, height=a.size or 512))
        size = a.size or pipe.native_size
        diffs, maxes, steps, sizes = [], [], [], []
        module = pipe.unet.module
        forward = module.forward

        def timed(*args, **kw):
            t0 = time.perf_counter()
            out = forward(*args, **kw)
            steps.append(time.perf_counter() - t0)
            sizes.append(cached_bytes(module))
            return out
        module.forward = timed
        try:
            for i, pr in enumerate(prompts):
                r = pipe.generate(pr.text, seed=pr.seed, steps=a.steps, cfg_scale=7.5, sampler="dpm++2m",
                                  width=size, height=size)
                img = np.asarray(r.image, dtype=np.int16)
                if (store, tokens) == ("compute", "all"):
                    reference[i] = img
                d = np.abs(img - reference[i])
                diffs.append(float(d.mean()))
                maxes.append(int(d.max()))
        finally:
            del module.forward
        err = kv_errors(pipe, prompts[0].text, store) if store != "compute" else 0.0
        pipe.close()
        print(json.dumps({"bench": "kv_error", "model": Path(a.model).name, "kv_store": store, "kv_tokens": tokens,
                          "n": len(prompts), "size": size, "kv_rel_err": float(f"{err:.3g}"),
                          "cache_bytes": max(sizes), "image_diff_mean": round(statistics.mean(diffs), 3),
                          "image_diff_max": max(maxes), "s_per_step": round(statistics.median(steps), 4),
                          "threads": a.threads}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
