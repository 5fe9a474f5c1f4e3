"""A labelled grid of samples from a shapes model: python -m sdlite.train.samples MODEL OUT.png [--seed N]."""

from __future__ import annotations

import argparse
import sys

from PIL import Image, ImageDraw

SAMPLE_PROMPTS = (
    "a red circle on a blue background",
    "a small yellow square at the top left on a black background",
    "a large green triangle on a white background",
    "a purple cross at the bottom right on a yellow background",
    "a white circle at the top on a red background",
    "a small cyan triangle at the right on a purple background",
    "a large black square in the center on a cyan background",
    "a blue cross on a white background",
    # held out of training (composition)
    "a red triangle on a white background",
    "a green square at the left on a black background",
    "a blue cross on a yellow background",
    "a yellow circle on a blue background",
)


def sample_grid(pipe, prompts=SAMPLE_PROMPTS, seed: int = 0, steps: int = 20, scale: int = 3,
                columns: int = 4, sampler: str = "dpm++2m") -> Image.Image:
    tiles = []
    for i, prompt in enumerate(prompts):
        image = pipe.generate(prompt, steps=steps, seed=seed + i, width=64, height=64, sampler=sampler).image
        tiles.append(image.resize((64 * scale, 64 * scale), Image.NEAREST))
    w = 64 * scale
    label_h = 28
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * (w + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, prompt) in enumerate(zip(tiles, prompts)):
        x, y = (i % columns) * w, (i // columns) * (w + label_h)
        grid.paste(tile, (x, y))
        words = prompt.split(" on a ")
        draw.text((x + 3, y + w + 2), words[0][:34], fill="black")
        draw.text((x + 3, y + w + 14), ("on a " + words[1])[:34] if len(words) > 1 else "", fill="black")
    return grid


def main(argv=None) -> int:
    from sdlite.pipeline import Pipeline
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpm++2m")
    a = p.parse_args(argv)
    pipe = Pipeline.load(a.model, threads=2)
    sample_grid(pipe, seed=a.seed, steps=a.steps, sampler=a.sampler).save(a.out)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
