"""`sdlite generate` batches (--batch-count), img2img (--init-image, --strength) and inpainting (--mask);
variation seeds in the library."""

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdlite.cli import main
from sdlite.pipeline import GenerationRequest

FAST = ["--steps", "4", "-W", "32", "-H", "32", "-q"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def write_init(path, mask_path=None):
    img = Image.new("RGB", (32, 32), (30, 60, 200))
    ImageDraw.Draw(img).ellipse((8, 8, 24, 24), fill=(220, 30, 30))
    img.save(path)
    if mask_path:
        m = Image.new("L", (32, 32), 0)
        ImageDraw.Draw(m).rectangle((16, 0, 31, 31), fill=255)
        m.save(mask_path)


def params(path):
    with Image.open(path) as im:
        return im.info["parameters"], np.asarray(im.convert("RGB"))


def test_batch_count_writes_one_file_per_seed(tiny_model, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, stdout, err = run(["generate", "a red circle", "-m", str(tiny_model), "-o", str(out), "--seed", "5",
                             "--batch-count", "3", *FAST], capsys)
    assert code == 0, err
    files = [out, tmp_path / "out-1.png", tmp_path / "out-2.png"]
    assert all(f.exists() for f in files) and len(list(tmp_path.iterdir())) == 3
    for seed, f in zip((5, 6, 7), files):
        assert f"Seed: {seed}," in params(f)[0] and f"{f} (seed {seed}" in stdout
    single = tmp_path / "single.png"
    assert run(["generate", "a red circle", "-m", str(tiny_model), "-o", str(single), "--seed", "6", *FAST],
               capsys)[0] == 0
    assert (params(single)[1] == params(files[1])[1]).all()  # image 2 of the batch is seed 6's image


def test_init_image_and_mask_flags(tiny_model, tmp_path, capsys):
    init, mask = tmp_path / "in.png", tmp_path / "mask.png"
    write_init(init, mask)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    base = ["generate", "a green circle", "-m", str(tiny_model), "--seed", "3", "--init-image", str(init), *FAST]
    assert run([*base, "-o", str(a), "--strength", "0.5"], capsys)[0] == 0
    assert "Denoising strength: 0.5" in params(a)[0]
    assert run([*base, "-o", str(b), "--strength", "0.5", "--mask", str(mask)], capsys)[0] == 0
    assert not (params(a)[1] == params(b)[1]).all()


def test_bad_image_flags_are_one_line_errors(tiny_model, tmp_path, capsys):
    out = tmp_path / "o.png"
    (tmp_path / "junk.png").write_bytes(b"not an image")
    code, _, err = run(["generate", "x", "-m", str(tiny_model), "-o", str(out), "--init-image",
                        str(tmp_path / "junk.png"), *FAST], capsys)
    assert code == 2 and "cannot read the image" in err and not out.exists()
    write_init(tmp_path / "in.png")
    code, _, err = run(["generate", "x", "-m", str(tiny_model), "-o", str(out), "--init-image",
                        str(tmp_path / "in.png"), "--strength", "1.5", *FAST], capsys)
    assert code == 2 and "denoising_strength" in err and not out.exists()
    code, _, err = run(["generate", "x", "-m", str(tiny_model), "-o", str(out), "--mask",
                        str(tmp_path / "in.png"), *FAST], capsys)
    assert code == 2 and "mask" in err and not out.exists()


def test_variation_seed_slerps_toward_the_subseed(tiny_pipe):
    def noise(**kw):
        req = GenerationRequest("x", seed=1, width=32, height=32, **kw).validate()
        return tiny_pipe.initial_noise(req, torch.Generator().manual_seed(req.seed))
    base, other = noise(), noise(subseed=2, subseed_strength=1.0)
    sub = GenerationRequest("x", seed=2, width=32, height=32).validate()
    assert torch.allclose(other, tiny_pipe.initial_noise(sub, torch.Generator().manual_seed(2)), atol=1e-5)
    assert torch.equal(noise(subseed=2, subseed_strength=0.0), base)
    mid = noise(subseed=2, subseed_strength=0.5)
    assert not torch.allclose(mid, base) and not torch.allclose(mid, other)
    req = GenerationRequest("x", seed=1, subseed_strength=0.5).validate()
    assert req.subseed is not None  # a random subseed is drawn (and recorded) when the strength is > 0
