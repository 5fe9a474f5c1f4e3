"""Tokenizers: reading (`clip`) and writing (`writer`) CLIP byte-level BPE tokenizer folders, and the standard
SD 1.x / 2.x vocabulary shipped with sdlite (`standard`) for single-file checkpoints, which hold no tokenizer.

    from sdlite.tokenizer import ClipTokenizer
    ids = ClipTokenizer.from_folder("model/tokenizer")(["a red circle"])   # (1, 77) int64
    ids = ClipTokenizer.standard("sd1")(["a red circle"])                 # no folder needed

A folder is read from ``tokenizer.json`` (as transformers 5 saves it) or ``vocab.json`` + ``merges.txt``;
`tokenizer_files_present` says whether a folder has either.
"""

from .clip import DEFAULT_MAX_LENGTH, ClipTokenizer, TokenTruncationWarning, max_token_id, tokenizer_files_present
from .standard import standard_vocab
from .writer import write_clip_tokenizer, write_standard_tokenizer

__all__ = [
    "ClipTokenizer", "TokenTruncationWarning", "DEFAULT_MAX_LENGTH", "max_token_id", "standard_vocab",
    "tokenizer_files_present", "write_clip_tokenizer", "write_standard_tokenizer",
]
