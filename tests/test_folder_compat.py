"""Folders as other tools write them: transformers 5's tokenizer.json-only tokenizer folder, and the outdated
scheduler configs of old SD 1.x uploads, which diffusers fixes (and so must we, to give its image)."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from sdlite.errors import OutdatedConfigWarning
from sdlite.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

GEN = dict(steps=4, cfg_scale=7.5, seed=11, width=64, height=64)


def _diffusers_latents(folder, scheduler_cls):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = getattr(diffusers, scheduler_cls).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref("a blue square", num_inference_steps=GEN["steps"], guidance_scale=GEN["cfg_scale"],
               width=64, height=64, generator=torch.Generator().manual_seed(GEN["seed"]),
               output_type="latent").images


def test_tokenizer_json_only_folder(tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    shutil.rmtree(folder / "tokenizer")
    fast = transformers.CLIPTokenizerFast.from_pretrained(tiny_model / "tokenizer") \
        if hasattr(transformers, "CLIPTokenizerFast") else tok
    fast.save_pretrained(folder / "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    want = Pipeline.load(tiny_model).generate("a blue square", sampler="euler", **GEN)
    got = Pipeline.load(folder).generate("a blue square", sampler="euler", **GEN)
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))
    ref = _diffusers_latents(folder, "EulerDiscreteScheduler")
    assert ((got.latents - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("cls,sampler", [("DDIMScheduler", "ddim"), ("PNDMScheduler", "euler")])
def test_outdated_scheduler_config_is_fixed_as_diffusers_does(tiny_model, tmp_path, cls, sampler):
    folder = tmp_path / "old"
    shutil.copytree(tiny_model, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg.update({"_class_name": cls, "steps_offset": 0, "clip_sample": True})
    path.write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = Pipeline.load(folder)
    notes = [str(w.message) for w in caught if issubclass(w.category, OutdatedConfigWarning)]
    assert any("steps_offset" in n for n in notes) and any("clip_sample" in n for n in notes), notes
    assert pipe.scheduler_config["steps_offset"] == 1 and pipe.scheduler_config["clip_sample"] is False
    got = pipe.generate("a blue square", sampler=sampler, **GEN)
    ref_cls = "DDIMScheduler" if sampler == "ddim" else "EulerDiscreteScheduler"
    ref = _diffusers_latents(folder, ref_cls)
    assert ((got.latents - ref).abs().max() / ref.abs().max()).item() < 1e-4
