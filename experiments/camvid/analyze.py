"""What the offset head does on the validation set of one trained OVeNet checkpoint.

    python experiments/camvid/analyze.py RUN/best.pth --data-root ../shared/data/camvid --out RUN/analysis.json

Reports, single-scale whole-image: mIoU and boundary mIoU of S_i (initial), S_s (seed) and S_f (final); offset
length statistics in full-resolution pixels, also near and away from boundaries (``by_region``); the confidence
histogram and mean, inside and outside the boundary band; and
where S_s beats S_i (pixels S_s gets right and S_i wrong, and the reverse), near boundaries and in the interior;
and how much of the offsets is one fixed per-position field, the same for every image (``offset_field``: the R^2
of the per-position mean over the val images of the most common size, see :func:`per_position_r2`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ovenet
from ovenet.data import build_dataset
from ovenet.metrics import BoundaryConfusion, ConfusionMatrix
from ovenet.metrics.boundary import boundary_band
from ovenet.geometry import resize_to_pixels

HEADS = {"initial": "logits_initial", "seed": "logits_seed", "final": "logits_final"}


def per_position_r2(offsets: torch.Tensor) -> dict:
    """How much of the offsets (``N x 2 x H x W``: N images of one size, x and y in pixels) one fixed
    per-position field explains: R^2 = 1 - sum (o - mean over images of o at that position)^2 / sum (o - the
    component's grand mean)^2, over images, positions and both components (also per component). 1: every image
    gets the same field (a geometry repair, or the content-free control); ~1/N: nothing position-bound.
    None where the offsets do not vary at all (the zero-offset control)."""
    o = offsets.double()
    field = o.mean(0, keepdim=True)
    within = (o - field).pow(2).sum((0, 2, 3))
    total = (o - o.mean((0, 2, 3), keepdim=True)).pow(2).sum((0, 2, 3))

    def r2(w: torch.Tensor, t: torch.Tensor) -> float | None:
        return 1.0 - float(w / t) if float(t) > 0 else None

    centred = field[0] - field[0].mean((1, 2), keepdim=True)
    return {"r2": r2(within.sum(), total.sum()), "r2_x": r2(within[0], total[0]), "r2_y": r2(within[1], total[1]),
            "images": o.shape[0], "size": list(o.shape[-2:]),
            "field_rms_px": float(centred.pow(2).sum(0).mean().sqrt()),
            "row_mean_dy_px": [round(v, 3) for v in field[0, 1].mean(1).tolist()]}


@torch.inference_mode()
def analyze(checkpoint: Path, data_root: Path | None, device: str = "cpu", width: int = 3) -> dict:
    model = ovenet.load(checkpoint, device=device)
    cfg = model.config
    if data_root is not None:
        cfg.data.root = str(data_root)
    dataset = build_dataset(cfg.data, train=False)
    c = model.num_classes
    conf = {h: ConfusionMatrix(c, device=device) for h in HEADS}
    band_conf = {h: BoundaryConfusion(c, width, device=device) for h in HEADS}
    hist_band, hist_inner = torch.zeros(10, device=device), torch.zeros(10, device=device)
    lengths, region_lengths = [], {"band": [], "interior": []}
    by_size: dict[tuple[int, int], list[torch.Tensor]] = {}  # offsets in pixels of the offset map, per size
    confidence_sum = {"band": 0.0, "interior": 0.0}
    wins = {"seed_right_initial_wrong": [0, 0], "initial_right_seed_wrong": [0, 0]}  # [band, interior]
    for i in range(len(dataset)):
        sample = dataset[i]
        image, label = sample["image"][None].to(device), sample["label"][None].to(device)
        out = model(image)
        size = label.shape[-2:]

        def upsample(t: torch.Tensor) -> torch.Tensor:  # as validation: by the model's grid where it has one
            return resize_to_pixels(t, size, out.grid, model.align_corners, image.shape[-2:])

        preds = {h: upsample(getattr(out, name)).argmax(1) for h, name in HEADS.items()}
        for h in HEADS:
            conf[h].update(preds[h], label)
            band_conf[h].update(preds[h], label)
        band = boundary_band(label, width)
        valid = label != 255
        s_ok, i_ok = preds["seed"] == label, preds["initial"] == label
        for key, mask in (("seed_right_initial_wrong", s_ok & ~i_ok), ("initial_right_seed_wrong", i_ok & ~s_ok)):
            wins[key][0] += int((mask & valid & band).sum())
            wins[key][1] += int((mask & valid & ~band).sum())
        f = upsample(out.confidence)[:, 0]
        hist_band += torch.histc(f[valid & band], bins=10, min=0, max=1)
        hist_inner += torch.histc(f[valid & ~band], bins=10, min=0, max=1)
        h, w = out.offsets.shape[-2:]
        xy = torch.stack([out.offsets[:, 0] * (w - 1) / 2, out.offsets[:, 1] * (h - 1) / 2], 1)
        by_size.setdefault((h, w), []).append(xy.cpu())
        px = xy.norm(dim=1)
        lengths.append((px * size[1] / w).flatten().cpu())  # in full-resolution pixels
        px_full = upsample(px[:, None])[:, 0] * size[1] / w
        for region, mask in (("band", valid & band), ("interior", valid & ~band)):
            region_lengths[region].append(px_full[mask].cpu())
            confidence_sum[region] += float(f[mask].sum())
    lengths = torch.cat(lengths)
    result = {h: {"miou": conf[h].compute()["miou"], "boundary_miou": band_conf[h].compute()["miou"]} for h in HEADS}
    result["offset_px"] = {"mean": lengths.mean().item(), "median": lengths.median().item(),
                           "p90": lengths.quantile(0.9).item() if lengths.numel() < 2**24 else None,
                           "max": lengths.max().item(), "share_over_1px": (lengths > 1).float().mean().item()}
    # Near (within `width` px of a label boundary) and away from boundaries: offset length and mean confidence.
    result["by_region"] = {}
    for region, hist in (("band", hist_band), ("interior", hist_inner)):
        values = torch.cat(region_lengths[region])
        result["by_region"][region] = {
            "offset_px_mean": values.mean().item(), "offset_px_median": values.median().item(),
            "confidence_mean": confidence_sum[region] / max(float(hist.sum()), 1.0), "pixels": values.numel()}
    result["confidence_hist_band"] = (hist_band / hist_band.sum().clamp(min=1)).tolist()
    result["confidence_hist_interior"] = (hist_inner / hist_inner.sum().clamp(min=1)).tolist()
    result["pixels"] = {k: {"band": v[0], "interior": v[1]} for k, v in wins.items()}
    result["offset_field"] = per_position_r2(torch.cat(max(by_size.values(), key=len)))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data-root", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=3, help="boundary band width in pixels")
    args = p.parse_args()
    model_is_ovenet = ovenet.load(args.checkpoint).is_ovenet
    if not model_is_ovenet:
        print("baseline checkpoint: no offset head to analyse")
        return
    result = analyze(args.checkpoint, args.data_root, args.device, args.width)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({h: result[h] for h in HEADS}, indent=2))


if __name__ == "__main__":
    main()
