"""python -m sdlite.train: train the shapes model (see sdlite.train.trainer for the recipe)."""

from __future__ import annotations

import argparse
import sys

from .trainer import Recipe, Trainer

STAGES = ("tokenizer", "vae", "latents", "unet", "export")


def main(argv: list[str] | None = None) -> int:
    r = Recipe()
    p = argparse.ArgumentParser(prog="python -m sdlite.train",
                                description="Train the tiny shapes text-to-image model on the CPU. "
                                            "Rerun the same command to resume from the last checkpoint.")
    p.add_argument("--work", required=True, help="folder for checkpoints and logs (resumable)")
    p.add_argument("--out", help="diffusers folder to write at the end "
                                 "(e.g. src/sdlite/assets/sdlite-shapes)")
    p.add_argument("--seed", type=int, default=r.seed)
    p.add_argument("--threads", type=int, default=r.threads,
                   help="at most this many torch threads; the trainer times 1..N now and then and uses the "
                        "fastest (on shared cores one thread can be several times faster than two). "
                        "--threads 1 makes a run bitwise reproducible; otherwise runs differ only by "
                        "float rounding")
    p.add_argument("--vae-steps", type=int, default=r.vae_steps)
    p.add_argument("--unet-steps", type=int, default=r.unet_steps)
    p.add_argument("--unet-batch", type=int, default=r.unet_batch)
    p.add_argument("--latent-pool", type=int, default=r.latent_pool)
    p.add_argument("--unet-lr", type=float, default=r.unet_lr)
    p.add_argument("--checkpoint-every", type=int, default=r.checkpoint_every)
    p.add_argument("--export-dtype", choices=("fp16", "fp32"), default=r.export_dtype)
    p.add_argument("--until", choices=STAGES, default="export", help="stop after this stage")
    p.add_argument("--finish-early", action="store_true",
                   help="end the unet stage at its last checkpoint (when time runs out) and export")
    a = p.parse_args(argv)
    recipe = Recipe(seed=a.seed, threads=a.threads, vae_steps=a.vae_steps, unet_steps=a.unet_steps,
                    unet_batch=a.unet_batch, latent_pool=a.latent_pool, unet_lr=a.unet_lr,
                    checkpoint_every=a.checkpoint_every, export_dtype=a.export_dtype)
    stages = set(STAGES[:STAGES.index(a.until) + 1])
    trainer = Trainer(recipe, a.work)
    trainer.finish_early = a.finish_early
    trainer.run(a.out, stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
