"""Shipped configs: every one loads, builds a valid model spec, follows its recipe, and the families differ only
where they should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ovenet.cli.main import main
from ovenet.config import CONFIG_DIR, _flatten, load_config, resolve_config_path
from ovenet.data import dataset_info
from ovenet.models import build_model
from ovenet.models.ovenet import model_spec

ALL = sorted(CONFIG_DIR.rglob("*.yaml"))
USABLE = [p for p in ALL if not p.name.startswith("_")]


def flat(name: str) -> dict:
    return _flatten(load_config(name).to_dict())


def differences(a: str, b: str) -> dict:
    fa, fb = flat(a), flat(b)
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k] and k != "name"}


def test_the_expected_families_are_shipped():
    names = {p.stem for p in USABLE}
    for dataset in ("cityscapes", "acdc", "ade20k"):
        for variant in ("hrnetv2_w48", "hrnetv2_w48_ovenet", "hrnetv2_w48_ocr", "hrnetv2_w48_ocr_ovenet"):
            assert f"{dataset}_{variant}" in names
    assert {"camvid_hrnetv2_w18s", "camvid_hrnetv2_w18s_ovenet", "camvid_hrnetv2_w18", "quickstart"} <= names
    assert len([n for n in names if n.startswith("camvid_ablation_")]) >= 5


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_loads_and_has_a_valid_model(path: Path):
    cfg = load_config(path)
    spec = model_spec(cfg.model)  # validates arch / stages / branch modules without building weights
    assert {"STAGE1", "STAGE4"} <= set(spec)
    if cfg.model.offset.enabled:
        assert f"STAGE{cfg.model.offset.branch_stage}_2" in spec
    # The model's class count is the dataset's.
    assert cfg.model.num_classes == dataset_info(cfg.data.name, cfg.data.num_classes)[0]
    if not path.name.startswith("_"):
        assert cfg.name == path.stem  # run folders are named after the config
        assert path.read_text().startswith("# ")  # the one-line description `ovenet configs` shows


def test_names_are_unique_so_shipped_names_resolve_to_their_file():
    stems = [p.stem for p in ALL]
    assert len(stems) == len(set(stems))
    for p in USABLE:
        assert resolve_config_path(p.stem) == p


@pytest.mark.parametrize("name", [p.stem for p in USABLE if "w48" not in p.stem])
def test_small_models_build(name: str):
    cfg = load_config(name)
    with torch.device("meta"):  # shapes only: fast
        model = build_model(cfg.model)
    assert model.is_ovenet == cfg.model.offset.enabled
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_w48_ocr_ovenet_has_the_official_parameter_count():
    # official_code_notes 1.2 [checked]: 103.31 M for HRNetV2-W48 + OCR + offset branch at stage 4.
    with torch.device("meta"):
        model = build_model(load_config("cityscapes_hrnetv2_w48_ocr_ovenet").model)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 103.31


def test_cityscapes_follows_the_paper_recipe():
    for name in ("cityscapes_hrnetv2_w48", "cityscapes_hrnetv2_w48_ovenet", "cityscapes_hrnetv2_w48_ocr",
                 "cityscapes_hrnetv2_w48_ocr_ovenet"):
        cfg = load_config(name)
        assert cfg.data.name == "cityscapes" and cfg.data.crop_size == [512, 1024] and cfg.data.base_size == 2048
        assert cfg.data.scale_range == [0.5, 2.0] and cfg.data.flip
        assert cfg.train.batch_size * 4 == 12 and cfg.train.epochs == 484
        assert cfg.train.lr == 0.01 and cfg.train.weight_decay == 5e-4 and cfg.train.momentum == 0.9
        assert (cfg.loss.type, cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept) == ("ohem", 0.9, 131072)
        assert cfg.model.offset.tau == 0.5 and cfg.model.offset.branch_stage == 4
        assert cfg.model.arch == "hrnetv2_w48"
        assert cfg.eval.mode == "official" and cfg.eval.scales == [1.0]  # --paper-scales: the official protocol
    text = (CONFIG_DIR / "cityscapes" / "_base_cityscapes.yaml").read_text()
    for note in ("0.2", "class-weighted CE", "trainval", "2.1", "10", "0.5, 0.75, 1.0, 1.25, 1.5, 1.75"):
        assert note in text  # the official differences and the paper test scales are documented


def test_acdc_ade20k_camvid_recipes():
    acdc = load_config("acdc_hrnetv2_w48_ovenet")
    assert acdc.data.name == "acdc" and acdc.data.crop_size == [540, 960] and acdc.data.base_size == 1920
    assert acdc.loss.type == "ohem" and acdc.train.epochs == 484
    ade = load_config("ade20k_hrnetv2_w48_ocr_ovenet")
    assert ade.model.num_classes == 150 and ade.data.crop_size == [520, 520] and ade.data.base_size == 520
    assert (ade.train.lr, ade.train.weight_decay, ade.train.epochs) == (0.02, 1e-4, 120)
    assert ade.data.eval_resize_short == 520 and ade.loss.type == "ohem"
    cam = load_config("camvid_hrnetv2_w18s_ovenet")
    assert cam.data.crop_size == [360, 480] and cam.data.base_size == 480 and cam.model.pretrained is None
    assert cam.model.arch == "hrnetv2_w18_small_v2" and cam.train.batch_size == 16


def test_official_recipe_config_sets_the_official_choices():
    d = differences("cityscapes_hrnetv2_w48_ocr_ovenet", "cityscapes_hrnetv2_w48_ocr_ovenet_official")
    assert d["model.offset.tau"] == (0.5, 0.2)
    assert d["loss.type"] == ("ohem", "ce") and d["loss.class_weights"] == (None, "cityscapes")
    assert d["data.train_split"] == ("train", "trainval")
    assert d["train.amp"] == ("bf16", "fp32")  # the official code trains and validates in fp32
    # One sampling convention: the official confidence loss reads seeds with align_corners=False, as S_s must.
    assert d["model.offset.sampling"] == ("exact", "official") and d["loss.confidence"] == ("paper", "official")


def test_every_shipped_recipe_reads_seeds_one_way():
    """S_s and the confidence target read seeds in the same convention: loss.confidence official (always
    align_corners=False) goes with model.offset.sampling official."""
    from ovenet.cli.commands import shipped_configs

    for path in shipped_configs():
        cfg = load_config(str(path))
        if cfg.loss.confidence == "official":
            assert cfg.model.offset.sampling == "official", path.name


@pytest.mark.parametrize("dataset,arch", [("cityscapes", "hrnetv2_w48"), ("cityscapes", "hrnetv2_w48_ocr"),
                                          ("acdc", "hrnetv2_w48"), ("acdc", "hrnetv2_w48_ocr"),
                                          ("ade20k", "hrnetv2_w48"), ("ade20k", "hrnetv2_w48_ocr"),
                                          ("camvid", "hrnetv2_w18s"), ("camvid", "hrnetv2_w18")])
def test_baseline_and_ovenet_are_one_flag_apart(dataset: str, arch: str):
    assert differences(f"{dataset}_{arch}", f"{dataset}_{arch}_ovenet") == {
        "model.offset.enabled": (False, True)}


@pytest.mark.parametrize("name,expected", [
    ("camvid_ablation_tau0.2", {"model.offset.tau": 0.2}),
    ("camvid_ablation_tau1.0", {"model.offset.tau": 1.0}),
    ("camvid_ablation_branch3", {"model.offset.branch_stage": 3}),
    ("camvid_ablation_ce", {"loss.type": "ce"}),
    ("camvid_ablation_no_confidence", {"loss.confidence": "none"}),
    ("camvid_ablation_tau0.2_ce", {"model.offset.tau": 0.2, "loss.type": "ce"}),
    ("camvid_ablation_tau0.2_branch3", {"model.offset.tau": 0.2, "model.offset.branch_stage": 3}),
])
def test_ablations_change_only_their_factor(name: str, expected: dict):
    d = differences("camvid_hrnetv2_w18s_ovenet", name)
    assert {k: new for k, (_, new) in d.items()} == expected


def test_quickstart_config_is_small_and_synthetic():
    cfg = load_config("quickstart")
    assert cfg.data.name == "synthetic" and cfg.model.offset.enabled and cfg.model.pretrained is None
    assert cfg.model.num_classes == dataset_info("synthetic")[0]
    assert cfg.data.image_size[0] * cfg.data.image_size[1] <= 160 * 96


def test_unknown_key_in_a_yaml_gives_the_nearest_spelling_through_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: camvid_hrnetv2_w18s_ovenet\ntrain:\n  learning_rate: 0.1\n  bach_size: 4\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]  # one line, no traceback
    assert err.startswith("ovenet: error: unknown config key 'train.learning_rate'")
    assert "valid keys:" in err and " lr," in err  # no close spelling: the valid keys are listed instead

    bad.write_text("_base_: camvid_hrnetv2_w18s_ovenet\nmodel:\n  offest:\n    tau: 0.2\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == "ovenet: error: unknown config key 'model.offest'; did you mean 'model.offset'?\n"


@pytest.mark.parametrize("spelling,value", [("1e-3", 1e-3), ("5E-4", 5e-4), (".02", 0.02), ("2", 2.0),
                                            ("1_000.5", 1000.5), ("0.01", 0.01)])
def test_every_python_float_spelling_works_on_the_command_line_and_in_yaml(tmp_path, spelling, value):
    cfg = load_config("camvid_hrnetv2_w18s_ovenet", [f"train.lr={spelling}", f"loss.class_weights=[{spelling}, 1]",
                                                     f"data.scale_range=[{spelling}, 2e3]"])
    assert cfg.train.lr == value and isinstance(cfg.train.lr, float)
    assert cfg.loss.class_weights == [value, 1.0] and cfg.data.scale_range == [value, 2000.0]
    path = tmp_path / "lr.yaml"
    path.write_text(f"_base_: camvid_hrnetv2_w18s_ovenet\ntrain:\n  lr: {spelling}\n  weight_decay: 1e-4\n")
    cfg = load_config(path)
    assert cfg.train.lr == value and cfg.train.weight_decay == 1e-4


def test_float_spellings_do_not_leak_into_other_types():
    from ovenet.errors import ConfigError

    assert load_config(None, ["loss.class_weights=cityscapes"]).loss.class_weights == "cityscapes"
    for override in ("train.iters=1e3", "train.lr=fast", "train.lr=true", "train.batch_size=2.0"):
        with pytest.raises(ConfigError, match="wrong type"):
            load_config(None, [override])


@pytest.mark.parametrize("path", USABLE, ids=lambda p: p.stem)
def test_no_shipped_config_needs_an_optional_package(path: Path):
    """TensorBoard is an extra (ovenet[tensorboard]): a shipped recipe that switched it on printed a notice on
    every run of a default install."""
    assert load_config(path).train.tensorboard is False


def test_one_precision_vocabulary_and_old_spellings_still_load():
    """train.amp and --precision both say fp32/bf16/fp16; 'none', what configs and checkpoints said before,
    reads as fp32."""
    assert load_config(None, ["train.amp=none"]).train.amp == "fp32"
    assert load_config(None, ["train.amp=fp32"]).train.amp == "fp32"
    from ovenet.errors import ConfigError

    with pytest.raises(ConfigError, match="is not one of \\['fp32', 'bf16', 'fp16'\\]"):
        load_config(None, ["train.amp=float16"])


@pytest.mark.parametrize("override", ["train.ckpt_every=0", "train.log_every=0", "train.val_every=-1"])
def test_intervals_that_would_crash_the_loop_are_config_errors(override):
    from ovenet.errors import ConfigError

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])
