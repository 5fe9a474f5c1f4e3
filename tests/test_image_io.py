"""image_io: PNG/JPEG/WebP output carrying A1111-style generation parameters, written atomically."""

import io
import os
import stat

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin, TiffTags

from sdlite import image_io
from sdlite.image_io import OUTPUT_SUFFIXES, output_format, read_parameters, save_image, save_png

NON_ASCII = "a café, 猫, emoji 🐱"
MULTI_LINE = (
    "a photo of a cat, (masterpiece:1.2), 日本語\n"
    "Negative prompt: blurry, lowres, ÿ\n"
    "Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1234, Size: 32x24, Model: tiny"
)
SUFFIXES = [".png", ".jpg", ".JPEG", ".webp"]
EXIF_SUFFIXES = [".jpg", ".JPEG", ".webp"]


@pytest.fixture
def image():
    pixels = np.random.default_rng(0).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture
def umask():
    """Run under a known umask, restoring the caller's afterwards."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _raw_exif(path):
    with Image.open(path) as img:
        raw = img.info["exif"]
    return raw[6:] if raw.startswith(b"Exif\0\0") else raw  # JPEG keeps the APP1 "Exif\0\0" header, WebP not


@pytest.mark.parametrize("text", [NON_ASCII, MULTI_LINE], ids=["non-ascii", "multi-line"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_parameters_round_trip(tmp_path, image, suffix, text):
    path = tmp_path / f"out{suffix}"
    assert save_image(image, path, text) == path
    assert read_parameters(path) == text
    with Image.open(path) as img:
        assert img.format == output_format(path)
        assert (img.mode, img.size) == ("RGB", (32, 24))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_save_png_still_works(tmp_path, image):
    path = save_png(image, tmp_path / "a.png", MULTI_LINE)
    assert read_parameters(path) == MULTI_LINE
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.info["parameters"] == MULTI_LINE
        assert np.array_equal(np.asarray(img), np.asarray(image))
    assert read_parameters(save_png(image, tmp_path / "b.png")) is None


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("parameters", [None, ""])
def test_no_parameters_stores_nothing(tmp_path, image, suffix, parameters):
    path = save_image(image, tmp_path / f"out{suffix}", parameters)
    assert read_parameters(path) is None
    with Image.open(path) as img:
        assert "exif" not in img.info and "parameters" not in img.info


@pytest.mark.parametrize("suffix", EXIF_SUFFIXES)
def test_exif_layout_matches_a1111(tmp_path, image, suffix):
    """IFD0 points (LONG) at an Exif IFD whose UserComment is UNDEFINED b"UNICODE\\0" + UTF-16BE text,
    what helper.UserComment.dump(text, encoding="unicode") gives and A1111 writes."""
    path = save_image(image, tmp_path / f"out{suffix}", NON_ASCII)
    with Image.open(path) as img:
        exif = img.getexif()
        assert 0x8769 in exif
        comment = exif.get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\x00")
    assert comment == b"UNICODE\x00" + NON_ASCII.encode("utf-16-be")

    # the TIFF types, which Pillow's dict view hides: piexif turns a BYTE-typed UserComment into a tuple of ints
    fp = io.BytesIO(_raw_exif(path))
    head = fp.read(8)
    ifd0 = TiffImagePlugin.ImageFileDirectory_v2(head)
    fp.seek(ifd0.next)
    ifd0.load(fp)
    assert ifd0.tagtype[0x8769] == TiffTags.LONG
    exif_ifd = TiffImagePlugin.ImageFileDirectory_v2(head, group=0x8769)
    fp.seek(ifd0[0x8769])
    exif_ifd.load(fp)
    assert exif_ifd.tagtype[0x9286] == TiffTags.UNDEFINED
    assert exif_ifd[0x9286] == comment


@pytest.mark.parametrize("suffix", EXIF_SUFFIXES)
def test_piexif_reads_ours_and_we_read_a1111s(tmp_path, image, suffix):
    """Cross-check with piexif when it happens to be importable (it is not a dependency)."""
    piexif = pytest.importorskip("piexif")
    helper = pytest.importorskip("piexif.helper")

    # A1111's read_info_from_image: piexif.load(image.info["exif"]), then UserComment.load
    path = save_image(image, tmp_path / f"ours{suffix}", MULTI_LINE)
    with Image.open(path) as img:
        loaded = piexif.load(img.info["exif"])
    value = loaded["Exif"][piexif.ExifIFD.UserComment]
    assert value == helper.UserComment.dump(MULTI_LINE, encoding="unicode")
    assert helper.UserComment.load(value) == MULTI_LINE

    # A1111's save_image_with_geninfo: plain save, then piexif.insert of the dumped EXIF
    theirs = tmp_path / f"theirs{suffix}"
    image.save(theirs, format=output_format(theirs), quality=90)
    comment = helper.UserComment.dump(NON_ASCII, encoding="unicode")
    piexif.insert(piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}}), str(theirs))
    assert read_parameters(theirs) == NON_ASCII


@pytest.mark.parametrize(
    "comment, expected",
    [
        (b"ASCII\0\0\0Steps: 20", "Steps: 20"),
        (b"JIS\0\0\0\0\0" + "猫".encode("shift_jis"), "猫"),
        (b"Steps: 20, caf\xc3\xa9\xff", "Steps: 20, café"),  # no known prefix: UTF-8, ignoring errors, like A1111
        (b"UNICODE\0", None),
    ],
)
def test_reads_other_user_comment_codes(tmp_path, image, comment, expected):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment  # Pillow writes this BYTE-typed; we read it all the same
    path = tmp_path / "other.jpg"
    image.save(path, format="JPEG", exif=exif.tobytes())
    assert read_parameters(path) == expected


def test_jpeg_default_quality_is_90_and_webp_is_lossy(tmp_path, image):
    ours = save_image(image, tmp_path / "ours.jpg", "p")
    plain = tmp_path / "plain.jpg"
    image.save(plain, format="JPEG", quality=90)
    with Image.open(ours) as a, Image.open(plain) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    webp = save_image(image, tmp_path / "out.webp", "p")
    with Image.open(webp) as img:
        assert not np.array_equal(np.asarray(img), np.asarray(image))
    small = save_image(image, tmp_path / "small.webp", "p", quality=10)
    assert small.stat().st_size < webp.stat().st_size


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_file_mode_follows_umask(tmp_path, image, umask, suffix, mask):
    umask(mask)
    path = save_image(image, tmp_path / f"out{suffix}", "p")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert os.umask(mask) == mask  # left unchanged
    path.chmod(0o600)  # overwriting an existing file gives the new file the usual mode too
    save_image(image, path, "q")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert read_parameters(path) == "q"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_folder_or_file_as_folder_raise_oserror(tmp_path, image, suffix):
    with pytest.raises(FileNotFoundError):
        save_image(image, tmp_path / "missing" / f"out{suffix}", "p")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        save_image(image, tmp_path / "file" / f"out{suffix}", "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_only_folder_raises_oserror(tmp_path, image, suffix):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running with privileges that write into read-only folders")
        with pytest.raises(PermissionError):
            save_image(image, folder / f"out{suffix}", "p")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_encoder_failure_leaves_nothing_and_keeps_old_file(tmp_path, image, monkeypatch, suffix, error):
    path = tmp_path / f"out{suffix}"
    path.write_bytes(b"old")

    def failing_save(self, fp, format=None, **params):
        fp.write(b"partial")
        raise error

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(type(error)):
        save_image(image, path, "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == b"old"


def test_jpeg_parameters_too_long_raise_valueerror_and_leave_nothing(tmp_path, image):
    with pytest.raises(ValueError, match="EXIF data is too long"):
        save_image(image, tmp_path / "out.jpg", "x" * 40_000)
    assert list(tmp_path.iterdir()) == []
    assert read_parameters(save_image(image, tmp_path / "out.webp", "x" * 40_000)) == "x" * 40_000


@pytest.mark.parametrize(
    "name, fmt",
    [("a.png", "PNG"), ("a.PNG", "PNG"), ("a.jpg", "JPEG"), ("a.Jpeg", "JPEG"), ("dir.v2/a.WEBP", "WEBP")],
)
def test_output_format(name, fmt):
    assert output_format(name) == fmt
    assert os.path.splitext(name)[1].lower() in OUTPUT_SUFFIXES


@pytest.mark.parametrize("name", ["out.gif", "out.tiff", "out", "out.png.bak", ".png", "out.jpg "])
def test_unknown_suffix_refused(tmp_path, image, name):
    with pytest.raises(ValueError) as info:
        output_format(name)
    assert str(info.value) == f"{name}: output must be a .png, .jpg or .webp file"
    with pytest.raises(ValueError, match="output must be a .png, .jpg or .webp file"):
        save_image(image, tmp_path / name, "p")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quality", [-1, 101])
def test_quality_out_of_range_refused(tmp_path, image, quality):
    with pytest.raises(ValueError, match="quality"):
        save_image(image, tmp_path / "out.jpg", "p", quality=quality)
    assert list(tmp_path.iterdir()) == []


def test_read_parameters_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_parameters(tmp_path / "missing.png")
    (tmp_path / "not-an-image.jpg").write_bytes(b"hello")
    with pytest.raises(OSError):
        read_parameters(tmp_path / "not-an-image.jpg")


def test_suffixes_and_formats_agree():
    assert OUTPUT_SUFFIXES == (".png", ".jpg", ".jpeg", ".webp")
    assert set(image_io._FORMATS) == set(OUTPUT_SUFFIXES)
