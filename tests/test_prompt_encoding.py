"""A1111 prompt encoding: 75-token chunks (comma and BREAK rules), the weighting rule checked against an
independent computation, plain prompts unchanged, long prompts reaching the image, and the shipped model
still following a weighted prompt."""

import warnings

import pytest
import torch

from sdlite.cli import build_parser
from sdlite.errors import InvalidRequest
from sdlite.request import GenerationRequest
from sdlite.runtime.prompt_encoding import empty_chunk, tokenize_prompt
from sdlite.tokenizer import ClipTokenizer, TokenTruncationWarning

KW = dict(steps=3, cfg_scale=7.5, seed=5, width=32, height=32, sampler="euler")


@pytest.fixture(scope="module")
def sd1():
    return ClipTokenizer.standard("sd1")


def body(tokenizer, chunk):
    """A chunk's ids between BOS and the first EOS."""
    assert chunk.ids[0] == tokenizer.bos_id and len(chunk.ids) == 77
    return chunk.ids[1:chunk.ids.index(tokenizer.eos_id)]


def ids_of(tokenizer, word):
    (one,) = tokenizer.encode(word)[1:2]
    return one


# ---------------------------------------------------------------------- chunking (A1111's tokenize_line)


def test_short_prompt_is_the_tokenizers_own_ids(sd1):
    for text in ["a red circle", "", "a, b, c " * 20]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TokenTruncationWarning)
            want = sd1.encode(text)
        chunks = tokenize_prompt(sd1, text)
        if sd1.num_tokens(text) <= 77:
            assert [c.ids for c in chunks] == [want]
            assert all(w == 1.0 for w in chunks[0].weights)


def test_long_prompt_in_chunks_of_75(sd1):
    cat, dog = ids_of(sd1, "cat"), ids_of(sd1, "dog")
    chunks = tokenize_prompt(sd1, "cat " * 80)
    assert [body(sd1, c) for c in chunks] == [[cat] * 75, [cat] * 5]
    assert chunks[1].ids[6:] == [sd1.pad_id] * 71
    chunks = tokenize_prompt(sd1, "cat " * 75 + "dog")
    assert [body(sd1, c) for c in chunks] == [[cat] * 75, [dog]]
    assert len(tokenize_prompt(sd1, "cat " * 75)) == 1


def test_comma_within_the_last_20_tokens_moves_the_rest(sd1):
    cat, dog, comma = ids_of(sd1, "cat"), ids_of(sd1, "dog"), ids_of(sd1, ",")
    chunks = tokenize_prompt(sd1, "cat " * 70 + ", " + "dog " * 10)
    assert [body(sd1, c) for c in chunks] == [[cat] * 70 + [comma], [dog] * 10]
    # a comma more than 20 tokens back does not
    chunks = tokenize_prompt(sd1, "cat " * 40 + ", " + "dog " * 40)
    assert [body(sd1, c) for c in chunks] == [[cat] * 40 + [comma] + [dog] * 34, [dog] * 6]
    # a comma that lands exactly on the chunk's end goes to the next chunk
    chunks = tokenize_prompt(sd1, "cat " * 75 + ", dog")
    assert [body(sd1, c) for c in chunks] == [[cat] * 75, [comma, dog]]


def test_break_ends_the_chunk(sd1):
    cat, dog = ids_of(sd1, "cat"), ids_of(sd1, "dog")
    chunks = tokenize_prompt(sd1, "cat BREAK dog")
    assert [body(sd1, c) for c in chunks] == [[cat], [dog]]
    assert [body(sd1, c) for c in tokenize_prompt(sd1, "cat BREAK BREAK dog")] == [[cat], [], [dog]]
    # as A1111's tokenize_line: a BREAK with nothing after it adds no chunk
    assert [body(sd1, c) for c in tokenize_prompt(sd1, "BREAK")] == [[]]
    assert [body(sd1, c) for c in tokenize_prompt(sd1, "cat BREAK")] == [[cat]]


def test_weights_follow_the_tokens(sd1):
    (chunk,) = tokenize_prompt(sd1, "a (red:1.3) [big] circle")
    assert chunk.ids == sd1.encode("a red big circle")
    assert chunk.weights[:6] == [1.0, 1.0, 1.3, 1 / 1.1, 1.0, 1.0]
    assert set(chunk.weights[6:]) == {1.0}


def test_plain_syntax_is_diffusers(sd1):
    text = "a (red:1.3) circle BREAK " + "cat " * 80
    with pytest.warns(TokenTruncationWarning):
        (chunk,) = tokenize_prompt(sd1, text, "plain")
    with pytest.warns(TokenTruncationWarning):
        assert chunk.ids == sd1.encode(text)
    # LoRA tags are not text in either syntax
    (chunk,) = tokenize_prompt(sd1, "a <lora:x:0.5>cat", "plain")
    assert chunk.ids == sd1.encode("a cat")
    with pytest.raises(ValueError):
        tokenize_prompt(sd1, "x", "comfy")


def test_sd2_padding(sd1):
    sd2 = ClipTokenizer.standard("sd2")
    chunks = tokenize_prompt(sd2, "cat " * 80)
    assert chunks[1].ids == sd2.encode("cat " * 5)
    assert empty_chunk(sd2).ids == sd2.encode("")


# ---------------------------------------------------------------------- the encoder and the pipeline


def test_plain_prompt_encodes_exactly_as_before(tiny_pipe):
    for text in ["a small red circle at the top left", "", "blurry"]:
        a1111 = tiny_pipe.encode_prompt(text)
        plain = tiny_pipe.encode_prompt(text, prompt_syntax="plain")
        ids = tiny_pipe.tokenizer([text])
        with torch.inference_mode():
            before = tiny_pipe.text_encoder.module(ids)
        assert a1111.shape == (1, 77, 32)
        assert torch.equal(a1111, plain) and torch.equal(a1111, before)
    a = tiny_pipe.generate("a small red circle at the top left", negative_prompt="blurry", **KW)
    b = tiny_pipe.generate("a small red circle at the top left", negative_prompt="blurry", prompt_syntax="plain",
                           **KW)
    assert torch.equal(a.latents, b.latents)


def test_weight_one_is_no_weight(tiny_pipe):
    a = tiny_pipe.generate("a (red:1.0) circle", **KW)
    b = tiny_pipe.generate("a red circle", **KW)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(tiny_pipe.generate("a (red:1.5) circle", **KW).latents, b.latents)


def test_weighting_is_a1111s_rule(tiny_pipe):
    """z * w token-wise, then scaled back to the chunk's original mean; computed here on its own."""
    tok = tiny_pipe.tokenizer
    raw = tok._tokenizer.encode
    n_a, n_red = len(raw("a ", add_special_tokens=False).ids), len(raw("red", add_special_tokens=False).ids)
    ids = tok(["a red circle"])
    with torch.inference_mode():
        z = tiny_pipe.text_encoder.module(ids).double()
    w = torch.ones(77, dtype=torch.float64)
    w[1 + n_a:1 + n_a + n_red] = 1.3
    w[1 + n_a + n_red:] = 1.0
    zw = z * w[None, :, None]
    want = zw * (z.mean() / zw.mean())
    got = tiny_pipe.encode_prompt("a (red:1.3) circle")
    assert got.shape == want.shape
    assert (got.double() - want).abs().max().item() < 1e-5
    assert (got.double() - z).abs().max().item() > 1e-2


def test_long_prompt_reaches_the_image(tiny_pipe):
    tok = tiny_pipe.tokenizer
    head = "a small red circle at the top left of a plain blue background and " * 9
    assert 140 <= tok.num_tokens(head) <= 150
    cond = tiny_pipe.encode_prompt(head + "green square")
    assert cond.shape == (1, 154, 32)
    a = tiny_pipe.generate(head + "green square", negative_prompt="blurry", **KW)
    b = tiny_pipe.generate(head + "yellow triangle", negative_prompt="blurry", **KW)
    assert not torch.equal(a.latents, b.latents)
    # plain: the end is cut off, so the same image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenTruncationWarning)
        c = tiny_pipe.generate(head + "green square", negative_prompt="blurry", prompt_syntax="plain", **KW)
        d = tiny_pipe.generate(head + "yellow triangle", negative_prompt="blurry", prompt_syntax="plain", **KW)
    assert torch.equal(c.latents, d.latents)


def test_prompt_and_negative_prompt_are_padded_to_the_same_length(tiny_pipe):
    long = "a small red circle, " * 30
    cond, uncond = tiny_pipe.same_length(tiny_pipe.encode_prompt(long), tiny_pipe.encode_prompt("blurry"))
    assert cond.shape == uncond.shape == (1, 154, 32)
    empty = tiny_pipe.encode_prompt("")
    assert torch.equal(uncond[:, 77:], empty) and torch.equal(uncond[:, :77], tiny_pipe.encode_prompt("blurry"))
    uncond2, cond2 = tiny_pipe.same_length(tiny_pipe.encode_prompt(long), tiny_pipe.encode_prompt("x"))
    assert cond2.shape == uncond2.shape
    # either side may be the long one; the batched and the split guidance agree
    for neg, pos in [(long, "a red circle"), ("blurry", long)]:
        img = tiny_pipe.generate(pos, negative_prompt=neg, **KW)
        assert torch.isfinite(img.latents).all()


def test_split_guidance_and_no_cache_take_long_prompts(tiny_model):
    from dataclasses import replace

    from sdlite.pipeline import Pipeline
    base = Pipeline.load(tiny_model)
    prompt, neg = "a small red circle, " * 30, "blurry"
    want = base.generate(prompt, negative_prompt=neg, **KW).latents
    for change in ({"cfg": "split"}, {"kv_cache": False}):
        pipe = Pipeline.load(tiny_model, plan=replace(base.plan, **change))
        got = pipe.generate(prompt, negative_prompt=neg, **KW).latents
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5, change


def test_request_and_cli_take_the_syntax():
    GenerationRequest("x", prompt_syntax="plain").validate()
    with pytest.raises(InvalidRequest) as e:
        GenerationRequest("x", prompt_syntax="comfy").validate()
    assert e.value.field == "prompt_syntax"
    args = build_parser().parse_args(["generate", "x", "--prompt-syntax", "plain", "--embeddings-dir", "emb"])
    assert (args.prompt_syntax, args.embeddings_dir) == ("plain", "emb")
    assert build_parser().parse_args(["generate", "x"]).prompt_syntax == "a1111"


def test_shipped_model_follows_a_weighted_prompt():
    from sdlite.pipeline import Pipeline
    from sdlite.train.shapes import check_image
    from sdlite.weights.model_folder import shipped_model
    if shipped_model() is None:
        pytest.skip("the shipped model is not installed")
    pipe = Pipeline.load()
    for seed in (0, 1):
        result = pipe.generate("a (red:1.3) circle on a blue background", seed=seed)
        c = check_image(result.image)
        assert (c.color, c.shape, c.background) == ("red", "circle", "blue"), seed
