"""What `sdlite distill` costs on an SD 1.5-size UNet: seconds and memory of one training step.

    .venv/bin/python bench/presets.py --make        # once: /tmp/sdlite-sd15-fp16 (random weights, SD 1.5 shapes)
    .venv/bin/sdlite prune /tmp/sdlite-sd15-fp16 /tmp/sdlite-sd15-small --no-measure   # BK-SDM-Small
    .venv/bin/python bench/distill_cost.py [--latent 32] [--batch 1] [--steps 3] [--threads 2]

Copies the pruned folder, builds the Distiller (teacher and student UNets as fp32 modules, AdamW), puts
random latents of `--latent` x `--latent` in place of the teacher's (drawing them takes the teacher 20 full
sampling steps a prompt), and times `--steps` training steps (teacher forward, student forward and backward
with the feature losses, optimizer step) after one warm-up. One JSON line: s/step (median), s per sample,
the process's peak RSS, and the student's trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="/tmp/sdlite-sd15-fp16")
    p.add_argument("--student", default="/tmp/sdlite-sd15-small")
    p.add_argument("--latent", type=int, default=32, help="latent side (32: 256x256 images, 64: 512x512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    from sdlite.train.distill import Distiller, DistillRecipe
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        dst = Path(tmp) / "student"
        shutil.copytree(a.student, dst)
        t0 = time.perf_counter()
        d = Distiller(dst, a.teacher, ["a lighthouse at dusk", "a red bicycle"], DistillRecipe(batch=a.batch),
                      threads=a.threads, log=lambda m: None)
        load_s = time.perf_counter() - t0
        # one latent per prompt, as the teacher would have drawn them
        d.latents = torch.randn((len(d.prompts), 4, a.latent, a.latent), generator=torch.Generator().manual_seed(0))
        times = []
        for i in range(a.steps + 1):
            t0 = time.perf_counter()
            d.train_step()
            if i:
                times.append(time.perf_counter() - t0)
        from sdlite.runtime.memory import peak_rss
        peak = peak_rss()
        step = statistics.median(times)
        print(json.dumps({"bench": "distill_cost", "teacher": a.teacher, "student": a.student,
                          "student_params": sum(p.numel() for p in d.student.parameters()),
                          "latent": a.latent, "image": a.latent * 8, "batch": a.batch, "threads": torch.get_num_threads(),
                          "load_s": round(load_s, 1), "s_per_step": round(step, 2),
                          "s_per_sample": round(step / a.batch, 2), "peak_rss_GiB": round(peak / 2**30, 2)}))
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
