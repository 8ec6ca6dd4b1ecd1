"""Visualisation helpers: colours at known points, shapes/dtypes, files really written."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ovenet.data import denormalize
from ovenet.vis import colorize, confidence_to_color, flow_to_color, overlay, save_png


def test_colorize_palette_and_black_for_ignore():
    palette = [(10, 20, 30), (200, 100, 0)]
    labels = torch.tensor([[0, 1], [255, 7]])  # 7: beyond the palette
    out = colorize(labels, palette)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out.tolist() == [[[10, 20, 30], [200, 100, 0]], [[0, 0, 0], [0, 0, 0]]]
    # 255 stays black even when the palette is long enough to have an entry for it.
    assert colorize(np.array([[255]]), [(9, 9, 9)] * 256).tolist() == [[[0, 0, 0]]]
    with pytest.raises(ValueError, match="H, W"):
        colorize(np.zeros((1, 2, 2)), palette)


def test_overlay_blends():
    image = np.full((2, 3, 3), 100, np.uint8)
    color = np.full((2, 3, 3), 200, np.uint8)
    assert (overlay(image, color, alpha=0.5) == 150).all()
    assert (overlay(image, color, alpha=0.0) == 100).all()
    assert (overlay(image, color, alpha=0.25) == 125).all()
    with pytest.raises(ValueError):
        overlay(image, color[:1])


def _unit(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([math.cos(a), math.sin(a)]).reshape(2, 1, 1)


@pytest.mark.parametrize(
    "angle, expected",
    [
        (0, (255, 0, 0)),  # +x: red
        (90, (255, 229, 0)),  # +y (down in the image): yellow-orange, between red and green
        (180, (0, 209, 255)),  # -x: cyan-blue
        (270, (88, 0, 255)),  # -y: blue-violet
    ],
)
def test_flow_wheel_at_known_angles(angle, expected):
    field = np.concatenate([_unit(angle), np.zeros((2, 1, 1))], axis=2)  # second pixel: zero vector
    out = flow_to_color(field)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    assert tuple(out[0, 0]) == expected
    assert tuple(out[0, 1]) == (255, 255, 255)  # zero vector is white


def test_flow_small_vectors_are_light_and_long_ones_dark():
    field = torch.tensor([[[0.5, 1.0, 2.0]], [[0.0, 0.0, 0.0]]])  # all pointing +x
    out = flow_to_color(field, max_norm=1.0)
    assert out[0, 0].tolist() == [255, 127, 127]  # half length: half saturated
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[0, 2].tolist() == [191, 0, 0]  # beyond max_norm: darkened by 0.75
    assert (flow_to_color(np.zeros((2, 3, 4))) == 255).all()  # all-zero field
    with pytest.raises(ValueError, match="2, H, W"):
        flow_to_color(np.zeros((3, 4, 4)))


def test_confidence_colormap():
    conf = torch.tensor([[0.0, 0.5, 1.0, float("nan")]])
    out = confidence_to_color(conf)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, 0].tolist() == [68, 1, 84]  # viridis ends
    assert out[0, 2].tolist() == [253, 231, 37]
    assert out[0, 3].tolist() == [0, 0, 0]
    luminance = out[0, :3].astype(float) @ [0.299, 0.587, 0.114]
    assert luminance[0] < luminance[1] < luminance[2]  # monotone lightness


def test_confidence_colormap_close_to_matplotlib_viridis():
    matplotlib = pytest.importorskip("matplotlib")
    t = np.linspace(0, 1, 257)
    reference = matplotlib.colormaps["viridis"](t)[:, :3] * 255
    assert np.abs(confidence_to_color(t[None])[0] - reference).max() < 6


def test_denormalize_inverts_imagenet_normalisation():
    rgb = np.array([[[0, 128, 255], [10, 20, 30]]], np.uint8)  # 1x2x3
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalized = torch.from_numpy(((rgb / 255.0 - mean) / std).transpose(2, 0, 1)).float()
    for tensor in (normalized, normalized[None]):
        out = denormalize(tensor)
        assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
        assert out.tolist() == rgb.tolist()


def test_save_png_writes_readable_files(tmp_path):
    color = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    path = save_png(tmp_path / "sub" / "color.png", color)
    assert path.exists() and np.array_equal(np.array(Image.open(path)), color)
    ids = torch.tensor([[0, 33000], [26001, 7]], dtype=torch.int32).numpy().astype(np.uint16)
    path16 = save_png(tmp_path / "ids.png", ids)
    assert np.array_equal(np.array(Image.open(path16)), ids)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "bad.png", np.zeros((2, 2), np.float32))


def test_keys_sit_in_the_top_right_corner_and_leave_the_rest():
    from ovenet.vis import with_key

    field = np.zeros((2, 60, 80))
    field[0] = 1.0  # every offset points right: red everywhere
    image = flow_to_color(field)
    keyed = with_key(image, "offsets")
    side = 60 // 5
    assert (keyed[side + 2 :] == image[side + 2 :]).all() and (keyed[:, : 80 - side - 2] == image[:, : 80 - side - 2]).all()
    key = keyed[1 : side + 1, 80 - side - 1 : 79].astype(int)
    right, left = key[side // 2, -2], key[side // 2, 1]  # the wheel's +x (red) and -x (cyan) ends
    assert right[0] > 200 and right[2] < 120 and left[0] < 120 and left[2] > 150
    bar = with_key(confidence_to_color(np.full((60, 80), 0.5)), "confidence")[1 : side + 1, -2]
    assert (bar[0] == confidence_to_color(np.ones((1, 1)))[0, 0]).all()  # 1 on top
    assert (bar[-1] == confidence_to_color(np.zeros((1, 1)))[0, 0]).all()  # 0 at the bottom
    assert (with_key(image[:5, :5], "offsets") == image[:5, :5]).all()  # no room: unchanged


def test_the_confidence_key_has_ticks_and_labels_at_1_half_and_0():
    from ovenet.vis import with_key

    image = confidence_to_color(np.full((360, 480), 0.5))
    keyed = with_key(image, "confidence").astype(int)
    side = 360 // 5
    bar_left = 480 - 1 - max(3, side // 4)  # the bar's first column (it ends one pixel from the right edge)
    assert (keyed[1 : side + 1, bar_left] == confidence_to_color(np.linspace(1, 0, side)[:, None])[:, 0]).all()
    tick_column = keyed[1 : side + 1, bar_left - 1]
    black = np.flatnonzero((tick_column == 0).all(axis=1))
    assert black.tolist() == [0, round(0.5 * (side - 1)), side - 1]  # ticks at the rows of 1, 0.5 and 0
    labels = keyed[1 : side + 1, bar_left - 24 : bar_left - 4].min(axis=2) < 128  # dark text left of the ticks
    for row in black:
        assert labels[max(0, row - 6) : row + 7].any(), row
    assert not labels[16:28].any()  # nothing between the labels of 1 and 0.5
    assert (keyed[side + 2 :] == image[side + 2 :]).all() and (keyed[:, :420] == image[:, :420]).all()
