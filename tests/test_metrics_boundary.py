"""Boundary (trimap) IoU on hand-computed label maps."""

import pytest
import torch

from ovenet.metrics import BoundaryConfusion, ConfusionMatrix, boundary_band

# Two vertical halves: class 0 in columns 0-2, class 1 in columns 3-5.
TARGET = torch.tensor([[0, 0, 0, 1, 1, 1]] * 6)
# The prediction puts the edge one column too far left.
PRED = torch.tensor([[0, 0, 1, 1, 1, 1]] * 6)


def test_band_of_a_straight_edge():
    assert boundary_band(TARGET, width=0)[0].tolist() == [False, False, True, True, False, False]
    assert boundary_band(TARGET, width=1)[0].tolist() == [False, True, True, True, True, False]
    assert boundary_band(TARGET, width=3).all()


@pytest.mark.parametrize(
    "width, matrix, iou",
    [
        (0, [[0, 6], [0, 6]], [0.0, 6 / 12]),  # columns 2 and 3 only
        (1, [[6, 6], [0, 12]], [6 / 12, 12 / 18]),  # columns 1 to 4
        (3, [[12, 6], [0, 18]], [12 / 18, 18 / 24]),  # the whole image = plain IoU
    ],
)
def test_boundary_iou_hand_computed(width, matrix, iou):
    metric = BoundaryConfusion(2, width=width)
    metric.update(PRED[None], TARGET[None].to(torch.uint8))
    assert metric.matrix.tolist() == matrix
    result = metric.compute()
    assert result["iou"] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(sum(iou) / 2)


def test_full_band_equals_plain_confusion():
    plain = ConfusionMatrix(2)
    plain.update(PRED, TARGET)
    banded = BoundaryConfusion(2, width=3)
    banded.update(PRED, TARGET)
    assert banded.compute() == plain.compute()


def test_diagonal_neighbours_count():
    target = torch.zeros(5, 5, dtype=torch.long)
    target[2, 2] = 1
    band = boundary_band(target, width=0)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1:4, 1:4] = True  # the 8-neighbourhood, diagonals included
    assert torch.equal(band, expected)


def test_ignore_edges_are_configurable():
    target = torch.zeros(7, 7, dtype=torch.long)
    target[2:5, 2:5] = 255
    band = boundary_band(target, width=0)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[1:6, 1:6] = True
    expected[3, 3] = False  # its window is all ignore: no edge
    assert torch.equal(band, expected)
    assert not boundary_band(target, width=0, ignore_is_boundary=False).any()

    counted = BoundaryConfusion(2, width=0)
    counted.update(torch.zeros_like(target), target)
    assert counted.matrix.tolist() == [
        [16, 0],
        [0, 0],
    ]  # the ring around the block; ignore pixels never count
    not_counted = BoundaryConfusion(2, width=0, ignore_is_boundary=False)
    not_counted.update(torch.zeros_like(target), target)
    assert not_counted.matrix.sum() == 0


def test_merge_state_and_errors():
    a, b = BoundaryConfusion(2, width=1), BoundaryConfusion(2, width=1)
    a.update(PRED, TARGET)
    b.update(PRED, TARGET)
    a.merge(b)
    assert a.matrix.tolist() == [[12, 12], [0, 24]]
    restored = BoundaryConfusion(2, width=1)
    restored.load_state_dict(a.state_dict())
    assert restored.compute() == a.compute()
    with pytest.raises(ValueError, match="width"):
        BoundaryConfusion(2, width=2).merge(a)
    with pytest.raises(ValueError, match="width"):
        BoundaryConfusion(2, width=-1)
    with pytest.raises(ValueError, match="shape"):
        a.update(PRED, TARGET[:3])
