"""The CamVid study's paired statistics (experiments/camvid/stats.py) on hand-computed cases; no data, no models."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

STATS = Path(__file__).resolve().parents[1] / "experiments" / "camvid" / "stats.py"


@pytest.fixture(scope="module")
def stats():
    spec = importlib.util.spec_from_file_location("camvid_stats", STATS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


def test_paired_summary_by_hand(stats):
    # diffs 2, 4, 6: mean 4; sample sd sqrt(((-2)^2 + 0 + 2^2) / 2) = 2; se 2/sqrt(3) = 1.154701;
    # t_{0.975, 2} = 4.3027, half width 4.968273: interval [-0.968273, 8.968273]; all three positive
    s = stats.paired_summary([2.0, 4.0, 6.0])
    assert s["n"] == 3 and close(s["mean"], 4.0) and close(s["sd"], 2.0)
    assert close(s["half_width"], 4.968273)
    assert close(s["ci95"][0], -0.968273) and close(s["ci95"][1], 8.968273)
    assert (s["positive"], s["negative"]) == (3, 0)


def test_paired_summary_signs_and_four_values(stats):
    # diffs 1, 2, 3, -1: mean 1.25; squared deviations 0.0625 + 0.5625 + 3.0625 + 5.0625 = 8.75, var 8.75/3,
    # sd 1.707825; half width 3.1824 * 1.707825 / 2 = 2.717492; a zero difference counts as neither sign
    s = stats.paired_summary([1.0, 2.0, 3.0, -1.0])
    assert close(s["mean"], 1.25) and close(s["sd"], 1.707825) and close(s["half_width"], 2.717492)
    assert (s["positive"], s["negative"]) == (3, 1)
    z = stats.paired_summary([0.0, 1.0, -1.0])
    assert (z["positive"], z["negative"]) == (1, 1)
    one = stats.paired_summary([5.0])
    assert one["n"] == 1 and math.isnan(one["half_width"])


def test_t_table(stats):
    assert stats.t_critical(1) == pytest.approx(12.7062) and stats.t_critical(4) == pytest.approx(2.7764)
    assert stats.t_critical(30) == pytest.approx(2.0423) and stats.t_critical(200) == pytest.approx(1.96)
    with pytest.raises(ValueError):
        stats.t_critical(0)


def run(variant: str, seed: int, miou: float, bmiou: float, s_i: float | None = None) -> dict:
    r = {"variant": variant, "seed": seed, "miou": miou, "boundary_miou": bmiou}
    if s_i is not None:
        r["analysis"] = {"initial": {"miou": s_i, "boundary_miou": bmiou - 0.01},
                         "final": {"miou": miou, "boundary_miou": bmiou}}
    return r


def test_differences_pair_by_seed(stats):
    # ovenet has seeds 1, 2, 3; baseline only 1 and 3 (seed 2 did not finish): only 1 and 3 are paired,
    # and each difference is taken within its seed (0.40 - 0.30, 0.35 - 0.38), in points
    runs = {"ovenet": {1: run("ovenet", 1, 0.40, 0.20, 0.39), 2: run("ovenet", 2, 0.50, 0.30, 0.45),
                       3: run("ovenet", 3, 0.35, 0.25, 0.35)},
            "baseline": {1: run("baseline", 1, 0.30, 0.22), 3: run("baseline", 3, 0.38, 0.20)}}
    d = stats.differences(runs)
    m = d["ovenet - baseline"]["miou"]
    assert d["ovenet - baseline"]["miou"]["seeds"] == [1, 3]
    assert close(m["values"][0], 10.0) and close(m["values"][1], -3.0) and close(m["mean"], 3.5)
    assert (m["positive"], m["negative"]) == (1, 1)
    b = d["ovenet - baseline"]["boundary_miou"]
    assert close(b["values"][0], -2.0) and close(b["values"][1], 5.0)
    # S_f - S_i within OVeNet over all three seeds: +1, +5, 0 points (mean 2, one seed with no change)
    f = d["ovenet: S_f - S_i"]["miou"]
    assert f["seeds"] == [1, 2, 3] and close(f["mean"], 2.0) and (f["positive"], f["negative"]) == (2, 0)
