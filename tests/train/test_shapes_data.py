"""The procedural shapes dataset and its checker: deterministic, held-out combos held out, checker exact."""

import itertools
import json

import numpy as np
import pytest

from sdlite.train import shapes
from sdlite.train.shapes import (
    COLORS,
    HELD_OUT_COLOR_BACKGROUND,
    HELD_OUT_COLOR_SHAPE,
    POSITIONS,
    SHAPES,
    bench_prompts,
    check_image,
    is_held_out,
    make_scene,
    render,
    scene_stream,
)


def test_vocabulary_sizes():
    assert len(COLORS) >= 8
    assert {"circle", "square", "triangle"} <= set(SHAPES) and len(SHAPES) >= 4
    # colors far apart, so that slightly-off generated colors still map to the named one
    rgb = np.array(list(COLORS.values()), dtype=float)
    d = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    assert d[~np.eye(len(rgb), dtype=bool)].min() > 100


def test_stream_is_deterministic_by_seed():
    a = list(itertools.islice(scene_stream(3), 50))
    b = list(itertools.islice(scene_stream(3), 50))
    c = list(itertools.islice(scene_stream(4), 50))
    assert a == b
    assert a != c
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a[:5], b[:5]))


def test_held_out_combos_never_in_training():
    seen_captions = set()
    for scene in itertools.islice(scene_stream(0, "train"), 5000):
        assert not is_held_out(*scene.combo)
        seen_captions.add(scene.caption())
    for color, shape in HELD_OUT_COLOR_SHAPE:
        assert not any(f"{color} {shape}" in c for c in seen_captions)
    for color, background in HELD_OUT_COLOR_BACKGROUND:
        assert not any(f" {color} " in c and c.endswith(f"on a {background} background") for c in seen_captions)
    # and the held-out split has only held-out combos, of every held-out pair
    held = list(itertools.islice(scene_stream(0, "held_out"), 2000))
    assert all(is_held_out(*s.combo) for s in held)
    assert {(s.color, s.shape) for s in held} >= HELD_OUT_COLOR_SHAPE


def test_training_pool_of_the_recipe_is_clean():
    """The recipe's latent pool comes from scene_stream(seed, "train"); check its captions directly."""
    from sdlite.train.trainer import Recipe
    r = Recipe()
    for scene in itertools.islice(scene_stream(r.seed, "train"), r.latent_pool):
        assert not is_held_out(*scene.combo), scene.caption()


def test_caption_words():
    scene = make_scene(__import__("random").Random(0), ("red", "circle", "blue"), size_word="small",
                       position=(0, 0))
    assert scene.caption() == "a small red circle at the top left on a blue background"
    assert make_scene(__import__("random").Random(0), ("red", "circle", "blue")).caption() == \
        "a red circle on a blue background"


def test_render_uses_only_named_colors():
    for scene in itertools.islice(scene_stream(1, "all"), 50):
        img = render(scene)
        colors = {tuple(p) for p in img.reshape(-1, 3)}
        assert colors == {COLORS[scene.background], COLORS[scene.color]}


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_checker_reads_ground_truth(split):
    n = 600
    right = {"background": 0, "color": 0, "shape": 0}
    pos_right = pos_n = size_right = size_n = 0
    for scene in itertools.islice(scene_stream(7, split), n):
        c = check_image(render(scene))
        right["background"] += c.background == scene.background
        right["color"] += c.color == scene.color
        right["shape"] += c.shape == scene.shape
        if scene.position is not None:
            pos_n += 1
            pos_right += c.position == scene.position
        if scene.size_word is not None:
            size_n += 1
            size_right += c.size_word == scene.size_word
    assert right == {"background": n, "color": n, "shape": n}
    assert pos_right == pos_n and size_right == size_n


def test_checker_tolerates_noise():
    """Generated images are not exact: small color noise must not change the reading."""
    rng = np.random.default_rng(0)
    ok = 0
    scenes = list(itertools.islice(scene_stream(2, "all"), 200))
    for scene in scenes:
        img = render(scene).astype(int) + rng.integers(-25, 26, size=(64, 64, 3))
        c = check_image(np.clip(img, 0, 255).astype(np.uint8))
        ok += (c.background, c.color, c.shape) == (scene.background, scene.color, scene.shape)
    assert ok >= 0.98 * len(scenes)


def test_checker_empty_image():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = COLORS["blue"]
    c = check_image(img)
    assert c.background == "blue" and c.color is None and c.shape is None


def test_bench_prompts_fixed_and_mixed():
    a, b = bench_prompts(200), bench_prompts(200)
    assert a == b
    assert len({p.text for p in a}) > 150
    held = [p for p in a if p.held_out]
    assert len(held) == 50
    assert all(is_held_out(p.color, p.shape, p.background) == p.held_out for p in a)
    assert any(p.position for p in a) and any(p.size_word for p in a)
    assert all(pos in POSITIONS for p in a if p.position for pos in [p.position])


def test_tokenizer_learned_on_captions_has_whole_words(tmp_path):
    from sdlite.tokenizer import ClipTokenizer
    from sdlite.tokenizer.writer import write_clip_tokenizer
    n = write_clip_tokenizer(tmp_path, shapes.caption_corpus(), vocab_size=1000)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == n
    for word in ["circle", "square", "triangle", "cross", "background", "purple", "bottom"]:
        assert f"{word}</w>" in vocab
    tok = ClipTokenizer.from_folder(tmp_path)
    ids = tok(["a red circle on a blue background"])[0].tolist()
    assert ids[0] == n - 2 and ids[8] == n - 1   # bos, 7 words, eos
