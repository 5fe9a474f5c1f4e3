"""Prompt adherence of a shapes model: generate for fixed prompts, read the images back, count.

Used by `bench/adherence.py` (the numbers in the model card) and by `tests/test_adherence.py` (a small
fixed subset with a threshold). Scores per attribute:

    background  the border's color is the named background color
    color       the shape's color is the named color
    shape       the shape's kind is the named kind
    position    the shape's box center is in the named third (prompts that name a position only)
    size        small/large as named (prompts that name a size only)
    all         every attribute the prompt names is right

reported for prompts whose (color, shape, background) combination was seen in training, for the
held-out combinations, and for all prompts together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .shapes import Prompt, bench_prompts, check_image

ATTRIBUTES = ("background", "color", "shape", "position", "size", "all")


@dataclass
class Outcome:
    prompt: Prompt
    correct: dict[str, bool]   # attribute -> correct, for the attributes the prompt names


def score_image(prompt: Prompt, image) -> Outcome:
    c = check_image(image)
    correct = {"background": c.background == prompt.background, "color": c.color == prompt.color,
               "shape": c.shape == prompt.shape}
    if prompt.position is not None:
        correct["position"] = c.position == prompt.position
    if prompt.size_word is not None:
        correct["size"] = c.size_word == prompt.size_word
    correct["all"] = all(correct.values())
    return Outcome(prompt, correct)


def summarize(outcomes: list[Outcome]) -> dict:
    """{"seen": {...}, "held_out": {...}, "all": {...}}; each attribute -> accuracy (0..1), plus counts."""
    out = {}
    for group, keep in (("seen", lambda o: not o.prompt.held_out), ("held_out", lambda o: o.prompt.held_out),
                        ("all", lambda o: True)):
        chosen = [o for o in outcomes if keep(o)]
        acc = {"n": len(chosen)}
        for attr in ATTRIBUTES:
            vals = [o.correct[attr] for o in chosen if attr in o.correct]
            acc[attr] = round(sum(vals) / len(vals), 4) if vals else None
        out[group] = acc
    return out


def run_adherence(pipe, prompts: list[Prompt] | None = None, *, n: int = 200, steps: int = 20,
                  sampler: str = "dpm++2m", cfg_scale: float = 7.5, size: int | None = None,
                  progress=None, keep_images: bool = False, deep_cache: int = 0) -> dict:
    """Generate one image per prompt (its own fixed seed) and score it; returns the summary with
    `seconds_per_image`, and `outcomes` / `images` lists. `deep_cache`: DeepCache's N (0: off)."""
    prompts = bench_prompts(n) if prompts is None else prompts
    if size is None:
        size = pipe.native_size
    outcomes, images = [], []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        result = pipe.generate(p.text, steps=steps, cfg_scale=cfg_scale, seed=p.seed, width=size,
                               height=size, sampler=sampler, **({"deep_cache": deep_cache} if deep_cache else {}))
        outcomes.append(score_image(p, result.image))
        if keep_images:
            images.append(result.image)
        if progress is not None:
            progress(i + 1, len(prompts))
    seconds = (time.perf_counter() - t0) / max(len(prompts), 1)
    summary = summarize(outcomes)
    summary["seconds_per_image"] = round(seconds, 4)
    summary["outcomes"] = outcomes
    if keep_images:
        summary["images"] = images
    return summary
