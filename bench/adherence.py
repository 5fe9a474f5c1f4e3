"""Prompt adherence of the shipped shapes model (or any shapes model folder).

    python bench/adherence.py                      # 200 prompts, dpm++2m, 20 steps: one JSON line
    python bench/adherence.py --sampler euler_a --steps 10 -n 50
    python bench/adherence.py --weights int8       # weights rounded to int8 per output channel
    python bench/adherence.py --matrix --card src/sdlite/assets/sdlite-shapes/README.md

Each prompt names a shape color, kind and background (and in about half of them a size and a
position); a quarter of them are combinations held out of training. Every image is generated with the
prompt's own fixed seed and read back by `sdlite.train.shapes.check_image` (exact flat colors, template
matching for the kind). One JSON line per configuration: accuracy per attribute for seen combinations,
held-out ones and all. `--matrix` runs every configuration of the model card's table and, with
`--card`, rewrites the table between the card's `<!-- adherence:begin/end -->` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sdlite.pipeline import Pipeline
from sdlite.train.adherence import cast_weights_fp16, cast_weights_int8, run_adherence
from sdlite.train.shapes import bench_prompts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "src" / "sdlite" / "assets" / "sdlite-shapes"


def load(model: Path, weights: str, lever: str | None, threads: int) -> Pipeline:
    if weights == "fp16-compute":
        pipe = Pipeline.load(model, dtype=torch.float16, threads=threads)
    else:
        pipe = Pipeline.load(model, threads=threads)
    if weights == "fp16":
        cast_weights_fp16(pipe)
    elif weights == "int8":
        cast_weights_int8(pipe)
    if lever is not None:
        apply_lever(pipe, lever)
    return pipe


def apply_lever(pipe: Pipeline, lever: str) -> None:
    """Memory levers of `sdlite.runtime`, where it has them."""
    try:
        from sdlite import runtime
    except ImportError as exc:  # pragma: no cover
        raise SystemExit(f"lever {lever}: sdlite.runtime is missing ({exc})")
    fn = getattr(runtime, f"enable_{lever}", None)
    if fn is None:
        raise SystemExit(f"lever {lever}: sdlite.runtime has no enable_{lever}(pipe)")
    fn(pipe)


def one(model: Path, n: int, steps: int, sampler: str, cfg: float, weights: str, lever: str | None,
        threads: int, label: str | None = None) -> dict:
    pipe = load(model, weights, lever, threads)
    prompts = bench_prompts(n)
    summary = run_adherence(pipe, prompts, steps=steps, sampler=sampler, cfg_scale=cfg)
    summary.pop("outcomes")
    pipe.close()
    row = {"bench": "adherence", "label": label or f"{sampler} {steps} steps, {weights}",
           "sampler": sampler, "steps": steps, "cfg_scale": cfg, "weights": weights, "lever": lever,
           "n": n, **summary}
    print(json.dumps(row), flush=True)
    return row


# (label, sampler, steps, weights, lever)
MATRIX = [
    ("default: DPM++ 2M, 20 steps", "dpm++2m", 20, "stored", None),
    ("DDIM 10", "ddim", 10, "stored", None),
    ("DDIM 20", "ddim", 20, "stored", None),
    ("DPM++ 2M 10", "dpm++2m", 10, "stored", None),
    ("DPM++ 2M Karras 20", "dpm++2m_karras", 20, "stored", None),
    ("Euler 10", "euler", 10, "stored", None),
    ("Euler 20", "euler", 20, "stored", None),
    ("Euler a 10", "euler_a", 10, "stored", None),
    ("Euler a 20", "euler_a", 20, "stored", None),
    ("int8 weights (per-channel), DPM++ 2M 20", "dpm++2m", 20, "int8", None),
    ("fp16 compute, DPM++ 2M 20", "dpm++2m", 20, "fp16-compute", None),
]


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table(rows: list[dict]) -> str:
    head = ("| configuration | n | background | shape color | shape kind | position | size | all "
            "| held-out: bg / color / kind / all | s/image |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        s, h = r["seen"], r["held_out"]
        lines.append(f"| {r['label']} | {r['n']} | {pct(s['background'])} | {pct(s['color'])} | "
                     f"{pct(s['shape'])} | {pct(s['position'])} | {pct(s['size'])} | {pct(s['all'])} | "
                     f"{pct(h['background'])} / {pct(h['color'])} / {pct(h['shape'])} / {pct(h['all'])} | "
                     f"{r['seconds_per_image']:.2f} |")
    return head + "\n".join(lines) + "\n"


def update_card(card: Path, rows: list[dict], note: str) -> None:
    begin, end = "<!-- adherence:begin -->", "<!-- adherence:end -->"
    text = card.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{card}: no {begin} ... {end} markers")
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    card.write_text(pre + begin + "\n" + note + "\n\n" + table(rows) + end + post, encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("-n", type=int, default=200, help="number of prompts (default 200)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--weights", choices=("stored", "fp16", "int8", "fp16-compute"), default="stored",
                   help="stored: as in the folder (fp16), computed in fp32; int8: rounded to int8 per "
                        "output channel; fp16-compute: fp16 weights and activations")
    p.add_argument("--lever", help="a memory lever of sdlite.runtime (enable_<lever>(pipe))")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--matrix", action="store_true", help="every configuration of the model card table")
    p.add_argument("--levers", nargs="*", default=[], help="with --matrix: levers to add as rows")
    p.add_argument("--card", type=Path, help="with --matrix: model card whose table to rewrite")
    p.add_argument("--jsonl", type=Path, help="append the JSON lines here too")
    a = p.parse_args(argv)

    rows = []
    t0 = time.perf_counter()
    configs = MATRIX + [(f"lever {lv}, DPM++ 2M 20", "dpm++2m", 20, "stored", lv) for lv in a.levers] \
        if a.matrix else [(None, a.sampler, a.steps, a.weights, a.lever)]
    for label, sampler, steps, weights, lever in configs:
        row = one(a.model, a.n, steps, sampler, a.cfg_scale, weights, lever, a.threads, label)
        rows.append(row)
        if a.jsonl:
            with a.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if a.card:
        note = (f"`python bench/adherence.py --matrix -n {a.n}` (cfg scale {a.cfg_scale:g}, "
                f"{a.threads} threads, {time.strftime('%Y-%m-%d')}); accuracies in %; the first columns "
                "are prompts whose combination was seen in training, then held-out combinations.")
        update_card(a.card, rows, note)
    print(f"# {len(rows)} configurations in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
