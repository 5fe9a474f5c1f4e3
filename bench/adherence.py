"""Prompt adherence of the shipped shapes model (or any shapes model folder).

    python bench/adherence.py                      # 200 prompts, dpm++2m, 20 steps: one JSON line
    python bench/adherence.py --sampler euler_a --steps 10 -n 50
    python bench/adherence.py --weights int8       # weights rounded to int8 per output channel
    python bench/adherence.py --precision bf16 --deep-cache 3   # bf16 compute, DeepCache N=3
    python bench/adherence.py --kv-store int8 --kv-tokens eot   # compressed cross-attention K/V
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

from sdlite.pipeline import Pipeline
from sdlite.train.adherence import run_adherence
from sdlite.train.shapes import bench_prompts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "src" / "sdlite" / "assets" / "sdlite-shapes"


_CONVERTED: dict[tuple[Path, str], Path] = {}


def weights_folder(model: Path, weights: str, scratch: Path) -> Path:
    """The model with its weights stored as `weights` (sdlite convert), made once per run."""
    if weights == "stored":
        return model
    key = (model, weights)
    if key not in _CONVERTED:
        from sdlite.runtime.convert import convert_model
        dst = scratch / f"{model.name}-{weights}"
        if not dst.exists():
            convert_model(model, dst, weights)
        _CONVERTED[key] = dst
    return _CONVERTED[key]


# lever name -> (Plan changes, attention slice size or None)
LEVERS = {
    "cfg_split": ({"cfg": "split"}, None),
    "staged": ({"residency": "staged"}, None),
    "tiled_vae": ({"vae_tile": 8, "vae_overlap": 4}, None),
    "sliced_attention": ({"attention": "sliced"}, 16),
    "no_kv_cache": ({"kv_cache": False}, None),
    "materialize": ({"weights_mode": "materialize"}, None),
}


def load(model: Path, weights: str, lever: str | None, threads: int, scratch: Path,
         precision: str = "fp32", kv: tuple[str, str] = ("compute", "all")) -> Pipeline:
    from sdlite.runtime.planner import Plan
    folder = weights_folder(model, "fp16" if weights == "fp16-compute" else weights, scratch)
    changes, chunk = LEVERS[lever] if lever else ({}, None)
    plan = Plan(width=64, height=64, kv_store=kv[0], kv_tokens=kv[1], **changes)
    if weights == "fp16-compute":
        precision = "fp16"
    pipe = Pipeline.load(folder, plan=plan, precision=precision, threads=threads)
    if chunk is not None:  # slices smaller than this model's token counts, so that slicing happens
        from sdlite.runtime.attention import set_attention
        for part in (pipe.text_encoder, pipe.unet, pipe.vae):
            set_attention(part.module, "sliced", chunk=chunk)
        pipe._attention_chunk = chunk
    return pipe


def one(model: Path, n: int, steps: int, sampler: str, cfg: float, weights: str, lever: str | None,
        threads: int, scratch: Path, label: str | None = None, precision: str = "fp32", deep_cache: int = 0,
        kv: tuple[str, str] = ("compute", "all")) -> dict:
    pipe = load(model, weights, lever, threads, scratch, precision, kv)
    prompts = bench_prompts(n)
    summary = run_adherence(pipe, prompts, steps=steps, sampler=sampler, cfg_scale=cfg, deep_cache=deep_cache)
    summary.pop("outcomes")
    pipe.close()
    row = {"bench": "adherence", "label": label or f"{sampler} {steps} steps, weights {weights}"
           + (f", lever {lever}" if lever else "") + (f", {precision} compute" if precision != "fp32" else "")
           + (f", DeepCache {deep_cache}" if deep_cache else "")
           + (f", K/V {kv[0]}" if kv[0] != "compute" else "") + (f", K/V tokens {kv[1]}" if kv[1] != "all" else ""),
           "sampler": sampler, "steps": steps, "cfg_scale": cfg, "weights": weights, "lever": lever,
           "precision": precision, "deep_cache": deep_cache, "kv_store": kv[0], "kv_tokens": kv[1],
           "model": model.name, "n": n, **summary}
    print(json.dumps(row), flush=True)
    return row


# (label, sampler, steps, weights, lever[, precision, deep_cache])
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
    ("int8 weights (UNet + text encoder), DPM++ 2M 20", "dpm++2m", 20, "int8", None),
    ("fp16 weights and compute, DPM++ 2M 20", "dpm++2m", 20, "fp16-compute", None),   # slow on CPU: capped
] + [(f"lever {lv}, DPM++ 2M 20", "dpm++2m", 20, "stored", lv) for lv in LEVERS] + [
    ("bf16 compute, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "bf16", 0),
    ("int8 compute (UNet transformer Linear), DPM++ 2M 20", "dpm++2m", 20, "stored", None, "int8", 0),
    ("DeepCache 2, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "fp32", 2),
    ("DeepCache 3, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "fp32", 3),
    ("DeepCache 5, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "fp32", 5),
    ("bf16 compute + DeepCache 3, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "bf16", 3),
    ("K/V cache bf16, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "fp32", 0, ("bf16", "all")),
    ("K/V cache int8 per head, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "fp32", 0, ("int8", "all")),
    ("K/V tokens through first EOT, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "fp32", 0, ("compute", "eot")),
    ("K/V int8 + tokens through first EOT, DPM++ 2M 20", "dpm++2m", 20, "stored", None, "fp32", 0, ("int8", "eot")),
]
CAPPED = {"fp16-compute": 50}


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


def update_card(card: Path, rows: list[dict], note: str, keep_note: str | None = None) -> None:
    """Rewrite the table between the card's markers; `keep_note`: keep the note written there before, with
    this sentence added (when it is not there yet), instead of the generic `note`."""
    begin, end = "<!-- adherence:begin -->", "<!-- adherence:end -->"
    text = card.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{card}: no {begin} ... {end} markers")
    pre, rest = text.split(begin, 1)
    old, post = rest.split(end, 1)
    if keep_note is not None:
        note = old.split("\n| configuration", 1)[0].strip()
        if keep_note not in note:
            note += " " + keep_note
    card.write_text(pre + begin + "\n" + note + "\n\n" + table(rows) + end + post, encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("-n", type=int, default=200, help="number of prompts (default 200)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--cfg-scale", type=float, default=7.5)
    p.add_argument("--weights", choices=("stored", "fp32", "fp16", "int8", "fp16-compute"), default="stored",
                   help="stored: as in the folder (the shipped model: fp16), computed in fp32; fp32/fp16/int8: "
                        "converted with `sdlite convert`; fp16-compute: fp16 weights and activations")
    p.add_argument("--lever", choices=sorted(LEVERS), help="a memory lever of the runtime's plan")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"), default="fp32",
                   help="compute precision (runtime.precision)")
    p.add_argument("--deep-cache", type=int, default=0, help="DeepCache N (0: off)")
    p.add_argument("--kv-store", choices=("compute", "bf16", "int8"), default="compute",
                   help="how the cached text K/V are kept (runtime.kv_cache)")
    p.add_argument("--kv-tokens", choices=("all", "eot"), default="all",
                   help="all 77 tokens, or through the first end-of-text token")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", help="the row's label (default: made from the options)")
    p.add_argument("--matrix", action="store_true", help="every configuration of the model card table")
    p.add_argument("--only", nargs="*", help="with --matrix: only rows whose label contains one of these")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/sdlite-adherence"),
                   help="where converted weight folders go")
    p.add_argument("--card", type=Path, help="with --matrix: model card whose table to rewrite")
    p.add_argument("--jsonl", type=Path, help="append the JSON lines here too")
    p.add_argument("--keep-note", metavar="SENTENCE", help="with --card: keep the card's note, adding this sentence")
    a = p.parse_args(argv)

    rows = []
    t0 = time.perf_counter()
    configs = MATRIX if a.matrix else [(a.label, a.sampler, a.steps, a.weights, a.lever, a.precision, a.deep_cache,
                                        (a.kv_store, a.kv_tokens))]
    if a.only:
        configs = [c for c in configs if any(o in c[0] for o in a.only)]
    a.scratch.mkdir(parents=True, exist_ok=True)
    for label, sampler, steps, weights, lever, *more in configs:
        n = min(a.n, CAPPED.get(weights, a.n)) if a.matrix else a.n
        row = one(a.model.resolve(), n, steps, sampler, a.cfg_scale, weights, lever, a.threads, a.scratch,
                  label, *more)
        rows.append(row)
        if a.jsonl:
            with a.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if a.card:
        # merge with the rows measured before (by label), in the matrix's order
        store = a.card.parent / "adherence.json"
        old = json.loads(store.read_text()) if store.exists() else []
        by_label = {r["label"]: r for r in old}
        by_label.update({r["label"]: r for r in rows})
        order = [c[0] for c in MATRIX]
        merged = sorted(by_label.values(), key=lambda r: order.index(r["label"]) if r["label"] in order
                        else len(order))
        store.write_text(json.dumps(merged, indent=1) + "\n")
        note = (f"`python bench/adherence.py --matrix -n {a.n} --card {a.card}` (cfg scale {a.cfg_scale:g}, "
                f"{a.threads} threads, 64x64); accuracies in %; fp16 compute is slow on CPU, so that row uses "
                f"the first {CAPPED['fp16-compute']} prompts. The first columns are prompts whose "
                "(color, kind, background) combination was seen in training; then held-out combinations. "
                "Position and size count only prompts that name them; *all* = every named attribute right.")
        update_card(a.card, merged, note, a.keep_note)
    print(f"# {len(rows)} configurations in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
