"""The model card (README.md) of a trained shapes model folder, from its training.json.

The adherence table between the `<!-- adherence:begin -->` / `<!-- adherence:end -->` markers is
written by `bench/adherence.py --matrix --card <folder>/README.md`; rewriting the card keeps it.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..fileio import read_json
from . import shapes

BEGIN, END = "<!-- adherence:begin -->", "<!-- adherence:end -->"


def _params(folder: Path, part: str) -> int:
    from ..weights.state_dict import load_component_weights
    with load_component_weights(folder / part) as w:
        return sum(math.prod(w.shape_of(k)) for k in w.keys())


def write_card(folder: str | Path) -> Path:
    folder = Path(folder)
    info = read_json(folder / "training.json")
    r, times, vae, unet = info["recipe"], info["times_s"], info["vae"], info["unet"]
    card = folder / "README.md"
    table = f"{BEGIN}\n(not measured yet: run `python bench/adherence.py --matrix --card {card}`)\n{END}"
    if card.exists():
        old = card.read_text(encoding="utf-8")
        if BEGIN in old and END in old:
            table = BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END
    sizes = {p: sum(f.stat().st_size for f in (folder / p).rglob("*") if f.is_file())
             for p in ("text_encoder", "unet", "vae", "tokenizer", "scheduler")}
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    params = {p: _params(folder, p) for p in ("text_encoder", "unet", "vae")}
    held_cs = ", ".join(f"{c} {s}" for c, s in sorted(shapes.HELD_OUT_COLOR_SHAPE))
    held_cb = ", ".join(f"{c} on {b}" for c, b in sorted(shapes.HELD_OUT_COLOR_BACKGROUND))
    minutes = sum(times.values()) / 60
    loss = unet.get("final_loss_ema")
    final_loss = f" Final training loss (min-SNR weighted, smoothed): {loss:.4f}." if loss is not None else ""
    vocab = read_json(folder / "text_encoder" / "config.json")["vocab_size"]
    text = f"""# sdlite-shapes

A tiny text-to-image model that the sdlite repository trains itself, on two CPU cores, so that
`sdlite generate "a red circle on a blue background"` works offline on a fresh machine. It has Stable
Diffusion 1.x's architecture family and folder layout (CLIP text encoder, UNet with cross-attention,
AutoencoderKL with 4 latent channels, SD 1.5's scheduler config), so it runs through exactly the code
paths real checkpoints use, and diffusers' `StableDiffusionPipeline` loads it as well.

It draws one flat-colored shape on a flat-colored background at 64x64, and nothing else.

## Data

Procedural, generated on the fly and deterministic by seed (`sdlite.train.shapes`): one shape
({", ".join(shapes.SHAPES)}) in one of {len(shapes.COLORS)} colors ({", ".join(shapes.COLORS)}) on a
background of another of them, with an optional size word (small, large) and an optional position
(a cell of a 3x3 grid: "at the top left", "in the center", ...), e.g.
"a small red circle at the top left on a blue background". Captions name the shape's color, kind and
background always; size and position each in about half of them.

Held out of training (never in a training caption or image), to test composition:
- shape color with kind: {held_cs};
- shape color on background: {held_cb}.

That leaves {len(shapes.train_combos())} of the {len(shapes.all_combos())} (color, kind, background)
combinations for training; the UNet stage saw a pool of {r["latent_pool"]} encoded training scenes.

## Model

| part | parameters | on disk ({r["export_dtype"]}) | shape |
|---|---|---|---|
| text encoder (CLIP) | {params["text_encoder"] / 1e6:.2f} M | {sizes["text_encoder"] / 2**20:.2f} MiB | hidden {r["text_config"]["hidden_size"]}, {r["text_config"]["num_hidden_layers"]} layers, {r["text_config"]["num_attention_heads"]} heads, 77 positions, vocab {vocab} |
| UNet | {params["unet"] / 1e6:.2f} M | {sizes["unet"] / 2**20:.2f} MiB | blocks {r["unet_config"]["block_out_channels"]}, cross-attention at 8x8 and 4x4 and in the mid block, {r["unet_config"]["sample_size"]}x{r["unet_config"]["sample_size"]}x4 latents |
| VAE (AutoencoderKL) | {params["vae"] / 1e6:.2f} M | {sizes["vae"] / 2**20:.2f} MiB | blocks {r["vae_config"]["block_out_channels"]}, factor 4, 4 latent channels, scaling factor {vae["scaling_factor"]:.4f} |
| tokenizer | | {sizes["tokenizer"] / 2**10:.1f} KiB | CLIP byte-level BPE (vocab.json + merges.txt) learned on the caption words |

Total on disk: {total / 2**20:.2f} MiB.

## Training recipe

`python -m sdlite.train --work runs/shapes --out src/sdlite/assets/sdlite-shapes` (seed {r["seed"]}, up to
{r["threads"]} torch threads: the trainer times 1 and {r["threads"]} threads every 1000 steps and uses the faster, since on
shared cores one thread can be several times faster than two; rerunning the same command resumes from the
last checkpoint; `--threads 1` makes a run bitwise reproducible, otherwise runs differ by float rounding):

1. tokenizer: BPE learned on every caption word (`write_clip_tokenizer`).
2. VAE: {r["vae_steps"]} steps of AdamW (lr {r["vae_lr"]:g}, cosine), batch {r["vae_batch"]} of freshly rendered
   scenes, loss MSE + L1 + {r["kl_weight"]:g} x KL. Reconstruction of fresh scenes: PSNR {vae["recon_psnr_db"]:.1f} dB,
   checker reads the reconstruction right {100 * vae["recon_checker_accuracy"]:.1f}% of the time.
   Scaling factor = 1 / std of the latent means = {vae["scaling_factor"]:.4f}.
3. Latent pool: {r["latent_pool"]} training scenes encoded once.
4. Text encoder + UNet, jointly from scratch: {unet["steps_done"]} steps (of {r["unet_steps"]} planned) of
   AdamW (lr {r["unet_lr"]:g}, {r["warmup_steps"]} warmup steps, cosine, weight decay {r["weight_decay"]:g}), batch {r["unet_batch"]},
   epsilon prediction on SD 1.x's schedule (scaled_linear betas 0.00085..0.012, 1000 steps) with
   min-SNR loss weighting (gamma {r["min_snr_gamma"]:g}), captions
   replaced by the empty prompt {100 * r["caption_dropout"]:.0f}% of the time (for classifier-free guidance),
   EMA {r["ema_decay"]} of the weights (exported).{final_loss}
5. Export: EMA weights in {r["export_dtype"]}, diffusers folder layout.

Wall time on this repository's 2-core machine: {minutes:.1f} minutes
({", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())}).

## Adherence

`bench/adherence.py`: for fixed prompts (a quarter of them held-out combinations), one image each with a
fixed seed, read back by a checker (`sdlite.train.shapes.check_image`): background = most common named
color on the border, shape color = most common other named color, kind = the best IoU among templates
drawn in the shape's bounding box, position = which third the box center is in, size = box side.
The checker reads rendered ground-truth scenes 100% right (tests/test_shapes_data.py).

{table}

## Limits

64x64 only (other sizes run, but the model never saw them); one shape per image; only the words above
mean anything to it (other words tokenize, byte by byte, and are ignored or confuse it).
"""
    card.write_text(text, encoding="utf-8")
    return card
