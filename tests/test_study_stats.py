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


def load_module(name: str, path: Path):
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_per_position_r2_on_hand_made_fields():
    """R^2 of a fixed per-position field (analyze.py): 1 for one field copied to every image, ~0 for per-image
    noise or per-image shifts, var_f / (var_f + var_noise) for a field plus noise, None for zero offsets."""
    import torch

    analyze = load_module("camvid_analyze", EXPERIMENTS / "camvid" / "analyze.py")
    g = torch.Generator().manual_seed(0)
    field = 2.0 * torch.randn(1, 2, 12, 16, generator=g) + torch.tensor([1.0, -3.0]).view(1, 2, 1, 1)
    fixed = analyze.per_position_r2(field.expand(20, -1, -1, -1))
    assert abs(fixed["r2"] - 1.0) < 1e-12 and abs(fixed["r2_x"] - 1.0) < 1e-12 and fixed["images"] == 20
    assert fixed["size"] == [12, 16] and len(fixed["row_mean_dy_px"]) == 12
    assert close(fixed["row_mean_dy_px"][3], round(field[0, 1, 3].mean().item(), 3))
    noise = analyze.per_position_r2(torch.randn(400, 2, 12, 16, generator=g))
    assert 0 <= noise["r2"] < 0.01  # expected 1/400 by chance
    shifts = analyze.per_position_r2(torch.randn(400, 2, 1, 1, generator=g).expand(-1, -1, 12, 16))
    assert abs(shifts["r2"]) < 0.01
    mixed = torch.randn(400, 2, 12, 16, generator=g) + field
    var_f = field.var(dim=(2, 3), unbiased=False).mean().item()  # the field's own spread over positions
    expected = 1 - (399 / 400) / (var_f + 1)  # within-position SS of unit noise over the total SS
    assert abs(analyze.per_position_r2(mixed)["r2"] - expected) < 0.02
    assert analyze.per_position_r2(torch.zeros(5, 2, 4, 4))["r2"] is None


def write_runs(folder: Path, rows: list[tuple]) -> None:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for variant, seed, miou, r2 in rows:
        r = {"variant": variant, "seed": seed, "miou": miou, "boundary_miou": miou / 2}
        if r2 is not None:
            r["analysis"] = {"initial": {"miou": miou - 0.01}, "final": {"miou": miou},
                             "offset_field": {"r2": r2, "field_rms_px": 2 * r2}}
        (folder / f"{variant}_seed{seed}.json").write_text(json.dumps(r))


def test_registered_tables_on_a_study_half_done(tmp_path):
    """The registered study's tables from whatever runs exist: seeds per arm, paired differences over the seeds
    both arms finished, the fixed-field R^2, and new - old paired by seed against the old study."""
    pretrained = load_module("pretrained_stats", EXPERIMENTS / "pretrained" / "stats.py")
    c = "lite0_coarse_"
    write_runs(tmp_path / "new", [(c + "baseline", 304, 0.30, None), (c + "baseline", 305, 0.32, None),
                                  (c + "baseline", 306, 0.31, None), (c + "ovenet", 304, 0.36, 0.70),
                                  (c + "ovenet", 305, 0.35, 0.60), (c + "ovenet", 306, 0.40, 0.65),
                                  (c + "zero_offset", 304, 0.33, None), (c + "zero_offset", 305, 0.34, None),
                                  (c + "content_free", 304, 0.37, 1.0)])
    write_runs(tmp_path / "old", [(c + "baseline", s, 0.25, None) for s in range(304, 309)])
    runs, old = pretrained.merged([tmp_path / "new"]), pretrained.merged([tmp_path / "old"])
    text, summary = pretrained.registered_tables(runs, old)
    coarse = summary["coarse head"]
    assert "concat head" not in summary and coarse["seeds"]["zero-offset"] == [304, 305]
    assert coarse["seeds"]["step-size"] == [] and "| step-size | lite0_coarse_sem2 | 0/5 |" in text
    # OVeNet - zero-offset over seeds 304, 305 only: +3 and +1 points (mean +2, 2/2 positive)
    z = coarse["OVeNet - zero-offset"]["miou"]
    assert z["n"] == 2 and close(z["mean"], 0.02) and z["positive"] == 2
    assert coarse["content-free - baseline"]["miou"]["n"] == 1 and coarse["OVeNet - step-size"]["miou"]["n"] == 0
    # the new baseline against the old one, seed by seed: +5, +7, +6 points
    lift = coarse["baseline: new - old"]
    assert lift["n"] == 3 and close(lift["mean"], 0.06) and lift["positive"] == 3
    assert "| OVeNet | lite0_coarse_ovenet | 3/5 | 37.00 ± 2.65 |" in text and "| 0.65 (0.60-0.70) | 1.30 |" in text
    assert "+6.00 [" in text and "(3/3 > 0)" in text and "commit): unrecorded (9)" in text


def test_every_study_variant_loads_and_the_registered_arms_are_the_controls():
    """Every arm of study.py is a shipped config plus overrides the config accepts (a control the config refuses,
    e.g. zero offsets with official sampling, would fail here, not hours into a study); the registered study's
    step-size arms double exactly the one semantic loss, to OVeNet's 1 + kappa + lambda, and its content-free arm
    is the coarse OVeNet with the coordinate head."""
    from ovenet.config import load_config

    study = load_module("camvid_study", EXPERIMENTS / "camvid" / "study.py")
    table = study.variants(1.5, 4.0)
    for name, variant in table.items():
        load_config(variant.config, list(variant.overrides))
    arms = study.STUDIES["registered"] + study.STUDIES["registered_concat"]
    assert set(arms) <= set(table) and len(arms) == 9
    ovenet = load_config(table["lite0_coarse_ovenet"].config)
    for sem2, ove in (("lite0_coarse_sem2", "lite0_coarse_ovenet"), ("lite0_sem2", "lite0_ovenet")):
        cfg = load_config(table[sem2].config, list(table[sem2].overrides))
        other = load_config(table[ove].config, list(table[ove].overrides))
        assert not cfg.model.offset.enabled and cfg.model.head == other.model.head
        assert cfg.loss.weight_semantic == 1 + ovenet.loss.weight_seed + ovenet.loss.weight_initial == 2.0
    free = load_config(table["lite0_coarse_content_free"].config, list(table["lite0_coarse_content_free"].overrides))
    assert free.model.offset.content_free and free.model.head == "coarse" and not free.model.offset.zero_offsets
