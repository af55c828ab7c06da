"""Image decoding shared by both command lines (pyattr/runtime/images.py): every mode to RGB uint8 by its
meaning, EXIF orientation, decompression bombs refused from the header, every error an InputError."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pyattr.errors import InputError
from pyattr.runtime import load_image as runtime_load_image
from pyattr.runtime.images import MAX_IMAGE_PIXELS, load_image, read_image


def saved(tmp_path, im: Image.Image, name: str, **kwargs) -> str:
    p = tmp_path / name
    im.save(p, **kwargs)
    return str(p)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit ramp: Pillow's convert("RGB") puts almost every pixel at 255; read_image scales by 255/65535."""
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = saved(tmp_path, Image.fromarray(ramp), "ramp16.png")
    assert Image.open(path).mode in ("I;16", "I")
    rgb = read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    expected = np.floor(ramp.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])
    assert (rgb == 255).mean() < 0.01  # was 0.996 with convert("RGB")
    assert len(np.unique(rgb[..., 0])) == 256


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_modes_in_memory(mode):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    order = ">u2" if mode == "I;16B" else "<u2"
    im = Image.frombytes(mode, (4, 1), values.astype(order).tobytes())
    assert im.mode == mode
    np.testing.assert_array_equal(load_image(im)[0, :, 0], [0, 1, 128, 255])


def test_mode_I_as_16_bit_and_out_of_range():
    in_range = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert in_range.mode == "I"
    np.testing.assert_array_equal(load_image(in_range)[0, :, 0], [0, 255])
    wide = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))
    np.testing.assert_array_equal(load_image(wide)[0, :, 0], [0, 128, 255])


def test_mode_F():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(load_image(unit)[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[10.0, 20.0, 30.0]], dtype=np.float32))
    np.testing.assert_array_equal(load_image(wide)[0, :, 0], [0, 128, 255])
    with pytest.raises(InputError, match="NaN"):
        load_image(Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32)))


def test_rgba_and_la_are_composited_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 0, 0, 255)  # opaque red
    rgba[0, 1] = (200, 0, 0, 0)  # fully transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half black: grey
    path = saved(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png")
    rgb = read_image(path)
    assert rgb[0, 0].tolist() == [200, 0, 0]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [127, 127, 127]  # 255 * (1 - 128/255) = 127.0
    la = Image.fromarray(np.array([[[100, 255], [100, 0]]], np.uint8), "LA")
    assert load_image(la)[0].tolist() == [[100, 100, 100], [255, 255, 255]]


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    path = saved(tmp_path, im, "p.png", transparency=0)
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    assert read_image(path)[0].tolist() == [[255, 255, 255], [10, 200, 30]]


def test_plain_modes(tmp_path):
    bits = Image.fromarray(np.array([[0, 1]], bool))
    assert bits.mode == "1"
    assert load_image(bits)[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    grey = Image.fromarray(np.array([[7, 250]], np.uint8))
    assert load_image(grey)[0].tolist() == [[7, 7, 7], [250, 250, 250]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red
    path = saved(tmp_path, cmyk, "c.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    red = read_image(path)[0, 0].astype(int)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_exif_orientation_applied(tmp_path):
    """Orientation 6 (rotate 90 clockwise to view): a 4 x 2 stored image is shown 2 wide, 4 high."""
    stored = np.zeros((2, 4, 3), np.uint8)
    stored[0, 0] = (255, 0, 0)  # top-left red
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(tmp_path, Image.fromarray(stored), "phone.png", exif=exif.tobytes())
    rgb = read_image(path)
    assert rgb.shape == (4, 2, 3)
    assert rgb[0, 1].tolist() == [255, 0, 0]  # the top-left corner turned to the top-right
    assert rgb.reshape(-1, 3).tolist().count([255, 0, 0]) == 1


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (truncated) data stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [int(MAX_IMAGE_PIXELS ** 0.5) + 1, 20_000, 70_000])
def test_decompression_bomb_refused_from_the_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(side, side))
    with pytest.raises(InputError, match="decompression bomb") as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_limit_sits_at_pillows_threshold():
    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                                     png_header_only(8, 8)[:-20]])
def test_corrupt_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_missing_and_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="not a file"):
        read_image(tmp_path)


def test_runtime_uses_the_shared_decoder(tmp_path):
    ramp = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000).astype(np.uint16)
    path = saved(tmp_path, Image.fromarray(ramp), "r.png")
    np.testing.assert_array_equal(runtime_load_image(path), read_image(path))
    assert runtime_load_image(path).max() < 255  # 60000 * 255 / 65535 = 233


def test_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (3, 3), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 2
    assert read_image(path)[1, 1].tolist() == [255, 0, 0]


def test_arrays():
    assert load_image(np.zeros((2, 3), np.uint8)).shape == (2, 3, 3)
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((2, 3, 4), np.uint8))
