"""Fuzz sdlite's safetensors reader against the official `safetensors` library.

Seeds are valid files written by `save_safetensors` (every dtype, zero-size and scalar tensors, metadata);
each example is a seed mutated a few times (bytes flipped or set to JSON punctuation, truncation, appended
bytes, header text spliced: numbers, names, dtypes, offsets, constants; the header length field changed).
For every example the reader must either refuse with `WeightsError` (at open, or on access for a BOOL
tensor with bytes other than 0/1), or return tensors that the official library also reads, with the
same names, dtypes, shapes and bytes. Anything else (another exception, a refusal by the official
library of a file we accept, different tensors) is a finding. One deliberate deviation is counted apart:
a zero-byte tensor placed inside another tensor's range reads no bytes and is accepted here (the
official library refuses it).

    python bench/fuzz_safetensors.py --examples 20000 [--seed 0]

prints one JSON line: {"examples", "accepted", "refused", "official_refused_too", "known_deviation",
"disagreements", "crashes", "seconds", "findings": [the first few, as hex]}. Exit status 1 when there
are disagreements or crashes. tests/weights/test_fuzz_safetensors.py runs a short version in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdlite.errors import WeightsError
from sdlite.weights.safetensors_mmap import open_safetensors, save_safetensors

PUNCT = b'{}[]",:-0123456789 .e\\'
NUMBERS = ["0", "1", "-1", "-0", "7", "8", "16", "1.0", "1e3", "2e400", "NaN", "Infinity", "-Infinity",
           str(2**31), str(2**32), str(2**62), str(2**63 - 1), str(2**63), str(2**64 - 1), str(2**64),
           "1" * 25, "1" * 5000, "null", "true", '"4"', "[]", "{}", "[0]", "[0,0]", "[1,1]"]
STRINGS = ['"F32"', '"F16"', '"BF16"', '"I64"', '"BOOL"', '"U8"', '"U16"', '"F8_E4M3"', '"f32"', '""',
           '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', '"__metadata__"', '"data_offsets"', '"shape"',
           '"dtype"', '"a"', '"\\u0000"']


def seed_files(rng: random.Random, folder: Path, count: int = 8) -> list[bytes]:
    """`count` valid safetensors files (as bytes) written by `save_safetensors`."""
    makers = [
        lambda: torch.randn(3, 5),
        lambda: torch.randn(4).half(),
        lambda: torch.randn(2, 2).to(torch.bfloat16),
        lambda: torch.randint(-5, 5, (3,), dtype=torch.int64),
        lambda: torch.randint(-5, 5, (2, 3), dtype=torch.int32),
        lambda: torch.randint(0, 255, (5,), dtype=torch.uint8),
        lambda: torch.randint(-5, 5, (4,), dtype=torch.int8),
        lambda: torch.randint(-5, 5, (2,), dtype=torch.int16),
        lambda: torch.rand(6) > 0.5,
        lambda: torch.randn(2, 0, 3),
        lambda: torch.tensor(2.5),
        lambda: torch.randn(2).double(),
    ]
    out = []
    for i in range(count):
        tensors = {f"t{j}.w": rng.choice(makers)() for j in range(rng.randint(1, 4))}
        metadata = {"format": "pt"} if rng.random() < 0.5 else None
        path = folder / f"seed{i}.safetensors"
        save_safetensors(tensors, path, metadata=metadata)
        out.append(path.read_bytes())
    return out


def _header_span(data: bytes) -> tuple[int, int] | None:
    if len(data) < 8:
        return None
    n = struct.unpack("<Q", data[:8])[0]
    return (8, 8 + n) if 8 + n <= len(data) else None


def _splice_header(data: bytes, rng: random.Random) -> bytes:
    """Replace one number or string of the header text by another, and fix the length field (mostly)."""
    span = _header_span(data)
    if span is None:
        return data
    text = data[span[0]:span[1]].decode("utf-8", errors="surrogateescape")
    tokens = list(re.finditer(r'-?\d+|"(?:[^"\\]|\\.)*"', text))
    if not tokens:
        return data
    tok = rng.choice(tokens)
    pool = NUMBERS if tok.group().lstrip("-")[:1].isdigit() else STRINGS
    if rng.random() < 0.3:
        pool = NUMBERS + STRINGS
    text = text[:tok.start()] + rng.choice(pool) + text[tok.end():]
    raw = text.encode("utf-8", errors="surrogateescape")
    n = len(raw) if rng.random() < 0.9 else span[1] - span[0]
    return struct.pack("<Q", n) + raw + data[span[1]:]


def _rewrite_offsets(data: bytes, rng: random.Random) -> bytes:
    """Shift one tensor's data_offsets (both ends) by a few bytes: gaps, overlaps, trailing bytes."""
    span = _header_span(data)
    if span is None:
        return data
    text = data[span[0]:span[1]].decode("utf-8", errors="surrogateescape")
    found = list(re.finditer(r'"data_offsets":\[(\d{1,20}),(\d{1,20})\]', text))
    if not found:
        return data
    m = rng.choice(found)
    d = rng.choice([-8, -4, -1, 1, 2, 4, 8])
    b, e = max(0, int(m.group(1)) + d), max(0, int(m.group(2)) + d)
    text = text[:m.start()] + f'"data_offsets":[{b},{e}]' + text[m.end():]
    raw = text.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw + data[span[1]:]


def _flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    span = _header_span(data)
    lo, hi = (span if span and rng.random() < 0.7 else (0, len(b)))
    if hi <= lo:
        return data
    i = rng.randrange(lo, hi)
    b[i] = rng.choice(PUNCT) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(b)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data) + 1)]


def _append(data: bytes, rng: random.Random) -> bytes:
    return data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 7, 8, 64, 700])))


def _length_field(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 8:
        return data
    n = struct.unpack("<Q", data[:8])[0] + rng.choice([-8, -1, 1, 8, 2**32, 2**63])
    return struct.pack("<Q", n % 2**64) + data[8:]


def _set_bool_byte(data: bytes, rng: random.Random) -> bytes:
    """Put a byte other than 0/1 into the data section (lands in a BOOL tensor at times)."""
    span = _header_span(data)
    if span is None or span[1] >= len(data):
        return data
    b = bytearray(data)
    b[rng.randrange(span[1], len(b))] = rng.choice([2, 0x80, 0xff])
    return bytes(b)


MUTATORS = [_flip, _flip, _splice_header, _splice_header, _rewrite_offsets, _truncate, _append, _length_field,
            _set_bool_byte]


def mutate(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        data = rng.choice(MUTATORS)(data, rng)
    return data


def _ours(path: Path) -> dict[str, torch.Tensor] | None:
    """Our reader's tensors (copied), or None when it refuses with WeightsError."""
    try:
        with open_safetensors(path) as sf:
            return {k: v.clone() for k, v in sf.items()}
    except WeightsError:
        return None


def _zero_size_inside(data: bytes) -> bool:
    """True for a file that differs from what the official library accepts only by a zero-byte tensor
    placed inside another tensor's byte range (accepted here on purpose)."""
    span = _header_span(data)
    try:
        header = json.loads(data[span[0]:span[1]])
        ranges = [tuple(e["data_offsets"]) for k, e in header.items() if k != "__metadata__"]
    except Exception:
        return False
    full = [(b, e) for b, e in ranges if e > b]
    return any(b == e and any(fb < b < fe for fb, fe in full) for b, e in ranges)


def _same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    if set(ours) != set(theirs):
        return False
    for k, t in ours.items():
        o = theirs[k]
        if t.dtype != o.dtype or t.shape != o.shape:
            return False
        if t.numel() and not torch.equal(t.reshape(-1).view(torch.uint8), o.reshape(-1).view(torch.uint8)):
            return False
    return True


def check(data: bytes, path: Path) -> str:
    """One example: 'refused', 'accepted', 'known_deviation', 'disagreement: ...' or 'crash: ...'."""
    from safetensors.torch import load as official_load

    path.write_bytes(data)
    try:
        ours = _ours(path)
    except Exception as e:  # anything but WeightsError is a bug
        return f"crash: {type(e).__name__}: {e}"[:300]
    if ours is None:
        return "refused"
    try:
        theirs = official_load(data)
    except Exception as e:
        if _zero_size_inside(data):
            return "known_deviation"
        return f"disagreement: accepted here, official refuses: {e}"[:300]
    return "accepted" if _same(ours, theirs) else "disagreement: tensors differ"


def fuzz(examples: int, seed: int = 0, time_limit: float | None = None) -> dict:
    """Run `examples` mutated files (or until `time_limit` seconds); return the counts and findings."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    counts = {"examples": 0, "accepted": 0, "refused": 0, "official_refused_too": 0, "known_deviation": 0,
              "disagreements": 0, "crashes": 0}
    findings: list[dict] = []
    start = time.perf_counter()
    from safetensors.torch import load as official_load

    with tempfile.TemporaryDirectory() as tmp:
        seeds = seed_files(rng, Path(tmp))
        path = Path(tmp) / "example.safetensors"
        for _ in range(examples):
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
            data = mutate(rng.choice(seeds), rng)
            outcome = check(data, path)
            counts["examples"] += 1
            kind = outcome.split(":")[0]
            if kind == "refused":
                counts["refused"] += 1
                try:
                    official_load(data)
                except Exception:
                    counts["official_refused_too"] += 1
            elif kind in ("accepted", "known_deviation"):
                counts[kind] += 1
            else:
                counts["crashes" if kind == "crash" else "disagreements"] += 1
                if len(findings) < 5:
                    findings.append({"outcome": outcome, "file": data[:2000].hex()})
    counts["seconds"] = round(time.perf_counter() - start, 2)
    counts["findings"] = findings
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = fuzz(args.examples, args.seed)
    print(json.dumps(result))
    return 1 if result["disagreements"] or result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
