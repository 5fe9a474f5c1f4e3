"""Textual-inversion embeddings: A1111's file formats, widths that do not fit skipped, use by name in the
prompt and the negative prompt, and parity with diffusers' load_textual_inversion on the tiny model."""

import warnings

import numpy as np
import pytest
import torch

from sdlite.cli import build_parser
from sdlite.errors import ModelFolderError, WeightsError
from sdlite.pipeline import Pipeline
from sdlite.runtime.prompt_encoding import EmbeddingTable, tokenize_prompt
from sdlite.tokenizer import ClipTokenizer
from sdlite.weights.embeddings import EmbeddingWarning, load_embeddings, read_embedding
from sdlite.weights.safetensors_mmap import save_safetensors

DIM = 32  # the tiny model's text encoder width


def save_a1111_pt(path, vectors):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "whatever",
                "step": 1200, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)


def save_emb_params(path, vectors):
    save_safetensors({"emb_params": vectors}, path)


def save_diffusers_bin(path, vectors, token="<concept>"):
    torch.save({token: vectors[0] if vectors.shape[0] == 1 else vectors}, path)


def vectors(n, dim=DIM, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    save_a1111_pt(d / "sunsetvibe.pt", vectors(1, seed=1))
    save_emb_params(d / "glowstyle.safetensors", vectors(3, seed=2))
    save_a1111_pt(d / "multipt.pt", vectors(2, seed=3))
    save_emb_params(d / "flatsingle.safetensors", vectors(1, seed=4))
    (d / "sub").mkdir()
    save_diffusers_bin(d / "sub" / "concept.bin", vectors(1, seed=5))
    save_a1111_pt(d / "sd2thing.pt", vectors(2, dim=1024, seed=6))
    (d / "broken.pt").write_bytes(b"not a pickle at all")
    (d / "notes.txt").write_text("not an embedding")
    (d / "empty.safetensors").write_bytes(b"")
    return d


def test_formats_are_read(emb_dir):
    pt = read_embedding(emb_dir / "sunsetvibe.pt")
    assert (pt.name, pt.num_vectors, pt.dim) == ("sunsetvibe", 1, DIM)
    assert torch.equal(pt.vectors, vectors(1, seed=1))
    st = read_embedding(emb_dir / "glowstyle.safetensors")
    assert (st.name, st.num_vectors) == ("glowstyle", 3) and torch.equal(st.vectors, vectors(3, seed=2))
    one = read_embedding(emb_dir / "sub" / "concept.bin")  # diffusers' {token: 1-d tensor}
    assert one.vectors.shape == (1, DIM) and torch.equal(one.vectors, vectors(1, seed=5))
    assert read_embedding(emb_dir / "sd2thing.pt").dim == 1024


def test_unreadable_and_misfit_files_are_skipped_with_one_line(emb_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = load_embeddings(emb_dir, DIM)
    assert sorted(found) == ["concept", "flatsingle", "glowstyle", "multipt", "sunsetvibe"]
    messages = [str(w.message) for w in caught if issubclass(w.category, EmbeddingWarning)]
    assert len(messages) == 3 and all("\n" not in m for m in messages)
    assert any("sd2thing.pt" in m and "1024" in m for m in messages)
    assert any("broken.pt" in m for m in messages) and any("empty.safetensors" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddingWarning)
        assert "sd2thing" in load_embeddings(emb_dir, 1024)
    with pytest.raises(ModelFolderError):
        load_embeddings(emb_dir / "missing")


def test_refused_files(tmp_path):
    torch.save({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, tmp_path / "two.pt")
    torch.save({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 4, dtype=torch.long)}}, tmp_path / "ints.pt")
    torch.save({"*": torch.full((1, 4), float("nan"))}, tmp_path / "nan.pt")
    for name, needle in [("two.pt", "single tensor"), ("xl.pt", "SDXL"), ("ints.pt", "floating"),
                         ("nan.pt", "NaN")]:
        with pytest.raises(WeightsError, match=needle):
            read_embedding(tmp_path / name)


def test_the_name_is_replaced_by_the_vectors():
    tok = ClipTokenizer.standard("sd1")
    emb = {"glowstyle": read_from(vectors(3, dim=768, seed=9), "glowstyle")}
    table = EmbeddingTable(tok, emb)
    (chunk,) = tokenize_prompt(tok, "a glowstyle cat", "a1111", table)
    n_a = 1
    assert [(at, v.shape[0]) for at, v in chunk.fixes] == [(1 + n_a, 3)]
    assert chunk.ids[-1] == tok.pad_id and len(chunk.ids) == 77
    # a word that only starts like the name is not it
    (chunk,) = tokenize_prompt(tok, "a glowstyles cat", "a1111", table)
    assert chunk.fixes == []
    # in plain syntax too, and in a long prompt it never straddles two chunks
    (plain,) = tokenize_prompt(tok, "a glowstyle cat", "plain", table)
    assert [(at, v.shape[0]) for at, v in plain.fixes] == [(2, 3)]
    chunks = tokenize_prompt(tok, "cat " * 73 + "glowstyle", "a1111", table)
    assert len(chunks) == 2 and chunks[0].fixes == [] and [at for at, _ in chunks[1].fixes] == [1]


def read_from(vecs, name):
    from sdlite.weights.embeddings import Embedding
    return Embedding(name, vecs, None)


def test_pipeline_uses_embeddings(tiny_model, emb_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddingWarning)
        pipe = Pipeline.load(tiny_model, embeddings=emb_dir)
    assert "glowstyle" in pipe.embeddings
    plain = Pipeline.load(tiny_model)
    kw = dict(steps=2, cfg_scale=7.5, seed=3, width=32, height=32, sampler="euler")
    assert torch.equal(pipe.encode_prompt("a red circle"), plain.encode_prompt("a red circle"))
    assert not torch.equal(pipe.encode_prompt("a glowstyle circle"), plain.encode_prompt("a glowstyle circle"))
    a = pipe.generate("a circle", negative_prompt="sunsetvibe", **kw)
    b = plain.generate("a circle", negative_prompt="sunsetvibe", **kw)
    assert not torch.equal(a.latents, b.latents)
    args = build_parser().parse_args(["generate", "x", "--embeddings-dir", str(emb_dir)])
    assert args.embeddings_dir == str(emb_dir)


# ---------------------------------------------------------------------- parity with diffusers


CASES = [
    # (files used, prompt, negative prompt)
    (["sunsetvibe.pt"], "a sunsetvibe circle at the top left", "blurry"),
    (["glowstyle.safetensors"], "a small glowstyle square", "blurry"),
    (["multipt.pt", "flatsingle.safetensors"], "multipt circle", "flatsingle, dark"),
    (["glowstyle.safetensors", "sunsetvibe.pt"], "a red circle", "glowstyle sunsetvibe"),
]


@pytest.mark.parametrize("files,prompt,neg", CASES)
def test_matches_diffusers_load_textual_inversion(tiny_model, emb_dir, tmp_path, files, prompt, neg):
    diffusers = pytest.importorskip("diffusers")
    used = tmp_path / "emb"
    used.mkdir()
    for name in files:
        (used / name).write_bytes((emb_dir / name).read_bytes())
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    for name in files:
        stem = name.rsplit(".", 1)[0]
        ref.load_textual_inversion(str(used / name), token=stem)
    kw = dict(steps=4, cfg_scale=7.5, seed=21, width=32, height=32)
    want = ref(prompt, negative_prompt=neg, num_inference_steps=kw["steps"], guidance_scale=kw["cfg_scale"],
               width=kw["width"], height=kw["height"], generator=torch.Generator().manual_seed(kw["seed"]),
               output_type="latent").images
    ours = Pipeline.load(tiny_model, embeddings=used)
    got = ours.generate(prompt, negative_prompt=neg, sampler="euler", prompt_syntax="plain", **kw)
    err = ((got.latents - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, err
    img = ref.vae.decode(want / ref.vae.config.scaling_factor).sample
    img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).detach().numpy() * 255).round()
    assert np.abs(np.asarray(got.image).astype(np.float64) - img).max() <= 1.0
    # without the embeddings the image differs: the test can fail
    bare = Pipeline.load(tiny_model).generate(prompt, negative_prompt=neg, sampler="euler", prompt_syntax="plain",
                                              **kw)
    assert ((bare.latents - want).abs().max() / want.abs().max()).item() > 1e-3
