"""Every image mode is read as its 8-bit RGB equivalent or refused in one line (issue 25, item 2).

Each case builds an 8-bit RGB (or grey) image, derives the other mode from it so that the expected pixels are
exact, saves the file, reads it back through ``read_image`` (datasets, ``ovenet predict``) and ``to_pixels``
(``model.predict``), and compares them equal.
"""

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ovenet.data.base import LabelTable, SampleFiles, SegmentationDataset, read_image
from ovenet.errors import DataError, OvenetError
from ovenet.inference import to_pixels

RNG = np.random.default_rng(25)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # non-square: 90-degree turns change the shape
GREY = RNG.integers(0, 256, (5, 7), dtype=np.uint8)


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _read_both_ways(path) -> np.ndarray:
    """The file through read_image, after checking that to_pixels reads the file and the PIL image alike."""
    array = read_image(path)
    assert array.dtype == np.uint8 and array.shape[2] == 3
    with Image.open(path) as img:
        from_pil = to_pixels(img).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(from_pil, array)
    np.testing.assert_array_equal(to_pixels(path).permute(1, 2, 0).numpy(), array)
    return array


def _png16(path, array: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow writes no 16-bit colour PNG): grey (0), RGB (2), grey+alpha (4)."""
    height, width = array.shape[:2]
    rows = b"".join(b"\0" + np.ascontiguousarray(row).astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    # Today's bug: Pillow's I;16 -> RGB clips every value above 255 to white.
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY.astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode == "I;16"
    np.testing.assert_array_equal(_read_both_ways(path), _grey_rgb(GREY))


def test_16bit_scale_is_value_over_257_rounded(tmp_path):
    # Hand-computed: 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 385/257 = 1.498 -> 1, 386/257 = 1.502 -> 2,
    # 65406/257 = 254.498 -> 254, 65407/257 = 254.502 -> 255, 65535 -> 255.
    values = np.array([[0, 128, 129, 385, 386, 65406, 65407, 65535]], dtype=np.uint16)
    expected = np.array([[0, 0, 1, 1, 2, 254, 255, 255]], dtype=np.uint8)
    path = tmp_path / "ramp16.png"
    _png16(path, values, color_type=0)
    np.testing.assert_array_equal(_read_both_ways(path), _grey_rgb(expected))


def test_16bit_big_endian_and_32bit_int_tiff(tmp_path):
    big_endian = tmp_path / "grey16b.tif"
    Image.fromarray((GREY.astype(np.uint16) * 257).astype(">u2")).save(big_endian)
    assert Image.open(big_endian).mode == "I;16B"
    np.testing.assert_array_equal(_read_both_ways(big_endian), _grey_rgb(GREY))
    int32 = tmp_path / "grey32.tif"
    Image.fromarray(GREY.astype(np.int32) * 257, "I").save(int32)
    assert Image.open(int32).mode == "I"
    np.testing.assert_array_equal(_read_both_ways(int32), _grey_rgb(GREY))


def test_16bit_rgb_png(tmp_path):
    # Pillow decodes 16-bit colour to the high byte; for 8-bit values scaled by 257 that is the 8-bit value.
    path = tmp_path / "rgb48.png"
    _png16(path, RGB.astype(np.uint16) * 257, color_type=2)
    np.testing.assert_array_equal(_read_both_ways(path), RGB)


def test_16bit_grey_alpha_png(tmp_path):
    path = tmp_path / "la32.png"
    alpha = RNG.integers(0, 65536, GREY.shape).astype(np.uint16)
    _png16(path, np.stack([GREY.astype(np.uint16) * 257, alpha], axis=2), color_type=4)
    np.testing.assert_array_equal(_read_both_ways(path), _grey_rgb(GREY))


@pytest.mark.parametrize("mode", ["F", "I"])
def test_modes_without_a_known_range_are_refused(tmp_path, mode):
    path = tmp_path / f"{mode}.tif"
    values = GREY.astype(np.float32) / 255 if mode == "F" else GREY.astype(np.int32) * 1000  # up to 255000
    Image.fromarray(values, mode).save(path)
    with pytest.raises(DataError, match=f"{path}.*save it as an 8-bit or 16-bit"):
        read_image(path)
    with Image.open(path) as img, pytest.raises(DataError, match="save it as"):
        to_pixels(img)


def test_1bit(tmp_path):
    black_white = np.where(GREY > 127, 255, 0).astype(np.uint8)
    path = tmp_path / "bits.png"
    Image.fromarray(black_white).convert("1").save(path)
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(_read_both_ways(path), _grey_rgb(black_white))


@pytest.mark.parametrize("transparency", [None, 3, bytes(range(0, 256, 16))])  # none, one entry, alpha per entry
def test_palette(tmp_path, transparency):
    colours = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = GREY % 16
    image = Image.fromarray(indices, "P")
    image.putpalette(colours.flatten().tolist())
    path = tmp_path / "palette.png"
    image.save(path, **({} if transparency is None else {"transparency": transparency}))
    assert Image.open(path).mode == "P" and ("transparency" in Image.open(path).info) == (transparency is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "should be converted to RGBA" warning is not for users to see
        read = _read_both_ways(path)
    np.testing.assert_array_equal(read, colours[indices])  # a transparent entry keeps its colour


def test_grey_alpha_and_rgba_drop_the_alpha(tmp_path):
    alpha = RNG.integers(0, 256, GREY.shape, dtype=np.uint8)
    grey_alpha = tmp_path / "la.png"
    Image.fromarray(np.stack([GREY, alpha], axis=2), "LA").save(grey_alpha)
    np.testing.assert_array_equal(_read_both_ways(grey_alpha), _grey_rgb(GREY))
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([RGB, alpha[..., None]], axis=2), "RGBA").save(rgba)
    np.testing.assert_array_equal(_read_both_ways(rgba), RGB)


def test_cmyk_tiff_and_jpeg(tmp_path):
    tiff = tmp_path / "cmyk.tif"
    Image.fromarray(RGB).convert("CMYK").save(tiff)
    assert Image.open(tiff).mode == "CMYK"
    np.testing.assert_array_equal(_read_both_ways(tiff), RGB)
    # JPEG is lossy: a smooth image survives quality 100 within a few levels (an inverted Adobe CMYK would not).
    ramp = np.stack([*np.meshgrid(np.linspace(40, 220, 32), np.linspace(60, 200, 24)), np.full((24, 32), 128.0)],
                    axis=2).astype(np.uint8)
    jpeg = tmp_path / "cmyk.jpg"
    Image.fromarray(ramp).convert("CMYK").save(jpeg, quality=100)
    assert Image.open(jpeg).mode == "CMYK"
    assert np.abs(_read_both_ways(jpeg).astype(int) - ramp).max() <= 6


# EXIF orientation -> how a viewer turns the stored pixels (the EXIF standard, written out with numpy).
SHOWN_FROM_STORED = {
    2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}
STORED_FROM_SHOWN = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.transpose(1, 0, 2),
                     6: lambda a: np.rot90(a, 1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
                     8: lambda a: np.rot90(a, -1)}


def _save_oriented(path, shown: np.ndarray, orientation: int) -> None:
    stored = np.ascontiguousarray(STORED_FROM_SHOWN[orientation](shown))
    np.testing.assert_array_equal(SHOWN_FROM_STORED[orientation](stored), shown)  # the two tables agree
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    path = tmp_path / f"oriented{orientation}.png"
    _save_oriented(path, RGB, orientation)
    np.testing.assert_array_equal(_read_both_ways(path), RGB)


def _dataset(tmp_path, label_shape, orientation):
    image, label = tmp_path / "img.png", tmp_path / "lbl.png"
    _save_oriented(image, RGB, orientation)
    Image.fromarray(np.zeros(label_shape, np.uint8)).save(label)
    return SegmentationDataset([SampleFiles("img", image, label)], LabelTable({0: 0}, "0"), None)


def test_a_label_is_paired_with_the_image_as_shown(tmp_path):
    shown = RGB.shape[:2]
    sample = _dataset(tmp_path, shown, 6).load(0)  # 90 degrees, label drawn on the image as shown: accepted
    np.testing.assert_array_equal(sample["image"], RGB)
    with pytest.raises(DataError, match="lbl.png is 7x5 .*size of image .*img.png as stored.*EXIF orientation 6"):
        _dataset(tmp_path, shown[::-1], 6).load(0)  # drawn on the stored pixels: refused, with the fix
    # A 180-degree turn keeps the size: which pixels the label belongs to cannot be told, so it is refused.
    with pytest.raises(DataError, match="EXIF orientation 3 .*cannot be told.*exif_transpose"):
        _dataset(tmp_path, shown, 3).load(0)


def test_arrays_scale_like_files():
    wide = GREY.astype(np.uint16) * 257 + 100  # not multiples of 257: the rounding matters
    expected = torch.from_numpy(_grey_rgb(((wide.astype(np.int64) * 2 + 257) // 514).astype(np.uint8)))
    assert torch.equal(to_pixels(wide).permute(1, 2, 0), expected)
    assert torch.equal(to_pixels(_grey_rgb(wide)).permute(1, 2, 0), expected)
    floats = to_pixels(RGB.astype(np.float32) / 255)
    torch.testing.assert_close(floats, torch.from_numpy(RGB).permute(2, 0, 1).float(), rtol=0, atol=1e-4)
    with pytest.raises(OvenetError, match="uint8 .*uint16 .*float"):
        to_pixels(RGB.astype(np.int32))
