"""The lighter shapes UNet, end to end: prune, distill for 10 and 30 minutes, and the adherence of each.

    .venv/bin/python bench/lighten.py [--work /tmp/sdlite-lighten] [--threads 1] [--minutes 10,30] \
        [--prune "--drop mid --drop up_blocks.1.attentions --drop down_blocks.2.attentions"] [--card CARD]

Every step runs the real command (printed before it runs) and is skipped when its output exists, so the
script can be rerun after an interruption:

1. prompts   512 distillation prompts (`sdlite.train.shapes.distill_prompts`: combinations seen in
             training only; the bench's held-out combinations stay unseen)
2. prune     sdlite prune SHAPES WORK/pruned with `--prune`'s options (default: the mid block, the
             attentions of up block 1 and of down block 2: 31.7 % of the parameters; `--prune "--target 0.3
             --importance output"` lets the output importance on the first 16 prompts choose)
3. distill   a copy of WORK/pruned distilled with `--threads 1` until 10 minutes (copied to
             WORK/distilled-10), then resumed until 30 (WORK/distilled-30)
4. adherence bench/adherence.py (200 prompts, DPM++ 2M 20 steps, cfg 7.5) on the teacher, the pruned
             model and each distilled one: one JSON line each, in WORK/adherence.jsonl

Then one JSON line per model with its UNet parameters and the adherence ("all named attributes"). With
`--card`, the rows join those of earlier runs (other `--prune` options) in `lighten.json` beside the card,
and the card's <!-- lighten:begin/end --> table is rewritten from them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "src" / "sdlite" / "assets" / "sdlite-shapes"
PY = sys.executable


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def unet_params(folder: Path) -> int:
    from sdlite.weights.sources import open_model
    with open_model(folder).part("unet").open_weights() as w:
        return sum(t.numel() for k in w.keys() for t in [w[k]])


def make_models(work: Path, a) -> dict[str, Path]:
    """Steps 1-3: the prompts, the pruned model, the distilled copies; {row name: folder}."""
    sdlite = [PY, "-m", "sdlite"]
    prompts = work / "prompts.txt"
    if not prompts.exists():
        from sdlite.train.shapes import distill_prompts
        prompts.write_text("\n".join(distill_prompts(512)) + "\n", encoding="utf-8")
        (work / "probe.txt").write_text("\n".join(distill_prompts(512)[:16]) + "\n", encoding="utf-8")
    pruned = work / "pruned"
    if not pruned.exists():
        extra = a.prune.split()
        if "--importance" in extra:
            extra += ["--prompts", str(work / "probe.txt")]
        run(sdlite + ["prune", SHAPES, pruned, "--no-measure", *extra])
    live = work / "distilling"
    models = {"teacher": SHAPES, "pruned": pruned}
    for m in [float(m) for m in a.minutes.split(",")]:
        out = work / f"distilled-{m:g}"
        models[f"distilled {m:g} min"] = out
        if out.exists():
            continue
        if not live.exists():
            shutil.copytree(pruned, live)
        run(sdlite + ["distill", live, "--teacher", SHAPES, "--prompts", prompts, "--minutes", f"{m:g}",
                      "--threads", str(a.threads)])
        shutil.copytree(live, out, ignore=shutil.ignore_patterns("distill"))
    return models


def adherence_rows(work: Path, models: dict[str, Path], a) -> dict[str, dict]:
    """Step 4: bench/adherence.py on each model not measured yet; {row name: its JSON row}."""
    jsonl = work / "adherence.jsonl"

    def read() -> dict:
        return {r["label"]: r for r in map(json.loads, jsonl.read_text().splitlines())} if jsonl.exists() else {}
    done = read()
    for name, folder in models.items():
        if not a.skip_adherence and name not in done:
            run([PY, ROOT / "bench" / "adherence.py", "-m", folder, "-n", str(a.n), "--threads",
                 str(a.adherence_threads), "--jsonl", jsonl, "--label", name])
    return read()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/sdlite-lighten"))
    p.add_argument("--threads", type=int, default=1, help="distillation threads (1: reproducible)")
    p.add_argument("--adherence-threads", type=int, default=2)
    p.add_argument("--minutes", default="10,30", help="distillation totals to keep a copy at")
    p.add_argument("--prune", default="--drop mid --drop up_blocks.1.attentions --drop down_blocks.2.attentions",
                   help="the options of sdlite prune")
    p.add_argument("-n", type=int, default=200, help="adherence prompts")
    p.add_argument("--skip-adherence", action="store_true")
    p.add_argument("--card", type=Path, help="model card whose <!-- lighten:begin/end --> table to rewrite")
    a = p.parse_args(argv)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    models = make_models(work, a)
    done = adherence_rows(work, models, a)
    rows = []
    for name, folder in models.items():
        row = {"bench": "lighten", "prune": a.prune if name != "teacher" else "", "model": name,
               "folder": str(folder), "unet_params": unet_params(folder)}
        distill = folder / "sdlite_distill.json"
        if distill.exists():
            d = json.loads(distill.read_text())
            row.update(distill_steps=d["steps"], distill_minutes=d["minutes"], distill_threads=d["threads"])
        if name in done:
            row.update(adherence_all=done[name]["all"]["all"], held_out_all=done[name]["held_out"]["all"],
                       seen_all=done[name]["seen"]["all"], position=done[name]["all"]["position"],
                       seconds_per_image=done[name]["seconds_per_image"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.card:
        write_card(a.card, rows, work, a)
    return 0


def write_card(card: Path, rows: list[dict], work: Path, a) -> None:
    """Merge `rows` into lighten.json beside the card (by prune options and model) and rewrite the table."""
    begin, end = "<!-- lighten:begin -->", "<!-- lighten:end -->"
    text = card.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{card}: no {begin} ... {end} markers")
    store = card.parent / "lighten.json"
    merged = {(r["prune"], r["model"]): r for r in (json.loads(store.read_text()) if store.exists() else [])}
    pruned = work / "pruned" / "sdlite_pruned.json"
    for r in rows:
        if r["prune"] and pruned.exists():
            r["removed"] = [x["unit"] for x in json.loads(pruned.read_text())["removed"]]
        merged[(r["prune"], r["model"])] = {k: v for k, v in r.items() if k != "folder"}
    ordered = sorted(merged.values(), key=lambda r: (r["prune"] != "", r["prune"], r["model"] != "pruned", r["model"]))
    store.write_text(json.dumps(ordered, indent=1) + "\n")
    teacher = next(r["unet_params"] for r in ordered if not r["prune"])
    lines = ["| removed | UNet parameters | distillation | all named attributes: all / seen / held-out | "
             "position |", "|---|---|---|---|---|"]
    for r in ordered:
        what = "(the teacher)" if not r["prune"] else ", ".join(r.get("removed", [])) + (
            f" (chosen by `{r['prune']}`)" if "--target" in r["prune"] else "")
        params = f"{r['unet_params']:,}" + ("" if r["unet_params"] == teacher else
                                           f" ({1 - r['unet_params'] / teacher:.1%} fewer)")
        dist = (f"{r['distill_minutes']:g} min, {r['distill_steps']} steps" if "distill_steps" in r
                else ("none" if r["prune"] else "-"))
        acc = (f"{100 * r['adherence_all']:.1f} / {100 * r['seen_all']:.1f} / {100 * r['held_out_all']:.1f}"
               if "adherence_all" in r else "not measured")
        pos = f"{100 * r['position']:.1f}" if r.get("position") is not None else "-"
        lines.append(f"| {what} | {params} | {dist} | {acc} | {pos} |")
    note = (f"`python bench/lighten.py --prune \"OPTIONS\" --card {card}` (distillation: 512 prompts of seen "
            f"combinations, batch 16, AdamW 2e-4, {a.threads} thread, the teacher's latents drawn first and counted "
            "in the minutes; adherence: 200 prompts, DPM++ 2M 20 steps, cfg 7.5). Accuracies in %; *position* "
            "counts the prompts that name one. Speed and memory: README \"Lighter UNets\".")
    card.write_text(text.split(begin)[0] + begin + "\n" + note + "\n\n" + "\n".join(lines) + "\n" + end
                    + text.split(end, 1)[1], encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
