"""A procedural captioned dataset of simple shapes, and a checker that reads the attributes back.

Every scene is one flat-colored shape on a flat-colored background, drawn without antialiasing so
that every pixel has exactly one of the named colors:

    "a small red circle at the top left on a blue background"
    "a yellow cross on a black background"

The caption always names the shape's color, its kind and the background color; the size word
("small"/"large") and the position phrase (a cell of a 3x3 grid) are each present in about half of
the captions. Scenes are a pure function of a seed (`scene_stream(seed)`), so the dataset is
reproducible without storing it.

Composition is tested with held-out combinations: some (shape color, shape kind) pairs and some
(shape color, background color) pairs never occur in training scenes (`is_held_out`); the bench asks
for them and reports their accuracy separately.

The checker (`check_image`) needs no network: background = the most common named color on the
border, shape = the pixels of another named color, its color = their most common named color, its
kind = the best-matching template (by IoU) drawn in the shape's bounding box, its position = the
third of the image its bounding-box center lies in, its size = the bounding-box side.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np

IMAGE_SIZE = 64

# Far apart in RGB (the closest pair, blue/purple, is 116 apart), so that a slightly off color from
# the model is still nearest to the intended one.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 220, 30),
    "green": (30, 170, 50),
    "cyan": (30, 210, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# half side in pixels for each size word; scenes whose caption has no size word use any value
# between the two ranges' extremes
SIZE_RADIUS = {"small": (8, 10), "large": (15, 17)}
ANY_RADIUS = (8, 17)
# (row, column) of a 3x3 grid -> phrase
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "at the left", (1, 1): "in the center", (1, 2): "at the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
POSITION_WORDS = {v: k for k, v in POSITIONS.items()}

# Never in training: these shape colors with these kinds, and these shape colors on these backgrounds.
HELD_OUT_COLOR_SHAPE = frozenset({("red", "triangle"), ("green", "square"), ("blue", "cross"),
                                  ("yellow", "circle"), ("purple", "triangle")})
HELD_OUT_COLOR_BACKGROUND = frozenset({("cyan", "black"), ("white", "purple"), ("black", "yellow"),
                                       ("blue", "green")})


@dataclass(frozen=True)
class Scene:
    color: str          # the shape's color
    shape: str          # circle, square, triangle, cross
    background: str     # background color
    cx: float           # center of the shape's bounding box, pixels
    cy: float
    radius: float       # half the bounding box side, pixels
    size_word: str | None = None          # "small"/"large" when the caption says it
    position: tuple[int, int] | None = None   # grid cell when the caption says it

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.color, self.shape, self.background)

    def caption(self) -> str:
        return make_caption(self.color, self.shape, self.background, self.size_word, self.position)


def make_caption(color: str, shape: str, background: str, size_word: str | None = None,
                 position: tuple[int, int] | None = None) -> str:
    words = ["a"]
    if size_word:
        words.append(size_word)
    words += [color, shape]
    if position is not None:
        words.append(POSITIONS[position])
    words += ["on", "a", background, "background"]
    return " ".join(words)


def is_held_out(color: str, shape: str, background: str) -> bool:
    return (color, shape) in HELD_OUT_COLOR_SHAPE or (color, background) in HELD_OUT_COLOR_BACKGROUND


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOR_NAMES for s in SHAPES for b in COLOR_NAMES if b != c]


def train_combos() -> list[tuple[str, str, str]]:
    return [t for t in all_combos() if not is_held_out(*t)]


def held_out_combos() -> list[tuple[str, str, str]]:
    return [t for t in all_combos() if is_held_out(*t)]


def _cell_center(index: int, radius: float, size: int) -> float:
    lo, hi = radius + 1, size - radius - 1
    return (lo, size / 2, hi)[index]


def make_scene(rng: random.Random, combo: tuple[str, str, str], *, size_word: str | None = None,
               position: tuple[int, int] | None = None, size: int = IMAGE_SIZE) -> Scene:
    """A scene for `combo` with the given (optional) size word and grid cell; the rest drawn from `rng`."""
    color, shape, background = combo
    lo, hi = SIZE_RADIUS[size_word] if size_word else ANY_RADIUS
    scale = size / IMAGE_SIZE
    radius = rng.uniform(lo, hi) * scale
    if position is None:
        cx = rng.uniform(radius + 1, size - radius - 1)
        cy = rng.uniform(radius + 1, size - radius - 1)
    else:
        row, col = position
        jitter = 2.0 * scale
        cx = _cell_center(col, radius, size) + rng.uniform(-jitter, jitter) * (1 if col == 1 else 0.5)
        cy = _cell_center(row, radius, size) + rng.uniform(-jitter, jitter) * (1 if row == 1 else 0.5)
        # keep the shape inside the image
        cx = min(max(cx, radius + 1), size - radius - 1)
        cy = min(max(cy, radius + 1), size - radius - 1)
    return Scene(color, shape, background, cx, cy, radius, size_word, position)


def random_scene(rng: random.Random, combos: list[tuple[str, str, str]], size: int = IMAGE_SIZE,
                 p_size_word: float = 0.5, p_position: float = 0.5) -> Scene:
    combo = combos[rng.randrange(len(combos))]
    size_word = rng.choice(SIZES) if rng.random() < p_size_word else None
    position = rng.choice(list(POSITIONS)) if rng.random() < p_position else None
    return make_scene(rng, combo, size_word=size_word, position=position, size=size)


def scene_stream(seed: int, split: str = "train", size: int = IMAGE_SIZE) -> Iterator[Scene]:
    """An endless, deterministic stream of scenes. `split`: "train" (held-out combos never appear),
    "held_out" (only held-out combos) or "all"."""
    combos = {"train": train_combos, "held_out": held_out_combos, "all": all_combos}[split]()
    rng = random.Random(f"shapes:{split}:{seed}")
    while True:
        yield random_scene(rng, combos, size)


# --- drawing --------------------------------------------------------------------------------------

def shape_mask(shape: str, cx: float, cy: float, rx: float, ry: float | None = None,
               size: int | tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask [H, W] of `shape` with bounding box center (cx, cy) and half sides (rx, ry),
    sampled at pixel centers."""
    ry = rx if ry is None else ry
    h, w = (size, size) if isinstance(size, int) else size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    u = (xs - cx) / max(rx, 1e-6)   # -1..1 inside the box
    v = (ys - cy) / max(ry, 1e-6)
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "triangle":   # apex at the top, base at the bottom
        return inside & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":      # a plus sign with arms one third of the side wide
        return inside & ((np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as a uint8 RGB array [size, size, 3]."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = COLORS[scene.background]
    img[shape_mask(scene.shape, scene.cx, scene.cy, scene.radius, size=size)] = COLORS[scene.color]
    return img


# --- checking -------------------------------------------------------------------------------------

_PALETTE = np.array([COLORS[n] for n in COLOR_NAMES], dtype=np.float32)


def nearest_color_index(img: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of the nearest named color of every pixel, [H, W]."""
    px = img.astype(np.float32)[..., None, :]
    return np.argmin(((px - _PALETTE) ** 2).sum(-1), axis=-1)


@dataclass
class Check:
    background: str | None
    color: str | None
    shape: str | None
    position: tuple[int, int] | None
    size_word: str | None
    shape_pixels: int


MIN_SHAPE_PIXELS = 12


def check_image(img) -> Check:
    """Read background color, shape color, kind, grid cell and size word back from an RGB image."""
    arr = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    h, w = arr.shape[:2]
    idx = nearest_color_index(arr)
    border = np.concatenate([idx[:2].ravel(), idx[-2:].ravel(), idx[:, :2].ravel(), idx[:, -2:].ravel()])
    bg = Counter(border.tolist()).most_common(1)[0][0]
    mask = idx != bg
    n = int(mask.sum())
    if n < MIN_SHAPE_PIXELS:
        return Check(COLOR_NAMES[bg], None, None, None, None, n)
    color = Counter(idx[mask].tolist()).most_common(1)[0][0]
    # the shape: pixels of its color (other stray colors are noise at the edges)
    shape_px = idx == color
    ys, xs = np.nonzero(shape_px)
    if len(xs) < MIN_SHAPE_PIXELS:
        return Check(COLOR_NAMES[bg], COLOR_NAMES[color], None, None, None, len(xs))
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1, y0, y1 = float(x0), float(x1) + 1, float(y0), float(y1) + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) / 2, 1.0), max((y1 - y0) / 2, 1.0)
    best, best_iou = None, -1.0
    for kind in SHAPES:
        t = shape_mask(kind, cx, cy, rx, ry, size=(h, w))
        iou = (t & shape_px).sum() / max((t | shape_px).sum(), 1)
        if iou > best_iou:
            best, best_iou = kind, iou
    col = min(int(cx * 3 / w), 2)
    row = min(int(cy * 3 / h), 2)
    side = max(x1 - x0, y1 - y0) * IMAGE_SIZE / w
    small_hi, large_lo = 2 * SIZE_RADIUS["small"][1], 2 * SIZE_RADIUS["large"][0]
    size_word = "small" if side < (small_hi + large_lo) / 2 else "large"
    return Check(COLOR_NAMES[bg], COLOR_NAMES[color], best, (row, col), size_word, len(xs))


@dataclass(frozen=True)
class Prompt:
    """One bench prompt: what the caption asks for."""
    text: str
    color: str
    shape: str
    background: str
    size_word: str | None
    position: tuple[int, int] | None
    held_out: bool
    seed: int


def bench_prompts(n: int = 200, seed: int = 0, held_out_fraction: float = 0.25) -> list[Prompt]:
    """`n` fixed prompts (a quarter from held-out combos), each with its own generation seed."""
    rng = random.Random(f"bench:{seed}")
    seen, held = train_combos(), held_out_combos()
    n_held = round(n * held_out_fraction)
    flags = [True] * n_held + [False] * (n - n_held)
    rng.shuffle(flags)
    out = []
    for flag in flags:
        pool = held if flag else seen
        combo = pool[rng.randrange(len(pool))]
        size_word = rng.choice(SIZES) if rng.random() < 0.5 else None
        position = rng.choice(list(POSITIONS)) if rng.random() < 0.5 else None
        text = make_caption(*combo, size_word, position)
        out.append(Prompt(text, *combo, size_word, position, is_held_out(*combo), rng.randrange(2**31)))
    return out


def distill_prompts(n: int = 512, seed: int = 0) -> list[str]:
    """`n` captions of combinations seen in training (never a held-out one, so that the bench's held-out
    prompts stay unseen by a distilled student too), with a size and a position about half the time each:
    the prompts `sdlite distill` teaches a pruned shapes model on."""
    rng = random.Random(f"distill:{seed}")
    combos = train_combos()
    out = []
    for _ in range(n):
        combo = combos[rng.randrange(len(combos))]
        size_word = rng.choice(SIZES) if rng.random() < 0.5 else None
        position = rng.choice(list(POSITIONS)) if rng.random() < 0.5 else None
        out.append(make_caption(*combo, size_word, position))
    return out


def caption_corpus() -> list[str]:
    """Every word the captions use, in caption-like lines, for learning the tokenizer's vocabulary."""
    lines = []
    for c, s, b in all_combos():
        for size_word in (None, *SIZES):
            lines.append(make_caption(c, s, b, size_word, None))
        for pos in POSITIONS:
            lines.append(make_caption(c, s, b, None, pos))
    return lines


def domain_notes(prompt: str, width: int, height: int) -> list[str]:
    """What a request asks of the shipped model beyond what it was trained on: another size than 64x64,
    or words its captions never used. Empty when the request is inside its domain."""
    import re
    notes = []
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        notes.append(f"the shipped model was trained at {IMAGE_SIZE}x{IMAGE_SIZE}; at {width}x{height} it "
                     "draws poorly")
    known = set(re.findall(r"[a-z]+", " ".join(caption_corpus()).lower()))
    unknown = sorted(set(re.findall(r"[a-z]+", prompt.lower())) - known)
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        notes.append(f"the shipped model knows {len(known)} words (colors, shapes, sizes, positions: e.g. "
                     f"'a small red circle at the top left on a blue background'); {shown} are not among them")
    return notes
