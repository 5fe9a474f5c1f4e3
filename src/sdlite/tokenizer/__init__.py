"""Tokenizers: reading (`clip`) and writing (`writer`) CLIP byte-level BPE tokenizer folders.

    from sdlite.tokenizer import ClipTokenizer
    ids = ClipTokenizer.from_folder("model/tokenizer")(["a red circle"])   # (1, 77) int64
"""

from .clip import DEFAULT_MAX_LENGTH, ClipTokenizer, TokenTruncationWarning
from .writer import write_clip_tokenizer

__all__ = ["ClipTokenizer", "TokenTruncationWarning", "DEFAULT_MAX_LENGTH", "write_clip_tokenizer"]
