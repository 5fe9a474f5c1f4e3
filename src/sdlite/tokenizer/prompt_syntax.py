"""AUTOMATIC1111's prompt syntax: attention weights, ``BREAK`` and extra-network tags. Pure text, no torch.

    parse_prompt("a (red:1.3) circle BREAK on blue <lora:flat:0.8>")
    # ParsedPrompt(fragments=[('a ', 1.0), ('red', 1.3), (' circle', 1.0), ('on blue ', 1.0)],
    #              breaks=[3], loras=[('flat', 0.8)])

Attention, as A1111's ``prompt_parser.parse_prompt_attention`` gives it:

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; they nest
  (``((text))`` is 1.21); ``(text:1.5)`` multiplies by 1.5 instead of 1.1;
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a lone ``\\`` is dropped;
- a bracket left open applies to the end of the prompt, a closing one with nothing open is literal text;
- ``BREAK`` (the upper-case word) ends the current 75-token chunk;
- runs of fragments with the same weight are merged; an empty prompt is ``[("", 1.0)]``.

Extra networks, as A1111 finds them (``<kind:args>``, args split at ``:``) before the attention is parsed:
the tags are taken out of the text (replaced by nothing). ``<lora:NAME>`` and ``<lora:NAME:SCALE>`` (also
``<lyco:...>``, the same networks in A1111) are returned in `ParsedPrompt.loras` as ``(NAME, SCALE)``,
SCALE 1.0 when not given; a LoRA tag with more than one scale (A1111's separate UNet / text-encoder
multipliers) keeps the first one, with a warning; a scale that is not a number drops the tag, with a
warning. Any other kind (``<hypernet:...>``) is removed and ignored with a `PromptSyntaxWarning`.

One departure from A1111: a ``BREAK`` inside brackets still breaks the chunk (A1111 would multiply its
marker's weight and then encode the word "BREAK" with a negative weight).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

__all__ = ["PROMPT_SYNTAXES", "ParsedPrompt", "PromptSyntaxWarning", "parse_prompt", "parse_prompt_attention",
           "extract_extra_networks", "BREAK", "ROUND_MULTIPLIER", "SQUARE_MULTIPLIER", "LORA_KINDS"]

#: `GenerationRequest.prompt_syntax`'s values: A1111's syntax (the default), or plain text as diffusers reads it
PROMPT_SYNTAXES = ("a1111", "plain")
BREAK = "BREAK"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
#: the extra-network kinds that are LoRAs (A1111's built-in Lora extension registers both names)
LORA_KINDS = ("lora", "lyco")

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT = re.compile(r":([+-]?[.\d]+)\)")
_ESCAPABLE = "()[]\\"
_SPECIAL = "\\()[]:"


class PromptSyntaxWarning(UserWarning):
    """Part of a prompt was ignored: an extra-network tag sdlite does not use, or a malformed LoRA tag."""


@dataclass
class ParsedPrompt:
    """A prompt in A1111 syntax, parsed.

    fragments  [(text, weight)]: the text with the tags and brackets taken out, in order; no empty text
               but for an empty prompt's ``[("", 1.0)]``
    breaks     fragment indices: a BREAK comes right before ``fragments[i]`` (``len(fragments)``: at the
               end); an index may repeat (``BREAK BREAK`` makes an empty chunk, as in A1111)
    loras      [(name, scale)] from ``<lora:NAME:SCALE>`` tags, in the order they appear
    """

    fragments: list[tuple[str, float]]
    breaks: list[int] = field(default_factory=list)
    loras: list[tuple[str, float]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The fragments' text joined (no brackets, no tags; each BREAK as a space)."""
        out, breaks = [], sorted(self.breaks)
        for i, (text, _) in enumerate(self.fragments):
            out.extend(" " for b in breaks if b == i)
            out.append(text)
        return "".join(out)

    @property
    def is_plain(self) -> bool:
        """True when the weights are all 1.0 and there is no BREAK: the text encodes as plain text does."""
        return not self.breaks and all(w == 1.0 for _, w in self.fragments)


def parse_prompt(text: str) -> ParsedPrompt:
    """Parse `text` in A1111 syntax (see the module docstring). Warns (`PromptSyntaxWarning`) for tags it
    ignores; never raises for any str."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be str, got {type(text).__name__}")
    text, loras = extract_extra_networks(text)
    fragments: list[tuple[str, float]] = []
    breaks: list[int] = []
    for piece, weight in parse_prompt_attention(text):
        if weight == -1 and piece == BREAK:
            breaks.append(len(fragments))
        elif piece:  # A1111 keeps the empty pieces around a BREAK; they hold no tokens
            fragments.append((piece, weight))
    if not fragments:
        fragments.append(("", 1.0))
    return ParsedPrompt(fragments, breaks, loras)


def extract_extra_networks(text: str) -> tuple[str, list[tuple[str, float]]]:
    """(`text` without its ``<kind:args>`` tags, the LoRA tags as [(name, scale)]). Other kinds and
    malformed LoRA tags are dropped with a `PromptSyntaxWarning`."""
    loras: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind.lower() not in LORA_KINDS:
            _warn(f"<{kind}:...> tags are not supported; {m.group(0)!r} was ignored")
            return ""
        name = args[0].strip()
        scale = 1.0
        if len(args) > 1:
            try:
                scale = float(args[1])
            except ValueError:
                _warn(f"{m.group(0)!r}: the scale {args[1]!r} is not a number; the tag was ignored")
                return ""
        if len(args) > 2:
            _warn(f"{m.group(0)!r}: only one LoRA scale is used (text encoder and UNet alike): {scale:g}")
        if not name:
            _warn(f"{m.group(0)!r} names no LoRA; the tag was ignored")
            return ""
        loras.append((name, scale))
        return ""

    return _EXTRA_NETWORK.sub(take, text), loras


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] with A1111's weights, each ``BREAK`` as ``("BREAK", -1.0)`` (A1111's marker).
    Extra-network tags are not treated here (see `extract_extra_networks`)."""
    parser = _Attention()
    i = 0
    while i < len(text):
        i = parser.step(text, i)
    return parser.finish()


class _Attention:
    """The state of one parse: [text, weight] items (a BREAK is [BREAK, None]) and the open brackets."""

    def __init__(self):
        self.res: list[list] = []
        self.round_open: list[int] = []
        self.square_open: list[int] = []

    def multiply(self, start: int, by: float) -> None:
        for item in self.res[start:]:
            if item[1] is not None:
                item[1] *= by

    def step(self, text: str, i: int) -> int:
        """Read what starts at text[i]; returns where the next item starts."""
        c = text[i]
        if c == "\\":
            if text[i + 1:i + 2] and text[i + 1] in _ESCAPABLE:
                self.res.append([text[i + 1], 1.0])
                return i + 2
            return i + 1  # a lone backslash: A1111 drops it
        if c == ":":
            return self.colon(text, i)
        if c == "(":
            self.round_open.append(len(self.res))
        elif c == "[":
            self.square_open.append(len(self.res))
        elif c == ")" and self.round_open:
            self.multiply(self.round_open.pop(), ROUND_MULTIPLIER)
        elif c == "]" and self.square_open:
            self.multiply(self.square_open.pop(), SQUARE_MULTIPLIER)
        elif c in ")]":
            self.res.append([c, 1.0])
        else:
            j = i
            while j < len(text) and text[j] not in _SPECIAL:
                j += 1
            _add_text(self.res, text[i:j])
            return j
        return i + 1

    def colon(self, text: str, i: int) -> int:
        """``:1.5)`` closes the innermost ``(`` with that weight; any other colon is text."""
        m = _WEIGHT.match(text, i)
        weight = _float(m.group(1)) if m else None
        if weight is not None and self.round_open:
            self.multiply(self.round_open.pop(), weight)
            return m.end()
        _add_text(self.res, m.group(0) if m else ":")
        return m.end() if m else i + 1

    def finish(self) -> list[tuple[str, float]]:
        for start in self.round_open:
            self.multiply(start, ROUND_MULTIPLIER)
        for start in self.square_open:
            self.multiply(start, SQUARE_MULTIPLIER)
        return _merge(self.res)


def _add_text(res: list[list], text: str) -> None:
    """Append plain text, split at BREAK as A1111 splits it (the empty pieces around a BREAK are kept)."""
    for k, part in enumerate(_BREAK_SPLIT.split(text)):
        if k:
            res.append([BREAK, None])
        res.append([part, 1.0])


def _merge(res: list[list]) -> list[tuple[str, float]]:
    out: list[list] = []
    for text, weight in res:
        if weight is None:
            out.append([BREAK, None])
        elif out and out[-1][1] is not None and out[-1][1] == weight:
            out[-1][0] += text
        else:
            out.append([text, weight])
    if not out:
        return [("", 1.0)]
    return [(text, -1.0 if weight is None else weight) for text, weight in out]


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _warn(message: str) -> None:
    warnings.warn(message, PromptSyntaxWarning, stacklevel=4)
