"""Writing images that carry their generation parameters (PNG, JPEG, WebP), without leaving half-written files.

The parameters are stored where AUTOMATIC1111's web UI stores and reads them, so its "PNG Info" tab and the
tools that follow it can read our files:

- PNG: a `parameters` text chunk (tEXt, or iTXt when the text is not Latin-1).
- JPEG and WebP: an EXIF block whose Exif IFD holds tag 0x9286 UserComment, type UNDEFINED, valued
  b"UNICODE\\0" followed by the text in UTF-16 big-endian, exactly what A1111 writes with
  `piexif.helper.UserComment.dump(text, encoding="unicode")`.

The EXIF block is built here by hand: Pillow's `Image.Exif` writes a bytes value of UserComment with TIFF
type BYTE, which piexif (and so A1111's reader) loads as a tuple of ints and cannot decode.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

_EXIF_IFD_POINTER = 0x8769
_USER_COMMENT = 0x9286
_UNDEFINED = 7
_LONG = 4
# the 8-byte character-code prefixes of a UserComment (EXIF 2.3, table 9), as piexif.helper.UserComment knows them
_COMMENT_CODES = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis"}


def output_format(path: str | Path) -> str:
    """The Pillow format name ("PNG", "JPEG" or "WEBP") for `path`, chosen by its suffix, case-insensitive.
    Raises ValueError for any other suffix."""
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: output must be a .png, .jpg or .webp file")
    return fmt


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Save `image` as PNG (whatever the suffix) with an A1111-style `parameters` text chunk; atomic, like
    `save_image`. Raises OSError when the file cannot be written."""
    return _save(image, Path(path), "PNG", parameters, 90)


def save_image(image: Image.Image, path: str | Path, parameters: str | None, *, quality: int = 90) -> Path:
    """Save `image` (an RGB, uint8 PIL image) at `path` with its generation `parameters`, in the format its
    suffix names (case-insensitive): .png; .jpg or .jpeg (JPEG, `quality` 0-100, 90 by default); .webp (lossy
    WebP, `quality` 0-100, 90 by default). PNG ignores `quality`. Empty or None `parameters` store nothing.

    The write is atomic: a temporary file in the same folder, renamed over `path` once complete; the file gets
    the usual mode (0o666 less the umask), and nothing is left behind when writing fails. Returns `path`.

    Raises ValueError for an unknown suffix or a quality out of range (before touching the disk), or when the
    parameters are too long for JPEG's single EXIF segment (about 32,000 characters); OSError when the file
    cannot be written (missing or read-only folder, full disk, ...).
    """
    path = Path(path)
    fmt = output_format(path)
    if not 0 <= quality <= 100:
        raise ValueError(f"JPEG/WebP quality must be between 0 and 100, not {quality}")
    return _save(image, path, fmt, parameters, quality)


def _save(image: Image.Image, path: Path, fmt: str, parameters: str | None, quality: int) -> Path:
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        options = {"pnginfo": info}
    else:
        options = {"quality": quality}
        if parameters:
            options["exif"] = _exif_with_user_comment(parameters)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _exif_with_user_comment(text: str) -> bytes:
    """b"Exif\\0\\0" + a big-endian TIFF block: IFD0 holding only the Exif IFD pointer, and an Exif IFD holding
    only UserComment (UNDEFINED) = b"UNICODE\\0" + UTF-16BE text (unencodable lone surrogates become "?", as
    piexif's errors="replace" does)."""
    comment = b"UNICODE\0" + text.encode("utf-16-be", errors="replace")
    exif_ifd = 8 + 2 + 12 + 4  # after the TIFF header and IFD0 (one entry, then the next-IFD offset)
    value_at = exif_ifd + 2 + 12 + 4
    return (
        b"Exif\0\0" + b"MM\0\x2a" + struct.pack(">I", 8)
        + struct.pack(">HHHII", 1, _EXIF_IFD_POINTER, _LONG, 1, exif_ifd) + struct.pack(">I", 0)
        + struct.pack(">HHHII", 1, _USER_COMMENT, _UNDEFINED, len(comment), value_at) + struct.pack(">I", 0)
        + comment
    )


def read_parameters(path: str | Path) -> str | None:
    """The generation parameters stored in the image at `path`, or None when it holds none: the EXIF
    UserComment (JPEG, WebP, or any image with EXIF) if there is a non-empty one, else the PNG `parameters`
    text chunk, as AUTOMATIC1111 reads them. The comment's 8-byte prefix chooses the decoding: "UNICODE\\0"
    UTF-16BE, "ASCII\\0\\0\\0" ASCII, "JIS" Shift-JIS (undecodable bytes become U+FFFD); any other value is
    read as UTF-8, ignoring what does not decode, as A1111 does. Raises OSError when the file cannot be read
    or is not an image."""
    with Image.open(path) as img:
        img.load()  # PNG text chunks may follow the image data
        comment = img.getexif().get_ifd(_EXIF_IFD_POINTER).get(_USER_COMMENT)
        text = img.info.get("parameters")
    if isinstance(comment, bytes):
        code = _COMMENT_CODES.get(comment[:8])
        comment = comment[8:].decode(code, errors="replace") if code else comment.decode("utf-8", errors="ignore")
    if comment and isinstance(comment, str):
        return comment
    return str(text) if text else None
