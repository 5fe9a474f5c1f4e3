"""A1111's prompt syntax: the weights its parse_prompt_attention gives (its documented examples), BREAK,
and the extra-network tags taken out of the text."""

import warnings

import pytest

from sdlite.tokenizer.prompt_syntax import (
    ParsedPrompt,
    PromptSyntaxWarning,
    extract_extra_networks,
    parse_prompt,
    parse_prompt_attention,
)

# prompt_parser.parse_prompt_attention's doctests, the values exactly as A1111 prints them
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text,want", A1111_EXAMPLES)
def test_a1111_documented_examples(text, want):
    assert parse_prompt_attention(text) == want


@pytest.mark.parametrize("text,want", [
    ("(word)", [("word", 1.1)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:0.0)", [("word", 0.0)]),
    ("\\(a\\) \\[b\\]", [("(a) [b]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("unopened) and ]", [("unopened) and ]", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("a :1.5) b", [("a :1.5) b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_weights(text, want):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=0)


def test_break_splits_and_is_a_marker():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    parsed = parse_prompt("a cat BREAK (a dog)")
    assert parsed.fragments == [("a cat", 1.0), ("a dog", 1.1)]
    assert parsed.breaks == [1]
    # a lower-case "break" and a word containing BREAK are text
    assert parse_prompt("breakfast BREAKS break").breaks == []
    # two BREAKs in a row: an empty chunk between them, as in A1111
    assert parse_prompt("x BREAK BREAK y").breaks == [1, 1]


def test_plain_text_is_one_fragment():
    parsed = parse_prompt("a red circle, on a blue background")
    assert parsed == ParsedPrompt([("a red circle, on a blue background", 1.0)], [], [])
    assert parsed.is_plain
    assert not parse_prompt("a (red) circle").is_plain
    assert not parse_prompt("a BREAK b").is_plain


def test_lora_tags_are_taken_out():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parsed = parse_prompt("a cat <lora:flat_style:0.8>, (sharp:1.2) <lora:Detail-v2> <LORA:x:-0.5>")
    assert parsed.loras == [("flat_style", 0.8), ("Detail-v2", 1.0), ("x", -0.5)]
    assert parsed.fragments == [("a cat , ", 1.0), ("sharp", 1.2), ("  ", 1.0)]
    assert "<" not in parsed.text


def test_other_extra_networks_are_ignored_with_a_warning():
    with pytest.warns(PromptSyntaxWarning, match="hypernet"):
        text, loras = extract_extra_networks("a cat <hypernet:anime:1>")
    assert (text, loras) == ("a cat ", [])
    with pytest.warns(PromptSyntaxWarning, match="not a number"):
        assert extract_extra_networks("<lora:x:strong>") == ("", [])
    with pytest.warns(PromptSyntaxWarning, match="only one LoRA scale"):
        assert extract_extra_networks("<lora:x:0.5:0.7>") == ("", [("x", 0.5)])


def test_text_that_only_looks_like_a_tag_stays():
    assert extract_extra_networks("i <3 cats, a <b> tag, 1 < 2") == ("i <3 cats, a <b> tag, 1 < 2", [])


def test_any_text_parses():
    for text in ["(((", "]]]", "(:", "(a:)", "(a:1.2.3)", "\\", "((a)[b:2])", "<lora:>", "<:x>", "BREAK"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = parse_prompt(text)
        assert parsed.fragments and all(isinstance(w, float) for _, w in parsed.fragments)
    with pytest.raises(TypeError):
        parse_prompt(None)
