"""`sdlite prune` and `sdlite distill` on tiny random models: what goes, what loads (sdlite and diffusers),
the importance choice, resuming, reproducibility and the errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sdlite.cli import main
from sdlite.errors import SdliteError
from sdlite.models.config import config_from_dict
from sdlite.models.unet import UNetConfig
from sdlite.pipeline import Pipeline
from sdlite.train.distill import Distiller, DistillRecipe, hash_seed, read_prompts
from sdlite.train.prune import Layout, plan_pruning, prune_model

PROMPTS = ["a red circle", "a blue square on a white background", "a small green cross", "a cat"]


def _unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _config(folder):
    return json.loads((folder / "unet" / "config.json").read_text())


def test_bk_sdm_small_removes_mid_and_one_pair_per_stage(tiny_model, tmp_path):
    report = prune_model(tiny_model, tmp_path / "small")
    cfg = _config(tmp_path / "small")
    assert cfg["mid_block_type"] is None and cfg["layers_per_block"] == 1
    assert [r["unit"].split(" ")[0] for r in report["removed"]] == ["mid", "layer:0", "layer:1", "layer:2"]
    before, after = _unet_weights(tiny_model), _unet_weights(tmp_path / "small")
    assert report["params_before"] == sum(t.numel() for t in before.values())
    assert report["params_after"] == sum(t.numel() for t in after.values()) < 0.8 * report["params_before"]
    assert not any(k.startswith("mid_block.") for k in after)
    # every kept tensor is the original's, unchanged (renumbered where a resnet before it went)
    layout_src = {k: v for k, v in before.items()}
    matched = sum(any(torch.equal(v, w) for w in layout_src.values() if w.shape == v.shape) for v in after.values())
    assert matched == len(after)
    # the other parts are copied, and the result records what was done
    assert (tmp_path / "small" / "text_encoder" / "model.safetensors").read_bytes() == \
        (tiny_model / "text_encoder" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "small" / "sdlite_pruned.json").read_text())["params_after"] == report["params_after"]


def test_pruned_folder_loads_in_sdlite_and_diffusers_with_the_same_output(tiny_model, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    prune_model(tiny_model, tmp_path / "p", ("mid", "layers", "inner-attentions"))
    pipe = Pipeline.load(tmp_path / "p")
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "p" / "unet").eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=gen)
    ctx = torch.randn((2, 77, pipe.unet_config.cross_attention_dim), generator=gen)
    with torch.no_grad():
        want = ref(x, torch.tensor(300.0), ctx).sample
        got = pipe.unet.module(x, torch.tensor(300.0), ctx)
    assert torch.allclose(got, want, atol=1e-5)
    size = Pipeline.load(tiny_model).native_size
    assert pipe.generate("a red circle", steps=2, seed=1).image.size == (size, size)


def test_layer_choice_keeps_shapes_and_follows_importance(tiny_model):
    with (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").open("rb"):
        weights = _unet_weights(tiny_model)
    base = _config(tiny_model)
    layout, records = plan_pruning(base, weights, ("layers",))
    # the first resnet of a widening stage cannot go (its input width differs): only shape-keeping choices
    for i, keep in enumerate(layout.down):
        assert len(keep) == 1
    # make resnet 0 of down block 1 tiny in magnitude: l1 importance must drop it where the shapes allow
    down1 = [k for k in weights if k.startswith("down_blocks.0.resnets.1.")]
    weights_low = dict(weights)
    for k in down1:
        weights_low[k] = weights[k] * 1e-3
    layout_low, rec = plan_pruning(base, weights_low, ("layers",))
    assert layout_low.down[0] == [0]  # resnet 1 (the quiet one) went
    weights_low = dict(weights)
    for k in [k for k in weights if k.startswith("down_blocks.0.resnets.0.")]:
        weights_low[k] = weights[k] * 1e-3
    assert plan_pruning(base, weights_low, ("layers",))[0].down[0] == [1]  # both fit at stage 0: resnet 0 went


def test_target_removes_least_important_until_the_fraction(tiny_model, tmp_path):
    report = prune_model(tiny_model, tmp_path / "t", target=0.4, importance="output", prompts=PROMPTS)
    assert report["params_removed"] >= 0.4
    values = [r["importance_output"] for r in report["removed"]]
    assert all(v > 0 for v in values)
    Pipeline.load(tmp_path / "t").generate("a red circle", steps=1, seed=0)
    with pytest.raises(SdliteError, match="the most this UNet can lose"):
        prune_model(tiny_model, tmp_path / "t2", target=0.99)


def test_prune_errors(tiny_model, tiny_bk_model, tmp_path):
    with pytest.raises(SdliteError, match="nothing to remove"):
        prune_model(tiny_bk_model, tmp_path / "bk")  # no mid block, one resnet per stage already
    assert not (tmp_path / "bk").exists()
    with pytest.raises(SdliteError, match="importance"):
        prune_model(tiny_model, tmp_path / "x", importance="random")
    with pytest.raises(SdliteError, match="prompts"):
        prune_model(tiny_model, tmp_path / "x", importance="output")
    (tmp_path / "exists").mkdir()
    with pytest.raises(SdliteError, match="already exists"):
        prune_model(tiny_model, tmp_path / "exists")
    assert not (tmp_path / "x").exists()


def test_layout_maps_renumbered_keys():
    cfg = config_from_dict(UNetConfig, {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D",
                           "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                           "norm_num_groups": 8, "cross_attention_dim": 32})
    layout = Layout.of(cfg)
    del layout.down[0][0]
    assert layout.source_of("down_blocks.0.resnets.0.conv1.weight") == "down_blocks.0.resnets.1.conv1.weight"
    assert layout.source_of("down_blocks.0.attentions.0.proj_in.weight") == "down_blocks.0.attentions.1.proj_in.weight"
    assert layout.source_of("conv_in.weight") == "conv_in.weight"


@pytest.fixture(scope="module")
def pruned(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "p"
    prune_model(tiny_model, out)
    return out


def _distill(dst, teacher, steps, seed=0):
    torch.set_num_threads(1)
    try:
        d = Distiller(dst, teacher, PROMPTS, DistillRecipe(seed=seed, batch=4, teacher_steps=2, teacher_batch=2),
                      threads=1, log=lambda m: None)
        out = d.run(steps=steps)
        d.close()
        return out
    finally:
        torch.set_num_threads(2)


def test_distill_resumes_to_the_same_weights_bit_for_bit(tiny_model, pruned, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(pruned, straight)
    shutil.copytree(pruned, resumed)
    _distill(straight, tiny_model, 6)
    _distill(resumed, tiny_model, 3)
    state = torch.load(resumed / "distill" / "state.pt", weights_only=True)
    assert state["step"] == 3
    _distill(resumed, tiny_model, 6)
    a, b = _unet_weights(straight), _unet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # training changed the weights, and the folder still generates
    orig = _unet_weights(pruned)
    assert any(not torch.equal(a[k], orig[k]) for k in a)
    assert json.loads((straight / "sdlite_distill.json").read_text())["steps"] == 6
    Pipeline.load(straight).generate("a red circle", steps=2, seed=0)


def test_distill_lowers_the_distance_to_the_teacher(tiny_model, pruned, tmp_path):
    dst = tmp_path / "d"
    shutil.copytree(pruned, dst)
    torch.set_num_threads(1)
    try:
        d = Distiller(dst, tiny_model, PROMPTS, DistillRecipe(batch=8, teacher_steps=2, lr=1e-3), log=lambda m: None)
        d.make_latents()
        first = [d.train_step()["out_kd"] for _ in range(3)]
        for _ in range(40):
            last = d.train_step()
        d.close()
    finally:
        torch.set_num_threads(2)
    assert last["out_kd"] < 0.5 * sum(first) / 3


def test_distill_refuses_another_recipe_and_bad_input(tiny_model, tiny_bk_model, pruned, tmp_path):
    dst = tmp_path / "d"
    shutil.copytree(pruned, dst)
    _distill(dst, tiny_model, 1)
    with pytest.raises(SdliteError, match="another teacher, prompts or recipe"):
        _distill(dst, tiny_model, 2, seed=1)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bk_model, bad)
    other = tmp_path / "other-teacher"
    from sdlite.testing.random_model import write_random_model
    write_random_model("tiny-std", other, seed=0)
    with pytest.raises(SdliteError, match="not the teacher's"):
        _distill(bad, other, 1)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(SdliteError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(SdliteError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")
    assert hash_seed(0, "step", 1) != hash_seed(0, "step", 2)


def test_cli_prune_and_distill(tiny_model, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    dst = tmp_path / "small"
    assert main(["prune", str(tiny_model), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "removed mid" in out and "fewer)" in out
    assert "s/step" in out and "peak RSS" in out  # both UNets timed, each in a fresh process
    assert main(["prune", str(tiny_model), str(dst), "--no-measure"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["prune", str(tiny_model), str(tmp_path / "x"), "--importance", "output"]) == 2
    assert "--prompts" in capsys.readouterr().err
    assert main(["prune", str(tiny_model), str(tmp_path / "x"), "--target", "1.5"]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["distill", str(dst), "--teacher", str(tiny_model), "--prompts", str(tmp_path / "p.txt"),
                 "--steps", "2", "--teacher-steps", "2", "--batch", "2", "--threads", "1", "-q"]) == 0
    assert "2 steps" in capsys.readouterr().out
    assert main(["distill", str(dst), "--teacher", str(tiny_model), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "--minutes" in capsys.readouterr().err
    torch.set_num_threads(2)


def test_drop_names_a_block_s_attentions(tiny_model, tmp_path):
    report = prune_model(tiny_model, tmp_path / "a", ("up_blocks.2.attentions",))
    cfg = _config(tmp_path / "a")
    assert cfg["up_block_types"][2] == "UpBlock2D" and cfg["down_block_types"][0] == "CrossAttnDownBlock2D"
    assert [r["unit"] for r in report["removed"]] == ["up_blocks.2.attentions"]
    assert not any(k.startswith("up_blocks.2.attentions.") for k in _unet_weights(tmp_path / "a"))
    with pytest.raises(SdliteError, match="no such attentions"):
        prune_model(tiny_model, tmp_path / "b", ("down_blocks.2.attentions",))  # a DownBlock2D: none
    with pytest.raises(SdliteError, match="unknown removal"):
        prune_model(tiny_model, tmp_path / "b", ("everything",))
    assert not (tmp_path / "b").exists()


def test_distill_refuses_the_teacher_itself_and_long_prompts(tiny_model, pruned, tmp_path):
    with pytest.raises(SdliteError, match="is the teacher itself"):
        Distiller(tiny_model, tiny_model, PROMPTS, DistillRecipe(), log=lambda m: None)
    dst = tmp_path / "d"
    shutil.copytree(pruned, dst)
    with pytest.raises(SdliteError, match="prompt 2 is longer"):
        Distiller(dst, tiny_model, ["a cat", "a red circle " * 40], DistillRecipe(), log=lambda m: None)
    assert not (dst / "distill").exists()
